"""Static PPO settings and the start-up checks of the batch sizes they split (spec §4.1).

`PPOSettings` is bound into the jitted PPO programs (`rlhf_jax.ppo_trainer`); the checks fail at
start-up, naming the config field, on a batch that the devices, the minibatches, the whitening
groups or the micro-batches cannot split.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from rlhf_jax import microbatch, sharding

if TYPE_CHECKING:  # only annotations: bench/device_check.py runs without ml_collections
    import ml_collections

MICRO_BATCH_FIELD = "model.micro_batch_size"


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
    micro_batch_size: int = 0

    @classmethod
    def from_config(cls, p: ml_collections.ConfigDict, micro_batch_size: int = 0) -> "PPOSettings":
        """Settings from `config.ppo`, and `config.model.micro_batch_size` (0 = no split)."""
        if p.value_model not in ("shared", "separate"):
            raise ValueError(f"ppo.value_model={p.value_model!r}: expected 'shared' or 'separate'")
        return cls(p.batch_size, p.nminibatches, p.noptepochs, p.cliprange, p.cliprange_value,
                   p.vf_coef, p.gamma, p.lam, p.whiten_rewards, p.whiten_groups,
                   p.value_model == "separate", p.get("ent_coef", 0.0),
                   p.get("mask_after_stop", False), micro_batch_size)

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.nminibatches

    @property
    def rollout_chunks(self) -> int:
        """Chunks each rollout stage runs the batch in."""
        return microbatch.num_chunks(self.batch_size, self.micro_batch_size)

    @property
    def update_chunks(self) -> int:
        """Chunks each minibatch's gradient is accumulated over."""
        return microbatch.num_chunks(self.minibatch_size, self.micro_batch_size)


def check_ppo_config(p: ml_collections.ConfigDict, mesh, micro_batch_size: int = 0) -> None:
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
    check_micro_batch(micro_batch_size, mb, mesh, "the PPO minibatch (ppo.batch_size / "
                      "ppo.nminibatches)")


def check_micro_batch(micro: int, batch: int, mesh, what: str) -> None:
    """Raises ValueError naming `--config.model.micro_batch_size` if it cannot split `batch`."""
    if micro < 0:
        raise ValueError(f"--config.{MICRO_BATCH_FIELD}={micro} must be >= 0 (0 = no split)")
    if micro == 0 or micro >= batch:
        return
    if batch % micro:
        raise ValueError(f"--config.{MICRO_BATCH_FIELD}={micro} does not divide {what} of "
                         f"{batch} rows")
    sharding.check_batch_divisible(f"--config.{MICRO_BATCH_FIELD}", micro, mesh)
