"""benchmarks/gpu.py: without a GPU it says so and measures nothing; its whole code path runs
on CPU at a tiny size (--smoke). The GPU run itself needs a CUDA machine."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
def test_without_gpu_it_says_so(capsys):
    assert _load().main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_smoke_runs_the_whole_table_on_cpu(capsys):
    assert _load().main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "| EBT S1 2 steps |" in out and "| Transformer++ |" in out
    assert "longest context that trains (EBT S1, batch 1): 16" in out
