r"""Compiles the real PPO programs for a TPU slice on any machine, and checks they fit in memory.

  pip install libtpu     # once; about 480 MB, only needed for this check
  python -m rlhf_jax.aot_check --config configs/sentiment.py:model=774M --topology v5e:2x4 \
      [--config.ppo.nminibatches=4] [--config.model.remat=True] [--json=report.json]

The topology names a TPU generation and its chip grid ("v3:2x2" is a v3-8, "v4:2x2x1" a v4-8,
"v5e:2x4" a v5litepod-8). libtpu's compile-only devices stand in for the TPUs, the mesh is
`config.mesh` over them, and the functions train_policy runs are built with the same shardings
and lowered on abstract inputs (no weights are read, `config.model.checkpoint` is ignored):

- `to_rollout`: the policy resharded to replicated for sampling;
- the rollout stages (`--programs=rollout` for all of them): `prefill` (contexts through the
  policy, KV cache filled), `decode` (the sampling loop), `value` (a separate value network
  only), `reference` (reference log-probs), `reward` (reward scores with the penalty),
  `finish` (KL rewards and statistics);
- `update`: `noptepochs` x `nminibatches` PPO steps on the donated train state;
- `reward_train`, `reward_sample`: one reward-model step, and the reward stage's sampling of
  `rewards.rollout_batch_size` responses (for normalisation) from the FSDP-sharded trunk.

Each program's per-device memory comes from the TPU compiler. Train_policy also holds arrays a
program does not take as arguments (the train state during the rollout, the frozen reference and
reward models during the update, the last iteration's outputs), so each row adds those
"resident" bytes; the largest sum must fit in the HBM the compiler allows per device.

FLOPs: the analytic model FLOPs of one PPO iteration (`rlhf_jax.flops`, what MFU uses), and the
compiler's cost analysis per program and device. The latter counts every loop body once (the
decode loop, the epochs x minibatches loop, and loops XLA itself adds for collective matmuls on
multi-host slices, e.g. half the FLOPs on v5e:2x4), so it is for comparing programs only.

Exit status 0 if everything fits, 1 if not ("needs X GiB per device, has Y GiB"), 2 on bad
input (a topology that is not one, a batch the devices do not divide, libtpu missing).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding

from rlhf_jax import cli, experiment, flops, label_types, ppo_trainer, runtime, sharding
from rlhf_jax import train_reward
from rlhf_jax import programs as programs_lib
from rlhf_jax.data import tasks
# The compiling machinery lives in `rlhf_jax.programs`; these names are part of this module's API.
from rlhf_jax.programs import (  # noqa: F401
    Program,
    ProgramReport,
    abstract,
    abstract_key,
    compile_ppo,
    compile_program,
    device_bytes,
    parse_oom,
    ppo_programs,
)

GIB = flops.GIB
ROLLOUT_PROGRAMS, PPO_PROGRAMS = programs_lib.ROLLOUT_PROGRAMS, programs_lib.PPO_PROGRAMS
REWARD_PROGRAMS = ("reward_train", "reward_sample")
ALL_PROGRAMS = PPO_PROGRAMS + REWARD_PROGRAMS
# Names that stand for several programs in `--programs`.
PROGRAM_GROUPS = {"rollout": ROLLOUT_PROGRAMS, "ppo": PPO_PROGRAMS}

LIBTPU_MISSING = (
    "compiling for a TPU topology needs libtpu, which is not installed: run `pip install "
    "libtpu` (about 480 MB; only this check needs it, it is not a dependency of rlhf_jax)")

# generation -> (number of chip-grid dimensions, extra get_topology_desc arguments).
# v4 and v5p VMs run in megacore mode (one JAX device per chip), so we compile for that.
TPU_GENERATIONS: dict[str, tuple[int, dict[str, Any]]] = {
    "v2": (2, {}),
    "v3": (2, {}),
    "v4": (3, {"chip_config_name": "megacore"}),
    "v5e": (2, {}),
    "v5p": (3, {"chip_config_name": "megacore"}),
    "v6e": (2, {}),
    "tpu7x": (3, {}),
}
TOPOLOGY_EXAMPLES = "v3:2x2 (v3-8), v4:2x2x1 (v4-8), v5e:2x4 (v5litepod-8), v6e:2x2"

class TopologyError(ValueError):
    """A topology string that does not name a TPU slice."""


class DoesNotFitError(RuntimeError):
    """The run needs more memory per device than the device has."""


class LibtpuMissingError(RuntimeError):
    """libtpu, needed to compile for a TPU topology, is not installed."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: generation and chip grid ("v5e", (2, 4))."""

    generation: str
    grid: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.grid))}"

    @property
    def num_chips(self) -> int:
        return math.prod(self.grid)


def parse_topology(text: str) -> Topology:
    """Parses "v5e:2x4" into a Topology.

    Raises:
        TopologyError: naming what is wrong and giving examples.
    """
    gen, sep, grid = text.strip().partition(":")
    gen = gen.lower()
    if not sep or not grid:
        raise TopologyError(f"topology {text!r}: expected GENERATION:GRID, e.g. "
                            f"{TOPOLOGY_EXAMPLES}")
    if gen not in TPU_GENERATIONS:
        raise TopologyError(f"topology {text!r}: unknown TPU generation {gen!r}; known: "
                            f"{', '.join(TPU_GENERATIONS)}")
    if not re.fullmatch(r"[1-9]\d*(x[1-9]\d*)*", grid):
        raise TopologyError(f"topology {text!r}: the chip grid {grid!r} must be positive integers "
                            f"joined by 'x', e.g. {TOPOLOGY_EXAMPLES}")
    dims = tuple(int(g) for g in grid.split("x"))
    want = TPU_GENERATIONS[gen][0]
    if len(dims) != want:
        raise TopologyError(f"topology {text!r}: a {gen} chip grid has {want} dimensions "
                            f"(e.g. {'x'.join(['2'] * want)}), got {len(dims)}")
    return Topology(gen, dims)


def require_libtpu() -> None:
    """Raises LibtpuMissingError, saying to `pip install libtpu`, when it is missing."""
    if importlib.util.find_spec("libtpu") is None:
        raise LibtpuMissingError(LIBTPU_MISSING)


def topology_devices(topology: Topology) -> list:
    """libtpu's compile-only devices of a TPU slice (no TPU needed)."""
    require_libtpu()
    # libtpu looks for a TPU VM's metadata when it loads and logs errors when there is none;
    # these values quiet most of that (one "could not determine TPU accelerator type" line
    # stays) and do not affect compiling for the requested topology.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Compile-only devices never open a TPU, so the lock libtpu takes against a second process
    # using the chips is not needed; without this, any other JAX process on the machine that
    # loaded libtpu (it is tried whenever JAX_PLATFORMS is unset) blocks the check.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    kwargs = TPU_GENERATIONS[topology.generation][1]
    try:
        desc = topologies.get_topology_desc(topology_name=topology.name, platform="tpu", **kwargs)
    except jax.errors.JaxRuntimeError as e:
        raise TopologyError(f"topology {topology.name!r} was rejected by libtpu: {e}") from e
    return list(desc.devices)


def usable_hbm_bytes(devices: Sequence) -> int | None:
    """The HBM per device the TPU compiler allows a program, or None if unknown.

    Asked from the compiler itself: a program that needs far more than any TPU has fails to
    compile with a message naming the available HBM. Falls back to `flops.DEVICE_SPECS`.
    """
    kind = devices[0].device_kind
    if devices[0].platform == "gpu":
        stats = devices[0].memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"])
    if devices[0].platform == "tpu":
        mesh = jax.sharding.Mesh(list(devices), ("d",))
        out = NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
        huge = jax.jit(lambda: jnp.zeros((len(devices), 1 << 40), jnp.uint8), out_shardings=out)
        try:
            huge.lower().compile()
        except jax.errors.JaxRuntimeError as e:
            parsed = parse_oom(str(e))
            if parsed:
                return parsed[1]
    spec = flops.device_spec(kind)
    return spec.hbm_bytes if spec else None


# -- reports --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Report:
    """The whole check: where, what, and whether it fits."""

    topology: str
    device_kind: str
    num_devices: int
    mesh: dict[str, int]
    hbm_bytes: int | None
    programs: list[ProgramReport]
    analytic: dict[str, float]
    model: str = ""
    command: str = ""

    @property
    def peak(self) -> ProgramReport:
        return max(self.programs, key=lambda p: p.total_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.peak.total_bytes

    @property
    def margin_bytes(self) -> int | None:
        return None if self.hbm_bytes is None else self.hbm_bytes - self.peak_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.hbm_bytes is None else self.margin_bytes >= 0

    def to_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "programs"}
        out["programs"] = [dict(dataclasses.asdict(p), program_bytes=p.program_bytes,
                                total_bytes=p.total_bytes) for p in self.programs]
        out |= {"peak_program": self.peak.name, "peak_bytes": self.peak_bytes,
                "margin_bytes": self.margin_bytes, "fits": self.fits}
        return out


def check_fits(needed_bytes: int, available_bytes: int | None, *, where: str = "",
               device_kind: str = "") -> None:
    """Raises DoesNotFitError "needs X GiB per device, has Y GiB" when needed > available."""
    if available_bytes is None or needed_bytes <= available_bytes:
        return
    on = f" of {device_kind}" if device_kind else ""
    raise DoesNotFitError(
        f"does not fit: {where + ' ' if where else ''}needs {needed_bytes / GIB:.2f} GiB per "
        f"device, has {available_bytes / GIB:.2f} GiB{on} (over by "
        f"{(needed_bytes - available_bytes) / GIB:.2f} GiB). Options: more devices, "
        "--config.ppo.nminibatches=<larger>, --config.model.remat=True, "
        "--config.model.dtype=bfloat16")


def check_report(report: Report) -> None:
    """Raises DoesNotFitError for a report whose peak does not fit."""
    peak = report.peak
    check_fits(peak.total_bytes, report.hbm_bytes, device_kind=report.device_kind,
               where=f"{report.model or 'the run'} on {report.topology} ({peak.name})")


def format_report(report: Report) -> str:
    """The human-readable table printed by the CLI."""
    g = lambda b: f"{b / GIB:7.2f}"  # noqa: E731
    n = max(report.num_devices, 1)
    head = (f"{'program':<14}{'args':>8}{'out':>8}{'alias':>8}{'temp':>8}{'program':>9}"
            f"{'+resid.':>9}{'=total':>9}{'XLA TFLOP':>11}{'compile':>9}")
    lines = [
        f"{report.model or 'config'} on {report.topology}: {report.num_devices} x "
        f"{report.device_kind}, mesh {report.mesh}",
        "per device, GiB:", head]
    for p in report.programs:
        if p.oom_bytes is not None:
            cells = f"{'':>8}{'':>8}{'':>8}{'':>8} {g(p.program_bytes)}*"
        else:
            cells = (f" {g(p.argument_bytes)} {g(p.output_bytes)} {g(p.alias_bytes)}"
                     f" {g(p.temp_bytes)}  {g(p.program_bytes)}")
        lines.append(f"{p.name:<14}{cells}  {g(p.resident_bytes)}  {g(p.total_bytes)}"
                     f"{p.flops / 1e12:11.2f}{p.compile_seconds:8.0f}s")
    if any(p.oom_bytes is not None for p in report.programs):
        lines.append("* refused by the compiler: the program alone needs this much")
    hbm = "unknown" if report.hbm_bytes is None else f"{report.hbm_bytes / GIB:.2f} GiB"
    lines.append(f"peak {report.peak_bytes / GIB:.2f} GiB per device ({report.peak.name}) of "
                 f"{hbm} usable")
    freed = max(p.total_bytes - p.freeable_bytes for p in report.programs)
    if freed < report.peak_bytes:
        lines.append(f"  ({freed / GIB:.2f} GiB if train_policy dropped the previous "
                     "iteration's rollout copy and outputs before reusing them)")
    if report.fits is None:
        lines.append("fits: unknown (no HBM size for this device; pass --hbm_gib)")
    else:
        lines.append(f"fits: {'yes' if report.fits else 'NO'} (margin "
                     f"{report.margin_bytes / GIB:+.2f} GiB)")
    a = report.analytic
    if a:
        parts = ", ".join(f"{k} {a[k]:.2e}" for k in ("sample", "value", "reference", "reward",
                                                        "update"))
        lines.append(f"model FLOPs per PPO iteration: {a['total']:.3e} ({a['total'] / n:.3e} "
                     f"per device): {parts}")
    lines.append("XLA TFLOP: the compiler's cost analysis per device, which counts every loop "
                 "body once (decode steps, epochs x minibatches, and the loops XLA adds for "
                 "collective matmuls on multi-host slices): compare programs with it, not MFU")
    return "\n".join(lines)


# -- building the programs -------------------------------------------------------------------

def build_ppo(config: ml_collections.ConfigDict, mesh, rules,
              spec: tasks.TaskSpec) -> list[Program]:
    """The PPO programs as train_policy builds them, with what it holds while each runs.

    Resident bytes follow `train_policy.train_policy`: the train state (params, Adam slots) and
    the frozen reference and reward params live throughout; the replicated rollout copy of the
    policy lives from `to_rollout` to the end of the rollout, and each rollout stage's outputs
    until the update has consumed them (train_policy drops them at the end of an iteration).
    """
    p = config.ppo
    micro = config.model.get("micro_batch_size", 0)
    ppo_trainer.check_ppo_config(p, mesh, micro)
    settings = ppo_trainer.PPOSettings.from_config(p, micro)
    gpt_cfg = experiment.gpt2_config(config)
    # The reward model (and a separate value network) are trained from the same initial model.
    rm_cfg = gpt_cfg
    num_updates = math.ceil(p.total_episodes / p.batch_size)
    tx = ppo_trainer.make_optimizer(p, num_updates)
    layout = ppo_trainer.build_layout(gpt_cfg, rm_cfg, settings, tx, mesh, rules)
    fns = layout.functions(gpt_cfg, rm_cfg, spec, settings, tx, mesh)
    return ppo_programs(fns, layout.to_rollout(), layout, rm_cfg, mesh, rules, spec)


def _reward_setup(config, mesh, rules, spec, gpt_cfg):
    """What `train_reward.RewardTrainer` reads from a RewardSetup, without any label file."""
    r = config.rewards
    for name, value in (("rewards.batch_size", r.batch_size),
                        ("rewards.rollout_batch_size", r.rollout_batch_size)):
        sharding.check_batch_divisible(name, value, mesh)
    return _NoLabelSetup(config=config, label_type=label_types.get_label_type(config.labels.type),
                         mesh=mesh, rules=rules, gpt_cfg=gpt_cfg, spec=spec,
                         num_steps=max(config.labels.num_train // r.batch_size, 1))


@dataclasses.dataclass
class _NoLabelSetup:
    config: Any
    label_type: Any
    mesh: Any
    rules: Any
    gpt_cfg: Any
    spec: Any
    num_steps: int


def build_reward(config: ml_collections.ConfigDict, mesh, rules,
                 spec: tasks.TaskSpec) -> list[Program]:
    """The reward stage's train step and normalisation sampler, as train_reward builds them."""
    gpt_cfg = experiment.gpt2_config(config)
    setup = _reward_setup(config, mesh, rules, spec, gpt_cfg)
    trainer = train_reward.RewardTrainer(setup)
    r = config.rewards
    state = abstract(trainer.abstract_state(), trainer.state_sharding)
    ref = abstract({"transformer": state["params"]["transformer"]}, trainer.trunk_sharding)
    batch_sh = sharding.batch_sharding(mesh)
    lt = setup.label_type
    batch = {
        "query": jax.ShapeDtypeStruct((r.batch_size, spec.query_length), jnp.int32,
                                      sharding=batch_sh),
        "samples": jax.ShapeDtypeStruct((r.batch_size, lt.num_samples, spec.response_length),
                                        jnp.int32, sharding=batch_sh),
        "label": jax.ShapeDtypeStruct((r.batch_size,), lt.label_dtype, sharding=batch_sh),
    }
    context = jax.ShapeDtypeStruct((r.rollout_batch_size, spec.context_length), jnp.int32,
                                   sharding=batch_sh)
    return [
        # train_reward holds the initial trunk (for normalisation) next to the train state.
        Program("reward_train", trainer.train_step, (state, batch), device_bytes(ref)),
        Program("reward_sample", trainer.sample_fn, (ref, context, abstract_key(mesh)),
                 device_bytes(state)),
    ]


def analytic_flops(config: ml_collections.ConfigDict, spec: tasks.TaskSpec) -> dict[str, float]:
    """`flops.ppo_iteration_flops` for a config."""
    return flops.ppo_config_flops(experiment.gpt2_config(config), config.ppo, spec)


def expand_programs(programs: Sequence[str]) -> tuple[str, ...]:
    """Program names with groups ("rollout", "ppo") expanded.

    Raises:
        ValueError: on a name that is neither a program nor a group.
    """
    out = []
    for name in programs:
        out += PROGRAM_GROUPS.get(name, (name,))
    unknown = sorted(set(out) - set(ALL_PROGRAMS))
    if unknown:
        raise ValueError(f"unknown programs {unknown}; known: {', '.join(ALL_PROGRAMS)} (groups: "
                         f"{', '.join(PROGRAM_GROUPS)})")
    return tuple(out)


def run_check(config: ml_collections.ConfigDict, topology: str,
              programs: Sequence[str] = ALL_PROGRAMS, hbm_bytes: int | None = None,
              log=print) -> Report:
    """Compiles the programs of `config` for `topology` and measures them.

    Args:
        config: a run config (as `configs/*.py:get_config` returns).
        topology: a TPU topology ("v5e:2x4"); "cpu" for this machine's CPU devices (no libtpu
            needed; the memory limit is then only what `hbm_bytes` says); or "local" for
            `jax.devices()`, e.g. on a TPU VM before a run starts.
        programs: which of ALL_PROGRAMS (or PROGRAM_GROUPS) to compile.
        hbm_bytes: overrides the per-device memory limit (e.g. to keep headroom).
        log: called with a line of progress per compiled program.

    Returns:
        The Report (call `check_report` to raise when it does not fit).

    Raises:
        TopologyError: a topology string that is not one.
        LibtpuMissingError: libtpu is missing.
        ValueError: a batch size the mesh does not divide, or another bad config field.
    """
    programs = expand_programs(programs)
    if topology == "cpu":
        devices = jax.devices("cpu")
    elif topology == "local":
        devices = jax.devices()
    else:
        devices = topology_devices(parse_topology(topology))
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
    rules = sharding.rules_from_config(config.sharding_rules)
    gpt_cfg = experiment.gpt2_config(config)
    spec = experiment.task_spec(config, experiment.tokenizer(config), gpt_cfg)
    if hbm_bytes is None:
        hbm_bytes = usable_hbm_bytes(devices)

    # Every batch size is validated (by building everything) before minutes of compiling.
    pending = build_ppo(config, mesh, rules, spec)
    if "rewards" in config:
        pending += build_reward(config, mesh, rules, spec)
    reports = []
    for program in pending:
        if program.name not in programs:
            continue
        log(f"compiling {program.name} ...")
        reports.append(compile_program(program, mesh, rules)[0])
        log(f"  {program.name}: {reports[-1].total_bytes / GIB:.2f} GiB per device "
            f"({reports[-1].compile_seconds:.0f}s)")
    return Report(
        topology=topology, device_kind=devices[0].device_kind, num_devices=len(devices),
        mesh=dict(mesh.shape), hbm_bytes=hbm_bytes, programs=reports,
        analytic=analytic_flops(config, spec), model=config.model.preset)


def main(argv):
    del argv
    from absl import flags

    f = flags.FLAGS
    if f.topology != "local":
        # Only libtpu's compile-only devices and the CPU are needed: never claim a real TPU (on
        # a TPU VM that would contend with a training run).
        jax.config.update("jax_platforms", "cpu")
    programs = [p.strip() for p in f.programs.split(",") if p.strip()]
    hbm = None if f.hbm_gib is None else int(f.hbm_gib * GIB)
    try:
        report = run_check(f.config, f.topology, programs, hbm,
                           log=lambda s: print(s, file=sys.stderr, flush=True))
    except (TopologyError, LibtpuMissingError, ValueError) as e:
        print(f"aot_check: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    report.command = " ".join(["python -m rlhf_jax.aot_check"] + sys.argv[1:])
    print(format_report(report))
    if f.json:
        runtime.atomic_write_text(f.json, json.dumps(report.to_dict(), indent=2))  # or gs://
    try:
        check_report(report)
    except DoesNotFitError as e:
        print(f"aot_check: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).",
                                    lock_config=True)
    flags.DEFINE_string("topology", None, f"TPU topology, e.g. {TOPOLOGY_EXAMPLES}; 'cpu'; or "
                        "'local' (jax.devices()).")
    flags.DEFINE_string("programs", ",".join(ALL_PROGRAMS), "Comma-separated programs.")
    flags.DEFINE_float("hbm_gib", None, "Per-device memory limit in GiB (default: the compiler's).")
    flags.DEFINE_string("json", None, "Also write the report as JSON here.")
    flags.mark_flags_as_required(["config", "topology"])
    cli.run(main)  # absl app.run; configs/... also found in the installed copy
