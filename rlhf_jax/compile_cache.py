"""JAX's persistent compilation cache: compiled programs kept on disk across runs.

A rerun with the same shapes and code (a resumed run, the quickstart again, a second run of a
config) then loads its programs instead of compiling them again. On by default
(`config.model.compilation_cache="auto"`), off with `--config.model.compilation_cache=`.

"auto" means `$RLHF_JAX_COMPILATION_CACHE` if that is set ("" or "off" there turns the cache
off, e.g. for tests), else `$XDG_CACHE_HOME/rlhf_jax/xla` (default `~/.cache/rlhf_jax/xla`).
A cache directory JAX was already given (`JAX_COMPILATION_CACHE_DIR`) is left as it is.

JAX keys each entry by the program, the compile options, the backend and the JAX version, so a
changed program or an upgrade simply misses. Programs that compiled in under a second are not
stored (JAX's `jax_persistent_cache_min_compile_time_secs`).
"""

from __future__ import annotations

import logging
import os

import jax

logger = logging.getLogger(__name__)

CACHE_ENV = "RLHF_JAX_COMPILATION_CACHE"
_OFF = ("", "off", "0", "false", "none")


def default_dir() -> str | None:
    """The directory "auto" stands for, or None when the environment turns the cache off."""
    if CACHE_ENV in os.environ:
        value = os.environ[CACHE_ENV].strip()
        return None if value.lower() in _OFF else value
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rlhf_jax", "xla")


def enable(setting: str | None) -> str | None:
    """Turns the persistent compilation cache on as `setting` says.

    Args:
        setting: "auto", a directory (local or gs://), or ""/None for off.

    Returns:
        The cache directory in use, or None when the cache is off.
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if not setting or str(setting).strip().lower() in _OFF:
        return None
    path = default_dir() if setting == "auto" else str(setting)
    if path is None:
        return None
    if "://" not in path:
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    logger.info("persistent compilation cache: %s", path)
    return path


def enable_from_config(config) -> str | None:
    """`enable(config.model.compilation_cache)`, for entry points (absent field: "auto")."""
    return enable(config.model.get("compilation_cache", "auto"))
