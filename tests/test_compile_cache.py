"""The persistent compilation cache: a second process loads what the first compiled."""

import os
import subprocess
import sys

import jax

from rlhf_jax import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import jax, jax.numpy as jnp
from rlhf_jax import compile_cache
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else 0)
print("dir", compile_cache.enable("auto"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
x = jax.jit(lambda a: jnp.tanh(a @ a.T).sum())(jnp.ones((64, 64)))
print("hits", len(hits), float(x))
"""


def _run(env):
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return dict(line.split(" ", 1) for line in out.stdout.splitlines())


def test_second_process_hits_the_cache(tmp_path):
    cache = str(tmp_path / "xla")
    env = dict(os.environ, RLHF_JAX_COMPILATION_CACHE=cache)
    first, second = _run(env), _run(env)
    assert first["dir"] == second["dir"] == cache
    assert first["hits"].split()[0] == "0" and os.listdir(cache)
    assert int(second["hits"].split()[0]) >= 1
    # Off by the environment (what the test suite sets) or by config.
    assert _run(dict(os.environ, RLHF_JAX_COMPILATION_CACHE="off"))["dir"] == "None"


def test_setting_off_or_already_set():
    assert compile_cache.enable("") is None
    assert compile_cache.enable(None) is None
    prev = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", "/somewhere/else")
        assert compile_cache.enable("auto") == "/somewhere/else"  # never overridden
    finally:
        jax.config.update("jax_compilation_cache_dir", prev)
