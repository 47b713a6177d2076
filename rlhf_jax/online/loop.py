"""The online RLHF loop around PPO (spec §5.3): ask for labels on the policy's samples while it
trains, and retrain the reward model on a schedule.

`OnlineRun.before_iteration(it, policy)` runs before each PPO iteration's rollout:
1. every `online.query_every` iterations, draws N samples of the current policy π on fresh
   queries and sends them to the label store as comparisons (a share as validation
   comparisons: 2 ρ + 2 π samples), enough for the labels the schedule needs one enqueue
   period ahead (`schedule.enqueue_target`);
2. reads the labels that arrived (incrementally, `after=`);
3. when a reward-model round is due (`schedule.iteration_round`), waits for its labels
   ("waiting for labels: 37/64, 1.2 labels/s"; or, with `online.wait=False`, goes on with the
   current model until they are there), measures the current model's accuracy on the labels
   it has not seen (`online/rm_accuracy_fresh`), and trains the round as `train_reward` does,
   in `{workdir}/online/rm_round_KK`: from ρ with a fresh head (or, `online.warm`, from the
   last model), one epoch over the first L_k labels, normalised as offline.
Round 0 runs before the first PPO episode on `online.initial_labels` labels of ρ's samples.

Resume: the loop's counters (comparisons asked, sampling draws, current round) are saved in
the policy checkpoint's metadata; the labels are read again from the store, which is the record
of what was answered. A round's directory is a train_reward run: a finished one returns at once
and an interrupted one resumes. Comparison keys derive from the run id (kept in
`{workdir}/online/run.json`) and the sampling draw, so re-sent comparisons add nothing.

Multi-host: only process 0 talks to the store; every process samples (a collective) and gets the
label arrays, counts and metrics by broadcast (`multihost_utils.broadcast_one_to_all`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
import uuid

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from rlhf_jax import label_types, networks, runtime, sharding, train_reward
from rlhf_jax.data import tasks
from rlhf_jax.labeling.records import TaskIdentity
from rlhf_jax.online import comparisons as comp
from rlhf_jax.online import schedule
from rlhf_jax.online.collect import LabelCollector
from rlhf_jax.online.store import OnlineStoreError, open_store

logger = logging.getLogger(__name__)

ONLINE_DIR = "online"
RUN_FILE = "run.json"
METRICS = ("online/labels", "online/rm_round", "online/rm_labels", "online/enqueued",
           "online/label_wait_s", "online/rm_accuracy_fresh", "online/policy_preferred",
           "online/policy_preferred_step")
# Plotted beside PPO's curves (keys missing from an offline run's metrics are skipped).
PLOTTED = ("online/policy_preferred", "online/rm_accuracy_fresh", "online/labels")
_TASK_NAMES = {"vader": "sentiment", "descriptiveness": "descriptiveness", "copying": "tldr",
               "rouge": "tldr"}
_MAX_DRAWS = 8  # unproductive draws in a row before an enqueue gives up (all invalid)


def task_identity(config, gpt_cfg, spec: tasks.TaskSpec) -> TaskIdentity:
    """What every comparison of this run's store must agree on."""
    n = label_types.get_label_type(config.labels.type).num_samples
    return TaskIdentity(tokenizer=config.model.tokenizer, query_length=spec.query_length,
                        response_length=spec.response_length, num_samples=n,
                        vocab_size=gpt_cfg.vocab_size, pad_id=spec.pad_id)


def _broadcast(tree):
    """Process 0's values on every process (a no-op on one process)."""
    if jax.process_count() == 1:
        return tree
    return multihost_utils.broadcast_one_to_all(tree)


def connect(config, task: TaskIdentity):
    """Opens the label store on process 0 and checks it before any training.

    Raises:
        OnlineStoreError: the server is down, refuses the token, or holds another task (on
            every process: the others learn it by broadcast).
    """
    store, error = None, ""
    if runtime.is_primary():
        try:
            store = open_store(config.online)
            counts = store.check(task)
            logger.info("online: label store %s: %d comparisons, %d labels", store.where,
                        counts["comparisons"]["total"], counts["labels"]["total"])
        except OnlineStoreError as e:
            error = str(e)
    failed = int(_broadcast(np.int32(bool(error))))
    if failed:
        raise OnlineStoreError(error or "online: process 0 could not use the label store")
    return store


def _run_id(workdir: str) -> str:
    """This run's id, made on its first start and kept in {workdir}/online/run.json."""
    path = epath.Path(workdir) / ONLINE_DIR / RUN_FILE
    if path.exists():
        return json.loads(path.read_text())["run_id"]
    run_id = f"{os.path.basename(os.path.normpath(workdir))[:40]}-{uuid.uuid4().hex[:12]}"
    if runtime.is_primary():
        path.parent.mkdir(parents=True, exist_ok=True)
        runtime.atomic_write_text(str(path), json.dumps({"run_id": run_id}))
    return run_id


class OnlineRun:
    """The online loop of one train_policy run (see the module docstring)."""

    def __init__(self, config, workdir: str, store, task: TaskIdentity, *, spec, tok, mesh,
                 rules, fns, layout, dataset, rm_cfg, ref_params, stop=lambda: False):
        o, p = config.online, config.ppo
        self.config, self.o, self.workdir, self.store, self.task = config, o, workdir, store, task
        self.spec, self.tok, self.mesh, self.rules = spec, tok, mesh, rules
        self.fns, self.layout, self.dataset, self.ref_params = fns, layout, dataset, ref_params
        self.stop = stop
        self.n = task.num_samples
        self.batch, self.total_episodes = p.batch_size, p.total_episodes
        self.counts = schedule.round_label_counts(o.initial_labels, o.total_labels, o.rm_rounds,
                                                  config.rewards.batch_size)
        self.run_id = _run_id(workdir) if runtime.is_primary() else ""
        # This run's labels in id order (process 0; the others hold an empty collector).
        self.labels = LabelCollector(store, self.run_id)
        self.state = {"enqueued": 0, "draws": 0, "next_enqueue": 0, "round": -1}
        self.last = {}  # this iteration's own metrics (a round's fresh accuracy, the wait)
        self._last_it = -1
        self.rm_params = None
        self._key = jax.random.fold_in(jax.random.key(config.seed), 0x0411)
        batch_sh = sharding.batch_sharding(mesh)
        self._score = jax.jit(
            lambda params, q, s: networks.rewards_of_samples(params, q, s, rm_cfg),
            in_shardings=(layout.reward, batch_sh, batch_sh))
        self._batch_sh = batch_sh
        # Which instructions the labeling page shows: the task the mock labeler stands for.
        self._task_name = _TASK_NAMES.get(config.labeler.kind, "")

    # -- checkpoint state ------------------------------------------------------------------
    def checkpoint_meta(self) -> dict:
        """The loop's counters, saved in the policy checkpoint's metadata."""
        return dict(self.state)

    def restore(self, meta: dict):
        """Restores the counters of a checkpoint and loads its round's reward model."""
        self.state.update({k: int(v) for k, v in meta.items() if k in self.state})
        self._read_labels()
        self.rm_params = self._load_round(self.state["round"])
        return self.rm_params

    # -- one iteration ---------------------------------------------------------------------
    def before_iteration(self, it: int, policy) -> tuple[object, dict]:
        """Enqueues, reads labels and trains a due round before PPO iteration `it`.

        Args:
            it: the 0-based PPO iteration about to run.
            policy: the current policy's params in the rollout layout.

        Returns:
            (the reward model's params to score this iteration with, online metrics).
        """
        t_wait = 0.0
        if it != self._last_it:  # (called twice for iteration 0 of a fresh run: keep the first)
            self.last, self._last_it = {}, it
        if it >= self.state["next_enqueue"]:
            self._enqueue(it, policy)
            self.state["next_enqueue"] = it + self.o.query_every
        self._read_labels()
        due = schedule.iteration_round(it, self.batch, self.total_episodes, self.counts,
                                       self.o.schedule)
        if due > self.state["round"]:
            must_wait = self.o.wait or self.state["round"] < 0  # no model yet: always wait
            if must_wait:
                if self.state["enqueued"] < self.counts[due]:
                    raise RuntimeError(
                        f"online: round {due} needs {self.counts[due]} labels but only "
                        f"{self.state['enqueued']} comparisons could be asked: the policy's "
                        "samples fail the task's validity check (the truncation token); use "
                        "--config.online.invalid_samples=keep, or a model that ends its "
                        "samples (train_sft)")
                t_wait = self._wait_for(self.counts[due])
                k = due
            else:
                k = schedule.due_round(self.counts[:due + 1], self._num_labels())
            if k > self.state["round"]:
                self._train_round(k)
        self.last["online/label_wait_s"] = self.last.get("online/label_wait_s", 0.0) + t_wait
        return self.rm_params, self._metrics()

    # -- enqueue ---------------------------------------------------------------------------
    def _enqueue(self, it: int, policy) -> None:
        target = schedule.enqueue_target(it, self.batch, self.total_episodes,
                                         self.o.initial_labels, self.o.total_labels,
                                         self.o.schedule, self.o.query_every)
        idle = 0  # consecutive draws that added nothing (every query had an invalid sample)
        while self.state["enqueued"] < target and idle < _MAX_DRAWS:
            added = self._draw_and_send(it, policy, target - self.state["enqueued"])
            self.state["enqueued"] += added
            self.state["draws"] += 1
            idle = 0 if added else idle + 1
        if self.state["enqueued"] < target:
            logger.warning("online: iteration %d asked for %d comparisons, %d so far: %d draws "
                           "in a row had no query whose samples all pass the validity check "
                           "(see --config.online.invalid_samples)", it, target,
                           self.state["enqueued"], idle)

    def _sample(self, params, queries, key) -> np.ndarray:
        """Post-processed samples [B, L] of `params` on the global batch `queries`."""
        with sharding.mesh_context(self.mesh, self.rules):
            state = self.fns.prefill(params, queries, key)
            cache = state.pop("cache")
            out, _ = self.fns.decode(params, cache, state, key)
            responses = multihost_utils.process_allgather(out["responses"], tiled=True)
        return np.asarray(tasks.postprocess_responses(np.asarray(responses), self.spec))

    def _draw_and_send(self, it: int, policy, wanted: int) -> int:
        """One sampling draw of B/N fresh queries x N samples; returns comparisons added."""
        draw, n = self.state["draws"], self.n
        local = self.dataset.get_batch(self.o.query_offset + draw, self.batch // n,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count())
        rep = sharding.host_batch_to_global(np.repeat(local, n, axis=0), self.mesh)
        queries = np.asarray(multihost_utils.process_allgather(rep, tiled=True))[::n]
        key = jax.random.fold_in(self._key, draw)
        pi = self._sample(policy, rep, key).reshape(len(queries), n, -1)
        kinds = ["train"] * len(queries)
        sources = [[comp.POLICY] * n for _ in kinds]
        # At iteration 0 the policy is ρ: a validation question would compare ρ with itself.
        val = comp.validation_rows(len(queries), self.o.validation_fraction if it else 0.0,
                                   self.config.seed, draw)
        if val.any():
            ref_policy = jax.device_put(dict(policy, transformer=self.ref_params["transformer"]),
                                        self.layout.rollout)
            rho = self._sample(ref_policy, rep, jax.random.fold_in(key, 1))
            rho = rho.reshape(len(queries), n, -1)
            del ref_policy
            for i in np.flatnonzero(val):
                pi[i], sources[i] = comp.mix_validation(pi[i], rho[i], self.config.seed, draw, i)
                kinds[i] = "validation"
        added = 0
        if runtime.is_primary():
            keys = [comp.comparison_key(self.run_id, draw, i) for i in range(len(queries))]
            records, counts = comp.build_comparisons(
                self.tok, self.spec, queries, pi, sources=sources, kinds=kinds, keys=keys,
                step=it, rm_round=max(self.state["round"], 0), task_name=self._task_name,
                drop_invalid=self.o.invalid_samples == "drop")
            records = records[:wanted]
            if records:
                result = self.store.enqueue(records, self.task, self.o.overlap)
                logger.info("online: iteration %d, draw %d: sent %d comparisons (%d new, %d "
                            "already stored; %d queries left out as invalid, %d empty)", it,
                            draw, len(records), result["added"], result["existing"],
                            counts["invalid"], counts["empty"])
            added = len(records)
        return int(_broadcast(np.int64(added)))

    # -- labels ----------------------------------------------------------------------------
    @property
    def rows(self) -> list[dict]:
        return self.labels.rows

    def _read_labels(self) -> None:
        """Reads the labels that arrived since the last read (process 0)."""
        if runtime.is_primary():
            self.labels.read()

    def _num_labels(self) -> int:
        return int(_broadcast(np.int64(len(self.rows))))

    def _wait_for(self, need: int) -> float:
        """Polls the store until it holds `need` labels of this run; returns seconds waited."""
        t0 = time.monotonic()

        def sync(have: int, stop: bool) -> tuple[int, bool]:
            have, stop = _broadcast((np.int64(have), np.int32(stop)))
            return int(have), bool(stop)

        if not self.labels.wait_for(need, self.o.poll_s, stop=self.stop, sync=sync,
                                    show_every_s=max(5.0, self.o.poll_s)):
            logger.warning("online: stopped while waiting for labels (%d/%d); rerun the same "
                           "command to resume", len(self.rows), need)
            raise SystemExit(runtime.EXIT_STOPPED)
        return time.monotonic() - t0

    # -- reward-model rounds ---------------------------------------------------------------
    def _round_dir(self, k: int) -> str:
        return os.path.join(self.workdir, ONLINE_DIR, f"rm_round_{k:02d}")

    def _round_config(self, k: int):
        rc = copy.deepcopy(self.config)  # locked: existing fields may be set, none added
        rc.labels.num_train, rc.labels.num_valid = self.counts[k], 0
        rc.labels.path, rc.rewards.trained_model = "", ""
        # A round is part of one policy iteration: the policy's stop_after counts iterations,
        # not reward-model steps (a stop signal still stops a round, resumably).
        rc.stop_after = 0
        return rc

    def _label_arrays(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Labels [start, stop) of this run as label arrays, on every process."""
        if runtime.is_primary():
            arrays = comp.label_arrays(self.rows[start:stop], self.n)
        else:
            arrays = {"query": np.zeros((stop - start, self.spec.query_length), np.int32),
                      **{f"sample{i}": np.zeros((stop - start, self.spec.response_length),
                                                np.int32) for i in range(self.n)},
                      "best": np.zeros((stop - start,), np.int32)}
        return {k: np.asarray(v) for k, v in _broadcast(arrays).items()}

    def _fresh_accuracy(self, start: int, stop: int) -> float:
        """The current reward model's accuracy on labels [start, stop) it has not seen."""
        arrays = self._label_arrays(start, stop)
        q = arrays["query"]
        s = np.stack([arrays[f"sample{i}"] for i in range(self.n)], axis=1)
        rows = self.batch // self.n  # a multiple of the mesh (validation checks ppo.batch_size)
        rows = max(rows - rows % self.mesh.size, self.mesh.size)
        pad = -len(q) % rows
        q = np.concatenate([q, np.repeat(q[-1:], pad, axis=0)])
        s = np.concatenate([s, np.repeat(s[-1:], pad, axis=0)])
        out = []
        with sharding.mesh_context(self.mesh, self.rules):
            for i in range(0, len(q), rows):
                qa = jax.make_array_from_callback(q[i:i + rows].shape, self._batch_sh,
                                                  lambda idx, a=q[i:i + rows]: a[idx])
                sa = jax.make_array_from_callback(s[i:i + rows].shape, self._batch_sh,
                                                  lambda idx, a=s[i:i + rows]: a[idx])
                r = self._score(self.rm_params, qa, sa)
                out.append(np.asarray(multihost_utils.process_allgather(r, tiled=True)))
        rewards = np.concatenate(out)[:stop - start]
        return comp.accuracy(rewards, arrays["best"])

    def _train_round(self, k: int) -> None:
        prev = self.state["round"]
        if prev >= 0:
            acc = self._fresh_accuracy(self.counts[prev], self.counts[k])
            self.last["online/rm_accuracy_fresh"] = acc
            logger.info("online: reward model of round %d: accuracy %.3f on the %d labels it "
                        "has not seen", prev, acc, self.counts[k] - self.counts[prev])
        if prev >= 0 and k > prev + 1:
            logger.warning("online: rounds %d-%d skipped (their labels came late); training "
                           "round %d", prev + 1, k - 1, k)
        init = self.rm_params if (self.o.warm and prev >= 0) else None
        logger.info("online: reward-model round %d/%d on %d labels in %s", k + 1,
                    len(self.counts), self.counts[k], self._round_dir(k))
        train_reward.train_reward(self._round_config(k), self._round_dir(k),
                                  labels=self._label_arrays(0, self.counts[k]),
                                  init_params=init)
        self.rm_params = self._load_round(k)
        self.state["round"] = k

    def _load_round(self, k: int):
        params, _, _ = train_reward.load_reward_model(self._round_dir(k), self.mesh, self.rules,
                                                      expected_spec=self.spec)
        return params

    def close(self) -> None:
        """Closes the label store (process 0)."""
        if self.store is not None:
            self.store.close()
            self.store = None

    def _metrics(self) -> dict[str, float]:
        """The online metrics of this iteration (process 0's, on every process)."""
        values = dict(self.last)
        values |= {"online/labels": len(self.rows), "online/rm_round": self.state["round"],
                   "online/rm_labels": self.counts[self.state["round"]],
                   "online/enqueued": self.state["enqueued"]}
        pref = comp.policy_preferred(self.rows) if runtime.is_primary() else None
        if pref is not None:
            values["online/policy_preferred"], values["online/policy_preferred_step"], _ = pref
        vec = np.asarray([values.get(k, np.nan) for k in METRICS], np.float64)
        vec = _broadcast(vec)
        return {k: float(v) for k, v in zip(METRICS, vec) if np.isfinite(v)}

