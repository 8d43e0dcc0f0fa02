"""DeepSpeed ZeRO stage 1/2 set-up for optimizer-state sharding, and the refusals.

ZeRO-1 and ZeRO-2 partition the AdamW state (and ZeRO-2 the reduced gradients) over the dp
group; parameters stay whole on every rank, which is what the thinking loop's nested
`autograd.grad` needs. Set-up choices and why:

* the optimizer is a torch AdamW passed as DeepSpeed's *client* optimizer: a
  DeepSpeed-configured optimizer JIT-builds FusedAdam (minutes on CPU);
* DeepSpeed's shared-memory CPU comm op is declared unavailable before initialising, so it
  is not JIT-built (~2 min on a fresh machine): collectives go through torch.distributed
  (gloo/NCCL), which this project initialises itself;
* `gradient_accumulation_steps=1` and one `engine.backward` per *optimizer* step: every
  other backward of the unroll (and of earlier micro-batches) accumulates locally, so ZeRO
  reduces once per optimizer step (see parallel.apply for how each stage is driven).

Refused, with the reason (RECIPES.md, EBT_SPEC section 6):
* ZeRO-3: the inner `autograd.grad(create_graph=True)` releases the partitioned parameters
  that the outer backward needs again;
* FSDP/FSDP2: per-block `fully_shard` crashes or leaves sharded gradients None under double
  backward; wrapping only the root shards nothing.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from .dims import LayoutError, ParallelDims
from .grads import broadcast_parameters
from .plan import tp_shard_dim

ZERO_STAGES = (0, 1, 2)


def check_zero_stage(stage: int) -> None:
    if stage == 3:
        raise LayoutError(
            "parallel.zero_stage=3 is refused: ZeRO-3 partitions the parameters themselves, and the thinking loop's "
            "inner autograd.grad(create_graph=True) releases partitioned parameters that the second-order backward "
            "needs again (wrong or failing gradients); use zero_stage 1 or 2, which shard the optimizer state"
        )
    if stage not in ZERO_STAGES:
        raise LayoutError(f"parallel.zero_stage={stage}: must be one of {ZERO_STAGES} (0 = data parallel without ZeRO)")


def refuse_fsdp() -> None:
    raise LayoutError(
        "FSDP is refused: FSDP2 fully_shard per block crashes under the EBT's double backward, or with "
        "reshard_after_backward disabled silently leaves sharded gradients None; use parallel.zero_stage 1 or 2 "
        "(optimizer-state sharding) and parallel.tp for parameter sharding"
    )


class _DeepSpeedMPU:
    """The model-parallel-unit interface DeepSpeed asks for, answered from our dims."""

    def __init__(self, dims: ParallelDims) -> None:
        self.dims = dims

    def get_model_parallel_rank(self) -> int:
        return self.dims.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.dims.tp

    def get_model_parallel_group(self):
        # Megatron's model-parallel group (tp x pp): ZeRO sums the gradient norm over it, and
        # counts a parameter not marked tensor-parallel only on tp rank 0 of each stage.
        return self.dims.model_parallel_group if self.dims.pp > 1 else self.dims.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.dims.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dims.dp

    def get_data_parallel_group(self):
        return self.dims.dp_group

    def get_tensor_model_parallel_group(self):
        return self.dims.tp_group

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.dims.pp

    # Newer DeepSpeed spells these with "tensor".
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size


def deepspeed_config(stage: int, clip: Optional[float], bucket_elements: int = 2**25) -> Dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(clip) if clip else 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": False,
            "contiguous_gradients": False,
            "reduce_scatter": True,
            "reduce_bucket_size": bucket_elements,
            "allgather_bucket_size": bucket_elements,
        },
    }


def build_zero_engine(
    model: nn.Module, optimizer: torch.optim.Optimizer, dims: ParallelDims, stage: int, clip: Optional[float]
):
    """A DeepSpeed engine for ZeRO `stage` (1 or 2) around an already tensor-parallel model.
    torch.distributed must be initialised. Returns the engine; `engine.optimizer` is the
    ZeRO optimizer whose `param_groups` are the client optimizer's."""
    check_zero_stage(stage)
    if stage == 0:
        raise ValueError("build_zero_engine: stage 0 is plain data parallelism (parallel.grads)")
    import deepspeed
    import deepspeed.ops

    # We communicate through torch.distributed; the shm op would only cost a JIT build.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    for name, p in model.named_parameters():
        # DeepSpeed's grad norm counts parameters marked model-parallel on every tp rank
        # and replicated ones once.
        p.tensor_model_parallel = dims.tp > 1 and tp_shard_dim(name) is not None
        p.model_parallel = p.tensor_model_parallel
    # DeepSpeed broadcasts each parameter as `p.data.view(torch.uint8)`, which fails for a
    # 0-dim parameter (the step size alpha). We broadcast everything ourselves first and hide
    # the scalars from its broadcast with the attribute it skips (removed right after).
    broadcast_parameters(model, dims)
    scalars = [p for p in model.parameters() if p.dim() == 0]
    for p in scalars:
        p.ds_optim_param = True
    try:
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=deepspeed_config(stage, clip),
            mpu=_DeepSpeedMPU(dims) if dims.tp > 1 or dims.pp > 1 else None,
            dist_init_required=False,
        )
    finally:
        for p in scalars:
            del p.ds_optim_param
    return engine
