"""The run record: config.json once, config_history.jsonl per start, and the resume check."""

import json
import os

import ml_collections
import pytest

from rlhf_jax import config_lib
from rlhf_jax.runs import record
from tests.test_train_reward import load_config


def _history(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, record.HISTORY_FILE))]


def test_fresh_start_writes_config_and_history(tmp_path):
    cfg = load_config()
    workdir = str(tmp_path)
    assert record.check_resume(workdir, cfg, trainer="train_reward") == []
    record.record_start(workdir, cfg, trainer="train_reward", step=None, changes=[])
    stored = json.load(open(tmp_path / record.CONFIG_FILE))
    assert stored == json.loads(json.dumps(cfg.to_dict()))
    (entry,) = _history(workdir)
    assert entry["event"] == "start" and entry["step"] is None and entry["changes"] == []
    assert entry["trainer"] == "train_reward" and entry["config"] == stored


def test_resume_refuses_a_meaningful_change_and_lists_every_field(tmp_path):
    workdir = str(tmp_path)
    cfg = load_config()
    record.record_start(workdir, cfg, trainer="train_policy", step=None, changes=[])
    changed = load_config()
    changed.ppo.batch_size = 64
    changed.seed = 7
    changed.task.temperature = 1.0
    with pytest.raises(record.ConfigChangedError) as err:
        record.check_resume(workdir, changed, trainer="train_policy")
    msg = str(err.value)
    for line in ("--config.ppo.batch_size: 32 recorded, 64 now", "--config.seed: 1 recorded, 7 now",
                 "--config.task.temperature: 0.7 recorded, 1.0 now"):
        assert line in msg
    assert "allow_config_change=True" in msg
    # Nothing was written by the refused attempt.
    assert len(_history(workdir)) == 1


def test_mutable_fields_and_ignored_sections_do_not_block(tmp_path):
    workdir = str(tmp_path)
    cfg = load_config()
    record.record_start(workdir, cfg, trainer="train_reward", step=None, changes=[])
    again = load_config()
    again.log_every, again.ckpt_every, again.ckpt_keep, again.stop_after = 7, 9, 1, 3
    again.tensorboard, again.samples_per_log = False, 0
    again.rewards.log_every = 3
    again.task.query_data_dir = "/elsewhere/tfds"  # the same data at another place
    again.mesh.fsdp = 4
    again.mesh.data = 2
    again.ppo.lr = 1.0  # train_reward does not read ppo
    assert record.check_resume(workdir, again, trainer="train_reward",
                               ignore_sections=("ppo", "sft", "labeler")) == []
    # The same ppo change blocks a trainer that reads ppo.
    with pytest.raises(record.ConfigChangedError, match=r"--config\.ppo\.lr"):
        record.check_resume(workdir, again, trainer="train_policy")


def test_allowed_change_is_recorded_and_becomes_the_reference(tmp_path):
    workdir = str(tmp_path)
    cfg = load_config()
    record.record_start(workdir, cfg, trainer="train_policy", step=None, changes=[])
    original = (tmp_path / record.CONFIG_FILE).read_text()
    changed = load_config()
    changed.ppo.lr = 2e-5
    changed.allow_config_change = True
    changes = record.check_resume(workdir, changed, trainer="train_policy")
    assert [(c.path, c.stored, c.current) for c in changes] == [("ppo.lr", 1e-5, 2e-5)]
    record.record_start(workdir, changed, trainer="train_policy", step=4, changes=changes)
    # config.json is never overwritten; the history has both starts and the change.
    assert (tmp_path / record.CONFIG_FILE).read_text() == original
    first, second = _history(workdir)
    assert second["event"] == "resume" and second["step"] == 4
    assert second["changes"] == [{"field": "ppo.lr", "recorded": 1e-5, "now": 2e-5}]
    # The next resume compares with the last recorded config, so the same lr passes without
    # the override, and readers see the config that last ran.
    same = load_config()
    same.ppo.lr = 2e-5
    assert record.check_resume(workdir, same, trainer="train_policy") == []
    assert record.load_run_config(workdir).ppo.lr == 2e-5


def test_fields_added_later_with_their_default_are_equal(tmp_path):
    """A stored config from an older version lacks a field the code added since."""
    workdir = str(tmp_path)
    old = load_config().to_dict()
    del old["model"]["dtype"]  # added with default "float32"
    del old["ppo"]["mask_after_stop"]  # added with default False
    del old["allow_config_change"]
    del old["online"]  # a run from before issue 13: the section's defaults are equal
    (tmp_path / record.CONFIG_FILE).write_text(json.dumps(old))
    assert record.check_resume(workdir, load_config(), trainer="train_policy") == []
    # A non-default value of a field the stored run did not have is a change.
    new = load_config()
    new.model.dtype = "bfloat16"
    with pytest.raises(record.ConfigChangedError, match="--config.model.dtype: '<absent>' "
                                                         "recorded, 'bfloat16' now"):
        record.check_resume(workdir, new, trainer="train_policy")
    # So is a field that is new to this code but has no known default (or a whole new section
    # whose builder `config_lib.<section>_config` does not exist).
    new = load_config()
    with new.unlocked():
        new.brand_new = ml_collections.ConfigDict({"enabled": False})
    with pytest.raises(record.ConfigChangedError, match="--config.brand_new.enabled"):
        record.check_resume(workdir, new, trainer="train_policy")


def test_new_section_with_a_builder_counts_its_defaults_as_equal(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    stored = load_config().to_dict()
    del stored["online"]  # the section is new to the code that resumes
    (tmp_path / record.CONFIG_FILE).write_text(json.dumps(stored))
    monkeypatch.setattr(config_lib, "online_config", lambda: ml_collections.ConfigDict(
        {"enabled": False, "rm_rounds": 20}), raising=False)
    new = load_config()
    with new.unlocked():
        new.online = config_lib.online_config()
    assert record.check_resume(workdir, new, trainer="train_policy") == []
    new.online.rm_rounds = 5
    with pytest.raises(record.ConfigChangedError, match="--config.online.rm_rounds"):
        record.check_resume(workdir, new, trainer="train_policy")


def test_a_removed_field_is_a_change(tmp_path):
    stored = load_config().to_dict()
    stored["ppo"]["old_knob"] = 3
    (tmp_path / record.CONFIG_FILE).write_text(json.dumps(stored))
    with pytest.raises(record.ConfigChangedError, match="--config.ppo.old_knob: 3 recorded, "
                                                         "'<absent>' now"):
        record.check_resume(str(tmp_path), load_config(), trainer="train_policy")


def test_broken_records_name_the_file(tmp_path):
    (tmp_path / record.CONFIG_FILE).write_text("{not json")
    with pytest.raises(record.RunRecordError, match=r"config\.json: not valid JSON"):
        record.check_resume(str(tmp_path), load_config(), trainer="train_sft")
    (tmp_path / record.HISTORY_FILE).write_text('{"config": {}}\n[1, 2\n')
    with pytest.raises(record.RunRecordError, match=r"config_history\.jsonl:2: not a config"):
        record.load_run_config(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json: not found"):
        record.load_run_config(str(tmp_path / "nowhere"))


def test_mutable_list_is_the_one_place():
    assert record.is_mutable("log_every") and record.is_mutable("mesh.fsdp")
    assert record.is_mutable("wandb.project")  # a whole section
    assert not record.is_mutable("ppo.batch_size") and not record.is_mutable("model.dtype")
    assert not record.is_mutable("seed") and not record.is_mutable("labels.num_train")
