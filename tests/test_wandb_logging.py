"""Optional Weights & Biases logging through MetricWriter, in wandb's offline mode (no network)."""

import glob
import json
import os
import sys
import time

import pytest

from rlhf_jax import metrics, wandb_logging

pytest.importorskip("wandb")


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    """WANDB_MODE=offline and wandb's own files in tmp: nothing leaves the machine."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))


def _log_chunks(data: bytes) -> list[bytes]:
    """Records of a `.wandb` file: a 7-byte ":W&B" header, then a LevelDB-style log of 32 KiB
    blocks of [crc32 (4), length (2, little-endian), type (1: full, 2: first, 3: middle,
    4: last)] chunks. W&B keeps no Python reader for its own file, hence this one."""
    assert data[:4] == b":W&B", data[:8]
    block, pos, out, partial = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind in (2, 3):
            partial = (b"" if kind == 2 else partial) + chunk
        elif kind == 4:
            out.append(partial + chunk)
    return out


def _records(path, timeout=60.0):
    """The records of a finished run's file. `run.finish()` can return before wandb's separate
    writer process has written the file out (seen under load), so this waits for the run's
    final "exit" record."""
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + timeout
    while True:
        records = []
        for chunk in _log_chunks(open(path, "rb").read()):
            records.append(pb.Record())
            records[-1].ParseFromString(chunk)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout} s"
        time.sleep(0.2)


def read_offline_runs(workdir):
    """[(run id, {step: {metric: value}}, config dict)] of every offline run under workdir."""
    runs = []
    paths = glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))
    for path in sorted(paths):  # by start time: offline-run-YYYYMMDD_HHMMSS-<id>
        history, config, run_id = {}, {}, None
        for record in _records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                       for i in record.history.item}
                history[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
        runs.append((run_id, history, config))
    return runs


def rows_by_step(rows):
    """metrics.jsonl rows merged per step, as W&B merges the logs of one step into one row."""
    out = {}
    for row in rows:
        out.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k != "step"})
    return out


def run_config(**wandb):
    return {"seed": 1, "ppo": {"lr": 1e-5, "kl": {"coef": 0.15}},
            "wandb": {"project": "rlhf-test", "entity": "", "name": "", "group": "",
                      "mode": "offline", **wandb}}


def test_rows_and_config_go_to_an_offline_run_and_resume_continues_it(tmp_path, wandb_offline):
    workdir = str(tmp_path / "run")
    with metrics.MetricWriter(workdir, tensorboard=False, resume_step=-1,
                              config=run_config()) as writer:
        writer.write(1, {"objective/score": 0.5, "objective/kl": 1.25})
        writer.write(2, {"objective/score": 0.75, "objective/kl": 2.0})
    run_id = open(os.path.join(workdir, wandb_logging.RUN_ID_FILE)).read().strip()
    ((got_id, history, config),) = read_offline_runs(workdir)
    assert got_id == run_id
    assert history == {1: {"objective/score": 0.5, "objective/kl": 1.25},
                       2: {"objective/score": 0.75, "objective/kl": 2.0}}
    assert config["ppo"] == {"lr": 1e-5, "kl": {"coef": 0.15}} and config["seed"] == 1
    # The JSONL rows carry the same names and values.
    rows = metrics.read_jsonl(os.path.join(workdir, metrics.METRICS_FILE))
    assert rows_by_step(rows) == history
    # Resuming after step 2 continues the same W&B run. (Offline run directories are named by
    # the second they start in: start the second one in a later second, so it gets its own
    # directory and sorts after the first.)
    time.sleep(1.05 - time.time() % 1)
    with metrics.MetricWriter(workdir, tensorboard=False, resume_step=2,
                              config=run_config()) as writer:
        writer.write(3, {"objective/score": 1.0})
    runs = read_offline_runs(workdir)
    assert [r[0] for r in runs] == [run_id, run_id]
    assert runs[1][1] == {3: {"objective/score": 1.0}}


def test_off_by_default_and_a_clear_error_without_wandb(tmp_path, wandb_offline, monkeypatch):
    workdir = str(tmp_path / "off")
    with metrics.MetricWriter(workdir, tensorboard=False, config=run_config(project="")) as w:
        w.write(1, {"objective/score": 0.5})
    assert not os.path.exists(os.path.join(workdir, "wandb"))
    assert not os.path.exists(os.path.join(workdir, wandb_logging.RUN_ID_FILE))
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'rlhf_jax\[wandb\]'"):
        metrics.MetricWriter(str(tmp_path / "x"), tensorboard=False, config=run_config())
