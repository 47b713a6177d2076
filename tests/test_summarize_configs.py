"""configs/tldr.py and configs/cnndm.py: the original launch.py values, and working variants."""

import pytest
from absl import flags
from ml_collections import config_flags

from rlhf_jax import experiment, models
from rlhf_jax.data import summarization
from rlhf_jax.tokenizer import get_tokenizer
from tests.test_train_reward import ROOT, load_config

LABELS = "https://openaipublic.blob.core.windows.net/lm-human-preferences/labels/"


@pytest.mark.parametrize("name", ["tldr", "cnndm"])
def test_original_values(name):
    cfg = load_config(name, None)
    original = summarization.summarization_task(name)
    for key in ("query_length", "response_length", "start_text", "end_text", "query_prefix",
                "query_suffix", "truncate_token", "truncate_after", "penalty_reward_value",
                "temperature"):
        assert cfg.task[key] == original[key], key
    assert cfg.task.query_dataset == {"tldr": "tfds:reddit", "cnndm": "tfds:cnn_dailymail"}[name]
    assert (cfg.model.preset, cfg.model.checkpoint, cfg.seed) == ("124M", "gpt2", 1)
    assert cfg.labels.path == f"{LABELS}{name}/online_45k.json"
    assert (cfg.labels.type, cfg.labels.num_train) == ("best_of_4", 46000)
    r = cfg.rewards
    assert (r.batch_size, r.lr, r.rollout_batch_size) == (16, 2.5e-5, 128)
    assert (r.normalize_before, r.normalize_after, r.normalize_samples) == (True, True, 256)
    p = cfg.ppo
    assert (p.total_episodes, p.batch_size, p.lr, p.nminibatches, p.noptepochs) == (
        1_000_000, 32, 2e-6, 1, 4)
    # The original's `rewards.whiten=False` (a non-existent field, spec §6.3.1), as intended.
    assert p.whiten_rewards is False
    assert (p.kl.coef, p.kl.adaptive) == ({"tldr": 0.03, "cnndm": 0.01}[name], False)
    assert cfg.labeler.kind == "copying" and cfg.sft.mode == "summarize"
    spec = experiment.task_spec(cfg, get_tokenizer(), experiment.gpt2_config(cfg))
    assert spec.context_length + spec.response_length <= 600


@pytest.mark.parametrize("name", ["tldr", "cnndm"])
def test_runlocal_fits_the_tiny_model(name):
    cfg = load_config(name)
    gpt_cfg = experiment.gpt2_config(cfg)
    assert gpt_cfg == models.preset("tiny")
    spec = experiment.task_spec(cfg, get_tokenizer(), gpt_cfg)
    assert spec.context_length + spec.response_length <= gpt_cfg.n_positions
    assert spec.truncate_after < spec.response_length
    # Task formatting is still the original's; only sizes shrink.
    assert (cfg.task.query_suffix, cfg.task.truncate_token) == ("\n\nTL;DR:", 198)
    assert cfg.task.query_dataset == "builtin:lead" and cfg.sft.lr == 3e-3


def parse_command_line(*args):
    """The config as `--config ... --config.a.b=v` gives it to an entry point."""
    argv = ["prog", *args]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def test_command_line_overrides_and_arguments():
    cfg = parse_command_line(f"--config={ROOT}/configs/cnndm.py:model=774M",
                             "--config.sft.steps=7", "--config.ppo.kl.coef=0.05")
    assert (cfg.model.preset, cfg.model.checkpoint, cfg.sft.steps) == ("774M", "gpt2-large", 7)
    assert cfg.ppo.kl.coef == 0.05 and cfg.task.end_text == "\n"
    # An empty end_text switches the end token off ("None" would be the one-token text "None").
    cfg = parse_command_line(f"--config={ROOT}/configs/cnndm.py:runlocal",
                             "--config.task.end_text=")
    spec = experiment.task_spec(cfg, get_tokenizer(), experiment.gpt2_config(cfg))
    assert cfg.task.end_text == "" and spec.end_token is None
    with pytest.raises(Exception, match="stpes"):
        parse_command_line(f"--config={ROOT}/configs/tldr.py", "--config.sft.stpes=7")
    with pytest.raises(ValueError, match="unknown config argument"):
        load_config("tldr", "runlocal,size=2")
