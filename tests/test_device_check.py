"""bench/device_check.py on CPU with the tiny preset: the same code a GPU/TPU session runs."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    # One CPU device (no forced host devices): the check builds its mesh from jax.devices().
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "bench/device_check.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_tiny_preset_prints_the_table_and_writes_json(tmp_path):
    out_path = str(tmp_path / "check.json")
    out = _run("--preset", "tiny", "--batch", "8", "--minutes", "3", "--max-iterations", "1",
               "--output", out_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for phase in ("prefill", "decode", "reference", "reward", "update", "iteration"):
        assert f"\n{phase} " in out.stdout, phase
    assert "episodes/s" in out.stdout and "of HBM bandwidth" in out.stdout
    assert "load average" in out.stdout
    info = json.load(open(out_path))
    assert info["device"] == "cpu" and info["batch"] == 8 and len(info["iterations"]) == 1
    assert info["phases"]["update"]["tflops_per_s"] > 0 and info["episodes_per_s"] > 0
    assert info["phases"]["iteration"]["mfu"] is None  # no known peak for a CPU
    assert info["peak_gib"] > 0 and set(info["memory"]) >= {"prefill", "decode", "update"}
    assert {c["dtype"] for c in info["alignment"]} == {"float32", "bfloat16"}
    assert all(c["ok"] for c in info["alignment"]), info["alignment"]


def test_bad_input():
    out = _run("--preset", "2b", "--minutes", "1")
    assert out.returncode == 2 and "invalid choice: '2b'" in out.stderr
    # A device that cannot hold the preset: the needed memory is printed, exit 1.
    out = _run("--preset", "tiny", "--batch", "8", "--minutes", "1",
               "--memory-limit-gib", "0.001")
    assert out.returncode == 1, out.stderr[-3000:]
    assert "does not fit: update needs" in out.stderr and "GiB per device" in out.stderr
    assert "compiled programs" in out.stdout
