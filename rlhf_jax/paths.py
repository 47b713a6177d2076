"""One path layer for every file the project reads or writes: local paths and `gs://` (issue 14).

Workdirs, `model.checkpoint`, `rewards.trained_model`, label files, query sources, samples and
exports may all be local paths or `gs://bucket/...` URLs (launch/README.md keeps a TPU run's
inputs and outputs in a bucket). Local paths keep their `os` behaviour; remote ones go through
`etils.epath` (gcsfs underneath), the layer orbax already uses for checkpoint metadata, while
orbax's array data goes through tensorstore's `gcs` driver. With `STORAGE_EMULATOR_HOST` (and
the variables of tests/gcs_emulator.py) set, all of them talk to that emulator only.

GCS has no directories: a "directory" is a name prefix with objects under it, `makedirs` does
nothing remotely, and a directory is published by uploading its files with the one that marks
it complete last (`upload_dir`). Every object write is atomic in GCS, so
`runtime.atomic_write_*` write a remote file in one upload, with no temporary name.

`check_readable` / `check_writable` run at start-up, before any compute: a missing bucket,
missing credentials or a refused permission fail there with the path and the flag or
`--config.` field that named it, instead of after the first checkpoint interval.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Sequence

from etils import epath

# What a denied request looks like, per GCS client: gcsfs raises OSError("Forbidden ...") for
# 403 and its HttpError (code 401) for a missing or invalid token; tensorstore reports
# PERMISSION_DENIED / UNAUTHENTICATED; google-auth raises DefaultCredentialsError.
# Status codes match as whole words, and only in the message with its URLs taken out: a probe
# object's random hex name once held "401". Words match inside names too
# (DefaultCredentialsError, PERMISSION_DENIED).
_DENIED = re.compile(r"\b(?:401|403)\b|forbidden|permission|unauthenticated|unauthorized|"
                     r"credentials|anonymous caller")
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+")
CREDENTIALS_HINT = (
    "check the credentials and the bucket's permissions: on a TPU VM the VM's service account "
    "needs roles/storage.objectAdmin on the bucket (launch/README.md, step 1.3); elsewhere run "
    "`gcloud auth application-default login`")


class StorageAccessError(OSError):
    """A path cannot be read or written; the message names the path, its flag and the cause."""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL (`gs://...`) rather than a local path."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """An `epath.Path` for `path` (local or remote)."""
    return epath.Path(os.fspath(path))


def join(base: str | os.PathLike, *parts: str) -> str:
    """`os.path.join` for local paths; `/`-joined for URLs (kept as strings)."""
    base = os.fspath(base)
    if not is_remote(base):
        return os.path.join(base, *parts)
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def basename(path: str | os.PathLike) -> str:
    """The last name of `path`, ignoring trailing slashes (`gs://b/runs/x/` -> `x`).

    `os.path.normpath` would turn `gs://` into `gs:/`, so URLs are split by hand.
    """
    path = os.fspath(path)
    if is_remote(path):
        return path.rstrip("/").rsplit("/", 1)[-1]
    return os.path.basename(os.path.normpath(path))


def exists(path: str | os.PathLike) -> bool:
    """Whether a file or directory (for GCS: an object or a prefix with objects) exists."""
    return os.path.exists(path) if not is_remote(path) else as_path(path).exists()


def isdir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory (for GCS: a prefix with at least one object under it)."""
    return os.path.isdir(path) if not is_remote(path) else as_path(path).is_dir()


def isfile(path: str | os.PathLike) -> bool:
    """Whether `path` is a file (for GCS: an object)."""
    return os.path.isfile(path) if not is_remote(path) else as_path(path).is_file()


def listdir(path: str | os.PathLike) -> list[str]:
    """The names directly under a directory."""
    return os.listdir(path) if not is_remote(path) else [p.name for p in as_path(path).iterdir()]


def read_bytes(path: str | os.PathLike) -> bytes:
    """A whole file's bytes."""
    if not is_remote(path):
        with open(path, "rb") as f:
            return f.read()
    return as_path(path).read_bytes()


def read_text(path: str | os.PathLike) -> str:
    """A whole UTF-8 file (UnicodeDecodeError for other bytes)."""
    return read_bytes(path).decode("utf-8")


def makedirs(path: str | os.PathLike) -> None:
    """Creates a local directory and its parents; nothing for GCS, which has no directories
    (an empty "directory" does not exist there: its first object makes it)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def rmtree(path: str | os.PathLike) -> None:
    """Removes a directory tree (for GCS: every object under the prefix); absent is fine."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
    elif isdir(path):
        as_path(path).rmtree()


def upload_dir(local_dir: str, dest: str, *, last: Sequence[str] = ()) -> None:
    """Copies the files of a local directory (flat) to `dest`, one object each.

    Args:
        local_dir: the directory written locally (e.g. by `save_pretrained`).
        dest: the remote directory.
        last: names uploaded after all others, so that their presence means the directory is
            complete (readers check for them), as a local rename would.
    """
    names = sorted(os.listdir(local_dir), key=lambda n: (n in last, n))
    for name in names:
        with open(os.path.join(local_dir, name), "rb") as f:
            as_path(join(dest, name)).write_bytes(f.read())


def download_files(src: str, names: Iterable[str], local_dir: str) -> list[str]:
    """Copies the files `names` that exist under remote `src` into `local_dir`.

    Returns:
        The names copied.
    """
    present = set(listdir(src))
    copied = []
    for name in names:
        if name in present:
            with open(os.path.join(local_dir, name), "wb") as f:
                f.write(read_bytes(join(src, name)))
            copied.append(name)
    return copied


def local_staging_dir(prefix: str = "rlhf_jax-") -> str:
    """A fresh local temporary directory for assembling what is then uploaded."""
    return tempfile.mkdtemp(prefix=prefix)


def staging_dir_for(target: str, prefix: str) -> str:
    """A fresh temporary directory in which to assemble the directory `target`.

    Local `target`: beside it (its parent is created), so that `os.replace` moves the result
    into place atomically on one file system. Remote `target`: a local temporary directory,
    uploaded afterwards (`upload_dir`).
    """
    if is_remote(target):
        return local_staging_dir(prefix)
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=prefix, dir=parent)


# --- Start-up access checks ---------------------------------------------------------------------

# Object stores checked at start-up (http(s) inputs are read once, with their own errors).
CHECKED_SCHEMES = ("gs://",)
_PROBE = b"rlhf_jax write probe\n"  # not empty: some servers mishandle an empty upload


def bucket_of(path: str) -> str:
    """The bucket name of a `gs://bucket/...` URL."""
    return path.split("://", 1)[1].split("/", 1)[0]


def _denied(err: BaseException) -> bool:
    text = _URL.sub(" ", f"{type(err).__name__} {err}".lower())
    return _DENIED.search(text) is not None


def _describe(path: str, flag: str, err: BaseException, action: str) -> StorageAccessError:
    cause = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    if isinstance(err, FileNotFoundError) and not _denied(err):
        why = (f"the bucket gs://{bucket_of(path)} does not exist (or is not visible to these "
               f"credentials)" if action.startswith("write") else
               f"no such file or directory (or no bucket gs://{bucket_of(path)})")
        return StorageAccessError(f"{flag}={path!r}: cannot {action}: {why} [{cause}]")
    if _denied(err):
        return StorageAccessError(f"{flag}={path!r}: cannot {action}: access denied; "
                                  f"{CREDENTIALS_HINT} [{cause}]")
    return StorageAccessError(f"{flag}={path!r}: cannot {action} ({cause}); {CREDENTIALS_HINT}")


def check_readable(path: str, flag: str) -> None:
    """Fails now, naming `flag`, when a `gs://` input cannot be read (other paths: no-op).

    Args:
        path: a file or directory URL (`gs://...`).
        flag: how the user named it, e.g. "--config.model.checkpoint" or "--workdir".

    Raises:
        StorageAccessError: for a missing object or bucket, missing credentials or a refused
            permission.
    """
    if not path or not path.startswith(CHECKED_SCHEMES):
        return
    try:
        if not as_path(path).exists():
            raise FileNotFoundError(path)
    except Exception as err:  # every client error becomes one clear message
        raise _describe(path, flag, err, "read") from err


def check_writable(path: str, flag: str) -> None:
    """Fails now, naming `flag`, when a `gs://` directory cannot be written (others: no-op).

    Writes and deletes one small probe object under `path`, through both GCS clients a run
    uses: etils.epath (metrics, configs, orbax metadata) and tensorstore (orbax's array data),
    as their credentials are found separately.

    Args:
        path: the remote directory (e.g. the workdir).
        flag: how the user named it, e.g. "--workdir".

    Raises:
        StorageAccessError: for a missing bucket, missing credentials or a refused permission.
    """
    if not path or not path.startswith(CHECKED_SCHEMES):
        return
    probe = join(path, f".rlhf_jax_write_probe-{uuid.uuid4().hex}")
    try:
        target = as_path(probe)
        target.write_bytes(_PROBE)
        target.unlink()
    except Exception as err:  # every client error becomes one clear message
        raise _describe(path, flag, err, "write") from err
    _check_tensorstore_writable(path, probe, flag)


def _check_tensorstore_writable(path: str, probe: str, flag: str) -> None:
    import tensorstore as ts

    bucket = bucket_of(path)
    key = probe.split("://", 1)[1].split("/", 1)[1]
    try:
        kv = ts.KvStore.open({"driver": "gcs", "bucket": bucket}).result()
        kv.write(key, _PROBE).result()
        # A single-key delete, not delete_range: that lists a key range, and a server that
        # ignores the range (gcp-storage-emulator does) would have every object deleted.
        kv.write(key, None).result()
    except Exception as err:  # tensorstore raises ValueError for HTTP errors
        if "not_found" in str(err).lower() or "404" in str(err):
            err = FileNotFoundError(str(err))
        raise _describe(path, flag, err, "write (orbax's tensorstore client)") from err
