"""Tests for rlhf_jax.metrics: JSONL/TensorBoard writer, resume truncation, progress, plots."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import metrics, runtime


def _write_steps(workdir, steps, **kw):
    with metrics.MetricWriter(workdir, **kw) as writer:
        for step in steps:
            writer.write(step, {"objective/score": 0.1 * step, "objective/kl": np.float32(step)})
            writer.write_samples(step, [{"query": f"q{step}", "response": "r"}])


def test_write_converts_scalars_and_reads_back(tmp_path):
    with metrics.MetricWriter(tmp_path, tensorboard=False) as writer:
        writer.write(1, {"a": 1, "b": np.float32(0.5), "c": jnp.asarray(2.5), "d": np.ones(())})
    assert metrics.read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 1, "a": 1.0, "b": 0.5, "c": 2.5, "d": 1.0}
    ]


def test_non_scalar_metric_rejected(tmp_path):
    with metrics.MetricWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="'v' must be a scalar"):
            writer.write(1, {"v": np.ones(3)})


@pytest.mark.parametrize("bad", [float("nan"), np.inf, jnp.asarray(-jnp.inf)])
def test_non_finite_raises_and_leaves_file_unchanged(tmp_path, bad):
    with metrics.MetricWriter(tmp_path, tensorboard=False) as writer:
        writer.write(1, {"ok": 1.0})
        writer.flush()
        before = (tmp_path / "metrics.jsonl").read_bytes()
        with pytest.raises(metrics.NonFiniteMetricError, match=r"step 2.*ppo/loss/value"):
            writer.write(2, {"ok": 2.0, "ppo/loss/value": bad})
        writer.flush()
        assert (tmp_path / "metrics.jsonl").read_bytes() == before
    assert issubclass(metrics.NonFiniteMetricError, FloatingPointError)


def test_check_finite_off_writes_nan(tmp_path):
    with metrics.MetricWriter(tmp_path, tensorboard=False, check_finite=False) as writer:
        writer.write(1, {"x": float("nan")})
    assert np.isnan(metrics.read_jsonl(tmp_path / "metrics.jsonl")[0]["x"])


def test_resume_truncation_matches_uninterrupted_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _write_steps(straight, range(1, 7), tensorboard=False)
    # The interrupted run logged up to step 5 but its last checkpoint was step 3.
    _write_steps(resumed, range(1, 6), tensorboard=False)
    _write_steps(resumed, range(4, 7), tensorboard=False, resume_step=3)
    for name in ("metrics.jsonl", "samples.jsonl"):
        assert (resumed / name).read_bytes() == (straight / name).read_bytes()
    assert [r["step"] for r in metrics.read_jsonl(resumed / "samples.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_resume_drops_torn_last_line_and_minus_one_clears(tmp_path):
    _write_steps(tmp_path, [1, 2], tensorboard=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "objective/sc')  # A crash in the middle of an append.
    assert [r["step"] for r in metrics.read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    metrics.MetricWriter(tmp_path, tensorboard=False, resume_step=2).close()
    assert (tmp_path / "metrics.jsonl").read_text().endswith("}\n")
    metrics.MetricWriter(tmp_path, tensorboard=False, resume_step=-1).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_read_jsonl_rejects_corruption_mid_file(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        metrics.read_jsonl(path)


def test_tensorboard_event_file_written(tmp_path):
    _write_steps(tmp_path, [1, 2], tensorboard=True, resume_step=None)
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_write_json_is_atomic_and_converts_numpy(tmp_path):
    with metrics.MetricWriter(tmp_path, tensorboard=False) as writer:
        path = writer.write_json("config.json", {"lr": np.float32(0.5), "shape": (2, 3)})
    assert json.loads(open(path).read()) == {"lr": 0.5, "shape": [2, 3]}


def test_non_primary_process_writes_nothing_but_still_checks(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "is_primary", lambda: False)
    workdir = tmp_path / "w"
    with metrics.MetricWriter(workdir) as writer:
        writer.write(1, {"x": 1.0})
        writer.write_samples(1, [{"q": "a"}])
        writer.write_json("config.json", {})
        # Every host raises on NaN, so no host is left waiting in a collective.
        with pytest.raises(metrics.NonFiniteMetricError):
            writer.write(2, {"x": float("nan")})
    assert not workdir.exists()


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_progress_line_format_and_eta():
    clock, lines = FakeClock(), []
    progress = metrics.Progress(
        1954,
        desc="train_policy",
        print_fn=lines.append,
        clock=clock,
        items_per_step={"episodes": 512},
    )
    assert progress.rate is None and progress.eta_seconds is None
    clock.t += 51.948  # 120 steps in 51.948 s = 2.31 step/s.
    assert progress.update(120, score=0.41, kl=3.2)
    assert progress.rate == pytest.approx(120 / 51.948)
    assert progress.eta_seconds == pytest.approx(1834 * 51.948 / 120)
    assert lines == [
        "train_policy 120/1954 (6.1%) | 2.31 step/s | 1.18e+03 episodes/s | ETA 0:13:14"
        " | score=0.41 kl=3.2"
    ]


def test_progress_throttles_and_always_prints_last_step():
    clock, lines = FakeClock(), []
    progress = metrics.Progress(10, print_fn=lines.append, clock=clock, log_every_seconds=10)
    printed = []
    for step in range(1, 11):
        clock.t += 3.0
        printed.append(progress.update(step))
    # First update prints, then every >= 10 s (steps 5 and 9), and the last step.
    assert printed == [True, False, False, False, True, False, False, False, True, True]
    assert lines[-1] == "10/10 (100.0%) | 0.333 step/s | ETA 0:00:00"
    assert not any("\r" in line for line in lines)


def test_progress_rate_ignores_steps_before_resume():
    clock, lines = FakeClock(), []
    progress = metrics.Progress(2000, start=1000, unit="update", print_fn=lines.append, clock=clock)
    clock.t += 5.0
    progress.update(1010)
    assert progress.rate == pytest.approx(2.0)
    assert progress.eta_seconds == pytest.approx(495.0)
    assert "1010/2000 (50.5%) | 2 update/s | ETA 0:08:15" == lines[0]


def test_progress_unknown_rate_and_non_primary(monkeypatch):
    lines = []
    metrics.Progress(5, print_fn=lines.append, clock=FakeClock()).update(0)
    assert lines == ["0/5 (0.0%) | ? step/s | ETA ?"]
    monkeypatch.setattr(runtime, "is_primary", lambda: False)
    silent = metrics.Progress(5, print_fn=lines.append, clock=FakeClock())
    assert not silent.update(5)
    assert len(lines) == 1


def test_plot_metrics_writes_png_and_skips_missing_keys(tmp_path):
    _write_steps(tmp_path, range(1, 5), tensorboard=False)
    out = metrics.plot_metrics(
        tmp_path / "metrics.jsonl",
        tmp_path / "plots" / "curves.png",
        ys=("objective/score", "absent/key", "objective/kl"),
        title="run",
    )
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="absent/key"):
        metrics.plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "x.png", ys=("absent/key",))
