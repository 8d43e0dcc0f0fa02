"""Smaller pieces of parallel/: layout validation and refusals (single process), activation
checkpointing against the plain model (single process, float64, S1 and S2), and the
Transformer++ baseline under tp=2 (vocab-parallel embedding, LM head and cross-entropy)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from parallel.apply import ParallelSettings, parallelize
from parallel.checkpointing import apply_activation_checkpointing
from parallel.dims import LayoutError, build_dims, rank_of, validate_layout
from parallel.tensor import shard_range, tensor_parallelize, tp_shard_dim
from parallel.spawn import run_distributed
from parity import TINY_MODEL, recipe
from parallel.zero import check_zero_stage, refuse_fsdp
from pretrain.model import build_model
from pretrain.model.vocab import LOCAL_VOCAB
from pretrain.thinking import unroll


def test_layout_errors_name_the_degrees():
    with pytest.raises(LayoutError, match=r"parallel.tp=2 x parallel.dp=2 x parallel.pp=1 = 4 processes, but 2"):
        validate_layout(2, 2, 1, 2)
    with pytest.raises(LayoutError, match=r"parallel.pp=2 = 2 processes, but 4"):
        validate_layout(1, 1, 2, 4)
    with pytest.raises(LayoutError, match="parallel.tp=2"):
        build_dims(tp=2, dp=1)  # a world of one process
    dims = build_dims()
    assert (dims.tp, dims.dp, dims.tp_rank, dims.dp_rank) == (1, 1, 0, 0)


def test_megatron_rank_layout_puts_tp_fastest():
    assert [rank_of(t, d, 0, tp=2, dp=2) for d in range(2) for t in range(2)] == [0, 1, 2, 3]
    assert rank_of(1, 1, 1, tp=2, dp=2) == 7


def test_refusals_explain_why():
    with pytest.raises(LayoutError, match="ZeRO-3.*autograd.grad"):
        check_zero_stage(3)
    with pytest.raises(LayoutError, match="FSDP"):
        refuse_fsdp()
    check_zero_stage(2)


def test_shard_ranges_tile_uneven_sizes():
    for size in (13, 16, 7):
        for parts in (1, 2, 3, 4):
            ranges = [shard_range(size, parts, r) for r in range(parts)]
            assert ranges[0][0] == 0 and ranges[-1][1] == size
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert tp_shard_dim("layers.0.attn.wq.weight") == 0 and tp_shard_dim("cand_embed.weight") == 1
    assert tp_shard_dim("layers.0.attn_norm.weight") is None and tp_shard_dim("step_size") is None


def test_tp1_is_the_untouched_model():
    model = build_model(TINY_MODEL)
    assert tensor_parallelize(model, build_dims()) is model and model.vocab_ops is LOCAL_VOCAB


@pytest.mark.parametrize("mode", ["block", "step", "block_vjp"])
@pytest.mark.parametrize("name", ["s1", "s2"])
def test_activation_checkpointing_is_exact(mode, name):
    overrides, thinking = recipe(name, same_random_stream=True)
    cfg = dict(TINY_MODEL, ebt_type="time_embed" if name == "s2" else "default", **overrides)
    grads = []
    for checkpointing in ("none", mode):
        torch.manual_seed(0)
        model = build_model(cfg).double()
        apply_activation_checkpointing(model, checkpointing)
        ids = torch.randint(0, 13, (2, 9), generator=torch.Generator().manual_seed(1))
        unroll(model, ids, thinking, generator=torch.Generator().manual_seed(2))
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for n, g in grads[0].items():
        assert grads[1][n] is not None
        torch.testing.assert_close(grads[1][n], g, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="activation_checkpointing"):
        apply_activation_checkpointing(build_model(cfg), "reentrant")


def _transformer_pp_main() -> None:
    dims = build_dims(tp=2, dp=1)
    cfg = dict(TINY_MODEL, arch="transformer++")
    torch.manual_seed(0)
    ref = build_model(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    pm = parallelize(model, dims, ParallelSettings(tp=2), lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    ids = torch.randint(0, 13, (3, 9), generator=torch.Generator().manual_seed(3))
    ref_loss = LOCAL_VOCAB.cross_entropy(ref(ids[:, :-1]), ids[:, 1:])
    ref_loss.backward()
    logits = pm.module(ids[:, :-1])
    assert logits.shape[-1] == shard_range(13, 2, dims.tp_rank)[1] - shard_range(13, 2, dims.tp_rank)[0]
    loss = pm.module.vocab_ops.cross_entropy(logits, ids[:, 1:])
    pm.backward(loss)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pm.module.vocab_ops.gather(logits), ref(ids[:, :-1]).detach(), rtol=1e-5, atol=1e-6)
    ref_params = dict(ref.named_parameters())
    for name, p in pm.module.named_parameters():
        assert p.grad is not None, name
        want = ref_params[name].grad
        dim = tp_shard_dim(name)
        if dim is not None:
            start, end = shard_range(want.shape[dim], 2, dims.tp_rank)
            want = want.narrow(dim, start, end - start)
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
def test_transformer_pp_tp2_matches_single_process():
    run_distributed(_transformer_pp_main, 2)


def _megatron_style_main(out_file: str) -> None:
    """f's backward as megatron-core writes it (an all-reduce that autograd does not record)."""
    import parallel.tensor as tensor
    from parity import parity_check

    def untracked_backward(ctx, grad):
        out = grad.detach().clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None

    tensor._CopyToTP.backward = staticmethod(untracked_backward)
    try:
        parity_check(ParallelSettings(tp=2), "s1", "default", num_steps=1)
        verdict = "passed"
    except AssertionError as err:
        verdict = str(err)
    if dist.get_rank() == 0:
        with open(out_file, "w") as fh:
            fh.write(verdict)


@pytest.mark.distributed
def test_harness_catches_a_collective_without_double_backward(tmp_path):
    """Why parallel.tensor writes each backward with the partner's .apply: an f whose backward
    all-reduces outside autograd (megatron-core's mapping) keeps the loss and dE/dy right but
    gets the second-order parameter gradients wrong, and the parity check says so."""
    out = tmp_path / "verdict.txt"
    run_distributed(_megatron_style_main, 2, str(out))
    verdict = out.read_text()
    assert verdict != "passed" and "grad/" in verdict, verdict
    print(verdict[:300])
