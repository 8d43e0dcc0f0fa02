"""The rank layout of parallel.dims is megatron-core's: our rank -> (tp, dp, pp) map equals
Megatron's RankGenerator for every layout of up to 16 ranks (pure arithmetic, no processes),
and a world of one builds without torch.distributed or megatron-core."""
from __future__ import annotations

import sys
import warnings

import pytest

from parallel.dims import MEGATRON_ORDER, ParallelDims, build_dims, rank_of


def _megatron_groups(tp: int, dp: int, pp: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.parallel_state import RankGenerator
    gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order=MEGATRON_ORDER)
    return {axis: sorted(gen.get_ranks(axis)) for axis in ("tp", "dp", "pp")}


LAYOUTS = [(tp, dp, pp) for tp in (1, 2, 4) for dp in (1, 2, 3) for pp in (1, 2, 4) if tp * dp * pp <= 16]


@pytest.mark.parametrize("tp,dp,pp", LAYOUTS)
def test_rank_map_equals_megatron(tp, dp, pp):
    pytest.importorskip("megatron.core")
    ours = {
        "tp": sorted([rank_of(t, d, p, tp, dp) for t in range(tp)] for d in range(dp) for p in range(pp)),
        "dp": sorted([rank_of(t, d, p, tp, dp) for d in range(dp)] for t in range(tp) for p in range(pp)),
        "pp": sorted([rank_of(t, d, p, tp, dp) for p in range(pp)] for t in range(tp) for d in range(dp)),
    }
    assert ours == _megatron_groups(tp, dp, pp)
    # And the coordinates ParallelDims reads back from a rank invert rank_of.
    for rank in range(tp * dp * pp):
        dims = ParallelDims(tp=tp, dp=dp, pp=pp, world_size=tp * dp * pp, rank=rank)
        assert rank_of(dims.tp_rank, dims.dp_rank, dims.pp_rank, tp, dp) == rank


def test_world_of_one_needs_no_megatron(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron", None)  # importing it would now fail
    dims = build_dims()
    assert (dims.tp, dims.dp, dims.pp, dims.pp_rank) == (1, 1, 1, 0) and dims.is_first_stage and dims.is_last_stage
    assert dims.pp_group is None and dims.pp_ranks == [0]
