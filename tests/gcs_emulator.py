"""A local Google Cloud Storage emulator on loopback, for tests of gs:// paths (issue 14).

    from tests.gcs_emulator import gcs_emulator  # noqa: F401  (a pytest fixture)

    def test_x(gcs_emulator):
        bucket = gcs_emulator.create_bucket("my-bucket")        # gs://my-bucket/...
        epath.Path(f"gs://{bucket}/a.txt").write_text("hi")    # goes to the emulator

`gcp-storage-emulator` (in memory) serves the GCS JSON API on 127.0.0.1. `emulator_env` is the
recipe that sends every gs:// read and write of this project's stack there and nowhere else:

- STORAGE_EMULATOR_HOST (read by gcsfs, etils.epath's gs:// backend, and by
  google-cloud-storage): the JSON API endpoint.
- GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (read by gcsfs when it is imported): the plain
  `GCSFileSystem`, not the zonal/HNS `ExtendedGcsFileSystem`, whose gRPC storage-layout lookup
  fails its TLS handshake against an emulator and only then falls back (46 s for one write,
  measured here; environment.md saw 60 s).
- FSSPEC_GCS_TOKEN=anon (fsspec passes it as gcsfs's `token`): no credential discovery, hence
  no probe of the GCE metadata server.
- TENSORSTORE_GCS_HTTP_URL (tensorstore's `gcs` kvstore, which writes orbax's array data): the
  endpoint. Tensorstore 0.1.86 does not read STORAGE_EMULATOR_HOST.
- GOOGLE_AUTH_TOKEN_FOR_TESTING (tensorstore): a fixed bearer token, its first choice of
  credentials, so it never reads credential files nor probes the metadata server.
- NO_GCE_CHECK=true (google-auth): never probe the metadata server.

Orbax writes array data through tensorstore's `gcs` driver (unless TENSORSTORE_GCS_BACKEND says
`gcs_grpc`, which this recipe does not serve) and everything else (directories, metadata,
commit markers) through etils.epath, so both halves above are needed.

The emulator does not implement GCS's generation preconditions nor send `x-goog-generation`;
tensorstore's OCDBT format (orbax's default) needs both, and without them about one orbax save
in four failed here ("Malformed StorageGeneration"). `_install_preconditions` adds them to the
emulator's object routes, in this process only.

Process-wide caches decide when the variables must be set: etils.epath keeps one gcsfs
filesystem per process and tensorstore one auth provider, both made at the first gs:// use.
The fixture therefore has session scope (one emulator, one port per test process), sets the
variables before any gs:// access, and also installs the plain gcsfs class and the anonymous
token in this process in case gcsfs or fsspec were imported earlier. Subprocesses get the same
recipe from `emulator_env()` (set in os.environ for the session, so they inherit it).
"""

from __future__ import annotations

import json
import os
import socket
import urllib.request

import pytest

HOST = "127.0.0.1"


def emulator_env(endpoint: str) -> dict[str, str]:
    """The environment variables that point this project's GCS clients at `endpoint`."""
    return {
        "STORAGE_EMULATOR_HOST": endpoint,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "FSSPEC_GCS_TOKEN": "anon",
        "TENSORSTORE_GCS_HTTP_URL": endpoint,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "NO_GCE_CHECK": "true",
    }


def _generation(storage, bucket: str, name: str | None) -> str:
    """An object's generation as GCS reports it, "0" when it does not exist."""
    from gcp_storage_emulator.exceptions import NotFound

    try:
        return str(storage.get_file_obj(bucket, name)["generation"]) if name else "0"
    except NotFound:
        return "0"


def _conditional(handler, kind: str):
    """`handler` with GCS's generation preconditions, and generation headers on reads.

    gcp-storage-emulator ignores `ifGenerationMatch`/`ifGenerationNotMatch` and sends no
    `x-goog-generation` header, but tensorstore's OCDBT format (orbax's default) relies on both:
    concurrent writers of its manifest each create it "if absent" and read it back with its
    generation. Without them a save fails now and then ("Malformed StorageGeneration") or,
    worse, writers overwrite each other. The server handles one request at a time, so the
    check and the write below are atomic, as in GCS.
    """
    from http import HTTPStatus

    def wrapped(request, response, storage, *args, **kwargs):
        if kind == "write":
            data = request.data  # read the body first: a 412 must not cut the upload short
            name = request.query.get("name", [None])[0] or request.params.get("object_id")
            if name is None and isinstance(data, dict):
                name = (data.get("meta") or {}).get("name")
        else:
            name = request.params.get("object_id")
        bucket = request.params["bucket_name"]
        current = _generation(storage, bucket, name)
        match = request.query.get("ifGenerationMatch", [None])[0]
        not_match = request.query.get("ifGenerationNotMatch", [None])[0]
        # A missing object is a 404 for reads and deletes (the handler says so), as in GCS.
        failed = match is not None and match != current and (kind == "write" or current != "0")
        if not failed and not_match is not None and not_match == current:
            if kind == "read":
                response.status = HTTPStatus.NOT_MODIFIED
                return
            failed = True
        if failed:
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json({"error": {"code": 412, "message": "conditionNotMet"}})
            return
        handler(request, response, storage, *args, **kwargs)
        if kind == "read" and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            generation = _generation(storage, bucket, name)
            if generation != "0":
                response["x-goog-generation"] = generation
                response["x-goog-metageneration"] = str(
                    storage.get_file_obj(bucket, name).get("metageneration", "1"))

    return wrapped


def _install_preconditions() -> None:
    """Routes the emulator's object reads, writes and deletes through `_conditional` (once)."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    if getattr(server, "_rlhf_jax_conditional", False):
        return
    kinds = {objects.insert: "write", objects.xml_upload: "write", objects.get: "read",
             objects.download: "read", objects.delete: "delete"}
    server.HANDLERS = tuple(
        (regex, {method: _conditional(h, kinds[h]) if h in kinds else h
                 for method, h in handlers.items()})
        for regex, handlers in server.HANDLERS)
    server._rlhf_jax_conditional = True


# Its own opener, without proxies: `urllib.request.urlopen` would build the process-wide opener
# with whatever proxy variables a test has set, and keep them for every later test.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class GcsEmulator:
    """An in-memory GCS emulator serving on a free loopback port."""

    def __init__(self):
        from gcp_storage_emulator.server import create_server

        _install_preconditions()

        with socket.socket() as s:  # a free port; the emulator binds it right after
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        self.endpoint = f"http://{HOST}:{port}"
        self._server = create_server(HOST, port, in_memory=True)
        self._server.start()

    def create_bucket(self, name: str) -> str:
        """Creates bucket `name` (as the JSON API's buckets.insert does) and returns it."""
        request = urllib.request.Request(
            f"{self.endpoint}/storage/v1/b?project=test", method="POST",
            data=json.dumps({"name": name}).encode(), headers={"Content-Type": "application/json"})
        with _DIRECT.open(request, timeout=30) as response:
            assert response.status == 200, response.status
        return name

    def objects(self, bucket: str) -> list[str]:
        """Names of the objects in `bucket`, read straight from the emulator's API."""
        names, token = [], ""
        while True:
            url = f"{self.endpoint}/storage/v1/b/{bucket}/o"
            url += f"?pageToken={token}" if token else ""
            with _DIRECT.open(url, timeout=30) as response:
                page = json.load(response)
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return sorted(names)

    def stop(self) -> None:
        self._server.stop()


def _use_plain_gcsfs_in_process() -> None:
    """What the variables do at import time, done again for an already-imported gcsfs/fsspec."""
    import fsspec
    import gcsfs.core
    from etils.epath import backend

    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
        fsspec.config.conf.setdefault(protocol, {})["token"] = "anon"
    # Drop filesystems made before the variables were set (epath and fsspec both cache them).
    backend.fsspec_backend._get_filesystem.cache_clear()
    gcsfs.core.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def gcs_emulator():
    """The session's GCS emulator, with os.environ pointing every GCS client at it."""
    emulator = GcsEmulator()
    env = emulator_env(emulator.endpoint)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _use_plain_gcsfs_in_process()
    try:
        yield emulator
    finally:
        emulator.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
