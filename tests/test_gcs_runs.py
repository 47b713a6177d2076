"""launch/README.md's TPU commands with gs:// paths, end to end against the GCS emulator (issue 14).

The commands run as the README writes them (`python -m rlhf_jax.<entry> --config
configs/sentiment.py:runlocal --workdir gs://... --config.model.checkpoint=gs://...
--config.labels.path=gs://...`), shrunk to a few steps: reward model, PPO stopped early
(`stop_after`, exit 3) and resumed by the same command, sampling, evaluation, and the export.
Every input (the GPT-2 checkpoint in Hugging Face format, the label file, the query file) is in
the bucket, every output goes there; the subprocesses run in an empty directory, which must
stay empty. They get the emulator recipe of tests/gcs_emulator.py from the environment, with
http(s)_proxy set to a closed loopback port so that an HTTP client that honours proxies
(tensorstore's libcurl) cannot reach anything but the emulator (no_proxy).

Bad input: a missing bucket (workdir and inputs) fails at start-up naming the flag or
`--config.` field, before any compute and without creating the bucket; and a GCS endpoint that
refuses an anonymous caller (what GCS answers a machine without credentials) fails the same way.
"""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from rlhf_jax import experiment, paths, train_reward
from rlhf_jax.data import labels as labels_lib
from rlhf_jax.models import hf_import
from tests.gcs_emulator import HOST, gcs_emulator  # noqa: F401 - the session fixture
from tests.test_train_reward import load_config

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "sentiment.py") + ":runlocal"
BUCKET = "rlhf-launch"
NUM_LABELS = 48
_CACHE: list[str] = []  # the module's compilation cache directory, once made


def _env(**extra) -> dict:
    env = dict(os.environ)  # the emulator recipe, set by the session fixture
    env.update(http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               no_proxy="127.0.0.1", **extra)
    return env


def _run(args, cwd, timeout=600, **env):
    t0 = time.time()
    env.setdefault("RLHF_JAX_COMPILATION_CACHE", _CACHE[0]) if _CACHE else None
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout, check=False)
    return proc, time.time() - t0


@pytest.fixture(scope="module")
def staged(gcs_emulator, tmp_path_factory):  # noqa: F811 - pytest fixture by name
    """A bucket with the inputs of launch/README.md step 1.4: a GPT-2 (tiny, random) in HF
    format, a best-of-4 label file and a query file."""
    emulator = gcs_emulator
    bucket = emulator.create_bucket(BUCKET)
    cfg = load_config()
    gpt_cfg = experiment.gpt2_config(cfg)
    trunk = experiment.initial_trunk(cfg, gpt_cfg)  # model.checkpoint "": random, seeded
    model = f"gs://{bucket}/models/tiny"
    hf_import.save_hf_checkpoint({"transformer": trunk}, gpt_cfg, model)
    rng = np.random.default_rng(0)
    labels = labels_lib.zero_labels("best_of_4", num=NUM_LABELS, query_length=64,
                                    response_length=24)
    for key in ("query", "sample0", "sample1", "sample2", "sample3"):
        labels[key] = rng.integers(0, 50257, labels[key].shape).astype(np.int32)
    labels["best"] = rng.integers(0, 4, NUM_LABELS).astype(np.int32)
    labels_path = f"gs://{bucket}/labels/sentiment/offline.json"
    labels_lib.save_labels(labels_path, labels)
    queries = f"gs://{bucket}/queries.txt"
    paths.as_path(queries).write_text(
        "The film was long. It had a plot.\nShe walked home in the rain. Then she slept.\n")
    cwd = tmp_path_factory.mktemp("cwd")
    # The resumed PPO run compiles what the stopped one did: share JAX's persistent cache
    # between the commands (outside their working directory).
    _CACHE[:] = [str(tmp_path_factory.mktemp("xla"))]
    return {"emulator": emulator, "bucket": bucket, "model": model, "labels": labels_path,
            "queries": queries, "trunk": trunk, "cwd": str(cwd), "times": {}}


def _inputs(staged):
    return [f"--config.model.checkpoint={staged['model']}",
            f"--config.labels.path={staged['labels']}"]


def test_readme_tpu_commands_with_gs_paths(staged):
    """Reward model, then PPO (stopped and resumed by the same command), sample, evaluate,
    export: every path in the bucket, nothing written locally."""
    emulator, b, cwd, times = staged["emulator"], staged["bucket"], staged["cwd"], staged["times"]
    rm, ppo = f"gs://{b}/runs/sentiment-rm", f"gs://{b}/runs/sentiment"
    # Few steps; no reward normalisation (its sampling programs would add compilations and
    # read or write nothing more from the bucket).
    small = ["--config.labels.num_train=32", "--config.labels.num_valid=16",
             "--config.rewards.normalize_before=False", "--config.rewards.normalize_after=False",
             "--config.rewards.verify_samples=0"]
    proc, times["train_reward"] = _run(["rlhf_jax.train_reward", "--config", CONFIG,
                                        "--workdir", rm, *_inputs(staged), *small], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    objects = emulator.objects(b)
    for name in ("reward_model.json", "config.json", "metrics.jsonl", "config_history.jsonl"):
        assert f"runs/sentiment-rm/{name}" in objects, (name, objects)
    assert any(o.startswith("runs/sentiment-rm/reward_model/") for o in objects)
    assert any(o.startswith("runs/sentiment-rm/checkpoints/4/") for o in objects)
    assert any(o.startswith("runs/sentiment-rm/tb/") for o in objects)  # TensorBoard on gs://

    # launch.sh's second stage; `stop_after` stands in for a preemption: exit 3, then the
    # same command resumes from the bucket and finishes.
    policy = ["rlhf_jax.train_policy", "--config", CONFIG, "--workdir", ppo, *_inputs(staged),
              f"--config.rewards.trained_model={rm}", "--config.ppo.total_episodes=64",
              "--config.log_every=1", "--config.ckpt_every=1", "--config.stop_after=1"]
    proc, times["train_policy (stopped)"] = _run(policy, cwd)
    assert proc.returncode == 3, proc.stderr[-3000:]
    rows = [json.loads(line) for line in
            paths.read_text(f"{ppo}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [1]
    proc, times["train_policy (resumed)"] = _run(policy, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in paths.read_text(f"{ppo}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["objective/score"]) for r in rows)
    history = [json.loads(line) for line in
               paths.read_text(f"{ppo}/config_history.jsonl").splitlines()]
    assert [(h["event"], h["step"]) for h in history] == [("start", None), ("resume", 1)]
    objects = emulator.objects(b)
    for name in ("plot.png", "samples.jsonl", "config.json"):
        assert f"runs/sentiment/{name}" in objects, name
    assert any(o.startswith("runs/sentiment/checkpoints/2/") for o in objects)

    samples, report = f"gs://{b}/eval/samples.jsonl", f"gs://{b}/eval/report.json"
    proc, times["sample"] = _run(["rlhf_jax.sample", "--workdir", ppo, "--output", samples,
                                  "--queries", staged["queries"], "--num_samples", "2"], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in paths.read_text(samples).splitlines()]
    assert len(rows) == 4 and {r["temperature"] for r in rows} == {0.7}
    proc, times["evaluate"] = _run(["rlhf_jax.evaluate", "--samples", samples, "--output",
                                    report, "--plot", f"gs://{b}/eval/novelty.png"], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(paths.read_text(report))["n"] == 4
    assert "eval/novelty.png" in emulator.objects(b)

    # The trained policy out, to the bucket, and back in through model.checkpoint's loader.
    from rlhf_jax import checkpoint_reader, export

    t0 = time.time()
    info = export.export_run(ppo, f"gs://{b}/export/ppo")
    assert info["kind"] == "policy" and info["step"] == 2 and info["workdir"] == ppo
    cfg, params = hf_import.load_hf_checkpoint(f"gs://{b}/export/ppo")
    trained, _, step = checkpoint_reader.read_state(f"{ppo}/checkpoints")
    assert step == 2 and cfg.n_embd == staged["trunk"]["wte"].shape[1]
    assert not np.array_equal(params["transformer"]["wte"], staged["trunk"]["wte"])  # trained
    np.testing.assert_array_equal(params["transformer"]["wte"],
                                  trained["policy"]["transformer"]["wte"])
    times["export + reload"] = time.time() - t0
    assert os.listdir(cwd) == []  # nothing written beside the commands
    print("command wall times (s):", {k: round(v, 1) for k, v in times.items()})


def _buckets(emulator) -> list[str]:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"{emulator.endpoint}/storage/v1/b?project=test", timeout=30) as response:
        return sorted(item["name"] for item in json.load(response).get("items", []))


def test_missing_bucket_fails_at_start_naming_the_flag(staged):
    """A missing bucket as workdir or input: a clear error before any compute, and nothing is
    created (no bucket, no object of the run)."""
    emulator = staged["emulator"]
    before = _buckets(emulator)
    cfg = load_config()
    with pytest.raises(paths.StorageAccessError,
                       match=r"--workdir='gs://no-such-bucket/run': cannot write: the bucket "
                             r"gs://no-such-bucket does not exist"):
        train_reward.train_reward(cfg, "gs://no-such-bucket/run")
    workdir = f"gs://{staged['bucket']}/runs/never"
    cfg.labels.path = "gs://no-such-bucket/labels.json"
    with pytest.raises(paths.StorageAccessError,
                       match=r"--config\.labels\.path='gs://no-such-bucket/labels\.json': "
                             r"cannot read"):
        train_reward.train_reward(cfg, workdir)
    cfg.labels.path = staged["labels"]
    cfg.model.checkpoint = f"gs://{staged['bucket']}/models/missing"
    with pytest.raises(paths.StorageAccessError, match=r"--config\.model\.checkpoint="):
        train_reward.train_reward(cfg, workdir)
    assert _buckets(emulator) == before
    assert not any(o.startswith("runs/never") for o in emulator.objects(staged["bucket"]))


class _RefusingGcs(BaseHTTPRequestHandler):
    """Answers every request as GCS answers an anonymous caller on a private bucket."""

    def _refuse(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = json.dumps({"error": {"code": 401, "message": (
            "Anonymous caller does not have storage.objects.create access to the Google Cloud "
            "Storage object. Permission 'storage.objects.create' denied on resource (or it may "
            "not exist)."), "errors": [{"reason": "required"}]}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _refuse

    def log_message(self, *args):
        pass


def test_no_credentials_fails_at_start_naming_the_flag(staged):
    """What covers "no credentials" without a network: the CLI's gs:// clients pointed at a
    loopback server that refuses every request with the 401 GCS gives an anonymous caller
    (gcsfs falls back to anonymous access when it finds no credentials). The run stops at
    start-up with the path, the flag and what to check; no real credential lookup is exercised
    (the emulator recipe turns it off)."""
    server = ThreadingHTTPServer((HOST, 0), _RefusingGcs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://{HOST}:{server.server_address[1]}"
    try:
        proc, _ = _run(["rlhf_jax.train_reward", "--config", CONFIG, "--workdir",
                        "gs://private-bucket/run", *_inputs(staged)], staged["cwd"],
                       timeout=120, STORAGE_EMULATOR_HOST=endpoint,
                       TENSORSTORE_GCS_HTTP_URL=endpoint)
    finally:
        server.shutdown()
    assert proc.returncode != 0
    err = proc.stderr
    assert "--workdir='gs://private-bucket/run': cannot write: access denied" in err, err[-3000:]
    assert "application-default login" in err and "Anonymous caller" in err
