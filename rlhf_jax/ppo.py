"""Pure PPO maths, mirroring `lm_human_preferences/train_policy.py` (spec §4.2-4.5).

KL-penalised rewards, whitening, GAE, the clipped policy/value loss and the logged statistics.
Everything here is a pure function on fixed-shape arrays: no jit, no I/O, no Python control flow
on traced values, so callers can jit, shard and scan over it freely.

Shapes: B = rollouts in the (mini)batch, L = response_length.
"""

from typing import Any

import jax
import jax.numpy as jnp

# Added to the variance before the rsqrt, as in the original `utils.whiten`.
WHITEN_EPS = 1e-8


def whiten(x: jax.Array, shift_mean: bool = True, groups: int = 1,
           mask: jax.Array | None = None) -> jax.Array:
    """Normalises `x` to unit variance (and zero mean when `shift_mean`), like the original.

    Mean and population variance are taken over all entries. With `shift_mean=False` the mean is
    added back: x' = (x - mean) / sqrt(var + 1e-8) + mean, which is how rewards are whitened.

    The original whitens inside each minibatch on each of its 8 MPI ranks, so statistics are
    local to a rank's slice of the minibatch (spec §4.4, §10.7). `groups` emulates that on a
    single global batch: the leading axis is split into `groups` equal contiguous blocks and each
    block is whitened with its own statistics. To reproduce the original exactly, lay the batch
    out so that block k holds the rollouts of original rank k and pass groups=num_ranks; the
    original also permutes minibatches within each rank, so shuffle within blocks too.

    Args:
        x: array of shape [batch, ...], e.g. rewards or advantages [B, L].
        shift_mean: if False, keep the original mean (only rescale).
        groups: number of equal blocks along the batch axis whitened independently; must divide
            x.shape[0].
        mask: optional 0/1 array shaped like `x` (`ppo.mask_after_stop`): statistics are taken
            over the entries where it is 1 only, and the other entries come out as 0.

    Returns:
        Array with the shape and dtype of `x`.

    Raises:
        ValueError: if `groups` is not a positive divisor of the batch size.
    """
    if groups < 1 or x.shape[0] % groups:
        raise ValueError(f"groups={groups} must be a positive divisor of batch {x.shape[0]}")
    # Row-major flattening keeps each block of B/groups consecutive rollouts together.
    blocks = x.astype(jnp.promote_types(x.dtype, jnp.float32)).reshape(groups, -1)
    if mask is None:
        mean = jnp.mean(blocks, axis=1, keepdims=True)
        var = jnp.mean(jnp.square(blocks - mean), axis=1, keepdims=True)
    else:
        weights = jnp.broadcast_to(mask, x.shape).astype(blocks.dtype).reshape(groups, -1)
        # max(., 1): a block with nothing masked in gets zeros, not NaN.
        count = jnp.maximum(jnp.sum(weights, axis=1, keepdims=True), 1.0)
        mean = jnp.sum(blocks * weights, axis=1, keepdims=True) / count
        var = jnp.sum(jnp.square(blocks - mean) * weights, axis=1, keepdims=True) / count
    whitened = (blocks - mean) * jax.lax.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    if mask is not None:
        whitened = whitened * weights
    return whitened.reshape(x.shape).astype(x.dtype)


def compute_rewards(
    scores: jax.Array, logprobs: jax.Array, ref_logprobs: jax.Array, kl_coef: Any,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token rewards: -kl_coef * KL on every token, plus the score on the last one.

    The score goes to array index L-1 even when the response was truncated earlier, and the KL
    penalty covers all L tokens including those after truncation (spec §4.2, §10.4). With a
    `mask` (`ppo.mask_after_stop`) the episode ends at the last position the mask keeps: the KL
    is zero after it and the score goes there instead (spec §9, summarize-from-feedback).

    Args:
        scores: [B] reward-model scores (after the no-stop-token penalty).
        logprobs: [B, L] sampling-time log-probs of the response tokens under the policy.
        ref_logprobs: [B, L] log-probs of the same tokens under the reference policy.
        kl_coef: scalar beta, the controller's value at rollout time.
        mask: optional [B, L] 0/1, a prefix of ones per row (`tasks.stop_mask`).

    Returns:
        rewards: [B, L] non_score_reward with the score added at index L-1 (or at the last
            masked-in index).
        non_score_reward: [B, L] -kl_coef * kl.
        kl: [B, L] logprobs - ref_logprobs, the single-sample ("k1") KL estimate (0 where
            masked out).
    """
    kl = jnp.asarray(logprobs) - jnp.asarray(ref_logprobs)  # [B, L]
    if mask is None:
        non_score_reward = -kl_coef * kl  # [B, L]
        return non_score_reward.at[:, -1].add(scores), non_score_reward, kl
    mask = mask.astype(kl.dtype)
    kl = kl * mask
    non_score_reward = -kl_coef * kl
    last = jnp.sum(mask, axis=1).astype(jnp.int32) - 1  # [B] index of the stop token
    at_last = jax.nn.one_hot(last, kl.shape[1], dtype=kl.dtype)  # [B, L]
    return non_score_reward + at_last * scores[:, None], non_score_reward, kl


def gae(rewards: jax.Array, values: jax.Array, gamma: float, lam: float) -> jax.Array:
    """Generalised advantage estimation over the response tokens.

    delta_t = r_t + gamma * V[t+1] - V[t] with V[L] = 0 (episodes end after L tokens), and
    A_t = delta_t + gamma * lam * A_{t+1}, computed with a reverse scan over time.

    Args:
        rewards: [B, L] per-token rewards.
        values: [B, L] sampling-time value predictions.
        gamma: discount (1 in the original).
        lam: GAE lambda (0.95 in the original).

    Returns:
        [B, L] advantages.
    """
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values  # [B, L]

    def step(next_advantage, delta_t):  # carry: [B] A_{t+1}; delta_t: [B]
        advantage = delta_t + gamma * lam * next_advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(step, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True)
    return advantages.T  # [L, B] -> [B, L]


def advantages_and_returns(
    rewards: jax.Array,
    values: jax.Array,
    *,
    gamma: float,
    lam: float,
    whiten_rewards: bool,
    whiten_groups: int = 1,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Advantages and value targets for one minibatch, in the original's order (spec §4.4).

    1. optionally whiten rewards without removing their mean;
    2. GAE;
    3. returns = advantages + values, formed *before* the advantages are whitened;
    4. whiten advantages (mean removed).

    Args:
        rewards: [B, L] per-token rewards from `compute_rewards`.
        values: [B, L] sampling-time values (V_old).
        gamma: discount.
        lam: GAE lambda.
        whiten_rewards: `ppo.whiten_rewards`.
        whiten_groups: see `whiten`; applies to both the reward and the advantage whitening.
        mask: optional [B, L] 0/1 prefix mask (`ppo.mask_after_stop`): each episode ends at its
            last masked-in token, so values after it count as 0 (GAE bootstraps with 0 there),
            whitening uses the masked-in entries only, and masked-out outputs are 0.

    Returns:
        advantages: [B, L] whitened advantages, gradient stopped.
        returns: [B, L] value targets, gradient stopped.
    """
    if mask is not None:
        mask = mask.astype(values.dtype)
        values, rewards = values * mask, rewards * mask
    if whiten_rewards:
        rewards = whiten(rewards, shift_mean=False, groups=whiten_groups, mask=mask)
    advantages = gae(rewards, values, gamma, lam)
    returns = advantages + values
    advantages = whiten(advantages, groups=whiten_groups, mask=mask)
    return jax.lax.stop_gradient(advantages), jax.lax.stop_gradient(returns)


def _mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean over all entries, or over entries where mask is 1."""
    if mask is None:
        return jnp.mean(x)
    return jnp.sum(x * mask) / jnp.sum(mask)


def _var(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Population variance over all (or the masked-in) entries, like `tf.nn.moments`."""
    return _mean(jnp.square(x - _mean(x, mask)), mask)


def ppo_loss(
    new_logprobs: jax.Array,
    vpred: jax.Array,
    old_logprobs: jax.Array,
    old_values: jax.Array,
    advantages: jax.Array,
    returns: jax.Array,
    *,
    cliprange: float,
    cliprange_value: float,
    vf_coef: float,
    entropy: jax.Array | None = None,
    mask: jax.Array | None = None,
    ent_coef: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped PPO policy loss plus clipped value loss, and their statistics (spec §4.4-4.5).

    By default every mean is over all B x L entries with no mask, as in the original: padding
    and post-truncation tokens count fully (spec §4.4.10). Passing `mask` switches every mean,
    variance and clip fraction to the masked-in entries (the "mask after stop" option).

    Args:
        new_logprobs: [B, L] log-probs of the sampled tokens under the current policy.
        vpred: [B, L] current value predictions.
        old_logprobs: [B, L] sampling-time log-probs.
        old_values: [B, L] sampling-time values, the centre of the value clipping.
        advantages: [B, L] whitened advantages.
        returns: [B, L] value targets.
        cliprange: policy ratio clip, ratio in [1 - c, 1 + c].
        cliprange_value: value clip around `old_values`, in reward units.
        vf_coef: weight of the value loss in the total.
        entropy: optional [B, L] per-token policy entropy, reported as "ppo/policy/entropy"
            (and rewarded when `ent_coef` is set).
        mask: optional [B, L] 0/1 (or float) weights; None means the original unmasked behaviour.
        ent_coef: entropy bonus weight (`ppo.ent_coef`; 0 in the original, which has none).

    Returns:
        total_loss: scalar pg_loss + vf_coef * vf_loss - ent_coef * mean(entropy).
        stats: dict of scalars keyed as in spec §4.5 ("ppo/loss/policy", ...). Note the original
            computes "ppo/val/var_explained" once from the error and returns variance averaged
            over minibatches and ranks; averaging this per-minibatch value differs slightly.
    """
    if mask is not None:
        mask = mask.astype(vpred.dtype)

    vpred_clipped = jnp.clip(vpred, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses1 = jnp.square(vpred - returns)
    vf_losses2 = jnp.square(vpred_clipped - returns)
    vf_loss = 0.5 * _mean(jnp.maximum(vf_losses1, vf_losses2), mask)
    # "Clipped" means the clipped term is strictly larger and therefore the one used.
    vf_clipfrac = _mean((vf_losses2 > vf_losses1).astype(vpred.dtype), mask)

    logratio = new_logprobs - old_logprobs
    if mask is not None:
        # Ratio 1 where masked out (summarize-from-feedback's INVALID_LOGPROB does the same):
        # exp of a large masked-out log-ratio would overflow, and inf * 0 is NaN.
        logratio = jnp.where(mask > 0, logratio, 0.0)
    ratio = jnp.exp(logratio)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = _mean(jnp.maximum(pg_losses1, pg_losses2), mask)
    pg_clipfrac = _mean((pg_losses2 > pg_losses1).astype(ratio.dtype), mask)

    total_loss = pg_loss + vf_coef * vf_loss
    if ent_coef:
        if entropy is None:
            raise ValueError("ppo_loss: ent_coef is set but no entropy was given")
        total_loss = total_loss - ent_coef * _mean(entropy, mask)

    returns_var = _var(returns, mask)
    val_error = _mean(jnp.square(vpred - returns), mask)
    stats = {
        "ppo/loss/policy": pg_loss,
        "ppo/loss/value": vf_loss,
        "ppo/loss/total": total_loss,
        "ppo/policy/approxkl": 0.5 * _mean(jnp.square(logratio), mask),
        "ppo/policy/clipfrac": pg_clipfrac,
        "ppo/returns/mean": _mean(returns, mask),
        "ppo/returns/var": returns_var,
        "ppo/val/vpred": _mean(vpred, mask),
        "ppo/val/error": val_error,
        "ppo/val/clipfrac": vf_clipfrac,
        "ppo/val/mean": _mean(old_values, mask),
        "ppo/val/var": _var(old_values, mask),
        "ppo/val/var_explained": 1.0 - val_error / returns_var,
    }
    if entropy is not None:
        stats["ppo/policy/entropy"] = _mean(entropy, mask)
    stats = jax.tree.map(jax.lax.stop_gradient, stats)
    return total_loss, stats


def pool_chunk_stats(stats: dict[str, jax.Array], returns: jax.Array,
                     old_values: jax.Array, mask: jax.Array | None = None
                     ) -> dict[str, jax.Array]:
    """`ppo_loss` statistics of a minibatch from those of its equal-size chunks.

    Micro-batching computes `ppo_loss` per chunk and averages the statistics over the chunks
    (with a mask, each chunk's weighted by its share of the masked-in count). Every statistic
    is a mean, so the average is the minibatch's value, except the two variances: they are
    recomputed here over the whole minibatch (they do not depend on the params), and the
    explained variance with them.

    Args:
        stats: chunk-averaged statistics from `ppo_loss`.
        returns: [B, L] the minibatch's value targets.
        old_values: [B, L] its sampling-time values.
        mask: the minibatch's [B, L] mask, or None (as given to `ppo_loss`).

    Returns:
        The minibatch's statistics.
    """
    if mask is not None:
        mask = mask.astype(returns.dtype)
    out = dict(stats)
    out["ppo/returns/var"] = _var(returns, mask)
    out["ppo/val/var"] = _var(old_values, mask)
    out["ppo/val/var_explained"] = 1.0 - out["ppo/val/error"] / out["ppo/returns/var"]
    return out


def rollout_stats(
    scores: jax.Array,
    logprobs: jax.Array,
    ref_logprobs: jax.Array,
    non_score_reward: jax.Array,
    kl_coef: Any,
    mask: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Rollout-level objective statistics (the "objective/*" part of `record_step_stats`).

    Args:
        scores: [B] scores after the penalty.
        logprobs: [B, L] sampling-time policy log-probs.
        ref_logprobs: [B, L] reference log-probs.
        non_score_reward: [B, L] -kl_coef * kl from `compute_rewards`.
        kl_coef: scalar beta used for this batch's rewards.
        mask: optional [B, L] 0/1 (`ppo.mask_after_stop`): the sums run over masked-in tokens.

    Returns:
        dict with "objective/kl" (mean over rollouts of the summed per-token KL; this is the
        adaptive controller's input), "objective/kl_coef", "objective/entropy" (mean summed
        -logprob of the sampled tokens), "objective/score" and "objective/score_total"
        (mean score + mean summed non-score reward).
    """
    mask = 1.0 if mask is None else mask.astype(logprobs.dtype)
    mean_kl = jnp.mean(jnp.sum((logprobs - ref_logprobs) * mask, axis=1))
    mean_entropy = jnp.mean(jnp.sum(-logprobs * mask, axis=1))
    mean_non_score_reward = jnp.mean(jnp.sum(non_score_reward, axis=1))
    mean_score = jnp.mean(scores)
    return {
        "objective/kl": mean_kl,
        "objective/kl_coef": jnp.asarray(kl_coef, mean_kl.dtype),
        "objective/entropy": mean_entropy,
        "objective/score": mean_score,
        "objective/score_total": mean_score + mean_non_score_reward,
    }
