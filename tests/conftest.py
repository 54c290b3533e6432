"""Test setup: 8 emulated CPU devices, set before JAX starts its backend."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 8, "tests need 8 CPU devices: conftest must run before jax starts"
