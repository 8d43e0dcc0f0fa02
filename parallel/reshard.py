"""Layout-independent sharded checkpoints of the model and AdamW state: written per tp rank,
loadable at any other tp/dp/ZeRO layout.

On disk (one folder; the trainer's checkpoint module owns the folder, metadata, RNG states
and data cursor around it):
  parallel.json                      layout written at, optimizer step, and for every tensor
                                     its full shape and the dim it is split along over tp
  model-tp{r}-of-{T}.safetensors     tp rank r's slice of every sharded parameter; tp rank 0
                                     also holds the replicated ones
  optim-tp{r}-of-{T}.safetensors     the same for AdamW's `<param>.exp_avg` / `.exp_avg_sq`
Under pipeline parallelism (pp > 1) every stage writes its own files,
`model-pp{s}-of-{P}-tp{r}-of-{T}.safetensors` (and `optim-...`), holding the tensors of stage s
(parallel.pipeline.parameter_stage); parallel.json then records `pp` and each tensor's stage.
Only dp rank 0 of each (tp, pp) group writes: dp replicas are identical, and ZeRO's
partitioned optimizer state is gathered over dp first (DeepSpeed's
safe_get_full_optimizer_state).

Loading assembles each full tensor from the tp pieces it was written as (`tp_shard_dim` is
a function of the name) and cuts this rank's slice for the new layout. The model's full
state is loaded *before* `parallelize` (which then slices it, and DeepSpeed copies it into
its master partitions); the optimizer state after, with `load_optimizer_state`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .apply import ParallelModel
from .dims import ParallelDims
from .plan import full_width, tp_shard_dim
from .tensor import gather_dim, shard_range

LAYOUT_FILE = "parallel.json"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _shard_name(kind: str, tp_rank: int, tp: int, pp_rank: int = 0, pp: int = 1) -> str:
    stage = f"-pp{pp_rank}-of-{pp}" if pp > 1 else ""
    return f"{kind}{stage}-tp{tp_rank}-of-{tp}.safetensors"


def _model_file(tp_rank: int, tp: int, pp_rank: int = 0, pp: int = 1) -> str:
    return _shard_name("model", tp_rank, tp, pp_rank, pp)


def _optim_file(tp_rank: int, tp: int, pp_rank: int = 0, pp: int = 1) -> str:
    return _shard_name("optim", tp_rank, tp, pp_rank, pp)


def _is_sharded(pm: ParallelModel, name: str) -> bool:
    return pm.dims.tp > 1 and tp_shard_dim(name) is not None


def _optimizer_tensors(pm: ParallelModel) -> Dict[str, torch.Tensor]:
    """This rank's AdamW state per parameter name (full over dp, tp-local)."""
    out: Dict[str, torch.Tensor] = {}
    for name, p in pm.module.named_parameters():
        if not p.requires_grad:
            continue
        for key in ADAM_KEYS:
            if pm.engine is None:
                state = pm.optimizer.state.get(p, {})
                value = state.get(key)
            else:
                from deepspeed.utils import safe_get_full_optimizer_state

                value = safe_get_full_optimizer_state(p, key)
            if value is not None:
                out[f"{name}.{key}"] = value.detach().reshape(p.shape).contiguous().cpu()
    return out


def _optimizer_step(pm: ParallelModel) -> int:
    if pm.engine is None:
        steps = [int(s["step"]) for s in pm.optimizer.state.values() if "step" in s]
    else:
        base = pm.engine.optimizer.optimizer
        steps = [int(s["step"]) for s in base.state.values() if "step" in s]
    return max(steps, default=0)


def save_sharded(pm: ParallelModel, folder: str | Path, extra: Optional[dict] = None) -> None:
    """Collective over the world: every rank calls it. Writes the layout-independent shards."""
    folder = Path(folder)
    dims = pm.dims
    optim = _optimizer_tensors(pm)  # collective under ZeRO: every rank takes part
    if dims.dp_rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        model_out = {}
        for name, tensor in pm.module.state_dict().items():
            if _is_sharded(pm, name) or dims.tp_rank == 0:
                model_out[name] = tensor.detach().contiguous().cpu()
        optim_out = {
            key: value for key, value in optim.items()
            if _is_sharded(pm, key.rsplit(".", 1)[0]) or dims.tp_rank == 0
        }
        save_file(model_out, str(folder / _model_file(dims.tp_rank, dims.tp, dims.pp_rank, dims.pp)))
        save_file(optim_out, str(folder / _optim_file(dims.tp_rank, dims.tp, dims.pp_rank, dims.pp)))
    shapes = {}
    for name, tensor in pm.module.state_dict().items():
        shape = list(tensor.shape)
        dim = tp_shard_dim(name) if _is_sharded(pm, name) else None
        if dim is not None:
            shape[dim] = full_width(name, pm.module.cfg)
        shapes[name] = {"shape": shape, "tp_dim": dim, "pp_stage": dims.pp_rank}
    if dims.pp > 1:  # rank 0 (stage 0) describes every stage's tensors: gather them over its pipeline
        stages: list = [None] * dims.pp
        dist.all_gather_object(stages, shapes, group=dims.pp_group)
        shapes = {}
        for part in stages:  # a buffer every stage holds (RoPE tables) is recorded at its first
            for name, info in part.items():
                shapes.setdefault(name, info)
    if dims.rank == 0:
        layout = {"tp": dims.tp, "dp": dims.dp, "pp": dims.pp, "zero_stage": pm.zero_stage,
                  "optimizer_step": _optimizer_step(pm), "tensors": shapes, "extra": extra or {}}
        (folder / LAYOUT_FILE).write_text(json.dumps(layout, indent=1))
    if dist.is_initialized():
        dist.barrier()


def read_layout(folder: str | Path) -> dict:
    return json.loads((Path(folder) / LAYOUT_FILE).read_text())


def _assemble(folder: Path, layout: dict, file_of, names) -> Dict[str, torch.Tensor]:
    tp, pp = layout["tp"], layout.get("pp", 1)
    pieces = []
    for r in range(tp):  # tp rank r's slice of every tensor, the stages' files merged
        merged: Dict[str, torch.Tensor] = {}
        for s in range(pp):
            merged.update(load_file(str(folder / file_of(r, tp, s, pp))))
        pieces.append(merged)
    full: Dict[str, torch.Tensor] = {}
    for key in names:
        name = key if key in layout["tensors"] else key.rsplit(".", 1)[0]
        dim = layout["tensors"][name]["tp_dim"]
        if dim is None:
            if key in pieces[0]:
                full[key] = pieces[0][key]
        elif all(key in p for p in pieces):
            full[key] = torch.cat([p[key] for p in pieces], dim=dim)
    return full


def load_full_model_state(folder: str | Path) -> Dict[str, torch.Tensor]:
    """The unsharded model state dict (what a single process would hold)."""
    folder = Path(folder)
    layout = read_layout(folder)
    return _assemble(folder, layout, _model_file, list(layout["tensors"]))


def load_full_optimizer_state(folder: str | Path) -> Dict[str, torch.Tensor]:
    """{"<param>.exp_avg": full tensor, ...} as a single process would hold it."""
    folder = Path(folder)
    layout = read_layout(folder)
    names = [f"{n}.{k}" for n in layout["tensors"] for k in ADAM_KEYS]
    return _assemble(folder, layout, _optim_file, names)


def local_slice(name: str, full: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """This rank's piece of a full tensor for parameter `name` under `dims`."""
    dim = tp_shard_dim(name) if dims.tp > 1 else None
    if dim is None:
        return full
    start, end = shard_range(full.shape[dim], dims.tp, dims.tp_rank)
    return full.narrow(dim, start, end - start)


def gather_full_model_state(module: nn.Module, dims: ParallelDims) -> Dict[str, torch.Tensor]:
    """The unsharded state dict, on every rank, from a tp-sharded module (collective over tp)."""
    out = {}
    for name, tensor in module.state_dict().items():
        dim = tp_shard_dim(name) if dims.tp > 1 else None
        if dim is None:
            out[name] = tensor.detach().clone()
        else:
            out[name] = gather_dim(tensor.detach(), dim, full_width(name, module.cfg), dims.tp_group, dims.tp)
    return out


def load_optimizer_state(pm: ParallelModel, folder: str | Path) -> int:
    """Loads AdamW moments (resliced for this layout) and the step count from a shard folder
    into a freshly parallelized model's optimizer. Returns the optimizer step."""
    step = int(read_layout(folder)["optimizer_step"])
    load_optimizer_moments(pm, load_full_optimizer_state(folder), step)
    return step


def load_optimizer_moments(pm: ParallelModel, full: Dict[str, torch.Tensor], step: int) -> None:
    """Full (unsharded) AdamW moments {"<param>.exp_avg": t, ...} into the optimizer of `pm`
    (any layout): each rank takes its tp slice; under ZeRO DeepSpeed keeps its dp partition."""
    named = [(n, p) for n, p in pm.module.named_parameters() if p.requires_grad]
    if pm.engine is None:
        for name, p in named:
            if f"{name}.exp_avg" not in full:
                continue
            pm.optimizer.state[p] = {
                # torch AdamW keeps `step` as a float tensor per parameter.
                "step": torch.tensor(float(step)),
                **{k: local_slice(name, full[f"{name}.{k}"], pm.dims).to(p).clone() for k in ADAM_KEYS},
            }
        return
    from deepspeed.utils import safe_set_full_optimizer_state

    zero = pm.engine.optimizer
    base = zero.optimizer
    # DeepSpeed creates the flat partitions' AdamW state lazily at the first step and links
    # each parameter's fragment to it then; create it now so the fragments can be written.
    for group in zero.single_partition_of_fp32_groups:
        base.state[group] = {"step": torch.tensor(float(step)),
                             **{k: torch.zeros_like(group) for k in ADAM_KEYS}}
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()
    zero._ebt_state_relinked = True
    for name, p in named:
        for key in ADAM_KEYS:
            if f"{name}.{key}" in full:
                safe_set_full_optimizer_state(p, local_slice(name, full[f"{name}.{key}"], pm.dims).to(p), key)
