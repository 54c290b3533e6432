"""The memory allocator set-up of jaxstar's processes, done before JAX starts.

XLA:CPU allocates a fresh scratch buffer of hundreds of MiB for every step and frees it after;
glibc's malloc hands such blocks back to the kernel, so the next step page-faults every page in
again. glibc's huge-page tunable makes each of those faults bring in 2 MiB instead of 4 KiB; a
caching allocator (jemalloc with decay off) keeps the pages, at the price of holding them.

`ensure()` runs first in the launcher, the demo and the benchmarks (`make test` starts pytest
through `python -m jaxstar.allocator`): it re-executes the process once, with the same command
line, with glibc's huge-page tunable (`GLIBC_TUNABLE`), or with `LD_PRELOAD` naming a library
the user chose (`CANDIDATES` says why the tunable is the default). It prints one line saying
which. `JAXSTAR_ALLOCATOR` chooses: `auto` (the default: the tunable), `off` (leave malloc
alone), `glibc` (the tunable), a candidate's name, or a path to a shared library.

  python -m jaxstar.allocator COMMAND ...   runs COMMAND under the allocator `ensure` would pick.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import sys

ENV = "JAXSTAR_ALLOCATOR"
ACTIVE = "JAXSTAR_ALLOCATOR_ACTIVE"  # set in the re-executed process: never re-execute twice
GLIBC_TUNABLE = "glibc.malloc.hugetlb=1"  # transparent huge pages for malloc's arenas


@dataclasses.dataclass(frozen=True)
class Allocator:
  """A preloadable malloc: where to look for it and the environment it wants."""
  name: str
  patterns: tuple[str, ...]  # globs, system library folders and site-packages
  env: tuple[tuple[str, str], ...] = ()

  def find(self) -> str | None:
    """The first file matching `patterns`, tried in order (None: not installed)."""
    for pattern in self.patterns:
      found = sorted(glob.glob(pattern))
      if found:
        return found[0]
    return None


def _site_packages() -> list[str]:
  return [p for p in sys.path if p.endswith("site-packages")]


_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
             "/usr/local/lib")

# `python -m benchmarks.vs_torch --allocators as_is,glibc,jemalloc,tcmalloc,mimalloc` on the
# plain train step of the benchmark model, 2-core x86 CPU (README, Benchmarks): jemalloc with
# decay off 0.81-0.83x glibc's step time (with its default decay 0.98x), glibc's huge-page
# tunable 0.84x, mimalloc (purge delay off, large pages) 0.94-0.95x, tcmalloc 2.10 0.97-1.0x.
# On the Quiet-STaR step (`benchmarks.quietstar_step --ahead 12`) none was faster, and jemalloc
# without decay held 1.9 GB of resident memory where glibc (with or without the tunable) held
# 1.0 GB. So `auto` is the tunable: nearly all of the gain, none of the memory; the libraries
# run only when named.
CANDIDATES = (
    Allocator("jemalloc", tuple(f"{d}/libjemalloc.so.2" for d in _LIB_DIRS),
              (("MALLOC_CONF", "dirty_decay_ms:-1,muzzy_decay_ms:-1"),)),
    Allocator("tcmalloc", tuple(f"{d}/libtcmalloc_minimal.so.4" for d in _LIB_DIRS)
              + tuple(f"{d}/libtcmalloc.so.4" for d in _LIB_DIRS),
              # No "large allocation" report on stderr for XLA's big scratch buffers.
              (("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40)),)),
    Allocator("mimalloc", tuple(f"{p}/cmeel.prefix/lib/libmimalloc.so*" for p in _site_packages())
              + tuple(f"{d}/libmimalloc.so*" for d in _LIB_DIRS),
              (("MIMALLOC_PURGE_DELAY", "-1"), ("MIMALLOC_ALLOW_LARGE_OS_PAGES", "1"))),
)


def choose(setting: str | None = None) -> tuple[str, str | None, dict[str, str]]:
  """(name, library path or None, environment to add) for a `JAXSTAR_ALLOCATOR` setting."""
  setting = (setting if setting is not None else os.environ.get(ENV, "auto")).strip() or "auto"
  if setting == "off":
    return "off", None, {}
  tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
  tunable = {"GLIBC_TUNABLES": ":".join(dict.fromkeys(tunables + [GLIBC_TUNABLE]))}
  if setting in ("auto", "glibc"):
    return "glibc", None, tunable
  if os.path.sep in setting:
    if not os.path.isfile(setting):
      raise FileNotFoundError(f"{ENV}={setting!r} is not a file")
    return os.path.basename(setting), setting, {}
  candidate = {c.name: c for c in CANDIDATES}.get(setting)
  if candidate is None:
    raise ValueError(f"{ENV}={setting!r}; choose auto, off, glibc, one of "
                     f"{[c.name for c in CANDIDATES]}, or a path")
  path = candidate.find()
  if path is None:
    return "glibc", None, tunable  # the named library is not installed: the tunable alone
  return candidate.name, path, dict(candidate.env)


def environment(name: str, path: str | None, env: dict[str, str],
                base: dict[str, str] | None = None) -> dict[str, str]:
  """`base` (default: this process's environment) set up to run under allocator `name`."""
  base = dict(os.environ if base is None else base)
  out = dict(base, **env, **{ACTIVE: name})
  if path:
    out["LD_PRELOAD"] = ":".join(filter(None, [path, base.get("LD_PRELOAD")]))
  return out


def clean_environment() -> dict[str, str]:
  """This process's environment without any allocator set-up (for benchmarks comparing them)."""
  names = {ACTIVE, "LD_PRELOAD", "GLIBC_TUNABLES"} | {k for c in CANDIDATES for k, _ in c.env}
  return {k: v for k, v in os.environ.items() if k not in names}


_announced = False  # the start-up line is printed once per process


def ensure(argv: list[str] | None = None) -> None:
  """Re-executes this process under the chosen allocator, once (Linux only), and prints the
  start-up line saying which malloc the process runs on.

  Call it before anything heavy is imported: everything before it runs twice.
  """
  global _announced
  if ACTIVE not in os.environ and sys.platform.startswith("linux"):
    name, path, env = choose()
    if name != "off":
      sys.stdout.flush()
      sys.stderr.flush()
      os.execve(sys.executable, list(argv if argv is not None else sys.orig_argv),
                environment(name, path, env))
  if not _announced:
    _announced = True
    print(f"jaxstar: {describe()}", file=sys.stderr, flush=True)


def describe() -> str:
  """The start-up line: which allocator this process runs under."""
  name = os.environ.get(ACTIVE)
  if not name:
    return f"malloc: glibc's, as is ({ENV}=off, or a process not started by jaxstar)"
  preload = os.environ.get("LD_PRELOAD", "").split(":")[0]
  where = preload or f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}"
  return f"malloc: {name} ({where}); {ENV}=off turns it off"


def main() -> None:
  """`python -m jaxstar.allocator COMMAND ...`: runs COMMAND under the allocator `ensure` would
  pick (as is when it is off or already set up)."""
  if len(sys.argv) < 2:
    raise SystemExit(f"usage: python -m jaxstar.allocator COMMAND [ARGS...]\n{__doc__}")
  name, path, env = choose()
  if name == "off" or os.environ.get(ACTIVE):
    os.execvp(sys.argv[1], sys.argv[1:])
  os.execvpe(sys.argv[1], sys.argv[1:], environment(name, path, env))


if __name__ == "__main__":
  main()
