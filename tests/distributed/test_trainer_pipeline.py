"""The trainer driving pipeline parallelism (gloo, forked ranks running the real Trainer):

* a pp=2 run of the full S2 recipe (random 2-3 steps, Langevin noise, step-size jitter, replay
  over 2 micro-batches) reproduces the single-process run: every loss, every evaluation and
  the final weights;
* checkpoints resume across pipeline layouts, continuing the same trajectory:
  1 process -> pp=2, pp=2 -> tp=2, tp=2 -> pp=2, pp=2 -> pp=2 x dp=2 (ZeRO-1),
  pp=2 x dp=2 -> pp=2 x tp=2, pp=2 -> pp=2 x dp=2 (ZeRO-2), pp=2 -> 1 process and
  pp=2 x dp=2 -> 1 process;
* the Transformer++ trains and evaluates under pp=2, matching one process;
* a pp=2 checkpoint holds one shard file per stage, and the folder says so.

(The pipeline's arithmetic against one process, gradients included, in float64 and float32:
tests/distributed/test_pipeline_parity.py; torchrun: tests/distributed/test_trainer_layouts.py.)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist

from parallel.spawn import run_distributed
from pretrain.config import load_config
from pretrain.trainer import Trainer

pytestmark = pytest.mark.distributed

TINY = ["model.dim=32", "model.num_layers=2", "model.num_heads=2", "data.seq_len=16", "model.max_seq_len=16",
        "train.global_batch_size=4", "train.eval_every=3", "train.eval_batches=1", "train.log_every=1",
        "optim.warmup_steps=2", "train.max_steps=9", "train.checkpoint_every=3", "train.keep_last_k=3"]
PP2 = ["parallel.pp=2", "parallel.pp_microbatches=2"]


def config(experiment: str, run_dir: Path, cache: Path, *overrides: str):
    return load_config([experiment], [f"run_dir={run_dir}", f"data.cache_dir={cache}", *TINY, *overrides])


def quiet(_msg: str) -> None:
    pass


def records(run_dir: Path, name: str) -> List[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def losses(run_dir: Path) -> List[float]:
    return [r["loss"] for r in records(run_dir, "metrics.jsonl") if r.get("loss") is not None]


def assert_close_rel(a: List[float], b: List[float], rel: float = 1e-5) -> None:
    assert len(a) == len(b), (a, b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * abs(y), (a, b)


def full_weights(trainer: Trainer) -> Dict[str, torch.Tensor]:
    """The whole model's weights, on every rank (collective over pp and tp)."""
    from parallel.reshard import gather_full_model_state

    model = trainer.module.eval_model()
    state = gather_full_model_state(model, trainer.dims)
    return {k: v.double() for k, v in state.items()}


def copy_checkpoint(src_run: Path, step: int, dst_run: Path) -> None:
    name = f"step_{step:08d}"
    shutil.copytree(src_run / "checkpoints" / name, dst_run / "checkpoints" / name)


def resume(experiment: str, tmp: Path, cache: Path, name: str, *layout: str) -> Trainer:
    trainer = Trainer(config(experiment, tmp / name, cache, *layout), log=quiet)
    assert trainer.resumed_from is not None
    trainer.run()
    return trainer


# -- 2 ranks -----------------------------------------------------------------------------------------
def _two_ranks(tmp: str, cache: str) -> None:
    tmp_path, cache_path, rank = Path(tmp), Path(cache), dist.get_rank()
    pp2 = Trainer(config("s2", tmp_path / "pp2", cache_path, *PP2), log=quiet)
    pp2.run()
    weights = full_weights(pp2)
    if rank == 0:
        torch.save(weights, tmp_path / "pp2.weights.pt")
        copy_checkpoint(tmp_path / "pp2", 3, tmp_path / "pp2-then-tp2")
        copy_checkpoint(tmp_path / "pp2", 3, tmp_path / "pp2-then-pp2dp2")
        copy_checkpoint(tmp_path / "pp2", 6, tmp_path / "pp2-then-pp2zero2")
    dist.barrier()
    resume("s2", tmp_path, cache_path, "single-then-pp2", *PP2)
    resume("s2", tmp_path, cache_path, "pp2-then-tp2", "parallel.tp=2")
    if rank == 0:
        copy_checkpoint(tmp_path / "pp2-then-tp2", 6, tmp_path / "tp2-then-pp2")
    dist.barrier()
    resume("s2", tmp_path, cache_path, "tp2-then-pp2", *PP2)
    tpp = Trainer(config("transformerpp", tmp_path / "tpp-pp2", cache_path, *PP2, "train.max_steps=3",
                         "train.checkpoint_every=0"), log=quiet)
    tpp.run()


def _four_ranks(tmp: str, cache: str) -> None:
    tmp_path, cache_path, rank = Path(tmp), Path(cache), dist.get_rank()
    resume("s2", tmp_path, cache_path, "pp2-then-pp2dp2", *PP2, "parallel.dp=2", "parallel.zero_stage=1")
    if rank == 0:
        copy_checkpoint(tmp_path / "pp2-then-pp2dp2", 6, tmp_path / "pp2dp2-then-pp2tp2")
    dist.barrier()
    resume("s2", tmp_path, cache_path, "pp2dp2-then-pp2tp2", *PP2, "parallel.tp=2")
    resume("s2", tmp_path, cache_path, "pp2-then-pp2zero2", *PP2, "parallel.dp=2", "parallel.zero_stage=2")


def test_pp2_reproduces_one_process_and_resumes_across_pipeline_layouts(tmp_path, data_cache):
    single = Trainer(config("s2", tmp_path / "single", data_cache), log=quiet)
    single.run()
    want = losses(tmp_path / "single")
    want_eval = [r["val_ce_per_step"] for r in records(tmp_path / "single", "eval.jsonl")]
    want_weights = {k: v.double() for k, v in single.model.state_dict().items()}
    assert len(want) == 9 and len(want_eval) == 3
    copy_checkpoint(tmp_path / "single", 3, tmp_path / "single-then-pp2")
    tpp_single = Trainer(config("transformerpp", tmp_path / "tpp-single", data_cache, "train.max_steps=3",
                                "train.checkpoint_every=0"), log=quiet)
    tpp_single.run()

    run_distributed(_two_ranks, 2, str(tmp_path), str(data_cache))

    # pp=2 from scratch: losses, evaluations (every thinking step) and weights
    assert_close_rel(losses(tmp_path / "pp2"), want)
    got_eval = [r["val_ce_per_step"] for r in records(tmp_path / "pp2", "eval.jsonl")]
    for got, ref in zip(got_eval, want_eval):
        assert_close_rel(got, ref)
    got_weights = torch.load(tmp_path / "pp2.weights.pt")
    assert got_weights.keys() == want_weights.keys()
    for k in want_weights:  # each tensor against its own scale
        assert float((got_weights[k] - want_weights[k]).norm()) <= 1e-5 * float(want_weights[k].norm()), k
    # the pp=2 checkpoint: one shard file per stage, the layout recorded
    folder = tmp_path / "pp2" / "checkpoints" / "step_00000009"
    shards = sorted(p.name for p in (folder / "model").glob("model-*.safetensors"))
    assert shards == ["model-pp0-of-2-tp0-of-1.safetensors", "model-pp1-of-2-tp0-of-1.safetensors"]
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["layout"] == {"tp": 1, "dp": 1, "pp": 2, "zero_stage": 0} and meta["world_size"] == 2
    # resumed across layouts: the remaining losses of the single-process run
    assert_close_rel(losses(tmp_path / "single-then-pp2"), want[3:])
    assert_close_rel(losses(tmp_path / "pp2-then-tp2"), want[3:])
    assert_close_rel(losses(tmp_path / "tp2-then-pp2"), want[6:])
    # the Transformer++ under pp=2
    assert_close_rel(losses(tmp_path / "tpp-pp2"), losses(tmp_path / "tpp-single"))
    assert_close_rel([r["val_ce"] for r in records(tmp_path / "tpp-pp2", "eval.jsonl")],
                     [r["val_ce"] for r in records(tmp_path / "tpp-single", "eval.jsonl")])

    run_distributed(_four_ranks, 4, str(tmp_path), str(data_cache))
    assert_close_rel(losses(tmp_path / "pp2-then-pp2dp2"), want[3:])
    assert_close_rel(losses(tmp_path / "pp2dp2-then-pp2tp2"), want[6:])
    assert_close_rel(losses(tmp_path / "pp2-then-pp2zero2"), want[6:])

    # pp=2 -> one process, pp=2 x dp=2 -> one process
    for src, name in ((tmp_path / "pp2", "pp2-then-single"), (tmp_path / "pp2-then-pp2dp2", "pp2dp2-then-single")):
        copy_checkpoint(src, 6, tmp_path / name)
        trainer = resume("s2", tmp_path, data_cache, name)
        assert_close_rel(losses(tmp_path / name), want[6:])
        got = {k: v.double() for k, v in trainer.model.state_dict().items()}
        for k in want_weights:
            assert float((got[k] - want_weights[k]).norm()) <= 1e-5 * float(want_weights[k].norm()), (name, k)
