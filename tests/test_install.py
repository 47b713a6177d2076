"""Packaging and the `rlhf-jax` console script (issue 14, install).

A real non-editable install into a fresh venv takes minutes, so this builds the wheel the way
pip does (`pip wheel --no-deps --no-build-isolation`), checks what it holds, and then runs the
unpacked wheel, the layout `pip install .` leaves in site-packages, from another directory.
"""

import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from rlhf_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))
SOURCES = ("setup.py", "pyproject.toml", "README.md", "rlhf_jax", "configs")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The project's wheel, built from a copy of its sources (no build/ left in the repo)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        from_, to = os.path.join(ROOT, name), src / name
        if os.path.isdir(from_):
            shutil.copytree(from_, to, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(from_, to)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
           "--no-index", "-w", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = glob.glob(str(out / "rlhf_jax-*.whl"))
    return path


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory):
    """The wheel unpacked as pip installs it: a site-packages holding only rlhf_jax."""
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return str(site)


def test_wheel_holds_configs_assets_and_console_script(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta_dir = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = z.read(f"{meta_dir}/entry_points.txt").decode()
        metadata = z.read(f"{meta_dir}/METADATA").decode()
    assert CONFIGS and {f"rlhf_jax/configs/{c}" for c in CONFIGS} <= names
    assert {"rlhf_jax/data/assets/books_train.jsonl", "rlhf_jax/data/assets/books_test.jsonl",
            "rlhf_jax/cli.py", "rlhf_jax/export.py", "rlhf_jax/checkpoint_reader.py",
            "rlhf_jax/data/preference_import.py"} <= names
    assert not any(n.startswith(("tests/", "configs/", "bench/")) for n in names)
    assert "rlhf-jax = rlhf_jax.cli:main" in entry_points
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert not any("tqdm" in line for line in requires)  # dropped: metrics.Progress is used
    assert any("torch==2.13.0" in line and 'extra == "test"' in line for line in requires)
    assert any("jax[cuda13]" in line and 'extra == "gpu"' in line for line in requires)
    assert any(line.startswith("Requires-Dist: wandb") and 'extra == "wandb"' in line
               for line in requires)
    # wandb stays out of the core install.
    assert not any("wandb" in line and "extra ==" not in line for line in requires)


def _run_installed(site, cwd, *args, timeout=300):
    env = dict(os.environ, PYTHONPATH=site)  # the unpacked wheel, not the source tree
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_installed_copy_resolves_configs_from_another_directory(site, tmp_path):
    """From a directory without configs/, `--config configs/...` and the quickstart's config
    load the installed copy; flags and overrides work through the console script."""
    code = ("import rlhf_jax, rlhf_jax.cli as c, rlhf_jax.quickstart as q;"
            "print(rlhf_jax.__file__); print(c.configs_dir());"
            "print(q.quickstart_config('w').model.preset)")
    out = _run_installed(site, tmp_path, "-c", code)
    assert out.returncode == 0, out.stderr[-3000:]
    module, configs, preset = out.stdout.split()
    assert module.startswith(site) and configs == os.path.join(site, "rlhf_jax", "configs")
    assert preset == "tiny"
    # The console script's code path (rlhf_jax.cli:main), then the entry module's own flags:
    # the override empties labels.path, which train_reward refuses before any compute.
    run = _run_installed(site, tmp_path, "-m", "rlhf_jax.cli", "train-reward", "--config",
                         "configs/sentiment.py:runlocal", "--workdir", str(tmp_path / "rm"),
                         "--config.labels.path=")
    assert run.returncode == 1, run.stderr[-3000:]
    assert "labels.path is empty" in run.stderr
    assert f"using the copy installed with rlhf_jax: {configs}/sentiment.py" in run.stderr


def test_resolve_config_argv(tmp_path, monkeypatch):
    installed = os.path.join(cli.configs_dir(), "sentiment.py")
    monkeypatch.chdir(tmp_path)
    argv = ["prog", "--config", "configs/sentiment.py:runlocal", "--config.ppo.lr=1e-5",
            "--task=configs/tldr.py", "--other", "configs/sentiment.py"]
    out = cli.resolve_config_argv(argv, ("config", "task"))
    assert out == ["prog", "--config", installed + ":runlocal", "--config.ppo.lr=1e-5",
                   "--task=" + os.path.join(cli.configs_dir(), "tldr.py"), "--other",
                   "configs/sentiment.py"]
    # A file that exists where the user runs wins over the installed copy.
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "sentiment.py").write_text("")
    assert cli.resolve_config_path("configs/sentiment.py:x") == "configs/sentiment.py:x"
    # Unknown files and paths outside configs/ are left for ml_collections to report.
    for value in ("configs/nope.py", "mine/sentiment.py", "/abs/configs/x.py", "gs://b/c.py"):
        assert cli.resolve_config_path(value) == value


def test_cli_usage_unknown_and_missing_commands(capsys, monkeypatch):
    assert cli.main(["--help"]) == 0
    usage = capsys.readouterr().out
    for name in ("train-policy", "train-reward", "train-sft", "label", "sample", "evaluate",
                 "quickstart", "aot-check", "export", "label-server", "label-worker"):
        assert f"  {name} " in usage
    assert cli.main([]) == 2
    assert cli.main(["train-ppo"]) == 2
    assert "unknown command 'train-ppo'" in capsys.readouterr().err
    monkeypatch.setitem(cli.COMMANDS, "label-server", ("rlhf_jax.no_such_module", "x"))
    assert cli.main(["label-server", "--port", "1"]) == 2
    assert "has no module rlhf_jax.no_such_module" in capsys.readouterr().err
