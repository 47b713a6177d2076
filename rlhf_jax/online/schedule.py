"""The online label schedule: how many labels a run should have at each PPO step, and at which
label counts the reward model is retrained (spec §5.3). Pure arithmetic, no I/O.

What the paper did (spec §5.3, "[paper, via notes]"): the reward model is trained before the
first PPO episode, then retrained 19 more times "at evenly spaced label counts", each time from
ρ with a fresh head on all labels so far. The label count as a function of PPO episodes was
front-loaded. Spec §5.3 marks the exact formula **[unverified]** (recalled, to be checked
against §2.3 of the paper's PDF, which this repository does not have):

    l(n) = N0 + (N - N0) * (1 - (1 - n / N_pi)^2)

with N0 the initial labels, N the total, n the PPO episodes so far and N_pi the run's episodes.
`schedule="paper"` uses exactly that formula, as the spec gives it and unverified as it is;
`schedule="linear"` is l(n) = N0 + (N - N0) * n / N_pi.

Conventions of this implementation (choices, not the paper's):
- round k (k = 0 .. R-1) trains on the first L_k labels, L_k = N0 + (N - N0) * k / (R - 1)
  rounded down to a whole number of reward-model batches (one epoch uses every label once);
- before PPO iteration i (0-based) every round with L_k <= l((i + 1) * B) is due ("the labels
  due by the end of this iteration"), so round 0 runs before the first episode and the last
  round (L = N) before the last iteration, where it still trains the policy;
- comparisons are enqueued ahead of need: at iteration i, up to l((i + 2q) * B), q =
  `online.query_every`, so labellers have an enqueue period to answer before PPO needs them.
"""

from __future__ import annotations

import math

SCHEDULES = ("linear", "paper")


def progress_fraction(x: float, schedule: str) -> float:
    """The share of the labels beyond the initial ones due at a fraction x of the episodes.

    Args:
        x: episodes so far / the run's episodes (clipped to [0, 1]).
        schedule: "linear" or "paper" (the spec's unverified front-loaded quadratic).

    Returns:
        A number in [0, 1], 0 at x = 0 and 1 at x = 1, non-decreasing.
    """
    x = min(max(float(x), 0.0), 1.0)
    if schedule == "linear":
        return x
    if schedule == "paper":
        return 1.0 - (1.0 - x) ** 2
    raise ValueError(f"--config.online.schedule={schedule!r}: expected one of "
                     f"{', '.join(map(repr, SCHEDULES))}")


def labels_due(episodes: int, total_episodes: int, initial: int, total: int,
               schedule: str) -> int:
    """l(n): the labels a run should have after `episodes` PPO episodes (rounded up).

    Args:
        episodes: PPO episodes so far (n).
        total_episodes: the run's episodes (N_pi).
        initial: labels before the first episode (N0).
        total: labels of the whole run (N).
        schedule: "linear" or "paper".

    Returns:
        An integer in [initial, total].
    """
    frac = progress_fraction(episodes / max(total_episodes, 1), schedule)
    # Rounding is done on the fraction's exact product; the clamp keeps float error from
    # ever asking for more than `total`.
    return min(total, initial + math.ceil((total - initial) * frac - 1e-9))


def round_label_counts(initial: int, total: int, rounds: int, batch_size: int) -> list[int]:
    """L_k: the label count each reward-model round trains on (evenly spaced, spec §5.3).

    Args:
        initial: labels of round 0 (`online.initial_labels`).
        total: labels of the last round (`online.total_labels`).
        rounds: rounds in all (`online.rm_rounds`), the first included.
        batch_size: `rewards.batch_size`: every count is a whole number of batches.

    Returns:
        `rounds` strictly increasing counts from `initial` to `total`.

    Raises:
        ValueError: naming the `--config.` field when the counts are not whole batches, when
            `total < initial`, or when there are fewer label batches than rounds to space.
    """
    if initial % batch_size:
        raise ValueError(f"--config.online.initial_labels={initial} is not divisible by "
                         f"rewards.batch_size={batch_size} (one epoch uses every label once)")
    if total % batch_size:
        raise ValueError(f"--config.online.total_labels={total} is not divisible by "
                         f"rewards.batch_size={batch_size} (one epoch uses every label once)")
    if total < initial:
        raise ValueError(f"--config.online.total_labels={total} is below "
                         f"online.initial_labels={initial}")
    if rounds == 1:
        return [initial]
    extra_batches = (total - initial) // batch_size
    if extra_batches < rounds - 1:
        raise ValueError(
            f"--config.online.rm_rounds={rounds} is larger than the label batches to space the "
            f"retrains over: (total_labels={total} - initial_labels={initial}) / "
            f"rewards.batch_size={batch_size} = {extra_batches} batches for {rounds - 1} "
            f"retrains; lower rm_rounds to at most {extra_batches + 1} or raise total_labels")
    return [initial + (extra_batches * k // (rounds - 1)) * batch_size for k in range(rounds)]


def due_round(label_counts: list[int], labels: int) -> int:
    """The last round whose label count is at most `labels` (-1 when none)."""
    k = -1
    for i, count in enumerate(label_counts):
        if count <= labels:
            k = i
    return k


def enqueue_target(iteration: int, batch_size: int, total_episodes: int, initial: int,
                   total: int, schedule: str, query_every: int) -> int:
    """How many comparisons a run should have asked for by iteration `iteration`'s enqueue.

    Enough for the labels due up to the next enqueue period's end (see the module
    docstring); never more than `total`.
    """
    episodes = min(total_episodes, (iteration + 2 * query_every) * batch_size)
    return labels_due(episodes, total_episodes, initial, total, schedule)


def iteration_round(iteration: int, batch_size: int, total_episodes: int,
                    label_counts: list[int], schedule: str) -> int:
    """The round due before PPO iteration `iteration` (0-based): round 0 at iteration 0."""
    due = labels_due(min(total_episodes, (iteration + 1) * batch_size), total_episodes,
                     label_counts[0], label_counts[-1], schedule)
    return max(0, due_round(label_counts, due))
