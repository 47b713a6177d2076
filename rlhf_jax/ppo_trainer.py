"""The jitted stages of one PPO iteration (spec §4.3): a staged rollout, then the update.

The rollout is five programs, each jitted on its own so that it can be timed on its own and so
that a host-side stage can be slotted in between (e.g. a reward computed outside JAX):

1. `prefill`: format the contexts, run them through the policy, fill the KV cache, draw the
   first token;
2. `decode`: draw the remaining tokens from the cache (sampling-time log-probs and values);
3. `value` (only with a separate value network): its values of the responses;
4. `reference`: the reference policy's log-probs of the responses;
5. `score`: the frozen reward model's score of the truncated response, with the penalty for
   responses without a stop token (stage "reward"); or, with `rewards.kind="labeler"`, the
   host-side mock labeler's score of the decoded response with the same penalty
   (`direct_reward.HostReward`, stage "labeler");
then `finish`: the KL-penalised per-token rewards and the rollout statistics. `rollout(...)`
runs them in order (and records each one's wall time when asked).

`update(...)`: `noptepochs` x `nminibatches` Adam steps on the PPO loss, as one jitted function
with explicit shardings and a donated train state. It also returns the iteration's non-finite
flags (`runs.nonfinite`): any minibatch's loss or gradient norm, and the updated parameters.
Minibatch permutations come from keys folded with (iteration, epoch), different every iteration. Frozen reference and reward params are
arguments, never closed-over constants.

Micro-batching (`model.micro_batch_size`, see `rlhf_jax.microbatch`): every stage runs its rows
in chunks of that many, and each minibatch's gradient is accumulated over chunks of that many.
Advantages and returns are whitened over the whole minibatch before it is split, so the update
equals the unsplit one.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import chex
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import microbatch, models, networks, optim, ppo, sampling, sharding
from rlhf_jax.data import tasks
from rlhf_jax.runs import nonfinite
# Settings and checks live in ppo_settings; callers reach them through this module too.
from rlhf_jax.ppo_settings import (  # noqa: F401
    MICRO_BATCH_FIELD,
    PPOSettings,
    check_micro_batch,
    check_ppo_config,
)

if TYPE_CHECKING:  # only annotations: bench/device_check.py runs without ml_collections
    import ml_collections

Array = jax.Array


def grouped_permutation(rng: Array, batch: int, groups: int, nminibatches: int) -> Array:
    """Minibatch row indices `[nminibatches, batch // nminibatches]`.

    Rows are shuffled within each of `groups` contiguous blocks (the original's ranks), and
    minibatch m takes slice m of every block, laid out block-major, so that `ppo.whiten(...,
    groups)` on a minibatch whitens each original rank's slice separately.
    """
    per_group = batch // groups
    keys = jax.random.split(rng, groups)
    perms = jax.vmap(lambda k: jax.random.permutation(k, per_group))(keys)
    perms = perms + (jnp.arange(groups) * per_group)[:, None]  # [G, B/G] global row ids
    mb_per_group = per_group // nminibatches
    perms = perms.reshape(groups, nminibatches, mb_per_group).transpose(1, 0, 2)
    return perms.reshape(nminibatches, -1)


ROLLOUT_STAGES = ("prefill", "decode", "value", "reference", "reward", "labeler", "finish")


class PPOFunctions:
    """Builds the jitted rollout stages and the update for one model, task and mesh."""

    def __init__(self, gpt_cfg: models.GPT2Config, rm_cfg: models.GPT2Config,
                 spec: tasks.TaskSpec, settings: PPOSettings, tx: optax.GradientTransformation,
                 mesh, state_sharding, policy_sharding, ref_sharding, rm_sharding,
                 value_sharding=None, rollout_sharding=None, max_traces: int | None = None):
        """Jits the rollout stages and the update.

        `max_traces`, if set, makes a retrace beyond that count fail (chex.assert_max_traces), to
        prove that iterations reuse one compiled program per stage.
        """
        self.cfg, self.rm_cfg, self.spec, self.s, self.tx = gpt_cfg, rm_cfg, spec, settings, tx
        self.sampler = sampling.SamplerSettings(gpt_cfg, spec.response_length, spec.temperature,
                                                num_chunks=settings.rollout_chunks)
        batch = sharding.batch_sharding(mesh)
        repl = sharding.replicated(mesh)
        self._batch = batch
        policy = rollout_sharding or policy_sharding

        def jit(fn, **kw):
            if max_traces is not None:
                fn = chex.assert_max_traces(fn, n=max_traces)
            return jax.jit(fn, **kw)

        self.prefill = jit(self._prefill, in_shardings=(policy, batch, repl))
        # The KV cache is donated: the decode loop updates it in place.
        self.decode = jit(self._decode, in_shardings=(policy, None, None, repl),
                          donate_argnums=(1,))
        self.value = jit(self._values, in_shardings=(value_sharding, batch, batch),
                         out_shardings=batch)
        self.reference = jit(self._reference, in_shardings=(ref_sharding, batch, batch),
                             out_shardings=batch)
        self.score = jit(self._score, in_shardings=(rm_sharding, batch, batch))
        self.finish = jit(self._finish, in_shardings=(batch, None, batch, None, repl))
        self.update = jit(self._update, in_shardings=(state_sharding, None, repl),
                          out_shardings=(state_sharding, repl, repl), donate_argnums=(0,))
        self.alignment = jit(self._alignment, in_shardings=(state_sharding["params"], None),
                             out_shardings=repl)

    # -- rollout ---------------------------------------------------------------------------
    def rollout(self, policy, value_params, ref, rm, queries, kl_coef, rng,
                timings: dict | None = None):
        """Runs the rollout stages in order.

        Args:
            policy: policy params in the rollout layout.
            value_params: a separate value network's params, or None.
            ref: frozen reference params.
            rm: frozen reward-model params, or a host-side reward (`direct_reward.HostReward`,
                called as `rm(queries, responses, batch_sharding)`; timed as "labeler").
            queries: `[batch, query_length]` global batch.
            kl_coef: scalar KL coefficient.
            rng: PRNG key of this iteration's sampling.
            timings: if a dict, each stage's wall seconds are stored in it (under the names of
                ROLLOUT_STAGES), waiting for each stage to finish before the next starts.

        Returns:
            (data for `update`, rollout stats, extras for logging).
        """
        clock = _StageClock(timings)
        state = clock("prefill", self.prefill(policy, queries, rng))
        cache = state.pop("cache")
        samples, _ = clock("decode", self.decode(policy, cache, state, rng))
        responses = samples["responses"]
        if self.s.separate_value:
            samples["values"] = clock("value", self.value(value_params, queries, responses))
        ref_logprobs = clock("reference", self.reference(ref, queries, responses))
        if callable(rm):  # the direct reward, on the host (reward-model params are a dict)
            scored = clock("labeler", rm(queries, responses, self._batch))
        else:
            scored = clock("reward", self.score(rm, queries, responses))
        return clock("finish", self.finish(queries, samples, ref_logprobs, scored, kl_coef))

    def _prefill(self, policy, queries, rng):
        context = tasks.format_context(queries, self.spec)
        state = sampling.prefill(policy, context, rng, self.sampler)
        return jax.tree.map(jax.lax.with_sharding_constraint, state,
                            self.sampler_state_shardings(state))

    def sampler_state_shardings(self, state):
        """Shardings of the sampler state between prefill and decode: rows over every device.

        Leaves are `[rows, ...]`, or `[chunks, rows, ...]` when the rollout is micro-batched;
        the cache's write index (a scalar, or one per chunk) is replicated.
        """
        chunked = self.s.rollout_chunks > 1
        rows = microbatch.chunk_sharding(self._batch) if chunked else self._batch
        repl = sharding.replicated(self._batch.mesh)
        return jax.tree.map(lambda a: rows if a.ndim >= 1 + chunked else repl, state)

    def _decode(self, policy, cache, first, rng):
        out, cache = sampling.decode(policy, dict(first, cache=cache), rng, self.sampler)
        return jax.lax.with_sharding_constraint(out, self._batch), cache

    def _forward_rows(self, fn, *args):
        return microbatch.map_rows(fn, self.s.rollout_chunks, *args, sharding=self._batch)

    def _values(self, value_params, queries, responses):
        context = tasks.format_context(queries, self.spec)
        return self._forward_rows(
            lambda c, r: networks.response_logprobs(value_params, c, r, self.cfg,
                                                    self.spec.temperature,
                                                    with_entropy=False)["values"],
            context, responses)

    def _reference(self, ref, queries, responses):
        context = tasks.format_context(queries, self.spec)
        return self._forward_rows(
            lambda c, r: networks.response_logprobs(ref, c, r, self.cfg, self.spec.temperature,
                                                    with_entropy=False)["logprobs"],
            context, responses)

    def _score(self, rm, queries, responses):
        truncated = tasks.postprocess_responses(responses, self.spec)
        raw = self._forward_rows(lambda q, r: networks.reward(rm, q, r, self.rm_cfg),
                                 queries, truncated)
        scores = tasks.penalize_invalid(raw, responses, self.spec)
        return jax.lax.with_sharding_constraint({"scores": scores, "truncated": truncated},
                                                self._batch)

    def _finish(self, queries, samples, ref_logprobs, scored, kl_coef):
        spec = self.spec
        responses, logprobs, scores = samples["responses"], samples["logprobs"], scored["scores"]
        # ppo.mask_after_stop: each episode ends at its stop token (spec §9).
        mask = tasks.stop_mask(responses, spec) if self.s.mask_after_stop else None
        rewards, non_score, kl = ppo.compute_rewards(scores, logprobs, ref_logprobs, kl_coef, mask)
        data = dict(context=tasks.format_context(queries, spec), responses=responses,
                    logprobs=logprobs, values=samples["values"], rewards=rewards,
                    **({} if mask is None else {"mask": mask}))
        data = jax.lax.with_sharding_constraint(data, self._batch)
        stats = ppo.rollout_stats(scores, logprobs, ref_logprobs, non_score, kl_coef, mask)
        stats["objective/valid_fraction"] = jnp.mean(tasks.responses_valid(responses, spec))
        extras = dict(truncated=scored["truncated"], scores=scores, kl_sum=kl.sum(-1),
                      queries=queries)
        return data, stats, extras

    # -- update ----------------------------------------------------------------------------
    def _new_logprobs(self, trainable, context, responses, with_entropy=True):
        """The training forward: log-probs (and entropy) of the policy, values of whichever
        network holds the value head."""
        spec = self.spec
        out = networks.response_logprobs(trainable["policy"], context, responses, self.cfg,
                                         spec.temperature, with_entropy=with_entropy)
        if self.s.separate_value:
            out["values"] = networks.response_logprobs(
                trainable["value"], context, responses, self.cfg, spec.temperature,
                with_entropy=False)["values"]
        return out

    def _loss(self, trainable, mb):
        """PPO loss of (a chunk of) a minibatch whose advantages and returns are computed.

        With `ppo.mask_after_stop` the loss and statistics are means over masked-in tokens,
        which do not average over chunks of unequal counts: each chunk's are weighted by its
        share of the minibatch's count (`mask_total`), so their average is the minibatch's.
        """
        s = self.s
        out = self._new_logprobs(trainable, mb["context"], mb["responses"])
        mask = mb.get("mask")  # present with ppo.mask_after_stop
        loss, stats = ppo.ppo_loss(out["logprobs"], out["values"], mb["logprobs"], mb["values"],
                                   mb["advantages"], mb["returns"], cliprange=s.cliprange,
                                   cliprange_value=s.cliprange_value, vf_coef=s.vf_coef,
                                   entropy=out["entropy"], mask=mask, ent_coef=s.ent_coef)
        if mask is not None and s.update_chunks > 1:
            weight = s.update_chunks * jnp.sum(mask) / mb["mask_total"][0]
            loss, stats = loss * weight, jax.tree.map(lambda v: v * weight, stats)
        return loss, stats

    def minibatch_loss(self, trainable, mb):
        """(loss, stats) of a whole minibatch as the update computes them (no micro-split)."""
        return self._loss(trainable, self._with_advantages(mb))

    def _with_advantages(self, mb):
        s = self.s
        mask = mb.get("mask")
        adv, returns = ppo.advantages_and_returns(
            mb["rewards"], mb["values"], gamma=s.gamma, lam=s.lam,
            whiten_rewards=s.whiten_rewards, whiten_groups=s.whiten_groups, mask=mask)
        out = dict(mb, advantages=adv, returns=returns)
        if mask is not None:  # the minibatch's count, on every row so that chunks keep it
            out["mask_total"] = jnp.full(mask.shape[:1], jnp.sum(mask, dtype=jnp.float32))
        return out

    def _update(self, state, data, rng):
        s = self.s
        n = s.update_chunks

        def minibatch_step(carry, idx):
            params, opt_state = carry
            mb = jax.tree.map(lambda x: x[idx], data)
            mb = self._with_advantages(jax.lax.with_sharding_constraint(mb, self._batch))
            (loss, stats), grads = microbatch.accumulate_gradients(self._loss, params, mb, n,
                                                                   self._batch)
            if n > 1:
                stats = ppo.pool_chunk_stats(stats, mb["returns"], mb["values"], mb.get("mask"))
            updates, opt_state = self.tx.update(grads, opt_state, params)
            flags = nonfinite.step_flags(loss, grads)
            return (optax.apply_updates(params, updates), opt_state), (stats, flags)

        def epoch(carry, e):
            idx = grouped_permutation(jax.random.fold_in(rng, e), s.batch_size,
                                      s.whiten_groups, s.nminibatches)
            return jax.lax.scan(minibatch_step, carry, idx)

        (params, opt_state), (stats, flags) = jax.lax.scan(
            epoch, (state["params"], state["opt_state"]), jnp.arange(s.noptepochs))
        # Averaged over epochs and minibatches, as the original's record_step_stats.
        stats = jax.tree.map(jnp.mean, stats)
        stats["ppo/val/var_explained"] = 1.0 - stats["ppo/val/error"] / stats["ppo/returns/var"]
        new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
        flags = nonfinite.any_flags(flags) | nonfinite.step_flags(params=params)
        return new_state, stats, flags

    def _alignment(self, trainable, data):
        """How far the training forward is from the sampler on a rollout, before any update.

        PPO's first minibatch reads the sampler's log-probs and values as the "old" ones, so
        with the same params its ratio must be 1 (spec §10.2). Returns the largest |log-ratio|,
        approxkl (0.5 * mean squared log-ratio) and the largest |value difference| over the
        batch.
        """
        out = self._forward_rows(
            lambda c, r: self._new_logprobs(trainable, c, r, with_entropy=False),
            data["context"], data["responses"])
        logratio = out["logprobs"] - data["logprobs"]
        return {"max_abs_logratio": jnp.max(jnp.abs(logratio)),
                "approxkl": 0.5 * jnp.mean(jnp.square(logratio)),
                "max_abs_value_diff": jnp.max(jnp.abs(out["values"] - data["values"]))}


class _StageClock:
    """Records the wall time of each rollout stage when given a dict (waiting for each)."""

    def __init__(self, timings: dict | None):
        self.timings = timings
        self.t0 = time.perf_counter()

    def __call__(self, name: str, out):
        if self.timings is not None:
            jax.block_until_ready(out)
            now = time.perf_counter()
            self.timings[name] = now - self.t0
            self.t0 = now
        return out


@dataclasses.dataclass
class PPOLayout:
    """Every sharding and abstract shape of a PPO run on one mesh.

    Shared by train_policy, the AOT memory check and the benchmarks, so that all of them compile
    exactly the program a run executes.
    """

    policy: object  # NamedShardings of the policy params
    value: object  # of a separate value network, or None
    trainable: dict  # {"policy": ..., ["value": ...]}
    ref: dict
    reward: object
    opt_state: object
    state: dict  # of the whole train state
    rollout: object  # of the policy during sampling (replicated)
    abstract_trainable: dict
    abstract_state: dict
    heads: tuple[str, ...]

    def functions(self, gpt_cfg, rm_cfg, spec, settings, tx, mesh, max_traces=None):
        """The jitted rollout stages and update for this layout."""
        return PPOFunctions(gpt_cfg, rm_cfg, spec, settings, tx, mesh, self.state, self.policy,
                            self.ref, self.reward, self.value, self.rollout, max_traces)

    def to_rollout(self):
        """A jitted reshard of the policy params into the rollout layout."""
        return jax.jit(lambda params: params, in_shardings=(self.policy,),
                       out_shardings=self.rollout)


def build_layout(gpt_cfg: models.GPT2Config, rm_cfg: models.GPT2Config, settings: PPOSettings,
                 tx: optax.GradientTransformation, mesh, rules) -> PPOLayout:
    """Shardings (FSDP from the logical-axis rules) and abstract shapes of a PPO run.

    Fails fast if the rules leave too many parameters replicated.
    """
    heads = () if settings.separate_value else ("value",)
    policy = sharding.param_shardings(gpt_cfg, heads, mesh, rules)
    value = (sharding.param_shardings(rm_cfg, ("value",), mesh, rules)
             if settings.separate_value else None)
    trainable = {"policy": policy} | ({"value": value} if value is not None else {})
    key = jax.random.key(0)
    abstract_trainable = jax.eval_shape(lambda: {
        "policy": models.init_params(gpt_cfg, key, heads),
        **({"value": models.init_params(rm_cfg, key, ("value",))} if value is not None else {})})
    sharding.assert_sufficiently_sharded(trainable, abstract_trainable)
    opt_state = sharding.opt_state_shardings(tx, abstract_trainable, trainable, mesh)
    repl = sharding.replicated(mesh)
    state = {"params": trainable, "opt_state": opt_state, "step": repl, "kl_coef": repl}
    abstract_state = {"params": abstract_trainable,
                      "opt_state": jax.eval_shape(tx.init, abstract_trainable),
                      "step": jax.ShapeDtypeStruct((), jnp.int32),
                      "kl_coef": jax.ShapeDtypeStruct((), jnp.float32)}
    return PPOLayout(
        policy=policy, value=value, trainable=trainable,
        ref={"transformer": policy["transformer"]},
        reward=sharding.param_shardings(rm_cfg, ("reward",), mesh, rules),
        opt_state=opt_state, state=state,
        # Sampling reads the policy once per generated token: replicate it for the rollout, so
        # FSDP does not all-gather every layer at every decoding step (one gather per rollout).
        rollout=jax.tree.map(lambda _: repl, policy),
        abstract_trainable=abstract_trainable, abstract_state=abstract_state, heads=heads)


def make_optimizer(p: ml_collections.ConfigDict, num_updates: int) -> optax.GradientTransformation:
    """TF1-style Adam with the learning rate decayed linearly per PPO iteration (spec §10.9)."""
    schedule = optim.ppo_lr_schedule(p.lr, num_updates, p.noptepochs * p.nminibatches)
    return optim.make_optimizer(schedule, adam_style=p.adam_style, eps=p.adam_eps,
                                max_grad_norm=p.max_grad_norm or None)


def value_params_from_reward(rm_params):
    """A separate value network initialised from the reward model (summarize-from-feedback).

    The trunk is the reward model's; the value head starts as the normalised reward head
    (gain * head + bias), so V(s) initially equals the reward model's estimate at s.
    """
    gain, bias = rm_params["reward_norm"]["gain"], rm_params["reward_norm"]["bias"]
    head = rm_params["reward_head"]
    # Copy the trunk: the train state is donated to the update, and donating buffers that the
    # frozen reward model still uses would free them under it.
    return {"transformer": jax.tree.map(jnp.copy, rm_params["transformer"]),
            "value_head": {"kernel": head["kernel"] * gain, "bias": head["bias"] * gain + bias}}

