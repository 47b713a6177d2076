"""The ahead-of-time TPU memory check: parsing, fit logic, and compiling the tiny config.

Compiling for TPU topologies needs libtpu (`pip install libtpu`), which CI does not install;
those tests skip. The rest runs anywhere: the same programs compile for the 8 fake CPU devices.
"""

import dataclasses
import importlib.util
import os
import subprocess
import sys

import pytest

from rlhf_jax import aot_check, flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = flops.GIB
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="needs libtpu to compile for TPU topologies (pip install libtpu)")

# What libtpu 0.0.52 says when a program does not fit a v5e device.
OOM_MESSAGE = (
    "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory "
    "required for HLO temporaries (17.89G) exceeds available HBM (15.75G). HLO module: jit_f.")


def load_config(arg="runlocal", name="sentiment"):
    path = os.path.join(ROOT, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# -- topology strings ---------------------------------------------------------------------------

def test_parse_topology():
    t = aot_check.parse_topology("v5e:2x4")
    assert (t.generation, t.grid, t.num_chips, t.name) == ("v5e", (2, 4), 8, "v5e:2x4")
    assert aot_check.parse_topology(" V4:2x2x1 ").name == "v4:2x2x1"


@pytest.mark.parametrize("text, match", [
    ("v5e", "expected GENERATION:GRID"),
    ("v5e:", "expected GENERATION:GRID"),
    ("v5litepod-8", "expected GENERATION:GRID"),
    ("v9:2x2", "unknown TPU generation 'v9'"),
    ("v5e:2x0", "positive integers"),
    ("v5e:2xa", "positive integers"),
    ("v5e:2*4", "positive integers"),
    ("v4:2x2", "a v4 chip grid has 3 dimensions"),
    ("v3:2x2x1", "a v3 chip grid has 2 dimensions"),
])
def test_parse_topology_errors(text, match):
    with pytest.raises(aot_check.TopologyError, match=match):
        aot_check.parse_topology(text)


def test_missing_libtpu_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(aot_check.LibtpuMissingError, match="pip install libtpu"):
        aot_check.topology_devices(aot_check.parse_topology("v5e:2x2"))


# -- memory arithmetic and the "does not fit" message --------------------------------------------

def test_parse_oom():
    needed, available = aot_check.parse_oom(OOM_MESSAGE)
    assert needed == int(17.89 * GIB) and available == int(15.75 * GIB)
    assert aot_check.parse_oom("INTERNAL: something else") is None


def test_check_fits_message():
    aot_check.check_fits(15 * GIB, 16 * GIB)
    aot_check.check_fits(100 * GIB, None)  # unknown limit: nothing to say
    with pytest.raises(aot_check.DoesNotFitError) as e:
        aot_check.check_fits(int(20.5 * GIB), int(15.75 * GIB), where="774M on v5e:2x4 (update)",
                             device_kind="TPU v5 lite")
    msg = str(e.value)
    assert "774M on v5e:2x4 (update) needs 20.50 GiB per device, has 15.75 GiB" in msg
    assert "over by 4.75 GiB" in msg and "nminibatches" in msg and "remat" in msg


def _fake_report(hbm_gib=15.75):
    programs = [
        aot_check.ProgramReport("rollout", argument_bytes=4 * GIB, output_bytes=GIB // 2,
                                temp_bytes=3 * GIB, resident_bytes=2 * GIB, flops=1e12),
        aot_check.ProgramReport("update", argument_bytes=6 * GIB, output_bytes=5 * GIB,
                                alias_bytes=5 * GIB, temp_bytes=4 * GIB, resident_bytes=3 * GIB,
                                freeable_bytes=2 * GIB, flops=3e12),
        aot_check.ProgramReport("reward_train", oom_bytes=30 * GIB // 2),
    ]
    return aot_check.Report(
        topology="v5e:2x4", device_kind="TPU v5 lite", num_devices=8,
        mesh={"data": 1, "fsdp": 8}, hbm_bytes=int(hbm_gib * GIB), programs=programs,
        analytic={"sample": 1.0, "value": 0.0, "reference": 2.0, "reward": 3.0, "update": 4.0,
                  "total": 10.0},
        model="774M")


def test_report_arithmetic_and_table():
    report = _fake_report()
    rollout, update, reward = report.programs
    assert rollout.program_bytes == 7.5 * GIB and rollout.total_bytes == 9.5 * GIB
    # Donated state: 5 GiB of the outputs reuse the arguments.
    assert update.program_bytes == 10 * GIB and update.total_bytes == 13 * GIB
    assert reward.total_bytes == 15 * GIB  # refused by the compiler: what it said it needs
    assert report.peak.name == "reward_train" and report.fits
    assert report.margin_bytes == pytest.approx(0.75 * GIB, abs=1)
    table = aot_check.format_report(report)
    assert "fits: yes (margin +0.75 GiB)" in table
    assert "refused by the compiler" in table
    assert "model FLOPs per PPO iteration: 1.000e+01 (1.250e+00 per device)" in table
    assert report.to_dict()["peak_program"] == "reward_train"
    aot_check.check_report(report)


def test_report_that_does_not_fit():
    report = _fake_report(hbm_gib=12)
    assert not report.fits
    assert "fits: NO (margin -3.00 GiB)" in aot_check.format_report(report)
    with pytest.raises(aot_check.DoesNotFitError, match="needs 15.00 GiB per device, has 12.00"):
        aot_check.check_report(report)


# -- bad input before compiling ------------------------------------------------------------------

def test_batch_that_the_devices_do_not_divide():
    config = load_config()
    config.ppo.batch_size = 36  # 8 CPU devices
    with pytest.raises(ValueError, match="ppo.batch_size=36 is not divisible by the 8 devices"):
        aot_check.run_check(config, "cpu", programs=("rollout",))


def test_reward_batch_that_the_devices_do_not_divide():
    config = load_config()
    config.rewards.batch_size = 12
    with pytest.raises(ValueError, match="rewards.batch_size=12"):
        aot_check.run_check(config, "cpu", programs=("rollout",))


def test_unknown_program():
    with pytest.raises(ValueError, match="unknown programs"):
        aot_check.run_check(load_config(), "cpu", programs=("sample",))


def _cli(*args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "rlhf_jax.aot_check",
                           "--config", "configs/sentiment.py:runlocal", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_cli_bad_topology_exits_2():
    out = _cli("--topology", "v5e:3")
    assert out.returncode == 2, out.stderr
    assert "a v5e chip grid has 2 dimensions" in out.stderr


def test_cli_batch_the_devices_do_not_divide_exits_2():
    out = _cli("--topology", "cpu", "--config.ppo.batch_size=36")
    assert out.returncode == 2, out.stderr
    assert "ppo.batch_size=36 is not divisible by the 8 devices" in out.stderr


def test_cli_does_not_fit_exits_1():
    """The smallest program against a made-up 0.01 GiB device: the table, then the number."""
    out = _cli("--topology", "cpu", "--programs=to_rollout", "--hbm_gib=0.01")
    assert out.returncode == 1, out.stderr
    assert "fits: NO" in out.stdout
    assert "needs" in out.stderr and "GiB per device, has 0.01 GiB" in out.stderr


# -- compiling -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_compiles_tiny_config_for_cpu_devices_and_flags_what_does_not_fit():
    """The real rollout and update, on abstract inputs, for the 8 CPU devices (no libtpu)."""
    config = load_config()
    report = aot_check.run_check(config, "cpu", programs=("rollout", "update"),
                                 hbm_bytes=16 * GIB, log=lambda s: None)
    # The rollout's stages (no separate value network here), then the update.
    assert [p.name for p in report.programs] == ["prefill", "decode", "reference", "reward",
                                                 "finish", "update"]
    assert report.num_devices == 8 and report.mesh == {"data": 1, "fsdp": 8} and report.fits
    update = report.programs[-1]
    assert all(p.argument_bytes > 0 and p.resident_bytes > 0 for p in report.programs)
    assert update.flops > 0
    # The state is donated: its outputs reuse its buffers.
    assert update.alias_bytes > 0
    # XLA's cost analysis counts a loop body once: the update's epochs x minibatches loop runs
    # one minibatch step, which should cost the analytic 3 x forward on a minibatch.
    p = config.ppo
    per_step = report.analytic["update"] / (p.noptepochs * p.nminibatches)
    assert update.flops * report.num_devices == pytest.approx(per_step, rel=0.15)

    tight = dataclasses.replace(report, hbm_bytes=report.peak_bytes - 1)
    with pytest.raises(aot_check.DoesNotFitError, match="needs .* GiB per device, has"):
        aot_check.check_report(tight)


@pytest.mark.slow
@needs_libtpu
def test_compiles_tiny_config_for_v5e_2x2():
    config = load_config()
    report = aot_check.run_check(config, "v5e:2x2", programs=("decode", "update"),
                                 log=lambda s: None)
    assert report.device_kind == "TPU v5 lite" and report.num_devices == 4
    # The limit comes from the TPU compiler itself.
    assert report.hbm_bytes == pytest.approx(15.75 * GIB, abs=0.01 * GIB)
    assert report.fits and report.peak_bytes < GIB
    assert all(p.flops > 0 and p.oom_bytes is None for p in report.programs)
    assert "fits: yes" in aot_check.format_report(report)


def test_large_presets_default_to_bfloat16_with_remat_and_dtype_is_validated():
    """What makes `aot_check --config configs/sentiment.py:model=774M --topology v5e:2x4` fit
    as written (docs/tpu_memory.md): bfloat16 matmuls and remat are the 774M/1.5B defaults."""
    from rlhf_jax import experiment

    for name in ("sentiment", "tldr"):
        for size, dtype, remat in (("124M", "float32", False), ("774M", "bfloat16", True),
                                   ("1.5B", "bfloat16", True)):
            m = load_config(f"model={size}", name).model
            assert (m.dtype, m.remat, m.micro_batch_size) == (dtype, remat, 0), (name, size)
    config = load_config()
    config.model.dtype = "float16"
    with pytest.raises(ValueError, match=r"--config.model.dtype='float16': expected one of "
                                         r"float32, bfloat16"):
        experiment.gpt2_config(config)
