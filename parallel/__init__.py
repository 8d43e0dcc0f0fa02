"""Everything that knows about ranks: process groups (dims), tensor parallelism on
twice-differentiable collectives (tensor), activation checkpointing of the thinking loop
(checkpointing), data-parallel gradient sync (grads), DeepSpeed ZeRO-1/2 (zero), the ordered
`parallelize` (apply), layout-independent sharded checkpoints (reshard) and the local gloo
test harness (testing). See docs/parallel.md."""
