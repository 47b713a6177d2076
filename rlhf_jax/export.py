r"""A trained model out, as a Hugging Face directory (PPO policy, SFT model or reward model).

  python -m rlhf_jax.export --workdir runs/ppo --output exported/ppo [--step N] \
      [--push_to_hub user/repo]

The output loads with `transformers.GPT2LMHeadModel.from_pretrained(DIR)` (and tokenizer and
generation settings with the Auto classes):
- `config.json`, `model.safetensors`: the GPT-2 trunk with its tied LM head
  (`models/hf_import.py`); in fp32 its logits equal ours to 1e-5 (tested);
- the tokenizer files of the run's `model.tokenizer`;
- `generation_config.json`: pure sampling at the task temperature the policy was trained at
  (top_k 0, top_p 1) for `response_length` new tokens. The task's post-processing (cut after
  the truncation token) is not a generation setting: see `rlhf_jax_export.json`;
- a reward model adds its head, gain and bias in `rlhf_jax_heads.safetensors`: the reward of
  raw query ‖ response is `gain * (h_last @ kernel + bias) + norm_bias`, where h_last is the
  trunk's final hidden state at the last token (README, "Export", has a PyTorch snippet);
- `rlhf_jax_export.json`: what was exported (run kind, workdir, step, task settings).

What a workdir holds decides what is exported: a train_reward workdir (`reward_model.json`)
exports its final reward model (or, with `--step`, a training checkpoint); otherwise the
checkpoint's metadata tells a train_policy run (the policy, without its value head) from a
train_sft run. Checkpoints are opened read-only (`checkpoint_reader`): exporting a run that is
still training changes nothing in it. The output is assembled beside its destination and
renamed into place, so it is complete or absent.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys

import ml_collections
from absl import flags

from rlhf_jax import checkpoint_reader, cli, experiment, models, paths, runtime
from rlhf_jax.runs import record, validation
from rlhf_jax.models import hf_import
from rlhf_jax.tokenizer import get_tokenizer

logger = logging.getLogger(__name__)

EXPORT_FILE = "rlhf_jax_export.json"
REWARD_META = "reward_model.json"  # train_reward.REWARD_MODEL_META, without importing trainers
REWARD_DIR = "reward_model"
KINDS = ("policy", "sft", "reward")


class ExportError(ValueError):
    """The workdir cannot be exported, or the upload failed; the message says which and why."""


def _read_json(path: str) -> dict:
    return json.loads(paths.read_text(path))


def read_run(workdir: str, step: int | None = None) -> dict:
    """Finds what a workdir holds and reads its model, read-only.

    Args:
        workdir: a train_policy, train_sft or train_reward workdir.
        step: a checkpoint step; None = the final reward model, or the latest checkpoint.

    Returns:
        {"kind", "step", "params" (numpy tree with "transformer" and, for a reward model, its
        heads), "gpt2_config" (GPT2Config), "config" (the run's ConfigDict or None)}.

    Raises:
        ExportError: no such workdir, or no checkpoint in it (the message names what it
            looked for).
    """
    if not paths.isdir(workdir):
        raise ExportError(f"--workdir {workdir}: no such directory")
    # The config the run last ran with (config_history.jsonl, else config.json).
    recorded = record.recorded_config(workdir)
    config = ml_collections.ConfigDict(recorded) if recorded is not None else None
    reward_meta = paths.join(workdir, REWARD_META)
    if step is None and paths.exists(reward_meta):
        meta = _read_json(reward_meta)
        params = checkpoint_reader.read_params(paths.join(workdir, REWARD_DIR),
                                               meta.get("checksums"))
        return {"kind": "reward", "step": None, "params": params, "config": config,
                "gpt2_config": models.GPT2Config(**meta["gpt2_config"]),
                "task_spec": meta.get("task_spec")}
    ckpt_dir = paths.join(workdir, "checkpoints")
    try:
        params, meta, step = checkpoint_reader.read_state(ckpt_dir, step)
    except FileNotFoundError as e:
        raise ExportError(
            f"--workdir {workdir}: nothing to export: no committed checkpoint in {ckpt_dir} "
            f"and no {REWARD_META} (is it a train_policy, train_sft or train_reward workdir, "
            f"and has it saved a step?) [{e}]") from None
    if "policy" in params:
        kind, params = "policy", {"transformer": params["policy"]["transformer"]}
    elif "reward_head" in params:
        kind = "reward"
    else:
        kind, params = "sft", {"transformer": params["transformer"]}
    if "gpt2_config" in meta:
        gpt_cfg = models.GPT2Config(**meta["gpt2_config"])
    elif config is not None:
        gpt_cfg = experiment.gpt2_config(config)
    else:
        raise ExportError(f"--workdir {workdir}: no config.json to tell the model's shape")
    return {"kind": kind, "step": step, "params": params, "gpt2_config": gpt_cfg,
            "config": config, "task_spec": meta.get("task_spec")}


def _task_settings(run: dict) -> dict:
    """The task settings a user of the exported model needs (from the run's config)."""
    keys = ("query_length", "response_length", "temperature", "truncate_token", "truncate_after",
            "query_prefix", "query_suffix", "start_text", "end_text", "penalty_reward_value")
    task = run["config"].task.to_dict() if run["config"] is not None else run["task_spec"] or {}
    return {k: task[k] for k in keys if k in task}


def export_run(workdir: str, output: str, *, step: int | None = None) -> dict:
    """Writes the workdir's model to `output` as a Hugging Face GPT-2 directory.

    Args:
        workdir: a train_policy, train_sft or train_reward workdir (local or `gs://`).
        output: the directory to create (local or `gs://`); it must not exist yet.
        step: a checkpoint step instead of the final model / latest checkpoint.

    Returns:
        The contents of `rlhf_jax_export.json` (kind, step, task settings, files).
    """
    import transformers

    if paths.exists(output):
        raise ExportError(f"--output {output}: already exists; refusing to overwrite it")
    run = read_run(workdir, step)
    cfg, task = run["gpt2_config"], _task_settings(run)
    tok_name = run["config"].model.tokenizer if run["config"] is not None else "gpt2"
    remote = paths.is_remote(output)
    # A remote export is assembled locally, then uploaded with config.json last.
    staging = paths.staging_dir_for(output, ".tmp-export-")
    try:
        model_dir = os.path.join(staging, "model")
        hf_import.save_hf_checkpoint(run["params"], cfg, model_dir)  # + heads file for an RM
        get_tokenizer(tok_name).save_pretrained(model_dir)
        eot = min(50256, cfg.vocab_size - 1)
        generation = transformers.GenerationConfig(
            do_sample=True, temperature=float(task.get("temperature", 1.0)), top_k=0, top_p=1.0,
            max_new_tokens=int(task.get("response_length", 24)), bos_token_id=eot,
            eos_token_id=eot, pad_token_id=eot)
        generation.save_pretrained(model_dir)
        info = {"kind": run["kind"],
                "workdir": workdir if paths.is_remote(workdir) else os.path.abspath(workdir),
                "step": run["step"], "task": task, "tokenizer": tok_name,
                "files": sorted(os.listdir(model_dir)) + [EXPORT_FILE]}
        if run["kind"] == "reward":
            info["reward"] = ("gain * (last_hidden_state[-1] @ reward_head.kernel + "
                              "reward_head.bias) + reward_norm.bias, on raw query ‖ response")
        runtime.atomic_write_text(os.path.join(model_dir, EXPORT_FILE),
                                  json.dumps(info, indent=2) + "\n")
        if remote:
            paths.upload_dir(model_dir, output, last=(hf_import.CONFIG_FILE,))
        else:
            os.replace(model_dir, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("exported the %s model of %s (step %s) to %s", run["kind"], workdir,
                run["step"], output)
    return info


def push_to_hub(output: str, repo: str, *, private: bool = True) -> str:
    """Uploads an exported directory to the Hugging Face Hub (needs network and a token).

    Args:
        output: the exported directory.
        repo: the hub repo id ("user/name"); created if missing.
        private: create the repo private.

    Returns:
        The URL of the upload commit.

    Raises:
        ExportError: for any failure (offline, no token, no network), saying that the export
            itself is complete.
    """
    try:
        import huggingface_hub

        api = huggingface_hub.HfApi()
        api.create_repo(repo, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=output, repo_id=repo,
                                   commit_message="rlhf_jax export")
        return str(getattr(commit, "commit_url", commit))
    except Exception as e:  # noqa: BLE001 - any hub failure is reported the same way
        raise ExportError(
            f"--push_to_hub {repo}: the upload failed ({type(e).__name__}: {e}). The export "
            f"at {output} is complete; upload it later with `hf upload {repo} {output}` where "
            "a network and a token (HF_TOKEN or `hf auth login`) exist") from None


def main(argv):
    del argv
    runtime.setup_logging()
    f = flags.FLAGS
    try:
        paths.check_readable(f.workdir, "--workdir")  # gs://: before anything is read
        if paths.is_remote(f.output):
            validation.check_output_file(f.output)  # a probe object beside it
            if f.push_to_hub:
                raise ExportError(f"--push_to_hub needs a local --output (got {f.output}): "
                                  "huggingface_hub uploads a local folder")
        info = export_run(f.workdir, f.output, step=f.step)
        if f.push_to_hub:
            info["pushed"] = push_to_hub(f.output, f.push_to_hub)
    except (ExportError, paths.StorageAccessError) as e:
        print(f"export: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(info, indent=2), flush=True)


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A train_policy, train_sft or train_reward workdir.")
    flags.DEFINE_string("output", None, "Directory to create (must not exist).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the final or latest model).")
    flags.DEFINE_string("push_to_hub", "", "Also upload to this Hugging Face repo (user/name).")
    flags.mark_flags_as_required(["workdir", "output"])
    cli.run(main)
