"""Direct reward: PPO against the mock labeler's own score, the paper's baseline (spec §8).

The paper's Fig. 2 and 3 compare policies trained against reward models learned from mock
labels with RL "directly" against the programmatic reward those labels came from. With
`rewards.kind="labeler"` no reward model is trained or loaded: each rollout's responses are
post-processed exactly as for the learned reward (`tasks.postprocess_responses`: padded after
the truncation token), decoded, and scored on the host with the task's mock labeler scorer
(`scorers.make_scorer`, one of `scorers.SCORER_KINDS`: VADER, descriptiveness, copying,
ROUGE).
Responses that fail the validity check then get `task.penalty_reward_value` instead
(`tasks.penalize_invalid`), and PPO adds the same per-token KL penalty as with a learned reward
(`ppo.compute_rewards`). The stage is timed as `time/rollout/labeler`.

Multi-host: every process gathers the whole batch (queries and responses) and scores all of
it, then keeps the rows of its own devices. The scorers are deterministic functions of the
decoded text (lexicon look-ups, n-gram counts), so every process computes the same score for a
row, with no broadcast to wait on and for any layout of the batch over the mesh (a row
replicated on several processes' devices gets the same value on each).
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax import labelers, scorers
from rlhf_jax.data import tasks
from rlhf_jax.runs import validation

# The config side lives with the start-up checks; re-exported for the trainers.
REWARD_KINDS = validation.REWARD_KINDS
reward_kind = validation.reward_kind
check_scorer = validation.check_direct_scorer


class HostReward:
    """Scores a rollout's responses on the host with a mock labeler's scorer."""

    def __init__(self, scorer: labelers.Scorer, tokenizer, spec: tasks.TaskSpec):
        """Creates the reward.

        Args:
            scorer: `scorer(query_texts, response_texts) -> float[B]`, higher is better.
            tokenizer: object with `decode(list[int]) -> str`.
            spec: the task settings (padding, truncation token and window, penalty).
        """
        self.scorer, self.tok, self.spec = scorer, tokenizer, spec

    def score_batch(self, queries: np.ndarray, responses: np.ndarray) -> dict[str, np.ndarray]:
        """Scores a whole batch given as host arrays.

        Args:
            queries: int[B, query_length] raw queries (what the labeler reads, as in label.py).
            responses: int[B, response_length] sampled responses (not yet post-processed).

        Returns:
            {"scores": float32[B] the scorer's score of each truncated response, or the penalty
            for an invalid one; "truncated": int32[B, response_length] the post-processed
            responses}.
        """
        spec = self.spec
        responses = np.asarray(responses, np.int32)
        truncated = tasks.postprocess_responses(responses, spec)
        query_texts = labelers.decode_tokens(self.tok, queries, spec.pad_id)
        response_texts = labelers.decode_tokens(self.tok, truncated, spec.pad_id)
        raw = np.asarray(self.scorer(query_texts, response_texts), np.float32)
        if raw.shape != (len(responses),):
            raise ValueError(f"the labeler's scorer returned shape {raw.shape} for "
                             f"{len(responses)} responses")
        return {"scores": tasks.penalize_invalid(raw, responses, spec), "truncated": truncated}

    def __call__(self, queries: jax.Array, responses: jax.Array,
                 batch_sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
        """Scores a global batch.

        Args:
            queries: int32[B, query_length], a global (batch-sharded) array.
            responses: int32[B, response_length], a global (batch-sharded) array.
            batch_sharding: the sharding of the outputs' leading axis (valid for any rank).

        Returns:
            {"scores": float32[B], "truncated": int32[B, response_length]}, global arrays with
            `batch_sharding`.
        """
        # The whole batch on every process (a collective: every process calls this).
        q, r = multihost_utils.process_allgather((queries, responses), tiled=True)
        out = self.score_batch(np.asarray(q), np.asarray(r))
        return {k: jax.make_array_from_callback(v.shape, batch_sharding,
                                                lambda idx, v=v: v[idx])
                for k, v in out.items()}


def make_host_reward(config: ml_collections.ConfigDict, tokenizer,
                     spec: tasks.TaskSpec) -> HostReward:
    """The direct reward of a `rewards.kind="labeler"` run, built at start-up.

    Raises:
        validation.ConfigError: when the task has no scorer, or its scorer cannot be built
            (e.g. "rouge" for a query source without reference summaries).
    """
    check_scorer(config)
    try:
        scorer = scorers.make_scorer(config, tokenizer, spec)
    except ValueError as err:
        raise validation.ConfigError(
            f"--config.rewards.kind='labeler': the scorer --config.labeler.kind="
            f"{config.labeler.kind!r} cannot be built: {err}") from None
    return HostReward(scorer, tokenizer, spec)
