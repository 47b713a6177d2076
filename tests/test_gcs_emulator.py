"""gs:// against a local GCS emulator: etils.epath text files and orbax checkpoints (issue 14).

Proves the recipe of tests/gcs_emulator.py: the objects land in the emulator, and no client
in this process connects to (or even resolves) anything but loopback. Python-level sockets
(gcsfs, google-cloud-storage) are watched with an audit hook. Tensorstore speaks HTTP through
its own libcurl, which no Python hook sees; it runs with http(s)_proxy set to a closed
loopback port and only the emulator's address exempt (no_proxy), so a request it sent
anywhere else would fail the test instead of leaving the machine.
"""

import ipaddress
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from rlhf_jax import checkpoint_reader, checkpointing, sharding
from tests.gcs_emulator import gcs_emulator  # noqa: F401 - the session fixture

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

_outside: list = []  # non-loopback hosts contacted while `_watching` is set
_watching: list = []


def _audit(event, args):
    if not _watching or event not in ("socket.connect", "socket.getaddrinfo"):
        return
    host = args[1][0] if event == "socket.connect" else args[0]
    if not isinstance(host, str):  # AF_UNIX paths and the like
        return
    try:
        loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        _outside.append((event, host))


sys.addaudithook(_audit)  # cannot be removed; it only records while a test watches


@pytest.fixture
def loopback_only(gcs_emulator, monkeypatch):  # noqa: F811 - pytest fixture by name
    """Fails the test if anything but loopback was contacted during it."""
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    _outside.clear()
    _watching.append(True)
    yield gcs_emulator
    _watching.clear()
    assert not _outside, f"contacted outside loopback: {sorted(set(_outside))}"


def test_epath_text_files_go_to_the_emulator(loopback_only):
    emulator = loopback_only
    bucket = emulator.create_bucket("rlhf-text")
    run = epath.Path(f"gs://{bucket}/runs/a")
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "sub").mkdir(exist_ok=True)
    (run / "sub" / "x.bin").write_bytes(b"\x00\x01")
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (run / "sub" / "x.bin").read_bytes() == b"\x00\x01"
    assert (run / "metrics.jsonl").exists() and not (run / "nope.txt").exists()
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "sub"]
    assert emulator.objects(bucket) == ["runs/a/metrics.jsonl", "runs/a/sub/x.bin"]
    with pytest.raises(FileNotFoundError):
        (run / "nope.txt").read_text()


def test_subprocesses_inherit_the_recipe(loopback_only):
    """A fresh process (a trainer run by a later test) gets the plain gcsfs class from the
    environment alone: no 60 s gRPC bucket-type lookup, hence the short timeout."""
    bucket = loopback_only.create_bucket("rlhf-subprocess")
    code = ("import gcsfs, gcsfs.core; from etils import epath;"
            f"p = epath.Path('gs://{bucket}/x.txt'); p.write_text('from a subprocess');"
            "print(gcsfs.GCSFileSystem is gcsfs.core.GCSFileSystem, p.read_text())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split(None, 1) == ["True", "from a subprocess\n"]
    assert loopback_only.objects(bucket) == ["x.txt"]


def test_tensorstore_gcs_conditional_writes(loopback_only):
    """What orbax's OCDBT format relies on: reads report generations, and a write conditioned
    on a stale generation fails and changes nothing (the emulator is extended for this)."""
    import tensorstore as ts

    bucket = loopback_only.create_bucket("rlhf-kv")
    kv = ts.KvStore.open({"driver": "gcs", "bucket": bucket}).result()
    kv.write("manifest", b"one").result()
    first = kv.read("manifest").result()
    assert first.value == b"one" and first.stamp.generation
    assert kv.write("manifest", b"two", if_equal=first.stamp.generation).result().generation
    stale = kv.write("manifest", b"three", if_equal=first.stamp.generation).result()
    assert stale.generation == b""  # the condition failed
    assert kv.read("manifest").result().value == b"two"
    assert loopback_only.objects(bucket) == ["manifest"]


def _state(mesh):
    """A small train-state-like tree, sharded over the 8 test devices."""
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    params = {"transformer": {"wte": jnp.arange(64.0).reshape(16, 4)},
              "value_head": {"kernel": jnp.ones((8, 1))}}
    params = jax.device_put(params, shard)
    return {"params": params, "opt_state": jax.tree.map(jnp.zeros_like, params),
            "step": jnp.int32(3)}


def test_orbax_checkpoints_on_gs_save_restore_and_read_only(loopback_only):
    emulator = loopback_only
    bucket = emulator.create_bucket("rlhf-ckpt")
    mesh = sharding.make_mesh(1, -1)
    state = _state(mesh)
    directory = f"gs://{bucket}/runs/ppo/checkpoints"
    with checkpointing.Checkpointer(directory, save_every=1, async_save=False) as ckpt:
        ckpt.save(3, state, {"phase": "train", "kl_coef": 0.15}, force=True)
    objects = emulator.objects(bucket)
    assert any(o.startswith("runs/ppo/checkpoints/3/state/") for o in objects), objects
    with checkpointing.Checkpointer(directory, save_every=1) as ckpt:
        assert ckpt.latest_step() == 3
        abstract = checkpointing.abstract_state(state)
        restored, meta = ckpt.restore(3, abstract)
    assert meta == {"phase": "train", "kl_coef": 0.15}
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    assert restored["params"]["transformer"]["wte"].sharding == \
        state["params"]["transformer"]["wte"].sharding
    # Read-only export path: nothing is written to the bucket.
    params, meta, step = checkpoint_reader.read_state(directory)
    assert step == 3 and isinstance(params["transformer"]["wte"], np.ndarray)
    np.testing.assert_array_equal(params["transformer"]["wte"], np.arange(64.0).reshape(16, 4))
    assert emulator.objects(bucket) == objects
    # A standalone params checkpoint (train_reward's final model).
    checkpointing.save_params(f"gs://{bucket}/runs/rm/reward_model", state["params"])
    loaded = checkpoint_reader.read_params(f"gs://{bucket}/runs/rm/reward_model")
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(state["params"]))
    assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == emulator.endpoint
