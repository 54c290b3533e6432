"""Quiet-STaR hyper-parameters (spec/quietstar.md §4) and their validation."""
from __future__ import annotations

import dataclasses

from jaxstar.errors import UserError
from jaxstar.model.config import REMAT_POLICIES

REWARD_REDUCTIONS = ("sum", "mean")


@dataclasses.dataclass(frozen=True)
class QuietStarConfig:
  """Static settings of the thought passes and the losses.

  Field names follow the official code; the letters are jaxstar's axis letters (the table in
  `jaxstar/model/transformer.py`): `n_ahead` = T + 3 counts start + T sampled tokens + end + 1,
  `n_ahead_talk` = A true tokens scored after each thought, `n_passes` = P.
  """
  n_ahead: int = 12                 # T + 3: T = n_ahead - 3 sampled thought tokens
  n_ahead_talk: int = 4             # A: true tokens ahead scored by the non-myopic loss
  n_passes: int = 2                 # P: thoughts sampled per position (copies of each document)
  policy_weight: float = 1e6        # weight of the REINFORCE term
  reinforce_temperature: float = 3.0  # temperature of the score-function log-probabilities
  base_loss_weight: float = 0.5     # NLL = w * base CE + (1 - w) * mean talk CE
  embedding_scale: float = 100.0    # start/end vectors are stored / this and used * this
  remove_negative_rewards: bool = True  # keep only positive advantages (official)
  reward_reduction: str = "sum"     # sum (official) | mean over the A talk tokens
  original_mode: bool = False       # the no-thought baseline: plain next-token CE
  greedy_eval_thoughts: bool = False  # eval thoughts by argmax (paper), not temperature 1
  remat_logits: bool = False        # recompute [.., V] logits in the backward pass instead of
                                    # keeping their softmax (memory vs. one more lm_head matmul)
  # The thought and talk passes run as a scan over chunks of positions; the backward pass
  # recomputes each chunk as one teacher-forced block, so the live activations are one chunk's
  # (linear in n_ahead), not all of them. chunk_positions=0 runs all positions at once and
  # differentiates the thought and talk passes as they are, nothing recomputed (layers follow
  # the model's remat_policy): the least work, for small models, with memory for all positions
  # and one weight gradient per pass.
  chunk_positions: int = 32         # positions per chunk, or 0
  chunk_remat: str = "dots_no_batch"  # layer remat policy inside a chunk's block pass

  def __post_init__(self):
    if self.original_mode:
      return
    if self.n_ahead < 4:
      raise UserError(f"quietstar.n_ahead={self.n_ahead} must be >= 4 "
                       "(start + at least one sampled token + end + 1)")
    if self.n_ahead_talk < 1:
      raise UserError(f"quietstar.n_ahead_talk={self.n_ahead_talk} must be >= 1")
    if self.n_passes < 1:
      raise UserError(f"quietstar.n_passes={self.n_passes} must be >= 1")
    if self.chunk_positions < 0:
      raise UserError(f"quietstar.chunk_positions={self.chunk_positions} must be >= 0 "
                       "(0: one pass over all positions)")
    if self.chunk_remat not in REMAT_POLICIES:
      raise UserError(f"quietstar.chunk_remat={self.chunk_remat!r}; choose one of "
                       f"{REMAT_POLICIES}")
    if self.reward_reduction not in REWARD_REDUCTIONS:
      raise UserError(f"quietstar.reward_reduction={self.reward_reduction!r}; "
                       f"choose one of {REWARD_REDUCTIONS}")

  @property
  def num_sampled(self) -> int:
    """T, the sampled thought tokens per position: n_ahead - 3."""
    return self.n_ahead - 3

  def check_seq_len(self, seq_len: int) -> None:
    """Raises unless some position has all A talk targets inside a sequence of `seq_len`."""
    if not self.original_mode and seq_len < self.n_ahead_talk + 2:
      raise UserError(f"data.seq_len={seq_len} is too short for quietstar.n_ahead_talk="
                       f"{self.n_ahead_talk}: need at least n_ahead_talk + 2 tokens")
