"""rlhf_jax.paths and the readers built on it, on local paths and on gs:// (the GCS emulator).

Fast, in-process: the path helpers, then each reader that used to open local files only
(tokenizer directory, samples JSONL, summarization JSONL, Parquet preference import) given a
gs:// path, and the start-up access checks.
"""

import io
import json
import os

import pytest

from rlhf_jax import evaluate, paths
from rlhf_jax.data import preference_import, summarization
from rlhf_jax.tokenizer import get_tokenizer
from tests.gcs_emulator import gcs_emulator  # noqa: F401 - the session fixture

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")


def test_local_and_url_path_helpers(tmp_path):
    assert paths.join("gs://b/runs/x/", "reward", "m.json") == "gs://b/runs/x/reward/m.json"
    assert paths.join("runs/x", "reward") == os.path.join("runs/x", "reward")
    assert paths.basename("gs://b/runs/x/") == "x" and paths.basename("runs/x/") == "x"
    assert paths.is_remote("gs://b/x") and not paths.is_remote(str(tmp_path))
    paths.makedirs(tmp_path / "a" / "b")
    (tmp_path / "a" / "b" / "f.txt").write_text("hi")
    assert paths.isdir(tmp_path / "a") and paths.isfile(tmp_path / "a" / "b" / "f.txt")
    assert paths.listdir(tmp_path / "a") == ["b"]
    assert paths.read_text(tmp_path / "a" / "b" / "f.txt") == "hi"
    paths.rmtree(tmp_path / "a")
    assert not paths.exists(tmp_path / "a")
    paths.check_writable(str(tmp_path), "--workdir")  # local: left to the local checks
    paths.check_readable(str(tmp_path / "missing"), "--x")


def test_gs_directories_upload_download_and_remove(gcs_emulator, tmp_path):  # noqa: F811
    bucket = gcs_emulator.create_bucket("rlhf-paths")
    local = tmp_path / "model"
    local.mkdir()
    for name in ("config.json", "model.safetensors", "vocab.json"):
        (local / name).write_text(name)
    dest = f"gs://{bucket}/m"
    paths.upload_dir(str(local), dest, last=("config.json",))
    assert paths.isdir(dest) and not paths.isfile(dest) and paths.isfile(f"{dest}/vocab.json")
    assert sorted(paths.listdir(dest)) == ["config.json", "model.safetensors", "vocab.json"]
    back = tmp_path / "back"
    back.mkdir()
    assert paths.download_files(dest, ["vocab.json", "absent.txt"], str(back)) == ["vocab.json"]
    assert (back / "vocab.json").read_text() == "vocab.json"
    paths.rmtree(dest)
    assert not paths.exists(dest) and gcs_emulator.objects(bucket) == []
    paths.check_writable(f"gs://{bucket}/run", "--workdir")
    assert gcs_emulator.objects(bucket) == []  # the probe object is deleted again


def test_readers_take_gs_paths(gcs_emulator, tmp_path):  # noqa: F811
    bucket = gcs_emulator.create_bucket("rlhf-readers")
    # A tokenizer directory staged in the bucket (as model.tokenizer may name one).
    get_tokenizer("gpt2").save_pretrained(str(tmp_path / "tok"))
    paths.upload_dir(str(tmp_path / "tok"), f"gs://{bucket}/tok")
    assert get_tokenizer(f"gs://{bucket}/tok").encode("Hello world") == [15496, 995]
    # Samples for evaluate, and summarization JSONL: read whole, errors name the gs:// line.
    samples = f"gs://{bucket}/samples.jsonl"
    paths.as_path(samples).write_text('{"query": "a b. c d.", "response": "a b."}\n\n'
                                      '{"query": "x", "response": 3}\n')
    with pytest.raises(evaluate.SamplesError, match=rf"{samples}:3: field 'response' is int"):
        evaluate.read_samples(samples)
    articles = f"gs://{bucket}/articles.jsonl"
    paths.as_path(articles).write_text(json.dumps({"article": "A story.", "summary": "S."})
                                       + "\n")
    assert summarization.jsonl_source(articles, "article", "summary", clean=None) == [
        ("A story.", "S.")]
    # Parquet preferences through the path layer (not pyarrow's own GCS client).
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["p"], "chosen": ["c"], "rejected": ["r"]}), buf)
    parquet = f"gs://{bucket}/prefs.parquet"
    paths.as_path(parquet).write_bytes(buf.getvalue())
    assert preference_import.read_records(parquet) == [
        (f"{parquet}:row 1", 1, {"prompt": "p", "chosen": "c", "rejected": "r"})]


def test_access_checks_name_the_flag_and_path(gcs_emulator):  # noqa: F811
    bucket = gcs_emulator.create_bucket("rlhf-checks")
    with pytest.raises(paths.StorageAccessError,
                       match=r"--workdir='gs://rlhf-nope/run': cannot write: the bucket "
                             r"gs://rlhf-nope does not exist"):
        paths.check_writable("gs://rlhf-nope/run", "--workdir")
    with pytest.raises(paths.StorageAccessError,
                       match=rf"--config\.labels\.path='gs://{bucket}/l\.json': cannot read: "
                             r"no such file"):
        paths.check_readable(f"gs://{bucket}/l.json", "--config.labels.path")


def test_denied_is_told_from_missing_by_the_error_not_by_names_in_it():
    """A missing bucket whose URL holds "401" (a random probe name did, failing CI once) or
    "credentials" is still a missing bucket; real refusals of each client are denials."""
    missing = FileNotFoundError("http://127.0.0.1:1/upload/storage/v1/b/credentials-b/o?"
                                "name=run%2F.rlhf_jax_write_probe-ae08306401b53")
    msg = str(paths._describe("gs://credentials-b/run", "--workdir", missing, "write"))
    assert "does not exist" in msg and "access denied" not in msg
    for err in (OSError("Forbidden: gs://b/run"), OSError("401 Anonymous caller does not have"),
                ValueError("PERMISSION_DENIED: ..."), ValueError("UNAUTHENTICATED"),
                type("DefaultCredentialsError", (Exception,), {})("no credentials found")):
        msg = str(paths._describe("gs://b/run", "--workdir", err, "write"))
        assert "access denied" in msg, (err, msg)
