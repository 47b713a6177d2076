"""Tests for rlhf_jax.checkpointing: policy, round trip of optax/flax state, cross-mesh restore."""

import os
import re
import shutil
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax import checkpoint_integrity as integrity
from rlhf_jax import checkpointing, runtime
from tests.conftest import require_devices


@flax.struct.dataclass
class TrainState:
    """Shaped like the train loops' states: a None field, optax state, raw key data."""

    step: jax.Array
    params: dict
    value_params: dict | None
    opt: optax.OptState
    rng_key_data: jax.Array


def _mesh(shape, names):
    return Mesh(np.asarray(jax.devices()[: int(np.prod(shape))]).reshape(shape), names)


def _state(sharding_w=None):
    w = jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8)
    params = {"w": w, "b": jnp.linspace(0, 1, 8).astype(jnp.bfloat16)}
    if sharding_w is not None:
        params["w"] = jax.device_put(w, sharding_w)
    opt = optax.adam(1e-3).init(params)
    # One update so mu/nu/count are not trivially zero.
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt = optax.adam(1e-3).update(grads, opt, params)
    return TrainState(
        step=jnp.asarray(7, jnp.int32),
        params=params,
        value_params=None,
        opt=opt,
        rng_key_data=jax.random.key_data(jax.random.key(42)),
    )


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_missing_or_empty_dir_has_no_latest_step(tmp_path):
    with checkpointing.Checkpointer(tmp_path / "missing" / "ckpt", save_every=1) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError):
            ckpt.restore()
    (tmp_path / "empty").mkdir()
    with checkpointing.Checkpointer(tmp_path / "empty", save_every=1) as ckpt:
        assert ckpt.latest_step() is None


def test_interval_policy_force_and_keep(tmp_path):
    state = _state()
    with checkpointing.Checkpointer(tmp_path, save_every=2, keep=3) as ckpt:
        saved = {step: ckpt.save(step, state, {"step": step}) for step in (1, 2, 3)}
        assert saved == {1: False, 2: True, 3: False}
        assert ckpt.save(3, state, {"step": 3}, force=True)
        # Forcing a step that is already saved (final save right after an interval save).
        assert not ckpt.save(3, state, {"step": 3}, force=True)
        for step in (4, 5, 6):
            ckpt.save(step, state, {"step": step})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [3, 4, 6]
        assert ckpt.latest_step() == 6
        assert not ckpt.reached_preemption(6)  # No distributed runtime here.


def test_error_in_loop_commits_started_saves_first(tmp_path):
    """An exception inside `commit_on_error` waits for the async save before it propagates."""
    ckpt = checkpointing.Checkpointer(tmp_path, save_every=1)
    with pytest.raises(FloatingPointError):
        with ckpt.commit_on_error():
            assert ckpt.save(1, _state(), {"step": 1})
            raise FloatingPointError("nan")
    # A second manager (as a rerun would open) sees the committed step at once.
    assert checkpointing.Checkpointer(tmp_path, save_every=1).latest_step() == 1
    ckpt.close()
    ckpt.close()  # idempotent


def test_round_trip_keeps_types_dtypes_and_meta(tmp_path):
    state = _state()
    meta = {"step": 7, "kl_coef": np.float32(0.25), "query_length": 64, "shape": (1, 2)}
    with checkpointing.Checkpointer(tmp_path, save_every=7) as ckpt:
        assert ckpt.save(7, state, meta)
    with checkpointing.Checkpointer(tmp_path, save_every=7) as ckpt:
        restored, restored_meta = ckpt.restore(abstract_state=checkpointing.abstract_state(state))
    _assert_same(restored, state)
    assert isinstance(restored, TrainState) and restored.value_params is None
    assert isinstance(restored.opt[0], optax.ScaleByAdamState)
    assert isinstance(restored.opt[1], optax.EmptyState)
    assert restored.params["b"].dtype == jnp.bfloat16
    key = jax.random.wrap_key_data(restored.rng_key_data)
    np.testing.assert_array_equal(jax.random.key_data(key), state.rng_key_data)
    assert restored_meta == {"step": 7, "kl_coef": 0.25, "query_length": 64, "shape": [1, 2]}


@require_devices(8)
@pytest.mark.parametrize("target", ["data2_fsdp4", "replicated"])
def test_restore_onto_another_mesh(tmp_path, target):
    fsdp8 = _mesh((8,), ("fsdp",))
    state = _state(NamedSharding(fsdp8, P("fsdp")))
    assert len(state.params["w"].sharding.device_set) == 8
    with checkpointing.Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, state, {})

    mesh = _mesh((2, 4), ("data", "fsdp"))
    replicated = NamedSharding(mesh, P())
    shardings = jax.tree.map(lambda _: replicated, state)
    if target == "data2_fsdp4":
        w_sharding = NamedSharding(mesh, P("fsdp", "data"))
        shardings = shardings.replace(params={**shardings.params, "w": w_sharding})
    abstract = checkpointing.abstract_state(state, shardings)
    with checkpointing.Checkpointer(tmp_path, save_every=1) as ckpt:
        restored, _ = ckpt.restore(1, abstract)
    _assert_same(restored, state)
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding == sharding
    if target == "data2_fsdp4":
        assert restored.params["w"].addressable_shards[0].data.shape == (4, 4)


def test_half_written_step_is_ignored(tmp_path):
    state = _state()
    with checkpointing.Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(2, state, {"step": 2})
    # A crash during the save of step 5: orbax writes into `<step>.orbax-checkpoint-tmp-<ts>`
    # and renames it only once everything is on disk.
    shutil.copytree(tmp_path / "2", tmp_path / "5.orbax-checkpoint-tmp-1712345678")
    with checkpointing.Checkpointer(tmp_path, save_every=1) as ckpt:
        assert ckpt.latest_step() == 2
        _, meta = ckpt.restore(abstract_state=checkpointing.abstract_state(state))
        assert meta == {"step": 2}
        # The next save after resuming goes through normally.
        assert ckpt.save(3, state, {"step": 3})
        ckpt.wait_until_finished()
        assert ckpt.latest_step() == 3
    # cleanup_tmp_directories runs in the background and is awaited by the first save.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "3"]


def test_abstract_state_sharding_forms():
    mesh = _mesh((2, 4), ("data", "fsdp"))
    tree = {"a": jnp.zeros((4, 8)), "b": jax.ShapeDtypeStruct((2,), jnp.int8), "c": 3}
    one = NamedSharding(mesh, P())
    out = checkpointing.abstract_state(tree, one)
    assert all(x.sharding == one for x in jax.tree.leaves(out))
    assert out["b"].dtype == jnp.int8 and out["c"].shape == ()
    per_leaf = {"a": NamedSharding(mesh, P("data")), "b": one, "c": one}
    assert checkpointing.abstract_state(tree, per_leaf)["a"].sharding == per_leaf["a"]
    own = checkpointing.abstract_state({"a": tree["a"]})
    assert own["a"].sharding == tree["a"].sharding


def test_check_compatible():
    meta = {"config_hash": "abc", "query_length": 64, "shape": [1, 2]}
    checkpointing.check_compatible(
        meta,
        {"config_hash": "abc", "query_length": np.int64(64), "shape": (1, 2)},
        ["config_hash", "query_length", "shape"],
    )
    with pytest.raises(ValueError, match=r"'query_length' is 64 in the checkpoint but 32"):
        checkpointing.check_compatible(meta, {"query_length": 32}, ["query_length"])
    with pytest.raises(ValueError, match=r"'model' is '<missing>' in the checkpoint but '124M'"):
        checkpointing.check_compatible(meta, {"model": "124M"}, ["model"])


def test_relative_directory_works(tmp_path, monkeypatch):
    # orbax itself rejects relative paths, but only when the first save reaches tensorstore.
    monkeypatch.chdir(tmp_path)
    with checkpointing.Checkpointer("run/ckpt", save_every=1) as ckpt:
        assert ckpt.save(1, {"a": jnp.ones(3)}, {})
    assert (tmp_path / "run" / "ckpt" / "1").is_dir()


@require_devices(8)
def test_save_and_load_params(tmp_path):
    fsdp8 = _mesh((8,), ("fsdp",))
    params = _state(NamedSharding(fsdp8, P("fsdp"))).params
    checkpointing.save_params(tmp_path / "model", params)
    checkpointing.save_params(tmp_path / "model", params)  # A rerun replaces the export.
    mesh = _mesh((2, 4), ("data", "fsdp"))
    target = {"w": NamedSharding(mesh, P("data")), "b": NamedSharding(mesh, P())}
    loaded = checkpointing.load_params(
        tmp_path / "model", checkpointing.abstract_state(params, target)
    )
    _assert_same(loaded, params)
    assert loaded["w"].sharding == target["w"]


def test_preemption_saves_off_interval_and_requests_stop(tmp_path):
    state = _state()
    with runtime.StopSignal() as stop, checkpointing.Checkpointer(tmp_path, save_every=10) as ckpt:
        # Stand-in for JAX's preemption service agreeing on step 3 as the sync point.
        ckpt._manager.reached_preemption = lambda step: step == 3
        assert not ckpt.save(2, state, {}) and not stop.requested
        assert ckpt.save(3, state, {})
        assert stop.requested and stop.reason == "preemption"
        assert ckpt.reached_preemption(3)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [3]


_PREEMPTED_CHILD = textwrap.dedent("""
    import os, signal, socket, sys, time
    sock = socket.socket(); sock.bind(("localhost", 0)); port = sock.getsockname()[1]; sock.close()
    import jax, jax.numpy as jnp
    jax.distributed.initialize(f"localhost:{port}", num_processes=1, process_id=0)
    from rlhf_jax import checkpointing, runtime
    state = {"w": jnp.ones((4,))}
    ckpt = checkpointing.Checkpointer(sys.argv[1], save_every=1000)
    with runtime.StopSignal() as stop, ckpt:
        for step in range(1, 500):
            if step == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # What the TPU VM gets before preemption.
            ckpt.save(step, state, {"step": step}, force=stop.requested)
            if stop.requested:
                ckpt.wait_until_finished()
                print("STOPPED", step, stop.reason, ckpt.all_steps(), flush=True)
                sys.exit(3)
            time.sleep(0.02)
    print("NOT STOPPED", flush=True)
""")


def test_real_sigterm_under_distributed_runtime_saves_and_stops(tmp_path):
    # The real path on a TPU VM: JAX's preemption service catches SIGTERM, the hosts agree on a
    # sync step a little later, orbax saves there off the interval, and the loop is told to stop.
    script = tmp_path / "child.py"
    script.write_text(_PREEMPTED_CHILD)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # One device is enough; keeps the child quick.
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr[-3000:]
    _, step, reason, steps = proc.stdout.strip().split(" ", 3)
    assert reason == "preemption" and int(step) >= 3
    assert steps == f"[{step}]"  # Saved at the sync step, far off the 1000-step interval.


def test_async_save_survives_donation_of_saved_buffers(tmp_path):
    # The PPO step donates the old state right after `save` returns; the async write must
    # already hold a host copy by then.
    state = {"w": jnp.arange(1024.0), "step": jnp.asarray(1)}
    expected = jax.tree.map(np.asarray, state)
    abstract = checkpointing.abstract_state(state)
    with checkpointing.Checkpointer(tmp_path, save_every=1, async_save=True) as ckpt:
        assert ckpt.save(1, state, {})
        jax.tree.map(lambda x: x.delete(), state)
        ckpt.wait_until_finished()
        restored, _ = ckpt.restore(1, abstract)
    _assert_same(restored, expected)


# ---------------------------------------------------------------- integrity and corruption


def _two_steps(tmp_path):
    states = {step: {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64) * step,
                     "step": jnp.asarray(step, jnp.int32)} for step in (1, 2)}
    with checkpointing.Checkpointer(tmp_path, save_every=1) as ckpt:
        for step, state in states.items():
            ckpt.save(step, state, {"step": step})
    return states, checkpointing.abstract_state(states[1])


def _largest_data_file(item_dir):
    files = [p for p in item_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(item_dir):
    path = _largest_data_file(item_dir)
    os.truncate(path, path.stat().st_size // 2)
    return "OUT_OF_RANGE.*params|Error reading"


def _flip(item_dir):
    path = _largest_data_file(item_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return "checksum mismatch|Error reading|decod"


def _break_metadata(item_dir):
    (item_dir / "_METADATA").write_text('{"tree_metadata": ')
    return r"_METADATA: not valid JSON"


@pytest.mark.parametrize("corrupt", [_truncate, _flip, _break_metadata],
                         ids=["truncated", "flipped", "metadata"])
def test_corrupt_latest_step_falls_back_and_is_set_aside(tmp_path, corrupt):
    states, abstract = _two_steps(tmp_path)
    why = corrupt(tmp_path / "2" / "state")
    broken = {p.relative_to(tmp_path / "2"): p.read_bytes()
              for p in (tmp_path / "2").rglob("*") if p.is_file()}
    with checkpointing.Checkpointer(tmp_path, save_every=1) as ckpt:
        with pytest.raises(checkpointing.CheckpointCorruptError) as err:
            ckpt.restore(2, abstract)
        assert str(err.value).startswith("step 2: ") and str(tmp_path / "2") in str(err.value)
        assert re.search(why, str(err.value)), str(err.value)
        step, state, meta = ckpt.restore_latest(abstract)
        assert (step, meta) == (1, {"step": 1})
        _assert_same(state, states[1])
        assert ckpt.all_steps() == [1]
        # The run goes on from step 1 and saves step 2 again.
        assert ckpt.save(2, states[2], {"step": 2})
    (moved,) = (tmp_path / "corrupt").iterdir()
    assert re.fullmatch(r"2-\d{8}T\d{6}Z", moved.name)
    assert {p.relative_to(moved): p.read_bytes() for p in moved.rglob("*") if p.is_file()} == broken
    with checkpointing.Checkpointer(tmp_path, save_every=1) as ckpt:
        _assert_same(ckpt.restore(2, abstract)[0], states[2])


def test_no_restorable_step_lists_every_step_and_moves_nothing(tmp_path):
    _, abstract = _two_steps(tmp_path)
    _truncate(tmp_path / "2" / "state")
    _break_metadata(tmp_path / "1" / "state")
    with checkpointing.Checkpointer(tmp_path, save_every=1) as ckpt:
        with pytest.raises(checkpointing.NoRestorableCheckpointError) as err:
            ckpt.restore_latest(abstract)
    msg = str(err.value)
    assert "none of the 2 checkpoints" in msg and "step 2: " in msg and "step 1: " in msg
    assert "1/state/_METADATA: not valid JSON" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


@require_devices(8)
def test_checksums_ignore_the_mesh_and_catch_one_bit():
    w = jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16)
    tree = {"w": w, "b": jnp.ones(5, jnp.bfloat16), "n": jnp.asarray(3)}
    plain = integrity.tree_checksums(tree)
    sharded = dict(tree, w=jax.device_put(w, NamedSharding(_mesh((8,), ("fsdp",)), P("fsdp"))),
                   n=jax.device_put(tree["n"], jax.devices()[3]))  # leaves on other devices
    assert integrity.tree_checksums(sharded) == plain
    assert integrity.tree_checksums(jax.tree.map(np.asarray, sharded)) == plain
    assert integrity.mismatches(sharded, plain) == []
    bits = np.asarray(w).copy()
    bits.view(np.uint32)[3, 5] ^= 1  # the lowest mantissa bit of one element
    assert integrity.mismatches(dict(tree, w=bits), plain) == [
        f"w: digest {integrity.tree_checksums({'w': bits})['w']} != saved {plain['w']}"]
    # Swapping two elements changes the digest too (it depends on positions).
    swapped = np.asarray(w).copy()
    swapped[0, 0], swapped[0, 1] = swapped[0, 1], swapped[0, 0]
    assert integrity.tree_checksums({"w": swapped})["w"] != plain["w"]


def test_read_only_reader_leaves_a_save_in_progress_alone(tmp_path):
    states, abstract = _two_steps(tmp_path)
    # A live run's save in progress: orbax writes `<step>.orbax-checkpoint-tmp-<ts>`.
    shutil.copytree(tmp_path / "2", tmp_path / "3.orbax-checkpoint-tmp-1712345678")

    def snapshot():
        return {str(p.relative_to(tmp_path)): (p.stat().st_mtime_ns, p.stat().st_size)
                for p in tmp_path.rglob("*")}

    before = snapshot()
    with checkpointing.Checkpointer(tmp_path, save_every=1, read_only=True) as ckpt:
        step, state, _ = ckpt.restore_latest(abstract)
        assert step == 2
        with pytest.raises(RuntimeError, match="read-only"):
            ckpt.save(4, state, {})
    _assert_same(state, states[2])
    assert snapshot() == before
    # A broken newest step is skipped, but a reader moves nothing aside.
    _truncate(tmp_path / "2" / "state")
    with checkpointing.Checkpointer(tmp_path, save_every=1, read_only=True) as ckpt:
        assert ckpt.restore_latest(abstract)[0] == 1
    assert not (tmp_path / "corrupt").exists() and (tmp_path / "2").is_dir()
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        checkpointing.Checkpointer(tmp_path / "none", save_every=1, read_only=True)
    assert not (tmp_path / "none").exists()


def test_load_params_verifies_and_names_the_file(tmp_path):
    params = {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64)}
    digests = checkpointing.save_params(tmp_path / "model", params)
    before = sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    _assert_same(checkpointing.load_params(tmp_path / "model", checksums=digests), params)
    assert sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before
    _flip(tmp_path / "model")
    with pytest.raises(checkpointing.CheckpointCorruptError, match=str(tmp_path / "model")):
        checkpointing.load_params(tmp_path / "model", checksums=digests)
    _break_metadata(tmp_path / "model")
    with pytest.raises(checkpointing.CheckpointCorruptError,
                       match=re.escape(str(tmp_path / "model" / "_METADATA"))):
        checkpointing.load_params(tmp_path / "model", checksums=digests)


_BROKEN_RESTORE_CHILD = textwrap.dedent("""
    import os, sys
    import jax.numpy as jnp
    from rlhf_jax import checkpointing
    state = {f"w{i}": jnp.arange(4096.0 * (i + 1)).reshape(64, -1) for i in range(6)}
    with checkpointing.Checkpointer(sys.argv[1], save_every=1) as ckpt:
        ckpt.save(1, state, {})
        ckpt.save(2, state, {})
    for step in ("1", "2"):
        d = os.path.join(sys.argv[1], step, "state", "ocdbt.process_0", "d")
        for name in os.listdir(d):
            os.truncate(os.path.join(d, name), 10)
    ckpt = checkpointing.Checkpointer(sys.argv[1], save_every=1)
    ckpt.restore_latest(checkpointing.abstract_state(state))  # raises: nothing restores
""")


def test_a_failed_restore_ends_with_its_error_not_orbax_noise(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_BROKEN_RESTORE_CHILD)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-4:]
    assert last[0].startswith("rlhf_jax.checkpoint_integrity.NoRestorableCheckpointError: none "
                              "of the 2 checkpoints"), proc.stderr[-3000:]
    assert "Exception ignored" not in proc.stderr and "Event loop is closed" not in proc.stderr


def test_orbax_leftover_filter_drops_only_its_leftovers(monkeypatch):
    """After a failed restore, orbax's abandoned reads raise "Event loop is closed" from
    TensorStore callbacks (through sys.excepthook) and again when their coroutines are
    collected (sys.unraisablehook); only those are dropped, everything else gets through."""
    import types

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    monkeypatch.setattr(sys, "excepthook", lambda t, e, tb: seen.append(e))
    monkeypatch.setattr(integrity, "_previous_hooks", {})
    integrity.quiet_orbax_leftovers()
    namespace = {}
    exec(compile("async def read(): pass", "/venv/orbax/checkpoint/serialization.py", "exec"),
         namespace)
    orbax_coroutine = namespace["read"]()
    closed, other = RuntimeError("Event loop is closed"), RuntimeError("something else")
    sys.unraisablehook(types.SimpleNamespace(exc_value=closed, object=None))
    sys.unraisablehook(types.SimpleNamespace(exc_value=GeneratorExit(), object=orbax_coroutine))
    sys.excepthook(RuntimeError, closed, None)
    sys.unraisablehook(types.SimpleNamespace(exc_value=other, object=None))
    sys.excepthook(ValueError, ValueError("real"), None)
    orbax_coroutine.close()
    assert [str(e) for e in seen] == ["something else", "real"]
