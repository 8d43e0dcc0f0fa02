"""Launch configs: malformed ones fail before anything is submitted, with a one-line message and
exit code 2; well-formed ones render the exact torchrun command / sbatch script / Ray plan."""
from __future__ import annotations

import subprocess

import pytest

from launchers import slurm as slurm_mod
from launchers.config import LaunchError, load_launch_config, plan_launch
from ebt.cli import main
from pretrain.config import ConfigError, load_config


def _multi_rank_refusal():
    try:
        load_config(["test_tiny"], ["parallel.dp=2"])
    except ConfigError as err:
        return str(err)
    return None


needs_multi_rank = pytest.mark.skipif(_multi_rank_refusal() is not None,
                                      reason=f"2-rank training not in this tree yet: {_multi_rank_refusal()}")


@pytest.fixture
def no_submission(monkeypatch):
    """Fails the test if anything reaches sbatch or Ray."""
    def refuse(*_a, **_k):
        raise AssertionError("submitted although the config is malformed")
    monkeypatch.setattr(slurm_mod, "submit", refuse)
    import launchers.ray as ray_mod
    monkeypatch.setattr(ray_mod, "_connected", refuse)


@pytest.mark.parametrize("backend, overrides, key", [
    ("slurm", ["nodes=0"], "nodes"),
    ("ray", ["nodes=-1"], "nodes"),
    ("slurm", ["slurm.partition=null", "nodes=1"], "slurm.partition"),
    ("slurm", ["nodes=1", "procs_per_node=3", "cpus_per_node=null", "parallel.tp=2"], "parallel.tp"),
    ("local", ["nodes=1", "procs_per_node=2", "cpus_per_node=2", "parallel.dp=3"], "parallel.dp"),
    ("local", ["nodes=1", "procs_per_node=3", "cpus_per_node=3", "parallel.pp=2", "model.num_layers=2"], "parallel.pp=2"),
    ("local", ["nodes=1", "procs_per_node=2", "cpus_per_node=2", "parallel.pp=2", "model.num_layers=2",
               "parallel.dp=2"], "parallel.pp=2"),
    ("slurm", ["nodes=1", "gpus_per_node=2", "procs_per_node=4"], "procs_per_node"),
    ("slurm", ["nodes=1", "slurm.mode=mpirun"], "slurm.mode"),
    ("slurm", ["nodes=1", "time_limit=soon"], "time_limit"),
    ("ray", ["nodes=1", "ray.placement_strategy=RANDOM"], "ray.placement_strategy"),
    ("local", ["nodes=2"], "nodes"),
    ("slurm", ["nodez=2"], "nodes"),
    ("slurm", ["slurm.partitoin=gpu"], "slurm.partition"),
    ("slurm", ["nodes=1", "train.max_stepz=3"], "train.max_steps"),
])
def test_malformed_launch_fails_before_submission_with_one_line(backend, overrides, key, no_submission, capsys):
    code = main(["launch", backend, "test_tiny_2x1", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("ebt launch: error: "), err
    assert key in err, err


def test_missing_partition_is_required_only_for_slurm(no_submission, capsys):
    with pytest.raises(LaunchError, match="slurm.partition"):
        plan_launch("slurm", "slurm", ["nodes=1", "experiment=test_tiny"])
    plan = plan_launch("local", "slurm", ["nodes=1", "experiment=test_tiny"])
    assert plan.launch.world_size == 1


def test_overrides_split_between_launch_and_run_config(tmp_path):
    lc, run_items = load_launch_config("test_tiny_2x1", ["nodes=1", "train.seed=3", "slurm.partition=x"])
    assert lc.nodes == 1 and lc.slurm.partition == "x" and run_items == ["train.seed=3"]
    plan = plan_launch("slurm", "test_tiny_2x1", ["nodes=1", "train.seed=3", f"run_dir={tmp_path}/r"])
    assert plan.run.train.seed == 3 and plan.run.train.max_steps == 40  # the file's overrides, then the CLI's
    assert plan.pretrain_args[-1] == f"run_dir={tmp_path}/r"


def test_one_node_script_and_command(tmp_path, capsys):
    assert main(["launch", "slurm", "test_tiny_2x1", "nodes=1", f"run_dir={tmp_path}/r", "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --nodes=1" in script and "#SBATCH --partition=debug" in script
    assert "#SBATCH --signal=B:USR1@60" in script and "#SBATCH --requeue" in script
    assert f"#SBATCH --output={tmp_path}/r/launch/slurm-%j.out" in script
    assert "--rdzv-backend=c10d" in script and "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert script.index("trap on_preempt USR1") < script.index("srun ")  # handler before the ranks start
    assert not (tmp_path / "r").exists()  # a dry run writes nothing
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr
    assert main(["launch", "local", "test_tiny_2x1", "nodes=1", "--dry-run"]) == 0
    command = capsys.readouterr().out
    assert "torch.distributed.run --nnodes=1 --nproc-per-node=1 --standalone" in command
    assert "EBT_PREEMPT_SIGNALS=USR1" in command and "-m pretrain pretrain" in command


def test_master_port_differs_per_job_and_restart():
    def port(job: int, restart: int) -> int:
        return slurm_mod.PORT_BASE + (job % slurm_mod.PORT_JOBS) * slurm_mod.PORT_RESTARTS + restart % slurm_mod.PORT_RESTARTS
    ports = {port(j, r) for j in range(1000) for r in range(40)}
    assert len(ports) == 40000 and min(ports) >= 15000 and max(ports) < 65536


@needs_multi_rank
def test_four_nodes_by_eight_gpus_script(capsys):
    assert main(["launch", "slurm", "slurm_4x8gpu", "--dry-run"]) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=64", "#SBATCH --time=24:00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --signal=B:USR1@300", "--nproc-per-node=8", "parallel.dp=32", "OMP_NUM_THREADS=8"):
        assert line in script, line
    assert main(["launch", "slurm", "slurm_4x8gpu", "slurm.mode=srun", "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --ntasks-per-node=8" in script and "#SBATCH --cpus-per-task=8" in script
    assert "RANK=$SLURM_PROCID" in script


@needs_multi_rank
def test_ray_dry_run_describes_the_workers(capsys):
    assert main(["launch", "ray", "test_tiny_2x1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "workers: 2" in out and "STRICT_SPREAD" in out and "backend gloo" in out
    assert "EBT_PREEMPT_SIGNALS" not in out


def test_preemption_handler_records_and_stops(monkeypatch):
    import os
    import signal

    from launchers import preemption

    monkeypatch.setenv(preemption.ENV_VAR, "USR1")
    try:
        assert preemption.install_from_env() == [int(signal.SIGUSR1)]
        assert not preemption.stop_requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.requested() and preemption.stop_requested()
    finally:
        preemption.reset()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL and not preemption.stop_requested()
