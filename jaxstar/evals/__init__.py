"""Evaluation: the Quiet-STaR paper metric and generation-based answer checking.

Host-side pieces (numpy / pure Python, no model) live in `paper_metric` (the probability of the
correct answer after "\\nA:", spec/quietstar.md §5.1) and `answers` (zero-shot and few-shot
chain-of-thought prompts, answer extraction, checking and majority voting, spec §5.2 and
spec/star.md §1.4). Model-side evaluation is built on top of them in the sibling modules.
"""
