"""The caching malloc set-up: which library is chosen, and the re-executed process runs on it."""
import os
import subprocess
import sys

import pytest

from jaxstar import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOW = ("from jaxstar import allocator; allocator.ensure(); import os; "
        "preload = os.environ.get('LD_PRELOAD', ''); "
        "print(preload, os.environ.get(allocator.ACTIVE), sep='|'); "
        "print(bool(preload) and os.path.realpath(preload) in open('/proc/self/maps').read())")


def _run(cmd, **env):
  base = dict(allocator.clean_environment(), PYTHONPATH=ROOT, **env)
  return subprocess.run(cmd, env=base, capture_output=True, text=True, timeout=120, check=True)


def test_choose():
  assert allocator.choose("off") == ("off", None, {})
  name, path, env = allocator.choose("glibc")
  assert (name, path) == ("glibc", None) and allocator.GLIBC_TUNABLE in env["GLIBC_TUNABLES"]
  name, path, _ = allocator.choose("auto")
  assert name in [c.name for c in allocator.CANDIDATES] + ["glibc"]
  assert path is None or os.path.isfile(path)
  for candidate in allocator.CANDIDATES:  # by name: that library, or the tunable without it
    named, path, _ = allocator.choose(candidate.name)
    assert named == (candidate.name if path else "glibc")
  with pytest.raises(ValueError, match="JAXSTAR_ALLOCATOR='tmalloc'; choose auto, off"):
    allocator.choose("tmalloc")
  with pytest.raises(FileNotFoundError, match="is not a file"):
    allocator.choose("/nonexistent/libmalloc.so")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_ensure_reexecutes_once_under_the_library():
  name, path, _ = allocator.choose("auto")
  out = _run([sys.executable, "-c", SHOW])
  preload, active = out.stdout.splitlines()[0].split("|")
  assert active == name and preload == (path or "")
  assert out.stdout.splitlines()[1] == str(bool(path))  # the library is mapped in the process
  assert out.stderr.count("jaxstar: malloc: ") == 1 and name in out.stderr
  off = _run([sys.executable, "-c", SHOW], JAXSTAR_ALLOCATOR="off")
  assert off.stdout.splitlines()[0] == "|None" and "glibc's, as is" in off.stderr
  wrapped = _run([sys.executable, "-m", "jaxstar.allocator", sys.executable, "-c", SHOW],
                 JAXSTAR_ALLOCATOR="glibc")
  assert wrapped.stdout.splitlines()[0] == "|glibc"
  assert "GLIBC_TUNABLES=" + allocator.GLIBC_TUNABLE in wrapped.stderr
