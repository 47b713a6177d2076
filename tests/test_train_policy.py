"""PPO end to end on a tiny GPT-2: alignment, sharding equivalence, resume, retracing, bad input."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import (
    checkpointing,
    experiment,
    ppo_trainer,
    sharding,
    train_policy,
    train_reward,
)
from rlhf_jax import sample as sample_lib
from rlhf_jax.data import sources, tasks
from rlhf_jax.runs import record
from tests.conftest import require_devices
from tests.test_train_reward import load_config

pytestmark = pytest.mark.slow


def tiny_config(**ppo):
    cfg = load_config()
    cfg.ppo.batch_size = 16
    cfg.ppo.total_episodes = 64
    cfg.ppo.lr = 1e-3
    cfg.log_every = 1
    cfg.ckpt_every = 1
    for k, v in ppo.items():
        cfg.ppo[k] = v
    return cfg


@pytest.fixture(scope="module")
def random_rm(tmp_path_factory):
    """A randomly initialised reward model saved as train_reward does (the original's 'test' RM)."""
    cfg = tiny_config()
    gpt_cfg = experiment.gpt2_config(cfg)
    tok = experiment.tokenizer(cfg)
    spec = experiment.task_spec(cfg, tok, gpt_cfg)
    trunk = experiment.initial_trunk(cfg, gpt_cfg)
    params = experiment.with_heads(trunk, gpt_cfg, ("reward",), jax.random.key(7))
    workdir = str(tmp_path_factory.mktemp("rm"))
    train_reward.save_reward_model(workdir, params, gpt_cfg, spec, "best_of_4")
    return workdir


def _functions(cfg, mesh, rm_dir, max_traces=None):
    """PPOFunctions and initial state/params, built as train_policy builds them."""
    rules = sharding.rules_from_config(cfg.sharding_rules)
    gpt_cfg = experiment.gpt2_config(cfg)
    tok = experiment.tokenizer(cfg)
    spec = experiment.task_spec(cfg, tok, gpt_cfg)
    ppo_trainer.check_ppo_config(cfg.ppo, mesh, cfg.model.micro_batch_size)
    settings = ppo_trainer.PPOSettings.from_config(cfg.ppo, cfg.model.micro_batch_size)
    rm, rm_cfg, _ = train_reward.load_reward_model(rm_dir, mesh, rules, expected_spec=spec)
    tx = ppo_trainer.make_optimizer(cfg.ppo, 4)
    layout = ppo_trainer.build_layout(gpt_cfg, rm_cfg, settings, tx, mesh, rules)
    fns = layout.functions(gpt_cfg, rm_cfg, spec, settings, tx, mesh, max_traces=max_traces)
    repl = sharding.replicated(mesh)
    trunk = experiment.initial_trunk(cfg, gpt_cfg)
    policy = experiment.with_heads(trunk, gpt_cfg, ("value",), jax.random.key(1))
    with sharding.mesh_context(mesh, rules):
        trainable = jax.device_put({"policy": policy}, layout.trainable)
        opt_state = jax.jit(tx.init, out_shardings=layout.opt_state)(trainable)
    state = {"params": trainable, "opt_state": opt_state,
             "step": jax.device_put(jnp.zeros((), jnp.int32), repl),
             "kl_coef": jax.device_put(jnp.float32(0.15), repl)}
    ref = jax.device_put({"transformer": trunk}, layout.ref)
    dataset = experiment.query_dataset(cfg, tok, spec)
    return fns, layout.to_rollout(), state, ref, rm, dataset, rules, spec


def test_first_minibatch_ratio_is_one_and_no_retrace(random_rm):
    """Sampling-time log-probs equal the training forward's (spec §10.2): on the first minibatch
    of an iteration the ratio is 1, approxkl 0 and nothing clips. Iterations do not recompile."""
    cfg = tiny_config()
    mesh = sharding.make_mesh()
    fns, to_rollout, state, ref, rm, dataset, rules, spec = _functions(cfg, mesh, random_rm,
                                                                        max_traces=1)
    with sharding.mesh_context(mesh, rules):
        for it in range(3):
            queries = sharding.host_batch_to_global(dataset.get_batch(it, 16), mesh)
            data, stats, extras = fns.rollout(to_rollout(state["params"]["policy"]), None, ref,
                                              rm, queries, state["kl_coef"], jax.random.key(it))
            if it == 0:
                _, first = jax.jit(fns.minibatch_loss)(state["params"], data)
                assert float(first["ppo/policy/approxkl"]) < 1e-10
                check = fns.alignment(state["params"], data)
                assert float(check["max_abs_logratio"]) < 1e-4
                assert float(check["max_abs_value_diff"]) < 1e-5
                assert float(first["ppo/policy/clipfrac"]) == 0.0
                assert float(first["ppo/val/clipfrac"]) == 0.0
                # Invalid responses (no '.' at index >= 16) score exactly the penalty.
                valid = np.asarray(tasks.responses_valid(data["responses"], spec))
                np.testing.assert_array_equal(np.asarray(extras["scores"])[~valid], -1.0)
            state, train_stats, flags = fns.update(state, data, jax.random.key(100 + it))
            assert int(flags) == 0
            assert np.isfinite(float(train_stats["ppo/loss/total"]))
    assert int(state["step"]) == 3


def test_first_minibatch_ratio_is_one_in_bfloat16(random_rm):
    """model.dtype=bfloat16: the sampler (KV-cache decode) and the training forward (fused
    attention over the whole sequence) round matmul outputs to bfloat16 (8-bit mantissa) in
    differently shaped products, so log-probs may differ by a few 1e-3 (measured on CPU: up to
    2.4e-3). Tolerance: |log-ratio| < 0.02 and approxkl < 1e-5, far below the clip range (0.2)
    and far below what a misalignment gives (O(1)); float32 above: < 1e-4 and < 1e-10."""
    cfg = tiny_config()
    cfg.model.dtype = "bfloat16"
    mesh = sharding.make_mesh()
    fns, to_rollout, state, ref, rm, dataset, rules, _ = _functions(cfg, mesh, random_rm)
    with sharding.mesh_context(mesh, rules):
        queries = sharding.host_batch_to_global(dataset.get_batch(0, 16), mesh)
        data, _, _ = fns.rollout(to_rollout(state["params"]["policy"]), None, ref, rm, queries,
                                 state["kl_coef"], jax.random.key(0))
        check = jax.device_get(fns.alignment(state["params"], data))
        _, first = jax.jit(fns.minibatch_loss)(state["params"], data)
    assert check["max_abs_logratio"] < 0.02 and check["approxkl"] < 1e-5, check
    assert check["max_abs_value_diff"] < 1e-3, check
    assert float(first["ppo/policy/clipfrac"]) == 0.0 and float(first["ppo/val/clipfrac"]) == 0.0
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["opt_state"])
               if jnp.issubdtype(x.dtype, jnp.floating))


def _iteration(cfg, mesh, rm_dir, data=None):
    """One rollout and update from the initial state (the update on `data` when given).

    Returns:
        (the rollout's data on device, host copies of (data, rollout stats, update stats,
        updated params), the PPOFunctions).
    """
    fns, to_rollout, state, ref, rm, dataset, rules, _ = _functions(cfg, mesh, rm_dir)
    with sharding.mesh_context(mesh, rules):
        queries = sharding.host_batch_to_global(dataset.get_batch(0, 16), mesh)
        rolled, stats, _ = fns.rollout(to_rollout(state["params"]["policy"]), None, ref, rm,
                                       queries, state["kl_coef"], jax.random.key(0))
        state, train_stats, flags = fns.update(state, rolled if data is None else data,
                                               jax.random.key(1))
        assert int(flags) == 0
    return rolled, jax.device_get((rolled, stats, train_stats, state["params"])), fns


def _assert_same_iteration(a, b, rtol_update):
    (da, sa, ta, pa), (db, sb, tb, pb) = a, b
    np.testing.assert_array_equal(da["responses"], db["responses"])
    for k in da:
        np.testing.assert_allclose(da[k], db[k], rtol=1e-5, atol=1e-5, err_msg=k)
    for k in sa:
        np.testing.assert_allclose(sa[k], sb[k], rtol=1e-5, atol=1e-5, err_msg=k)
    for k in ta:
        np.testing.assert_allclose(ta[k], tb[k], rtol=rtol_update, atol=1e-5, err_msg=k)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(x, y, rtol=rtol_update, atol=1e-6)


@require_devices(8)
def test_micro_batches_equal_the_unsplit_iteration(random_rm):
    """model.micro_batch_size=8 of 16 rows on 8 devices: the staged rollout (2 chunks per
    stage) gives the same samples, and the accumulated update (on the same data) the same
    params and stats."""
    mesh = sharding.make_mesh()
    data, whole, fns = _iteration(tiny_config(), mesh, random_rm)
    assert fns.s.update_chunks == 1
    cfg = tiny_config()
    cfg.model.micro_batch_size = 8
    _, split, fns = _iteration(cfg, mesh, random_rm, data)
    assert fns.s.update_chunks == 2 and fns.s.rollout_chunks == 2
    _assert_same_iteration(whole, split, rtol_update=1e-5)
    # With ppo.mask_after_stop the losses are means over masked-in tokens, and the chunks hold
    # unequal counts: a random prefix mask (what tasks.stop_mask gives) on the same data.
    lengths = np.random.default_rng(3).integers(1, 25, 16)
    mask = jnp.asarray(np.arange(24)[None, :] < lengths[:, None], jnp.float32)
    masked = dict(data, mask=jax.device_put(mask, data["rewards"].sharding))
    results = []
    for micro in (0, 8):
        cfg = tiny_config(noptepochs=1)
        cfg.model.micro_batch_size = micro
        results.append(_iteration(cfg, mesh, random_rm, masked)[1])
    _assert_same_iteration(*results, rtol_update=1e-5)


@require_devices(8)
def test_update_on_8_devices_matches_one_device(random_rm):
    cfg = tiny_config()
    results = [_iteration(cfg, mesh, random_rm)[1]
               for mesh in (sharding.make_mesh(), sharding.make_mesh(devices=jax.devices()[:1]))]
    _assert_same_iteration(*results, rtol_update=1e-4)


def _rows(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    # Wall-clock metrics differ from run to run; everything else must match exactly.
    return [{k: v for k, v in r.items() if not k.startswith(("elapsed/", "perf/", "time/"))}
            for r in rows]


def _tree(root):
    return sorted(os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files)


def test_resume_matches_uninterrupted_run(random_rm, tmp_path):
    """4 iterations straight equal 2 iterations, a stop, and 2 resumed, metric for metric."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    cfg = tiny_config()
    cfg.rewards.trained_model = random_rm
    train_policy.train_policy(cfg, straight)
    cfg.stop_after = 2
    with pytest.raises(SystemExit) as stopped:
        train_policy.train_policy(cfg, resumed)
    assert stopped.value.code == train_policy.EXIT_STOPPED
    assert checkpointing.Checkpointer(os.path.join(resumed, "checkpoints"),
                                      save_every=1).latest_step() == 2
    cfg.stop_after = 0
    last = train_policy.train_policy(cfg, resumed)
    a, b = _rows(straight), _rows(resumed)
    raw = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl"))]
    assert all(r["perf/tokens_per_sec"] > 0 and r["perf/model_tflops_per_sec_per_device"] > 0
               for r in raw)
    assert [r["step"] for r in a] == [1, 2, 3, 4] == [r["step"] for r in b]
    assert a == b
    assert last["objective/kl_coef"] != 0.15  # the adaptive controller moved
    # A finished workdir returns at once, with the final iteration's metrics.
    assert train_policy.train_policy(cfg, resumed) == last
    for name in ("plot.png", "samples.jsonl", "config.json", "tb"):
        assert os.path.exists(os.path.join(straight, name)), name
    sample = json.loads(open(os.path.join(straight, "samples.jsonl")).readline())
    assert {"query", "response", "score", "kl", "total"} <= set(sample)
    # A resume with another batch size is refused, naming the field, before anything runs
    # (it used to run silently and jump elapsed/episodes).
    cfg.ppo.batch_size = 32
    with pytest.raises(record.ConfigChangedError, match=r"--config\.ppo\.batch_size: 16 "
                                                         r"recorded, 32 now"):
        train_policy.train_policy(cfg, resumed)
    history = [json.loads(line) for line in open(os.path.join(resumed, record.HISTORY_FILE))]
    assert [(h["event"], h["step"]) for h in history] == [("start", None), ("resume", 2),
                                                          ("resume", 4)]
    assert json.load(open(os.path.join(resumed, "config.json")))["stop_after"] == 2  # as started
    # The sampling CLI's library path: the trained policy at the training temperature. It only
    # reads: a save in progress of a live run (orbax's temporary directory) survives it.
    ckpt_dir = os.path.join(straight, "checkpoints")
    shutil.copytree(os.path.join(ckpt_dir, "4"), os.path.join(ckpt_dir,
                                                              "5.orbax-checkpoint-tmp-1712345678"))
    before = {p: os.stat(p).st_mtime_ns for p in _tree(straight)}
    params, step = sample_lib.load_policy(straight)
    assert {p: os.stat(p).st_mtime_ns for p in _tree(straight)} == before
    assert step == 4
    texts = sources.load_texts("builtin", "test")[:3] + ["no full stop here"]
    rows = sample_lib.sample_texts(sample_lib.load_run_config(straight), params, texts,
                                   num_samples=2, batch_size=8)
    assert len(rows) == 6  # the text without a '.' is skipped by the books start/end rules
    assert {r["temperature"] for r in rows} == {0.7}
    assert all(len(r["response_tokens"]) <= 24 for r in rows)


def test_separate_value_network_from_reward_model(random_rm, tmp_path):
    cfg = tiny_config(value_model="separate", total_episodes=32)
    cfg.rewards.trained_model = random_rm
    last = train_policy.train_policy(cfg, str(tmp_path / "sep"))
    assert np.isfinite(last["ppo/loss/total"])
    assert last["ppo/val/mean"] != 0.0  # values start from the reward model, not zero


def test_bad_input(random_rm, tmp_path):
    cfg = tiny_config()
    cfg.rewards.trained_model = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="rewards.trained_model=.*does not exist"):
        train_policy.train_policy(cfg, str(tmp_path / "a"))
    cfg = tiny_config(batch_size=12)
    with pytest.raises(ValueError, match="ppo.batch_size=12 is not divisible by the 8 devices"):
        train_policy.train_policy(cfg, str(tmp_path / "b"))
    cfg = tiny_config(nminibatches=3)
    with pytest.raises(ValueError, match="not divisible by ppo.nminibatches=3"):
        train_policy.train_policy(cfg, str(tmp_path / "c"))
    cfg = tiny_config(whiten_groups=4)
    with pytest.raises(ValueError, match="needs >= 8 rollouts per whitening group"):
        train_policy.train_policy(cfg, str(tmp_path / "d"))
    for micro, match in ((12, "micro_batch_size=12 does not divide the PPO minibatch"),
                         (4, "micro_batch_size=4 is not divisible by the 8 devices")):
        cfg = tiny_config()
        cfg.model.micro_batch_size = micro
        with pytest.raises(ValueError, match=f"--config.model.{match}"):
            train_policy.train_policy(cfg, str(tmp_path / f"m{micro}"))
    cfg = tiny_config()
    cfg.rewards.trained_model = random_rm
    cfg.task.truncate_after = 10
    with pytest.raises(ValueError, match="other task settings: truncate_after"):
        train_policy.train_policy(cfg, str(tmp_path / "e"))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(random_rm, tmp_path):
    cfg = tiny_config(lr=1e30, noptepochs=1)  # iteration 1 reports pre-update (finite) stats
    cfg.rewards.trained_model = random_rm
    workdir = str(tmp_path / "nan")
    with pytest.raises(train_policy.NonFiniteLossError, match="non-finite") as err:
        train_policy.train_policy(cfg, workdir)
    bad = err.value.step
    assert f"train_policy: non-finite {', '.join(err.value.quantities)} at step {bad}" in str(
        err.value)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1,
                                      read_only=True)
    assert ckpt.all_steps() == list(range(1, bad))[-3:]  # ckpt_keep=3 finite states
    for step in ckpt.all_steps():
        state, meta = ckpt.restore(step)
        assert meta["value_model"] == "shared"
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
    rows = _rows(workdir)
    assert rows and all(np.isfinite(r["ppo/loss/total"]) and r["step"] < bad for r in rows)


def test_mask_after_stop_ignores_everything_after_the_stop_token(random_rm):
    """ppo.mask_after_stop (with an entropy bonus): the rollout stores the stop mask, and the
    update is blind to tokens, log-probs, values and rewards after each stop token."""
    cfg = tiny_config(mask_after_stop=True, ent_coef=0.01)
    mesh = sharding.make_mesh()
    fns, to_rollout, state, ref, rm, dataset, rules, spec = _functions(cfg, mesh, random_rm)
    with sharding.mesh_context(mesh, rules):
        queries = sharding.host_batch_to_global(dataset.get_batch(0, 16), mesh)
        data, stats, _ = fns.rollout(to_rollout(state["params"]["policy"]), None, ref, rm,
                                     queries, state["kl_coef"], jax.random.key(0))
        data = {k: np.array(v) for k, v in jax.device_get(data).items()}
        np.testing.assert_array_equal(data["mask"], tasks.stop_mask(data["responses"], spec))
        # A random tiny model never stops by itself: put a '.' at index 18 in half the rows.
        data["responses"][::2, 18] = spec.truncate_token
        data["mask"] = tasks.stop_mask(data["responses"], spec)
        assert data["mask"][::2].sum(1).tolist() == [19] * 8
        poisoned = {k: v.copy() for k, v in data.items()}
        after = data["mask"] == 0
        rng = np.random.default_rng(0)
        poisoned["responses"][after] = rng.integers(0, 50257, after.sum())
        for key in ("logprobs", "values", "rewards"):
            poisoned[key][after] = rng.normal(size=after.sum()) * 100
        copy = jax.tree.map(jnp.copy, state)
        new, train_stats, _ = fns.update(state, data, jax.random.key(1))
        new_poisoned, stats_poisoned, _ = fns.update(copy, poisoned, jax.random.key(1))
    for k in train_stats:
        np.testing.assert_allclose(float(train_stats[k]), float(stats_poisoned[k]), rtol=1e-5,
                                   err_msg=k)
    for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(new_poisoned["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert np.isfinite(float(train_stats["ppo/loss/total"]))
