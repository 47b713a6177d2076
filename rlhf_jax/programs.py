"""The programs of a PPO run as compilable units: abstract arguments, resident memory, reports.

`ppo_programs` lists every jitted program train_policy runs (the rollout reshard, the rollout
stages, the update) with abstract arguments that carry their shardings, so each can be lowered
and compiled without data (`compile_program`), and with the bytes train_policy keeps alive
while it runs. `rlhf_jax.aot_check` compiles them for a TPU slice; `bench/device_check.py` and
the benchmarks compile them for the local devices (`compile_ppo`) and then run the compiled
executables, so compile time and memory are measured apart from run time.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax import flops, models, ppo_trainer, sharding
from rlhf_jax.data import tasks

GIB = flops.GIB
ROLLOUT_PROGRAMS = ("prefill", "decode", "value", "reference", "reward", "finish")
PPO_PROGRAMS = ("to_rollout",) + ROLLOUT_PROGRAMS + ("update",)

# The TPU compiler's out-of-memory error, e.g. "... the total memory required for HLO
# temporaries (17.89G) exceeds available HBM (15.75G)". Its G are GiB.
_OOM_RE = re.compile(r"\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


def parse_oom(message: str) -> tuple[int, int] | None:
    """(needed, available) bytes per device from a TPU compiler out-of-memory error, or None."""
    m = _OOM_RE.search(message)
    if not m:
        return None
    return int(float(m.group(1)) * GIB), int(float(m.group(2)) * GIB)


@dataclasses.dataclass
class ProgramReport:
    """Per-device memory and FLOPs of one compiled program.

    Attributes:
        name: program name (`PPO_PROGRAMS`, or aot_check's reward programs).
        argument_bytes, output_bytes, alias_bytes, temp_bytes: from `memory_analysis()`;
            alias bytes are outputs that reuse donated arguments.
        resident_bytes: arrays train_policy holds while this program runs that are not its
            arguments (see `ppo_programs`).
        flops: FLOPs per device from the compiler's `cost_analysis()`. XLA counts each loop
            body once, so loops (sampling steps, PPO epochs and minibatches, and the loops it
            adds itself for collective matmuls on multi-host slices) are undercounted.
        compile_seconds: wall time of `.lower().compile()`.
        oom_bytes: when the compiler refused the program for lack of memory, what it said the
            program alone needs; the byte counts above are then 0.
        freeable_bytes: the part of `resident_bytes` train_policy could free before this program
            (buffers of the previous iteration it still references).
    """

    name: str
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    resident_bytes: int = 0
    flops: float = 0.0
    compile_seconds: float = 0.0
    oom_bytes: int | None = None
    freeable_bytes: int = 0

    @property
    def program_bytes(self) -> int:
        """Peak of the program alone: arguments, outputs not aliased to them, temporaries."""
        if self.oom_bytes is not None:
            return self.oom_bytes
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def total_bytes(self) -> int:
        return self.program_bytes + self.resident_bytes


def device_bytes(tree) -> int:
    """Bytes per device of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            itemsize = 8  # a threefry key is two uint32 words
        else:
            itemsize = jnp.dtype(leaf.dtype).itemsize
        total += math.prod(leaf.sharding.shard_shape(leaf.shape)) * itemsize
    return total


def abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


@dataclasses.dataclass
class Program:
    """A program to compile: its jitted function, abstract arguments and resident bytes
    (arrays the caller holds while it runs that are not its arguments)."""

    name: str
    fn: Any
    args: tuple
    resident: int
    freeable: int = 0


def abstract_key(mesh) -> jax.ShapeDtypeStruct:
    k = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=sharding.replicated(mesh))


def ppo_programs(fns: ppo_trainer.PPOFunctions, to_rollout, layout: ppo_trainer.PPOLayout,
                 rm_cfg: models.GPT2Config, mesh, rules, spec: tasks.TaskSpec) -> list[Program]:
    """Every PPO program (`PPO_PROGRAMS`) with abstract arguments and resident bytes.

    Each stage's inputs are the previous stages' outputs: their shapes come from tracing (no
    compiling needed) and their shardings from `PPOFunctions`, which pins them.
    """
    repl, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    rows = lambda tree: abstract(tree, jax.tree.map(  # noqa: E731
        lambda a: batch if a.ndim else repl, tree))
    state = abstract(layout.abstract_state, layout.state)
    trainable = layout.abstract_trainable
    ref = abstract({"transformer": trainable["policy"]["transformer"]}, layout.ref)
    rm = abstract(jax.eval_shape(lambda: models.init_params(rm_cfg, jax.random.key(0),
                                                             ("reward",))), layout.reward)
    policy, value = state["params"]["policy"], state["params"].get("value")
    copy = abstract(trainable["policy"], layout.rollout)
    queries = jax.ShapeDtypeStruct((fns.s.batch_size, spec.query_length), jnp.int32,
                                   sharding=batch)
    kl_coef, key = jax.ShapeDtypeStruct((), jnp.float32, sharding=repl), abstract_key(mesh)

    with sharding.mesh_context(mesh, rules):
        st = jax.eval_shape(fns.prefill, copy, queries, key)
        st = abstract(st, fns.sampler_state_shardings(st))
        cache = st.pop("cache")
        samples = rows(jax.eval_shape(fns.decode, copy, cache, st, key)[0])
        responses = samples["responses"]
        values = rows(jax.eval_shape(fns.value, value, queries, responses)) if value else None
        ref_lp = rows(jax.eval_shape(fns.reference, ref, queries, responses))
        scored = rows(jax.eval_shape(fns.score, rm, queries, responses))
        full = dict(samples, values=values) if value else samples
        outputs = rows(jax.eval_shape(fns.finish, queries, full, ref_lp, scored, kl_coef))

    b = device_bytes
    state_b, ref_b, rm_b, copy_b = b(state), b(ref), b(rm), b(copy)
    value_b = b(value) if value is not None else 0
    samples_b = b(samples) + (b(values) if value else 0)
    base = state_b + ref_b + rm_b  # held throughout the rollout
    programs = [
        Program("to_rollout", to_rollout, (policy,), base - b(policy)),
        Program("prefill", fns.prefill, (copy, queries, key), base),
        Program("decode", fns.decode, (copy, cache, st, key), base),
    ]
    if value:
        programs.append(Program("value", fns.value, (value, queries, responses),
                                 base - value_b + copy_b + b(samples)))
    programs += [
        Program("reference", fns.reference, (ref, queries, responses),
                 base - ref_b + copy_b + samples_b),
        Program("reward", fns.score, (rm, queries, responses),
                 base - rm_b + copy_b + samples_b + b(ref_lp)),
        Program("finish", fns.finish, (queries, full, ref_lp, scored, kl_coef),
                 base + copy_b),
        # train_policy drops the rollout copy of the policy before the update.
        Program("update", fns.update, (state, outputs[0], key),
                 ref_b + rm_b + b(outputs) - b(outputs[0])),
    ]
    return programs


def compile_program(pending: Program, mesh, rules) -> tuple[ProgramReport, Any]:
    """Compiles one program; returns its report and the compiled executable (None on OOM)."""
    t0 = time.time()
    report = ProgramReport(pending.name, resident_bytes=pending.resident,
                           freeable_bytes=pending.freeable)
    try:
        with sharding.mesh_context(mesh, rules):
            compiled = pending.fn.lower(*pending.args).compile()
    except jax.errors.JaxRuntimeError as e:
        parsed = parse_oom(str(e))
        if parsed is None:
            raise
        report.oom_bytes = parsed[0]
        report.compile_seconds = time.time() - t0
        return report, None
    report.compile_seconds = time.time() - t0
    mem = compiled.memory_analysis()
    if mem is not None:
        report.argument_bytes = int(mem.argument_size_in_bytes)
        report.output_bytes = int(mem.output_size_in_bytes)
        report.alias_bytes = int(mem.alias_size_in_bytes)
        report.temp_bytes = int(mem.temp_size_in_bytes)
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per partition
        cost = cost[0] if cost else {}
    report.flops = float((cost or {}).get("flops", 0.0))
    return report, compiled


# Program name -> the PPOFunctions attribute that runs it.
_STAGE_ATTRS = {"prefill": "prefill", "decode": "decode", "value": "value",
                "reference": "reference", "reward": "score", "finish": "finish",
                "update": "update"}


def compile_ppo(fns: ppo_trainer.PPOFunctions, to_rollout, programs: list[Program], mesh,
                rules, log=None) -> tuple[list[ProgramReport], Any]:
    """Compiles the PPO programs ahead of time and makes `fns` run the compiled executables.

    For benchmarks and the device check: the compile time and memory of each program are
    measured apart from running it, and nothing compiles again later.

    Args:
        fns: the PPOFunctions the programs were built from (`ppo_programs`).
        to_rollout: its reshard function.
        programs: `ppo_programs(...)`.
        mesh, rules: the mesh and sharding rules.
        log: optional callable taking a progress line.

    Returns:
        (the reports in program order, the compiled `to_rollout`); a program the compiler
        refused for memory has `oom_bytes` set and stays uncompiled.
    """
    reports, compiled_to_rollout = [], to_rollout
    for pending in programs:
        if log:
            log(f"compiling {pending.name} ...")
        report, exe = compile_program(pending, mesh, rules)
        reports.append(report)
        if exe is None:
            continue
        if pending.name == "to_rollout":
            compiled_to_rollout = exe
        else:
            setattr(fns, _STAGE_ATTRS[pending.name], exe)
    return reports, compiled_to_rollout
