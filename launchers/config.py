"""The launch-config schema (`configs/launch/*.yaml`) and its validation.

This module owns *where* a run's processes go: nodes, processes, GPUs and CPUs per node, the
time limit, the Slurm partition/account, the Ray address, the environment, and which run
config (an experiment plus `key=value` overrides) every rank trains. It knows nothing about
training itself: the run config is loaded through `pretrain.config.load_config` only to check,
before anything is submitted, that it is valid for the world size the layout launches.

Loading: defaults < launch YAML < `key=value` overrides. An override whose first component is
a launch key (`nodes=2`, `slurm.partition=gpu`) changes the launch config; any other override
(`train.max_steps=10`) is forwarded to the run config of every rank. All errors are one-line
`LaunchError`s (a `ConfigError`, so `ebt` prints them as usage errors with exit code 2).
"""
from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launchers import BACKENDS
from pretrain.config import GROUPS, ConfigError, RunConfig, load_config, resolve_config_path, resolve_named_yaml

SLURM_MODES = ("torchrun", "srun")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_TIME_LIMIT = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


class LaunchError(ConfigError):
    """A launch configuration that cannot be submitted; the message is one line naming the key."""


@dataclass
class SlurmConfig:
    """The `slurm:` section: how `ebt launch slurm` writes and submits its sbatch script."""

    partition: Optional[str] = None
    """Partition (`#SBATCH --partition`). Required: a job that lands in whatever partition a
    cluster happens to default to is a classic way to lose a day."""
    account: Optional[str] = None
    """Account to charge (`#SBATCH --account`); null = the user's default account."""
    qos: Optional[str] = None
    """Quality of service (`#SBATCH --qos`); null = the default."""
    mode: str = "torchrun"
    """`torchrun`: one srun task per node running torchrun with c10d rendezvous.
    `srun`: one srun task per rank, RANK/LOCAL_RANK/WORLD_SIZE from SLURM_PROCID/LOCALID/NTASKS."""
    signal_seconds: int = 120
    """Seconds before the time limit at which Slurm sends USR1 to the batch shell
    (`--signal=B:USR1@N`); the run then checkpoints and requeues itself. 0 disables."""
    max_requeues: int = 20
    """The script stops requeueing itself after this many restarts (SLURM_RESTART_COUNT)."""
    sbatch_args: List[str] = field(default_factory=list)
    """Extra `#SBATCH` options, verbatim (e.g. `--constraint=h100`, `--exclusive`)."""
    setup: List[str] = field(default_factory=list)
    """Shell lines run by the batch script before launching (e.g. `module load cuda/12.4`)."""


@dataclass
class RayConfig:
    """The `ray:` section: how `ebt launch ray` places Ray Train (TorchTrainer) workers."""

    address: Optional[str] = None
    """Cluster to connect to (`host:port` of the GCS, or `auto` inside `ray job submit`);
    null starts a private single-node Ray on loopback (127.0.0.2) for this launch only."""
    max_failures: int = 3
    """Worker-group restarts after a failure; each restart resumes from the run folder's
    latest checkpoint. 0 = fail on the first error."""
    placement_strategy: str = "SPREAD"
    """Ray placement of the workers: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD."""
    storage_path: Optional[str] = None
    """Where Ray Train keeps its own run state; null = `<run_dir>/launch/ray`. Must be shared
    by all nodes on a real cluster (as must the run folder)."""


@dataclass
class LaunchConfig:
    """Placement of one training run. World size = nodes x procs_per_node."""

    experiment: str = "default"
    """The run config every rank trains: an experiment name (configs/experiments/) or a YAML path."""
    overrides: List[str] = field(default_factory=list)
    """`key=value` overrides of the run config (after the experiment, before the command line's)."""
    run_dir: Optional[str] = None
    """The run folder (checkpoints, logs, and `launch/` with the scripts and scheduler logs);
    null = the experiment's `run_dir`. Resolved to an absolute path at launch; on a cluster it
    must be on storage every node sees."""
    nodes: int = 1
    """Number of nodes (machines)."""
    procs_per_node: Optional[int] = None
    """Training processes per node; null = gpus_per_node on GPU nodes, else 1."""
    gpus_per_node: int = 0
    """GPUs per node; 0 = CPU training (gloo). With GPUs every process drives one (nccl)."""
    cpus_per_node: Optional[int] = None
    """CPU cores per node to request; null = the scheduler's default. Also sets OMP_NUM_THREADS
    to cpus_per_node / procs_per_node unless `env` sets it."""
    time_limit: Optional[str] = None
    """Wall-clock limit in Slurm's format (`HH:MM:SS`, `D-HH:MM:SS`, minutes); null = partition default."""
    job_name: Optional[str] = None
    """Scheduler job name; null = `ebt-<experiment>`."""
    env: Dict[str, str] = field(default_factory=dict)
    """Environment variables for every rank."""
    python: Optional[str] = None
    """Interpreter on the nodes (the one with this project installed); null = the one running
    `ebt launch`, which is right when the nodes share its file system."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    # -- derived -------------------------------------------------------------------------
    @property
    def num_procs_per_node(self) -> int:
        if self.procs_per_node is not None:
            return self.procs_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.num_procs_per_node

    @property
    def interpreter(self) -> str:
        return self.python or sys.executable

    @property
    def name(self) -> str:
        return self.job_name or f"ebt-{Path(self.experiment).stem}"

    def threads_per_proc(self) -> Optional[int]:
        if self.cpus_per_node is None:
            return None
        return max(1, self.cpus_per_node // self.num_procs_per_node)

    def validate(self, backend: str) -> None:
        """Checks that need no run config; raises a one-line LaunchError naming the key."""
        if backend not in BACKENDS:
            raise LaunchError(f"unknown launcher {backend!r}; use one of {', '.join(BACKENDS)}")
        if self.nodes < 1:
            raise LaunchError(f"nodes: must be >= 1, got {self.nodes}")
        if self.procs_per_node is not None and self.procs_per_node < 1:
            raise LaunchError(f"procs_per_node: must be >= 1 (or null), got {self.procs_per_node}")
        if self.gpus_per_node < 0:
            raise LaunchError(f"gpus_per_node: must be >= 0, got {self.gpus_per_node}")
        if self.gpus_per_node and self.num_procs_per_node > self.gpus_per_node:
            raise LaunchError(
                f"procs_per_node: {self.num_procs_per_node} processes but gpus_per_node={self.gpus_per_node}; "
                "each process drives one GPU"
            )
        if self.cpus_per_node is not None and self.cpus_per_node < self.num_procs_per_node:
            raise LaunchError(
                f"cpus_per_node: {self.cpus_per_node} is fewer than procs_per_node={self.num_procs_per_node}"
            )
        if self.time_limit is not None and not _TIME_LIMIT.match(str(self.time_limit)):
            raise LaunchError(f"time_limit: {self.time_limit!r} is not a Slurm time (e.g. 04:00:00 or 2-00:00:00)")
        for key in self.env:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", str(key)):
                raise LaunchError(f"env: {key!r} is not a valid environment variable name")
        if backend == "local" and self.nodes != 1:
            raise LaunchError(f"nodes: `ebt launch local` runs on this machine only (nodes=1), got {self.nodes}")
        if backend == "slurm":
            sc = self.slurm
            if not sc.partition:
                raise LaunchError("slurm.partition: required for `ebt launch slurm` (e.g. slurm.partition=gpu)")
            if sc.mode not in SLURM_MODES:
                raise LaunchError(f"slurm.mode: {sc.mode!r} is not one of {', '.join(SLURM_MODES)}")
            if sc.signal_seconds < 0:
                raise LaunchError(f"slurm.signal_seconds: must be >= 0 (0 disables), got {sc.signal_seconds}")
            if sc.max_requeues < 0:
                raise LaunchError(f"slurm.max_requeues: must be >= 0, got {sc.max_requeues}")
            for arg in sc.sbatch_args:
                if not str(arg).startswith("--"):
                    raise LaunchError(f"slurm.sbatch_args: {arg!r} must be a long option such as --exclusive")
        if backend == "ray":
            if self.ray.max_failures < 0:
                raise LaunchError(f"ray.max_failures: must be >= 0, got {self.ray.max_failures}")
            if self.ray.placement_strategy not in PLACEMENT_STRATEGIES:
                raise LaunchError(
                    f"ray.placement_strategy: {self.ray.placement_strategy!r} is not one of {', '.join(PLACEMENT_STRATEGIES)}"
                )


# -- loading -------------------------------------------------------------------------------
LAUNCH_KEYS = tuple(f.name for f in fields(LaunchConfig))
RUN_KEYS = tuple(f.name for f in fields(RunConfig) if f.name not in LAUNCH_KEYS)
RUN_KEYS += tuple(g for g in GROUPS if g not in LAUNCH_KEYS and g not in RUN_KEYS)  # recipe=s2


def resolve_launch_path(name: str) -> Path:
    """A YAML path, or the name of a file in configs/launch/."""
    return resolve_named_yaml(name, "launch", "launch config", LaunchError)


def _one_line(err: Exception, origin: str, schema: DictConfig) -> LaunchError:
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    key = getattr(err, "full_key", None) or ""
    match = re.search(r"Key '([^']+)' not in '(\w+)'", msg)
    if match:
        leaf = match.group(1)
        parent = key.rpartition(".")[0] if key.endswith(leaf) else key
        node = schema
        for part in parent.split(".") if parent else []:
            node = node.get(part) if isinstance(node, DictConfig) else None
        valid = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
        where = f"{parent}.{leaf}" if parent else leaf
        hint = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
        tail = f" (did you mean {(parent + '.' if parent else '') + hint[0]!r}?)" if hint else f" (valid keys: {', '.join(valid)})"
        return LaunchError(f"{origin}: unknown launch key {where!r}{tail}")
    return LaunchError(f"{origin}: {key + ': ' if key else ''}{msg}")


def split_overrides(overrides: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(launch overrides, run-config overrides) by the first component of each key."""
    launch, run = [], []
    for item in overrides:
        if "=" not in item:
            raise LaunchError(f"override {item!r} is not of the form key=value")
        key = item.split("=", 1)[0].strip()
        head = key.split(".")[0]
        if head not in LAUNCH_KEYS and head not in RUN_KEYS:
            hint = difflib.get_close_matches(head, [*LAUNCH_KEYS, *RUN_KEYS], n=1, cutoff=0.5)
            tail = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise LaunchError(f"override {item!r}: {head!r} is neither a launch key nor a run-config section{tail}")
        (launch if head in LAUNCH_KEYS else run).append(item)
    return launch, run


def load_launch_config(config: Optional[str], overrides: Sequence[str] = ()) -> Tuple[LaunchConfig, List[str]]:
    """The launch config (defaults < YAML < launch overrides) and the run-config overrides of
    the command line, which apply after the file's own `overrides:`."""
    schema = OmegaConf.structured(LaunchConfig)
    merged = schema
    launch_items, run_items = split_overrides(overrides)
    if config is not None:
        path = resolve_launch_path(config)
        try:
            layer = OmegaConf.load(path)
        except Exception as err:  # noqa: BLE001 - YAML errors come in many types
            raise LaunchError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if layer is not None and not isinstance(layer, DictConfig):
            raise LaunchError(f"{path}: the top level must be a mapping of launch keys")
        try:
            merged = OmegaConf.merge(merged, layer or {})
        except OmegaConfBaseException as err:
            raise _one_line(err, str(path), schema) from None
    for item in launch_items:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _one_line(err, "command line", schema) from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _one_line(err, "launch config", schema) from None
    assert isinstance(cfg, LaunchConfig)
    if config is not None and not os.path.isabs(cfg.experiment):
        # An experiment path in a launch YAML is relative to that YAML (names stay names).
        candidate = resolve_launch_path(config).parent / cfg.experiment
        if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
            cfg.experiment = str(candidate.resolve())
    return cfg, run_items


# -- the run config every rank trains ---------------------------------------------------------
@dataclass
class LaunchPlan:
    """A validated launch: the placement, and the exact `ebt pretrain` arguments of every rank."""

    launch: LaunchConfig
    backend: str
    run: RunConfig
    pretrain_args: List[str]
    """Arguments after `python -m pretrain` (starting with `pretrain`), identical on every rank."""

    @property
    def run_dir(self) -> Path:
        return Path(self.run.run_dir)

    @property
    def launch_dir(self) -> Path:
        """Scripts, scheduler logs and Ray state of the launcher: `<run_dir>/launch`."""
        return self.run_dir / "launch"


def _explicit(items: Sequence[str], key: str) -> bool:
    return any(i.split("=", 1)[0].strip() == key for i in items)


def plan_launch(backend: str, config: Optional[str], overrides: Sequence[str] = ()) -> LaunchPlan:
    """Loads and validates everything a launch needs, without touching the disk or a scheduler.

    The data-parallel degree follows the layout: `parallel.dp = world_size / (parallel.tp x
    parallel.pp)` unless the run config sets it (then tp x dp x pp must equal the world size)."""
    lc, cli_run_items = load_launch_config(config, overrides)
    lc.validate(backend)
    experiment = str(resolve_config_path(lc.experiment).resolve())
    run_items = [*lc.overrides, *cli_run_items]
    probe = load_config([experiment], run_items)
    world, tp, ppn = lc.world_size, probe.parallel.tp, lc.num_procs_per_node
    pp = probe.parallel.pp
    if world % (tp * pp):
        raise LaunchError(
            f"parallel.tp={tp} x parallel.pp={pp} = {tp * pp} does not divide the world size {world} "
            f"(nodes={lc.nodes} x procs_per_node={ppn})"
        )
    if tp > 1 and ppn % tp:
        raise LaunchError(
            f"parallel.tp={tp} does not divide procs_per_node={ppn}: tensor-parallel groups would span nodes"
        )
    extra: List[str] = []
    if _explicit(run_items, "parallel.dp") or _explicit(lc.overrides, "parallel.dp"):
        from parallel.dims import LayoutError, validate_layout

        try:
            validate_layout(tp, probe.parallel.dp, pp, world)
        except LayoutError as err:
            raise LaunchError(f"{err} (the launch has nodes={lc.nodes} x procs_per_node={ppn}; drop parallel.dp "
                              "to derive it)") from None
    elif probe.parallel.dp != world // (tp * pp):
        extra.append(f"parallel.dp={world // (tp * pp)}")
    run_dir = lc.run_dir or probe.run_dir
    run_dir = os.path.abspath(os.path.expanduser(run_dir))
    items = [i for i in run_items if not i.startswith("run_dir=")] + extra + [f"run_dir={run_dir}"]
    run = load_config([experiment], items)  # validates the derived dp against the batch sizes
    if lc.gpus_per_node > 0 and run.train.device == "cpu":
        raise LaunchError("train.device: 'cpu' with gpus_per_node > 0; set gpus_per_node=0 or train.device=auto")
    return LaunchPlan(launch=lc, backend=backend, run=run, pretrain_args=["pretrain", experiment, *items])
