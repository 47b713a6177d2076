"""The jitted halves of one PPO iteration (spec §4.3): rollout and update.

`rollout(...)`: sample responses from the policy (sampling-time log-probs and values), the
reference log-probs, the frozen reward model's score of the truncated response with the penalty
for responses without a stop token, and the KL-penalised per-token rewards.

`update(...)`: `noptepochs` x `nminibatches` Adam steps on the PPO loss, as one jitted function
with explicit shardings and a donated train state. It also returns the iteration's non-finite
flags (`runs.nonfinite`): any minibatch's loss or gradient norm, and the updated parameters. Minibatch permutations come from keys folded
with (iteration, epoch), different every iteration. Frozen reference and reward params are
arguments, never closed-over constants.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import ml_collections
import optax

from rlhf_jax import models, networks, optim, ppo, sampling, sharding
from rlhf_jax.data import tasks
from rlhf_jax.runs import nonfinite

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PPOSettings:
    """Static PPO settings (hashable, bound into the jitted functions)."""

    batch_size: int
    nminibatches: int
    noptepochs: int
    cliprange: float
    cliprange_value: float
    vf_coef: float
    gamma: float
    lam: float
    whiten_rewards: bool
    whiten_groups: int
    separate_value: bool
    ent_coef: float = 0.0
    mask_after_stop: bool = False

    @classmethod
    def from_config(cls, p: ml_collections.ConfigDict) -> "PPOSettings":
        if p.value_model not in ("shared", "separate"):
            raise ValueError(f"ppo.value_model={p.value_model!r}: expected 'shared' or 'separate'")
        return cls(p.batch_size, p.nminibatches, p.noptepochs, p.cliprange, p.cliprange_value,
                   p.vf_coef, p.gamma, p.lam, p.whiten_rewards, p.whiten_groups,
                   p.value_model == "separate", p.get("ent_coef", 0.0),
                   p.get("mask_after_stop", False))

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.nminibatches


def check_ppo_config(p: ml_collections.ConfigDict, mesh) -> None:
    """Fails at start-up, naming the field, on batch sizes that cannot be split as asked."""
    sharding.check_batch_divisible("ppo.batch_size", p.batch_size, mesh)
    if p.batch_size % p.nminibatches:
        raise ValueError(f"ppo.batch_size={p.batch_size} is not divisible by "
                         f"ppo.nminibatches={p.nminibatches}")
    mb = p.batch_size // p.nminibatches
    sharding.check_batch_divisible("ppo.batch_size / ppo.nminibatches", mb, mesh)
    if mb % p.whiten_groups:
        raise ValueError(f"the PPO minibatch ({mb}) is not divisible by "
                         f"ppo.whiten_groups={p.whiten_groups}")
    if p.whiten_rewards and mb // p.whiten_groups < 8:
        # The original asserts at least 8 rollouts per rank-minibatch when whitening rewards.
        raise ValueError(
            f"ppo.whiten_rewards needs >= 8 rollouts per whitening group; the minibatch of {mb} "
            f"split into ppo.whiten_groups={p.whiten_groups} gives {mb // p.whiten_groups}")


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


class PPOFunctions:
    """Builds the jitted rollout and update for one model, task and mesh."""

    def __init__(self, gpt_cfg: models.GPT2Config, rm_cfg: models.GPT2Config,
                 spec: tasks.TaskSpec, settings: PPOSettings, tx: optax.GradientTransformation,
                 mesh, state_sharding, policy_sharding, ref_sharding, rm_sharding,
                 value_sharding=None, rollout_sharding=None, max_traces: int | None = None):
        """Jits the rollout and the update.

        `max_traces`, if set, makes a retrace beyond that count fail (chex.assert_max_traces), to
        prove that iterations reuse one compiled program.
        """
        self.cfg, self.rm_cfg, self.spec, self.s, self.tx = gpt_cfg, rm_cfg, spec, settings, tx
        rollout_fn, update_fn = self._rollout, self._update
        if max_traces is not None:
            rollout_fn = chex.assert_max_traces(rollout_fn, n=max_traces)
            update_fn = chex.assert_max_traces(update_fn, n=max_traces)
        batch = sharding.batch_sharding(mesh)
        repl = sharding.replicated(mesh)
        self._batch = batch
        self.rollout = jax.jit(
            rollout_fn,
            in_shardings=(rollout_sharding or policy_sharding, value_sharding, ref_sharding,
                          rm_sharding, batch, repl, repl),
            out_shardings=None,
        )
        self.update = jax.jit(
            update_fn,
            in_shardings=(state_sharding, None, repl),
            out_shardings=(state_sharding, repl, repl),
            donate_argnums=(0,),
        )

    # -- rollout ---------------------------------------------------------------------------
    def _rollout(self, policy, value_params, ref, rm, queries, kl_coef, rng):
        spec, cfg = self.spec, self.cfg
        context = tasks.format_context(queries, spec)
        out = sampling.sample(policy, context, rng, config=cfg,
                              response_length=spec.response_length, temperature=spec.temperature)
        responses, logprobs = out["responses"], out["logprobs"]
        if self.s.separate_value:
            values = networks.response_logprobs(value_params, context, responses, cfg,
                                                spec.temperature, with_entropy=False)["values"]
        else:
            values = out["values"]
        ref_logprobs = networks.response_logprobs(ref, context, responses, cfg, spec.temperature,
                                                  with_entropy=False)["logprobs"]
        truncated = tasks.postprocess_responses(responses, spec)
        raw_scores = networks.reward(rm, queries, truncated, self.rm_cfg)
        scores = tasks.penalize_invalid(raw_scores, responses, spec)
        # ppo.mask_after_stop: each episode ends at its stop token (spec §9).
        mask = tasks.stop_mask(responses, spec) if self.s.mask_after_stop else None
        rewards, non_score, kl = ppo.compute_rewards(scores, logprobs, ref_logprobs, kl_coef, mask)
        data = dict(context=context, responses=responses, logprobs=logprobs, values=values,
                    rewards=rewards, **({} if mask is None else {"mask": mask}))
        data = jax.lax.with_sharding_constraint(data, self._batch)
        stats = ppo.rollout_stats(scores, logprobs, ref_logprobs, non_score, kl_coef, mask)
        stats["objective/valid_fraction"] = jnp.mean(tasks.responses_valid(responses, spec))
        extras = dict(truncated=truncated, scores=scores, kl_sum=kl.sum(-1), queries=queries)
        return data, stats, extras

    # -- update ----------------------------------------------------------------------------
    def _loss(self, trainable, mb):
        spec, s = self.spec, self.s
        out = networks.response_logprobs(trainable["policy"], mb["context"], mb["responses"],
                                         self.cfg, spec.temperature)
        if s.separate_value:
            vpred = networks.response_logprobs(trainable["value"], mb["context"], mb["responses"],
                                               self.cfg, spec.temperature,
                                               with_entropy=False)["values"]
        else:
            vpred = out["values"]
        mask = mb.get("mask")  # present with ppo.mask_after_stop
        adv, returns = ppo.advantages_and_returns(
            mb["rewards"], mb["values"], gamma=s.gamma, lam=s.lam,
            whiten_rewards=s.whiten_rewards, whiten_groups=s.whiten_groups, mask=mask)
        return ppo.ppo_loss(out["logprobs"], vpred, mb["logprobs"], mb["values"], adv, returns,
                            cliprange=s.cliprange, cliprange_value=s.cliprange_value,
                            vf_coef=s.vf_coef, entropy=out["entropy"], mask=mask,
                            ent_coef=s.ent_coef)

    def _update(self, state, data, rng):
        s = self.s

        def minibatch_step(carry, idx):
            params, opt_state = carry
            mb = jax.tree.map(lambda x: x[idx], data)
            mb = jax.lax.with_sharding_constraint(mb, self._batch)
            (loss, stats), grads = jax.value_and_grad(self._loss, has_aux=True)(params, mb)
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
        """The jitted rollout and update for this layout."""
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

