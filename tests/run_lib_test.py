"""The run plumbing: the loop reads the devices only at log, eval and checkpoint steps, and the
SIGTERM flag of a one-process run."""
import os
import signal

import pytest
from jax._src import array as array_lib
from jax._src import config as jax_config

from jaxstar import pretrain
from jaxstar import run_lib
from tests import pretrain_test


class HostRead(RuntimeError):
  pass


@pytest.fixture
def cpu_transfer_guard(monkeypatch):
  """Makes `jax.transfer_guard_device_to_host("disallow")` bite on CPU, as on accelerators: a
  read of an array's value under it raises `HostRead`. Yields the list of allowed reads."""
  reads = []
  value = array_lib.ArrayImpl._value

  def guarded(self):
    if jax_config.transfer_guard_device_to_host.value == "disallow":
      raise HostRead(f"device-to-host read of {self.shape} {self.dtype} inside the train loop")
    reads.append(self.shape)
    return value.fget(self)
  monkeypatch.setattr(array_lib.ArrayImpl, "_value", property(guarded))
  yield reads


def _config():
  """The pretrain tests' short run, logging, evaluating and saving at some steps only."""
  return pretrain_test.config(**{"data.seq_len": 16, "eval_data.seq_len": 16, "log_every": 3,
                                 "eval_every": 3, "checkpoint.save_every": 6,
                                 "data.synthetic_docs": 64})


def test_loop_reads_devices_only_at_log_eval_and_checkpoint_steps(tmp_path, cpu_transfer_guard,
                                                                 monkeypatch):
  summary = pretrain.train_and_evaluate(_config(), str(tmp_path / "ok"))
  assert summary["step"] == 6 and cpu_transfer_guard  # the reads at log/eval/save steps happen

  # A per-step host read added to the loop (here: through the step it calls) now fails.
  jit_train_step = run_lib.Run.jit_train_step

  def reading_every_step(self, *args):
    step = jit_train_step(self, *args)

    def read(state, batch):
      state, metrics = step(state, batch)
      float(metrics["loss"])
      return state, metrics
    return read
  monkeypatch.setattr(run_lib.Run, "jit_train_step", reading_every_step)
  with pytest.raises(HostRead, match="inside the train loop"):
    pretrain.train_and_evaluate(_config(), str(tmp_path / "reads"))


def test_sigterm_sets_the_flag_of_a_one_process_run():
  preemption = run_lib.Preemption()
  try:
    assert not preemption.should_stop(1) and not preemption.poll()
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.should_stop(2) and preemption.requested
  finally:
    preemption.close()
  handler = preemption._handle  # pylint: disable=protected-access
  assert signal.getsignal(signal.SIGTERM) is not handler
