r"""The `rlhf-jax` console script, and config-file resolution shared with `python -m`.

  rlhf-jax train-policy --config configs/sentiment.py --workdir runs/ppo [--config.ppo.lr=2e-5]
  rlhf-jax label import --task configs/sentiment.py --input prefs.jsonl --format pairs ...
  rlhf-jax --help

Each subcommand runs its entry module exactly as `python -m rlhf_jax.<module>` does (through
`runpy`, as `__main__`): the module's own `if __name__ == "__main__"` block defines its absl and
ml_collections flags and calls `app.run`, so flags, `--config.a.b=value` overrides, `--help`
and exit codes are the same by construction, with no second list of flags to keep in sync.

Config files: `--config configs/sentiment.py[:args]` is read relative to the current directory,
as ml_collections does. When that file does not exist and the path starts with `configs/`, the
copy installed with the package (`rlhf_jax/configs/`, see setup.py) is used instead and the
resolved path is logged, so a non-editable `pip install .` runs the README's commands from any
directory. Entry modules call `run(main)` instead of `app.run(main)` to get this under
`python -m` as well.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import runpy
import sys
from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)

# Subcommand -> (module run as __main__, one-line description).
COMMANDS: dict[str, tuple[str, str]] = {
    "train-policy": ("rlhf_jax.train_policy", "PPO against a reward model (spec §4)"),
    "train-reward": ("rlhf_jax.train_reward", "reward model from preference labels (spec §3)"),
    "train-sft": ("rlhf_jax.train_sft", "supervised fine-tuning (LM or summaries)"),
    "label": ("rlhf_jax.label", "mock labels, or `label import` of your own text preferences"),
    "sample": ("rlhf_jax.sample", "samples of a trained policy or the base model, as JSONL"),
    "evaluate": ("rlhf_jax.evaluate", "ROUGE, novelty and copying of summary samples"),
    "quickstart": ("rlhf_jax.quickstart", "the mock experiment end to end on a CPU"),
    "aot-check": ("rlhf_jax.aot_check", "compile for a TPU slice here and report memory"),
    "export": ("rlhf_jax.export", "a run's model as a Hugging Face directory"),
    "label-server": ("rlhf_jax.label_server", "the human labelling web server"),
    "label-worker": ("rlhf_jax.label_worker", "the labelling worker"),
}
CONFIG_FLAGS = ("config",)
_CONFIGS_PREFIX = "configs"


def configs_dir() -> str | None:
    """The directory of the project's config files, or None if none is found.

    A wheel install has them as `rlhf_jax/configs/`; a source checkout (and an editable install
    of one) has the top-level `configs/` beside the package.
    """
    package = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(package, "configs"),
                      os.path.join(os.path.dirname(package), "configs")):
        if os.path.isdir(candidate):
            return candidate
    return None


def resolve_config_path(value: str) -> str:
    """`configs/<file>.py[:args]` -> the installed copy when the relative path does not exist.

    Args:
        value: a `--config` value, `path[:args]`.

    Returns:
        `value` unchanged when its file exists (or is not a `configs/...` path, or no installed
        copy has it); otherwise the installed file's absolute path with the same `:args`.
    """
    path, sep, arg = value.partition(":")
    if not path or os.path.exists(path) or "://" in path or os.path.isabs(path):
        return value
    parts = os.path.normpath(path).split(os.sep)
    root = configs_dir()
    if len(parts) < 2 or parts[0] != _CONFIGS_PREFIX or root is None:
        return value
    installed = os.path.join(root, *parts[1:])
    if not os.path.isfile(installed):
        return value
    logger.warning("config file %s not found under %s; using the copy installed with rlhf_jax: %s",
                   path, os.getcwd(), installed)
    return installed + sep + arg


def resolve_config_argv(argv: Sequence[str], flag_names: Sequence[str] = CONFIG_FLAGS) -> list[str]:
    """Applies `resolve_config_path` to the values of the config-file flags in `argv`.

    Handles `--config X`, `--config=X` and the single-dash forms; overrides such as
    `--config.ppo.lr=1e-5` are left alone.

    Args:
        argv: a full argument vector (argv[0] is the program).
        flag_names: names of the config-file flags.

    Returns:
        A new argument list.
    """
    out = list(argv)
    names = {f"{dash}{name}" for name in flag_names for dash in ("-", "--")}
    for i, arg in enumerate(out):
        if i == 0:
            continue
        flag, eq, value = arg.partition("=")
        if flag in names and eq:
            out[i] = f"{flag}={resolve_config_path(value)}"
        elif arg in names and i + 1 < len(out):
            out[i + 1] = resolve_config_path(out[i + 1])
    return out


def run(main: Callable, flag_names: Sequence[str] = CONFIG_FLAGS) -> None:
    """`absl.app.run(main)` with config-file paths resolved first (see the module docstring).

    sys.argv itself is rewritten, because ml_collections reads the `--config.x=...` overrides
    from sys.argv when the flag is parsed.
    """
    from absl import app

    sys.argv[:] = resolve_config_argv(sys.argv, flag_names)
    app.run(main)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: rlhf-jax <command> [flags]   (`rlhf-jax <command> --help` lists the flags)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry: `rlhf-jax <command> [flags]`.

    Args:
        argv: the arguments after the program name (default: sys.argv[1:]).

    Returns:
        The exit status (the entry module's own, through SystemExit, when it runs).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"rlhf-jax: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = COMMANDS[command][0]
    if importlib.util.find_spec(module) is None:
        print(f"rlhf-jax {command}: this installation has no module {module} (it is not part "
              f"of rlhf_jax {_version()}); update rlhf_jax to a version that includes it",
              file=sys.stderr)
        return 2
    sys.argv[:] = [f"rlhf-jax {command}", *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


def _version() -> str:
    from rlhf_jax import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
