"""Test set-up: 8 fake CPU devices, forced before anything imports JAX."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Entry points turn JAX's persistent compilation cache on by default; tests compile afresh
# (test_compile_cache turns it on explicitly, in subprocesses).
os.environ.setdefault("RLHF_JAX_COMPILATION_CACHE", "off")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end smoke and resume tests")
    config.addinivalue_line("markers", "torch: needs torch for parity with transformers")


@pytest.fixture(scope="session")
def n_devices():
    return jax.device_count()


def require_devices(n):
    """Skip a test when fewer than `n` devices exist, so it is never silently wrong."""
    return pytest.mark.skipif(jax.device_count() < n, reason=f"needs {n} devices")
