"""Turning a config into processes: `ebt launch local|slurm|ray`.

- `config`: the launch-config schema (nodes, processes, GPUs/CPUs per node, time limit,
  partition/account, environment, run folder) and its validation against the run config.
- `local`: torchrun on this machine; the environment every rank gets from any launcher.
- `slurm`: the sbatch script (torchrun per node or one task per rank), submission, and the
  preemption contract (USR1 -> checkpoint -> `scontrol requeue` -> resume).
- `ray`: Ray Train (TorchTrainer) workers with bounded restarts from the last checkpoint.
- `preemption`: the training side of preemption (signal handler, collective stop decision).

Every launcher ends in the same entry point on every rank, `python -m pretrain pretrain ...`,
with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; the training code knows
nothing of Slurm or Ray.
"""

BACKENDS = ("local", "slurm", "ray")
"""The launchers `ebt launch BACKEND` knows."""
