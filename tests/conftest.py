"""Test setup, before JAX starts: 8 emulated CPU devices and a persistent compilation cache.

The cache (`.jax_cache/` in the repository, or $JAXSTAR_TEST_CACHE) keeps every compiled
program across tests, runs and the launcher subprocesses the tests start (they inherit the
environment), so a rerun of the suite mostly skips XLA compilation.
"""
import os

from jaxstar import allocator

# `make test` starts pytest through `python -m jaxstar.allocator` (re-executing here would lose
# pytest's captured output streams); a bare `pytest` runs on glibc's malloc. Say which.
print(f"\njaxstar: {allocator.describe()}")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.environ.get("JAXSTAR_TEST_CACHE", os.path.join(_ROOT, ".jax_cache")))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 8, "tests need 8 CPU devices: conftest must run before jax starts"
