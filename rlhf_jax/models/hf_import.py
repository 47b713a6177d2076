"""Hugging Face GPT-2 checkpoints in and out, without torch.

`load_hf_checkpoint(dir_or_name)` reads `config.json` + `model.safetensors` (the layout of
`GPT2LMHeadModel.save_pretrained` and of the hub's `gpt2` repos) into our param tree.
`save_hf_checkpoint(params, config, out_dir)` writes a directory that
`transformers.GPT2LMHeadModel.from_pretrained(out_dir)` loads, so a trained policy can leave for
the PyTorch ecosystem. Our scalar heads (value, reward, reward gain/bias) are not part of
GPT2LMHeadModel; they go to a separate `rlhf_jax_heads.safetensors` beside it and are read back
by `load_hf_checkpoint`.

HF's `Conv1D` stores weights as (in, out), which is already the Flax Dense kernel layout, so
no transposes are needed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np

from rlhf_jax import paths, runtime
from rlhf_jax.models.gpt2 import GPT2Config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HEADS_FILE = "rlhf_jax_heads.safetensors"

# HF keys that are buffers or tied copies, not parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_IGNORED_KEYS = ("lm_head.weight",)


class CheckpointFormatError(ValueError):
    """A checkpoint directory is missing files or holds tensors of the wrong shape."""


def _layer_names(n_layer: int) -> list[tuple[str, tuple[str, ...]]]:
    """(HF name, our tree path) for every trunk parameter."""
    names = [
        ("wte.weight", ("wte",)),
        ("wpe.weight", ("wpe",)),
        ("ln_f.weight", ("ln_f", "scale")),
        ("ln_f.bias", ("ln_f", "bias")),
    ]
    for i in range(n_layer):
        ours = f"h_{i}"
        for ln in ("ln_1", "ln_2"):
            names.append((f"h.{i}.{ln}.weight", (ours, ln, "scale")))
            names.append((f"h.{i}.{ln}.bias", (ours, ln, "bias")))
        for mod, sub in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")):
            names.append((f"h.{i}.{mod}.{sub}.weight", (ours, mod, sub, "kernel")))
            names.append((f"h.{i}.{mod}.{sub}.bias", (ours, mod, sub, "bias")))
    return names


def _expected_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    d = cfg.n_embd
    shapes = {"wte.weight": (cfg.vocab_size, d), "wpe.weight": (cfg.n_positions, d)}
    shapes["ln_f.weight"] = shapes["ln_f.bias"] = (d,)
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            shapes[p + f"{ln}.weight"] = shapes[p + f"{ln}.bias"] = (d,)
        shapes[p + "attn.c_attn.weight"], shapes[p + "attn.c_attn.bias"] = (d, 3 * d), (3 * d,)
        shapes[p + "attn.c_proj.weight"], shapes[p + "attn.c_proj.bias"] = (d, d), (d,)
        shapes[p + "mlp.c_fc.weight"], shapes[p + "mlp.c_fc.bias"] = (d, 4 * d), (4 * d,)
        shapes[p + "mlp.c_proj.weight"], shapes[p + "mlp.c_proj.bias"] = (4 * d, d), (d,)
    return shapes


def config_from_hf(hf: dict, path: str = "config.json", **overrides) -> GPT2Config:
    """Builds a GPT2Config from an HF `config.json` dict."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CheckpointFormatError(f"{path}: model_type is {hf.get('model_type')!r}, not 'gpt2'")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointFormatError(f"{path}: activation_function {act!r} is not supported")
    try:
        fields = dict(
            vocab_size=int(hf["vocab_size"]),
            n_positions=int(hf.get("n_positions", hf.get("n_ctx", 1024))),
            n_embd=int(hf["n_embd"]),
            n_layer=int(hf["n_layer"]),
            n_head=int(hf["n_head"]),
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        )
    except KeyError as e:
        raise CheckpointFormatError(f"{path}: missing field {e.args[0]!r}") from e
    return GPT2Config(**{**fields, **overrides})


def _resolve_dir(name_or_dir: str) -> str:
    if paths.is_remote(name_or_dir):  # a staged copy in a bucket: never the hub
        if not paths.isdir(name_or_dir):
            raise CheckpointFormatError(
                f"{name_or_dir}: no such checkpoint directory (need {CONFIG_FILE} and "
                f"{WEIGHTS_FILE} under it)")
        return name_or_dir
    if os.path.isdir(name_or_dir):
        return name_or_dir
    if os.path.exists(name_or_dir):
        raise CheckpointFormatError(f"{name_or_dir}: expected a checkpoint directory, got a file")
    try:
        import huggingface_hub

        return huggingface_hub.snapshot_download(
            name_or_dir, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE]
        )
    except Exception as e:  # noqa: BLE001 - any hub failure means: not available here
        raise CheckpointFormatError(
            f"{name_or_dir!r} is not a local directory and could not be fetched from the hub "
            f"({type(e).__name__}: {e}); stage config.json and model.safetensors locally"
        ) from e


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    """Reads a safetensors file (local, or remote read whole); a bad header or truncated data
    names the file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load, load_file

    try:
        return load(paths.read_bytes(path)) if paths.is_remote(path) else load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointFormatError(f"{path}: not a readable safetensors file ({e})") from e


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_hf_checkpoint(name_or_dir: str, expected: GPT2Config | None = None, **overrides):
    """Loads an HF GPT-2 checkpoint into our param tree.

    Args:
        name_or_dir: a directory (local or `gs://`) with config.json and model.safetensors, or
            a hub name (needs network access; a `gs://` path never falls back to the hub).
        expected: if given, the checkpoint's shapes must match this config exactly.
        **overrides: GPT2Config fields that do not change shapes (dtype, remat, pad_id).

    Returns:
        (GPT2Config, params) with params `{"transformer": ..., [heads]}` as float32 numpy arrays.

    Raises:
        CheckpointFormatError: on missing files, missing tensors or shape mismatches; the message
            names the file and tensor.
    """
    ckpt_dir = _resolve_dir(name_or_dir)
    cfg_path = paths.join(ckpt_dir, CONFIG_FILE)
    weights_path = paths.join(ckpt_dir, WEIGHTS_FILE)
    for p in (cfg_path, weights_path):
        if not paths.isfile(p):
            raise CheckpointFormatError(f"{p}: missing file (need {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        hf_cfg = json.loads(paths.read_text(cfg_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{cfg_path}: not valid JSON: {e}") from e
    if not isinstance(hf_cfg, dict):
        raise CheckpointFormatError(f"{cfg_path}: expected a JSON object")
    cfg = config_from_hf(hf_cfg, cfg_path, **overrides)
    if expected is not None:
        for field in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(cfg, field) != getattr(expected, field):
                raise CheckpointFormatError(
                    f"{cfg_path}: {field}={getattr(cfg, field)} but the run's config expects "
                    f"{field}={getattr(expected, field)}"
                )
    tensors = _load_safetensors(weights_path)
    # Hub checkpoints name tensors "h.0...."; GPT2LMHeadModel.save_pretrained uses "transformer.h.0....".
    stripped = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    shapes = _expected_shapes(cfg)
    trunk: dict = {}
    for hf_name, path in _layer_names(cfg.n_layer):
        if hf_name not in stripped:
            raise CheckpointFormatError(f"{weights_path}: missing tensor {hf_name!r}")
        arr = stripped.pop(hf_name)
        if tuple(arr.shape) != shapes[hf_name]:
            raise CheckpointFormatError(
                f"{weights_path}: tensor {hf_name!r} has shape {tuple(arr.shape)}, expected "
                f"{shapes[hf_name]} from {cfg_path}"
            )
        _set(trunk, path, np.asarray(arr, np.float32))
    leftover = [
        k for k in stripped if not k.endswith(_IGNORED_SUFFIXES) and k not in _IGNORED_KEYS
    ]
    if leftover:
        raise CheckpointFormatError(f"{weights_path}: unexpected tensors {sorted(leftover)[:5]}")
    params = {"transformer": trunk}
    heads_path = paths.join(ckpt_dir, HEADS_FILE)
    if paths.isfile(heads_path):
        for name, arr in _load_safetensors(heads_path).items():
            _set(params, tuple(name.split(".")), np.asarray(arr, np.float32))
    return cfg, params


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def save_hf_checkpoint(params, config: GPT2Config, out_dir: str,
                       extra: Callable[[str], Any] | None = None) -> None:
    """Writes params as an HF GPT-2 checkpoint directory, atomically.

    Locally the directory is assembled under a temporary name and renamed into place, so a
    crash never leaves a half-written checkpoint at `out_dir`. A `gs://` `out_dir` is assembled
    in a local temporary directory and uploaded with `config.json` last: readers need it, so a
    crash mid-upload leaves no loadable half checkpoint.

    Args:
        params: our param tree (jax or numpy arrays); gathered to the host here.
        config: its GPT2Config.
        out_dir: destination directory (local or `gs://`); must not exist yet.
        extra: called with the staging directory to add files (e.g. a tokenizer's
            `save_pretrained`), so they land in the same atomic step.
    """
    import jax
    import transformers
    from safetensors.numpy import save_file

    if paths.exists(out_dir):
        raise FileExistsError(f"{out_dir}: already exists; refusing to overwrite a checkpoint")
    params = jax.tree.map(lambda x: np.ascontiguousarray(np.asarray(x, np.float32)), params)
    trunk = params["transformer"]
    tensors = {}
    for hf_name, path in _layer_names(config.n_layer):
        node = trunk
        for key in path:
            node = node[key]
        tensors["transformer." + hf_name] = node
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        layer_norm_epsilon=config.layer_norm_epsilon,
        activation_function="gelu_new",
        bos_token_id=min(50256, config.vocab_size - 1),
        eos_token_id=min(50256, config.vocab_size - 1),
        tie_word_embeddings=True,
    )
    remote = paths.is_remote(out_dir)
    tmp = paths.staging_dir_for(out_dir, ".tmp-hf-")
    try:
        hf_config.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        heads = {k: v for k, v in params.items() if k != "transformer"}
        if heads:
            save_file(_flatten(heads), os.path.join(tmp, HEADS_FILE))
        if extra is not None:
            extra(tmp)
        if remote:
            paths.upload_dir(tmp, out_dir, last=(CONFIG_FILE,))
            shutil.rmtree(tmp, ignore_errors=True)
            return
        # mkdtemp and safetensors create 0700 / 0600: give everything the user's usual modes.
        for name in [tmp, *(os.path.join(tmp, f) for f in os.listdir(tmp))]:
            runtime.apply_umask(name)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
