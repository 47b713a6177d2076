"""Bad files are named in their errors, and files are written with the user's umask."""

import json
import logging
import os
import stat

import jax
import numpy as np
import pytest

from rlhf_jax import evaluate, models, reward_store, runtime
from rlhf_jax.data import labels as labels_lib
from rlhf_jax.data import sources
from rlhf_jax.models import hf_import


def _tiny_params():
    cfg = models.preset("tiny")
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
    return cfg, jax.tree.map(lambda a: rng.normal(0, 0.02, a.shape).astype(np.float32), shapes)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_files_follow_the_umask(tmp_path, umask):
    cfg, params = _tiny_params()
    old = os.umask(umask)
    try:
        assert runtime.current_umask() == umask
        runtime.atomic_write_text(tmp_path / "report.json", "{}")
        labels_lib.save_labels(str(tmp_path / "labels.json"), {"best": np.array([1, 2])})
        hf_import.save_hf_checkpoint(params, cfg, str(tmp_path / "hf"))
    finally:
        os.umask(old)
    for name in ("report.json", "labels.json", "hf/config.json", "hf/model.safetensors"):
        assert _mode(tmp_path / name) == 0o666 & ~umask, name
    assert _mode(tmp_path / "hf") == 0o777 & ~umask


def test_truncated_or_garbage_safetensors_name_the_file(tmp_path):
    cfg, params = _tiny_params()
    out = tmp_path / "hf"
    hf_import.save_hf_checkpoint(params, cfg, str(out))
    weights = out / hf_import.WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(hf_import.CheckpointFormatError,
                       match=f"{weights}: not a readable safetensors file"):
        hf_import.load_hf_checkpoint(str(out))
    weights.write_bytes(b"\xff" * 64)  # a header length far past the end
    with pytest.raises(hf_import.CheckpointFormatError, match=str(weights)):
        hf_import.load_hf_checkpoint(str(out))
    (out / hf_import.CONFIG_FILE).write_bytes(b"\x89PNG\r\n")
    with pytest.raises(hf_import.CheckpointFormatError,
                       match=f"{out / hf_import.CONFIG_FILE}: not valid JSON"):
        hf_import.load_hf_checkpoint(str(out))


def test_binary_label_file_names_the_file(tmp_path):
    path = tmp_path / "labels.json"
    path.write_bytes(b'[{"query": [1]}]\x00\xff\xfe')
    with pytest.raises(labels_lib.LabelFileError,
                       match=f"{path}: not UTF-8 text \\(byte 0xff at offset 17\\)"):
        labels_lib.load_labels(str(path), "best_of_4", query_length=1, response_length=1,
                               vocab_size=10)
    with pytest.raises(sources.SourceError, match=f"{path}: not UTF-8"):
        sources.load_texts(str(path))


def test_broken_reward_model_json_names_the_file(tmp_path):
    meta = tmp_path / reward_store.REWARD_MODEL_META
    meta.write_text('{"gpt2_config": {')
    with pytest.raises(reward_store.RewardModelError, match=f"{meta}: not valid JSON"):
        reward_store.load_reward_model(str(tmp_path), None, None)
    meta.write_text('{"gpt2_config": {}}')
    with pytest.raises(reward_store.RewardModelError,
                       match=f"{meta}: missing field\\(s\\) \\['task_spec', 'label_type'\\]"):
        reward_store.load_reward_model(str(tmp_path), None, None)
    meta.write_text('{"gpt2_config": {"n_lyr": 2}, "task_spec": {}, "label_type": "best_of_4"}')
    with pytest.raises(reward_store.RewardModelError, match=f"{meta}: bad gpt2_config"):
        reward_store.load_reward_model(str(tmp_path), None, None)


def test_binary_samples_file_names_file_and_line(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_bytes(b'{"query": "a", "response": "b"}\n\xff\xfe\n')
    with pytest.raises(evaluate.SamplesError, match=f"{path}:2: not UTF-8"):
        evaluate.read_samples(str(path))


def test_log_file_waits_for_the_workdir(tmp_path):
    """setup_logging must not create the workdir: a start-up that fails validation leaves none."""
    workdir = tmp_path / "run"
    try:
        runtime.setup_logging(str(workdir))
        logging.getLogger("rlhf_jax.test").info("before the workdir exists")
        assert not workdir.exists()
        workdir.mkdir()
        logging.getLogger("rlhf_jax.test").info("after")
    finally:
        runtime.setup_logging(None)
    text = (workdir / runtime.LOG_FILE_NAME).read_text()
    assert text.index("before the workdir exists") < text.index("after")


def test_atomic_writes_keep_json_round_trip(tmp_path):
    runtime.atomic_write_text(tmp_path / "a.json", json.dumps({"x": 1}))
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
