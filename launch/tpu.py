"""jaxstar's launcher: flags, multi-host start-up, dispatch on `config.stage`.

  python launch/tpu.py --config=configs/pretrain_tiny.py --workdir=workdirs/pretrain_tiny
  python launch/tpu.py --config=configs/pretrain_tiny.py:variant=small --config.num_steps=1000 ...
  python launch/tpu.py --config=configs/quietstar_7b.py --compile_only --num_devices=32

Every host of a TPU pod slice runs the same command; `jax.distributed.initialize()` finds the
others. Elsewhere (CPU or GPU clusters) pass --coordinator_address, --num_processes and
--process_id. Exit status: 0 when done, 143 after a SIGTERM (preemption) checkpoint, 2 on a
user error (a bad flag or config value, a missing or empty file, a checkpoint or mesh that does
not fit), printed as one line; --traceback (or JAXSTAR_TRACEBACK=1) shows its stack instead.

--compile_only lowers and compiles the stage's train step on the config's mesh without reading
data or weights, prints the per-device memory and FLOPs (`jaxstar/compile_plan.py`) and exits;
--num_devices=N runs it on N emulated CPU devices (without it, on the devices present: a TPU
VM's own chips). No --workdir is needed for it.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxstar import allocator  # noqa: E402  pylint: disable=g-import-not-at-top

allocator.ensure()  # re-executes under a caching malloc before JAX is imported (once)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and logs go here.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Emulate this many CPU devices (tests).")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the stack of a user error too.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False,
                                  "Compile the train step, print its memory and FLOPs, exit.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0,
                                    "With --compile_only: compile for this many emulated CPU "
                                    "devices (0: the devices present).")
flags.mark_flags_as_required(["config"])

EXIT_USER_ERROR = 2


def _fail(message: str):
  """Prints the one line and exits 2 at once: by then the run has closed its checkpointer and
  writer, and a normal interpreter exit lets orbax's idle threads print tracebacks about their
  closed event loop after a failed restore, burying the line."""
  print(f"jaxstar: error: {message}", file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(EXIT_USER_ERROR)  # pylint: disable=protected-access


def _parse_flags(argv):
  """absl's parsing, with a bad flag or config override reported as one line (exit 2)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if "--traceback" in argv or os.environ.get("JAXSTAR_TRACEBACK"):
      raise
    _fail(" ".join(str(e).split()))


def _start_jax():
  import jax  # pylint: disable=g-import-not-at-top
  if _NUM_DEVICES.value:  # CPU devices standing in for accelerators: compile their program
    from jaxstar.model import layers  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", _NUM_DEVICES.value)
    layers.set_cpu_layouts(False)
  elif _CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") or os.environ.get(
      "MEGASCALE_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()  # a multi-host TPU slice: the environment says where peers are


def main(argv):
  del argv
  if _NUM_DEVICES.value and not _COMPILE_ONLY.value:
    _fail("--num_devices is for --compile_only (--cpu_devices emulates devices for a real run)")
  if not (_WORKDIR.value or _COMPILE_ONLY.value):
    _fail("flag --workdir must have a value (checkpoints, metrics and logs go there)")
  config = _CONFIG.value
  if _COMPILE_ONLY.value:
    with config.unlocked():
      config.compile_only = True
  _start_jax()
  from jaxstar import errors  # pylint: disable=g-import-not-at-top
  from jaxstar import stages  # pylint: disable=g-import-not-at-top
  try:
    stages.run(config, _WORKDIR.value or "")
  except errors.USER_ERRORS as e:
    if _TRACEBACK.value or os.environ.get("JAXSTAR_TRACEBACK"):
      raise
    _fail(errors.one_line(e))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
