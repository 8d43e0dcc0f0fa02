"""The trainer's one road at 2 ranks (gloo, forked ranks running the real Trainer in-process;
tests/distributed/test_trainer_layouts.py covers the same through torchrun):

* a dp=2 and a ZeRO-1 dp=2 run of the full S2 recipe (random 2-3 steps, Langevin noise,
  step-size jitter, replay) reproduce the single-process run: 10 losses and the final
  weights within 1e-5 relative;
* resume across layouts continues the same trajectory (dp=2 -> 1 process, 1 -> tp=2,
  dp=2 -> ZeRO-1);
* a NaN (and an inf) in one rank's gradient at tp=2, dp=2 and ZeRO-1: the step is skipped on
  every rank, weights and optimizer state bitwise unchanged, logged and counted, and
  `train.max_consecutive_nonfinite` stops the run with a one-line error;
* every shipped experiment trains, checkpoints and resumes under tp=2, dp=2, ZeRO-1, ZeRO-2, pp=2;
* the Transformer++ trains, evaluates and checkpoints under tp=2, matching one process.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist

from parallel.spawn import run_distributed
from pretrain.config import load_config
from pretrain.trainer import GRAD_FAULT_ENV, NonFiniteError, Trainer

pytestmark = pytest.mark.distributed

S2_TINY = ["model.dim=32", "model.num_layers=1", "model.num_heads=2", "train.global_batch_size=4",
           "train.eval_every=0", "train.eval_batches=1", "train.log_every=1", "optim.warmup_steps=2"]
EXPERIMENT_TINY = S2_TINY + ["data.seq_len=16", "model.max_seq_len=16"]
EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "configs" / "experiments").glob("*.yaml"))


def config(experiment: str, run_dir: Path, cache: Path, *overrides: str):
    return load_config([experiment], [f"run_dir={run_dir}", f"data.cache_dir={cache}", *overrides])


def quiet(_msg: str) -> None:
    pass


def losses(run_dir: Path) -> List[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r.get("loss") is not None]


def full_weights(trainer: Trainer) -> Dict[str, torch.Tensor]:
    """The unsharded weights (collective under tp)."""
    from parallel.reshard import gather_full_model_state

    return {k: v.double() for k, v in gather_full_model_state(trainer.model, trainer.dims).items()}


def assert_close_rel(a: List[float], b: List[float], rel: float = 1e-5) -> None:
    assert len(a) == len(b), (a, b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * abs(y), (a, b)


def assert_weights_close(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], rel: float = 1e-5) -> None:
    """Each tensor within `rel` of its own scale in norm (||a - b|| / ||b||). Not elementwise:
    after 10 AdamW steps in float32, an element whose gradient is near Adam's eps has the
    rounding of its gradient (summation order differs between layouts) amplified by ~1/eps
    (seen: 5e-5 of the tensor's largest magnitude on single tok_embeddings entries); the
    float64 parity cases in test_parallel_parity.py bound the arithmetic itself at 1e-10."""
    assert got.keys() == want.keys()
    for k in want:
        diff = got[k] - want[k]
        assert float(diff.norm()) <= rel * float(want[k].norm()), (k, float(diff.norm() / want[k].norm()))


# -- dp / ZeRO reproduce one process, resume across layouts ------------------------------------
def _layouts_main(tmp: str, cache: str) -> None:
    tmp_path, rank = Path(tmp), dist.get_rank()
    for name, layout in (("dp2", ["parallel.dp=2"]), ("zero1", ["parallel.dp=2", "parallel.zero_stage=1"])):
        trainer = Trainer(config("s2", tmp_path / name, Path(cache), *S2_TINY, "train.max_steps=10",
                                 "train.checkpoint_every=5", *layout), log=quiet)
        trainer.run()
        weights = full_weights(trainer)
        if rank == 0:
            torch.save(weights, tmp_path / f"{name}.weights.pt")
            if name == "dp2":  # its step-5 checkpoint, resumed below under ZeRO-1
                shutil.copytree(tmp_path / name / "checkpoints" / "step_00000005",
                                tmp_path / "dp2-then-zero1" / "checkpoints" / "step_00000005")
        dist.barrier()
    trainer = Trainer(config("s2", tmp_path / "dp2-then-zero1", Path(cache), *S2_TINY, "train.max_steps=10",
                             "train.checkpoint_every=5", "parallel.dp=2", "parallel.zero_stage=1"), log=quiet)
    assert trainer.step == 5
    trainer.run()
    # 1 process -> tp=2: the single run's step-5 checkpoint (copied by the parent), resumed at tp=2
    trainer = Trainer(config("s2", tmp_path / "single-then-tp2", Path(cache), *S2_TINY, "train.max_steps=10",
                             "train.checkpoint_every=5", "parallel.tp=2"), log=quiet)
    assert trainer.step == 5 and trainer.resumed_from is not None
    trainer.run()


def test_dp2_and_zero1_reproduce_one_process_and_resume_across_layouts(tmp_path, data_cache):
    base = [*S2_TINY, "train.max_steps=10", "train.checkpoint_every=5"]
    single = Trainer(config("s2", tmp_path / "single", data_cache, *base), log=quiet)
    single.run()
    want_weights = {k: v.double() for k, v in single.model.state_dict().items()}
    want = losses(tmp_path / "single")
    assert len(want) == 10
    # the single run's step-5 checkpoint, resumed at tp=2 inside the ranks (the same run,
    # interrupted: max_steps, and so the learning-rate schedule, unchanged)
    shutil.copytree(tmp_path / "single" / "checkpoints" / "step_00000005",
                    tmp_path / "single-then-tp2" / "checkpoints" / "step_00000005")
    run_distributed(_layouts_main, 2, str(tmp_path), str(data_cache))
    for name in ("dp2", "zero1"):
        assert_close_rel(losses(tmp_path / name), want)
        assert_weights_close(torch.load(tmp_path / f"{name}.weights.pt"), want_weights)
    assert_close_rel(losses(tmp_path / "single-then-tp2"), want[5:])
    assert_close_rel(losses(tmp_path / "dp2-then-zero1"), want[5:])
    # dp=2 -> one process: resume the dp=2 run's step-5 checkpoint here, the next 5 losses match
    resumed = tmp_path / "dp2-then-single"
    (resumed / "checkpoints").mkdir(parents=True)
    os.rename(tmp_path / "dp2" / "checkpoints" / "step_00000005", resumed / "checkpoints" / "step_00000005")
    trainer = Trainer(config("s2", resumed, data_cache, *base), log=quiet)
    assert trainer.step == 5
    trainer.run()
    assert_close_rel(losses(resumed), want[5:])
    assert_weights_close({k: v.double() for k, v in trainer.model.state_dict().items()}, want_weights)


# -- the non-finite guard in every layout -----------------------------------------------------------
def _state_snapshot(trainer: Trainer) -> Dict[str, torch.Tensor]:
    """Every tensor of this rank's weights and optimizer state (ZeRO: its fp32 partitions and
    their AdamW state)."""
    out = {f"w/{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    pm = trainer.pm
    if pm.engine is None:
        for i, p in enumerate(pm.params):
            for key, value in pm.optimizer.state.get(p, {}).items():
                out[f"opt/{i}/{key}"] = value.clone()
    else:
        zero = pm.engine.optimizer
        for i, flat in enumerate(zero.single_partition_of_fp32_groups):
            out[f"fp32/{i}"] = flat.detach().clone()
            for key, value in zero.optimizer.state.get(flat, {}).items():
                out[f"opt/{i}/{key}"] = value.clone()
    return out


def _nonfinite_main(tmp: str, cache: str, layout: List[str], out_file: str) -> None:
    tmp_path, rank = Path(tmp), dist.get_rank()
    cfg = lambda steps, *extra: config("s1", tmp_path / "run", Path(cache), *S2_TINY,  # noqa: E731
                                       f"train.max_steps={steps}", "train.checkpoint_every=2", *layout, *extra)
    Trainer(cfg(2), log=quiet).run()
    lines: List[str] = []
    os.environ[GRAD_FAULT_ENV] = "nan@3@1"  # rank 1 only
    trainer = Trainer(cfg(3), log=lines.append)
    before = _state_snapshot(trainer)
    trainer.run()
    after = _state_snapshot(trainer)
    unchanged = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    os.environ[GRAD_FAULT_ENV] = "inf@5,6@1"  # step 4 is good: the count restarts
    trainer = Trainer(cfg(8, "train.max_consecutive_nonfinite=2"), log=quiet)
    try:
        trainer.run()
        stopped = "did not stop"
    except NonFiniteError as err:
        stopped = str(err)
    del os.environ[GRAD_FAULT_ENV]
    result = {"unchanged": unchanged, "num_tensors": len(before), "skipped": trainer.skipped, "lines": lines,
              "stopped": stopped, "step": trainer.step}
    gathered: List = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(out_file).write_text(json.dumps(gathered))


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.dp=2"], ["parallel.dp=2", "parallel.zero_stage=1"]],
                         ids=["tp2", "dp2", "zero1"])
def test_a_nonfinite_gradient_on_one_rank_skips_the_step_everywhere(tmp_path, data_cache, layout):
    out = tmp_path / "result.json"
    run_distributed(_nonfinite_main, 2, str(tmp_path), str(data_cache), layout, str(out))
    ranks = json.loads(out.read_text())
    for r in ranks:  # every rank: weights and optimizer state bitwise unchanged by the poisoned step
        assert r["unchanged"] and r["num_tensors"] > 0, r
        assert r["step"] == 6 and r["skipped"] == 3  # steps 3, 5 and 6 skipped; the stop after 6
        assert "\n" not in r["stopped"]
        assert "2 consecutive steps with non-finite gradient (train.max_consecutive_nonfinite=2)" in r["stopped"]
    assert any("step 3: skipped (non-finite gradient); 1 in a row, 1 in total" in l for l in ranks[0]["lines"])
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [3, 5, 6]
    meta = json.loads(max((tmp_path / "run" / "checkpoints").glob("step_*")).joinpath("metadata.json").read_text())
    assert meta["reason"] == "nonfinite" and meta["skipped_steps"] == 3


# -- every experiment under every layout ---------------------------------------------------------------
def _experiments_main(tmp: str, cache: str, layout: List[str], out_file: str) -> None:
    done = {}
    for experiment in EXPERIMENTS:
        run_dir = Path(tmp) / experiment
        cfg = lambda steps: config(experiment, run_dir, Path(cache), *EXPERIMENT_TINY,  # noqa: E731
                                   f"train.max_steps={steps}", "train.checkpoint_every=2", *layout)
        Trainer(cfg(2), log=quiet).run()
        trainer = Trainer(cfg(3), log=quiet)
        resumed_at = trainer.step
        trainer.run()
        done[experiment] = {"resumed_at": resumed_at, "step": trainer.step}
    if dist.get_rank() == 0:
        Path(out_file).write_text(json.dumps(done))


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.dp=2"], ["parallel.dp=2", "parallel.zero_stage=1"],
                                    ["parallel.dp=2", "parallel.zero_stage=2"],
                                    ["parallel.pp=2", "parallel.pp_microbatches=2", "model.num_layers=2"]],
                         ids=["tp2", "dp2", "zero1", "zero2", "pp2"])
def test_every_experiment_trains_checkpoints_and_resumes(tmp_path, data_cache, layout):
    out = tmp_path / "done.json"
    run_distributed(_experiments_main, 2, str(tmp_path), str(data_cache), layout, str(out))
    done = json.loads(out.read_text())
    assert set(done) == set(EXPERIMENTS) and len(EXPERIMENTS) >= 5
    for experiment, row in done.items():
        assert row == {"resumed_at": 2, "step": 3}, experiment
        assert (tmp_path / experiment / "checkpoints" / "step_00000003" / "metadata.json").is_file()


# -- the Transformer++ under tp=2 ---------------------------------------------------------------------
def _tpp_main(tmp: str, cache: str) -> None:
    trainer = Trainer(config("transformerpp", Path(tmp) / "tp2", Path(cache), *EXPERIMENT_TINY, "train.max_steps=4",
                             "train.checkpoint_every=2", "train.eval_every=2", "parallel.tp=2"), log=quiet)
    trainer.run()
    weights = full_weights(trainer)
    if dist.get_rank() == 0:
        torch.save(weights, Path(tmp) / "tp2.weights.pt")


def test_transformer_pp_trains_evaluates_and_checkpoints_under_tp2(tmp_path, data_cache):
    args = [*EXPERIMENT_TINY, "train.max_steps=4", "train.checkpoint_every=2", "train.eval_every=2"]
    single = Trainer(config("transformerpp", tmp_path / "single", data_cache, *args), log=quiet)
    single.run()
    run_distributed(_tpp_main, 2, str(tmp_path), str(data_cache))
    assert_close_rel(losses(tmp_path / "tp2"), losses(tmp_path / "single"))
    evals = [[json.loads(l)["val_ce"] for l in (tmp_path / name / "eval.jsonl").read_text().splitlines()]
             for name in ("tp2", "single")]
    assert len(evals[0]) == 2
    assert_close_rel(*evals)
    assert_weights_close(torch.load(tmp_path / "tp2.weights.pt"),
                         {k: v.double() for k, v in single.model.state_dict().items()})
    meta = json.loads((tmp_path / "tp2" / "checkpoints" / "step_00000004" / "metadata.json").read_text())
    assert meta["layout"]["tp"] == 2 and meta["world_size"] == 2
