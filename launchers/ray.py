"""`ebt launch ray`: the run's ranks as Ray Train (TorchTrainer) workers.

This module owns the Ray side of a launch: connecting to a cluster (or starting a private one
on loopback), placing `world_size` workers, and restarting them after a failure. The training
code does not know Ray: each worker runs the `ebt` entry point in-process with the standard
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), as torchrun would.

- Process groups: Ray's TorchConfig (gloo on CPU, nccl on GPU) sets the variables and opens a
  group of its own. The entry point creates its own group from the variables, so each worker
  closes Ray's first and takes a fresh MASTER_PORT chosen on rank 0 (reusing Ray's port
  could meet its half-closed store).
- Failures: when a worker dies (process killed, node lost, an exception), Ray stops the group
  and, up to `ray.max_failures` times, starts a new one; the entry point resumes from the run
  folder's latest checkpoint, so the run folder must be storage every node sees.
- No signal handlers: Ray runs the training function outside the main thread, and Ray's own
  failure handling replaces Slurm-style preemption signals.
- A private cluster (`ray.address: null`) binds to 127.0.0.2: Ray rewrites 127.0.0.1 to the
  machine's outward address. It uses its own temp dir and is shut down (exactly the processes
  it started) when the run ends.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List

from .config import LaunchError, LaunchPlan
from .local import rank_environment
from .preemption import ENV_VAR as PREEMPT_ENV

LOCAL_NODE_IP = "127.0.0.2"
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


def pid_file(run_dir: Path, rank: int) -> Path:
    """Where worker `rank` records its process id (operators and tests: which process is rank r)."""
    return run_dir / "launch" / f"ray-rank{rank}.pid"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def train_worker(config: Dict[str, Any]) -> None:
    """The function every Ray Train worker runs: the `ebt pretrain` entry point, in-process."""
    import ray.train
    import torch.distributed as dist
    from ray.train.collective import broadcast_from_rank_zero

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    port = broadcast_from_rank_zero(_free_port() if rank == 0 else None)
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.update(config["env"])
    os.environ["MASTER_PORT"] = str(port)
    path = pid_file(Path(config["run_dir"]), rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n")
    from ebt.cli import main

    code = main(list(config["args"]))
    if code != 0:
        raise RuntimeError(f"rank {rank}: `ebt {' '.join(config['args'][:1])}` exited with code {code}")


def _worker_environment(plan: LaunchPlan) -> Dict[str, str]:
    env = rank_environment(plan)
    env.pop(PREEMPT_ENV, None)  # see the module docstring: no signal handlers under Ray
    return env


def describe(plan: LaunchPlan) -> str:
    """What `--dry-run` prints: where the workers go and what each runs."""
    lc, rc = plan.launch, plan.launch.ray
    where = rc.address or f"a private local Ray on {LOCAL_NODE_IP}"
    per_worker = _resources(plan)
    lines = [
        f"ray cluster: {where}",
        f"workers: {lc.world_size} ({lc.nodes} node(s) x {lc.num_procs_per_node}), resources each {per_worker}, "
        f"placement {rc.placement_strategy}, backend {'nccl' if lc.gpus_per_node else 'gloo'}",
        f"failures: restart the worker group up to {rc.max_failures} time(s), resuming from {plan.run_dir}",
        f"storage: {_storage(plan)}",
        "environment: " + " ".join(f"{k}={v}" for k, v in _worker_environment(plan).items()),
        "each worker runs: python -m pretrain " + " ".join(plan.pretrain_args),
    ]
    return "\n".join(lines)


def _resources(plan: LaunchPlan) -> Dict[str, float]:
    lc = plan.launch
    resources: Dict[str, float] = {"CPU": float(lc.threads_per_proc() or 1)}
    if lc.gpus_per_node:
        resources["GPU"] = 1.0
    return resources


def _storage(plan: LaunchPlan) -> str:
    return os.path.abspath(plan.launch.ray.storage_path or str(plan.launch_dir / "ray"))


@contextlib.contextmanager
def _connected(plan: LaunchPlan) -> Iterator[None]:
    """Connects to `ray.address`, or starts a private single-node Ray for this launch."""
    import ray

    python_path = os.pathsep.join(p for p in (PROJECT_ROOT, os.environ.get("PYTHONPATH")) if p)
    # print patching would show every line of the ranks twice in the driver's output
    runtime_env = {"env_vars": {"PYTHONPATH": python_path, "RAY_AUTH_MODE": "disabled",
                                "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local ray.init() would otherwise turn on token auth
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = plan.launch.ray.address
    if address is not None:
        ray.init(address=address, runtime_env=runtime_env, configure_logging=False)
        try:
            yield
        finally:
            ray.shutdown()  # disconnects; the cluster keeps running
        return
    lc = plan.launch
    cpus = int(lc.world_size * _resources(plan)["CPU"])
    temp_dir = tempfile.mkdtemp(prefix="ebt-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        ray.init(address="local", num_cpus=cpus, num_gpus=lc.gpus_per_node, _node_ip_address=LOCAL_NODE_IP,
                 _temp_dir=temp_dir, include_dashboard=False, runtime_env=runtime_env, configure_logging=False,
                 object_store_memory=256 * 2**20)
        try:
            yield
        finally:
            ray.shutdown()  # stops exactly the processes this ray.init started
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def launch_ray(plan: LaunchPlan, dry_run: bool = False) -> int:
    print(describe(plan), flush=True)
    if dry_run:
        return 0
    try:
        import ray  # noqa: F401
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError:
        raise LaunchError("Ray is not installed: pip install 'ebt-pretrain[cluster]'") from None
    lc, rc = plan.launch, plan.launch.ray
    plan.launch_dir.mkdir(parents=True, exist_ok=True)
    config = {"args": list(plan.pretrain_args), "env": _worker_environment(plan), "run_dir": str(plan.run_dir)}
    with _connected(plan):
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=lc.world_size, use_gpu=lc.gpus_per_node > 0,
                                         resources_per_worker=_resources(plan),
                                         placement_strategy=rc.placement_strategy),
            torch_config=TorchConfig(backend="nccl" if lc.gpus_per_node else "gloo"),
            run_config=RunConfig(name=lc.name, storage_path=_storage(plan),
                                 failure_config=FailureConfig(max_failures=rc.max_failures)),
        )
        try:
            trainer.fit()
        except Exception as err:  # noqa: BLE001 - Ray wraps worker errors in its own types
            first: List[str] = [line for line in str(err).splitlines() if line.strip()][:1]
            print(f"ebt launch ray: training failed after {rc.max_failures} restart(s) (ray.max_failures): "
                  f"{first[0] if first else type(err).__name__}", flush=True)
            return 1
    print(f"ebt launch ray: done; run folder {plan.run_dir}", flush=True)
    return 0
