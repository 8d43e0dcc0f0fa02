"""`ebt eval`: the System-2 curve, best-of-G and early stop on the validation split and on OOD
sets of real packaged text, the Transformer++ twin's CE on the same windows; bad input is one
line with exit code 2."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ebt.cli import main as ebt_main
from pretrain.config import load_config
from pretrain.evaluate import load_for_eval, ood_windows, run_eval
from pretrain.export import export_checkpoint
from pretrain.thinking import think
from pretrain.trainer import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny EBT run and its Transformer++ twin (same data, tokenizer and budget)."""
    root = tmp_path_factory.mktemp("eval")
    common = [f"data.cache_dir={root / 'cache'}", "train.max_steps=4", "train.checkpoint_every=0"]
    train(load_config(["test_tiny"], [f"run_dir={root / 'ebt'}", *common]), log=lambda *_: None)
    train(load_config(["test_tiny"], [f"run_dir={root / 'tpp'}", "model.arch=transformer++", *common]),
          log=lambda *_: None)
    return root


def test_eval_reports_curve_best_of_g_early_stop_and_twin_on_every_set(runs, capsys):
    record = run_eval(str(runs / "ebt"), steps=4, samples=(1, 2), batches=1, batch_size=3, twin=str(runs / "tpp"),
                      out=str(runs / "out"), log=lambda *_: None)
    table = capsys.readouterr().out
    names = [s["name"] for s in record["sets"]]
    assert names == ["val (in-dist.)", "pydoc", "pysource"]
    for line in ("| val (in-dist.) |", "| pydoc |", "| pysource |", "CE@4", "best-of-2", "Transformer++ twin CE"):
        assert line in table
    saved = json.loads((runs / "out" / "eval.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert (runs / "out" / "system2.png").stat().st_size > 0

    ev, twin = load_for_eval(runs / "ebt"), load_for_eval(runs / "tpp")
    windows = ood_windows("pysource", ev.tokenizer, ev.seq_len, 3)
    # The windows are the run's tokenizer applied to the stdlib's own source text (documents
    # joined by the end-of-sequence token).
    lib = Path(os.__file__).parent
    corpus = "".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(lib.glob("*.py")))
    eos = ev.tokenizer.tok.id_to_token(ev.tokenizer.eos_id)
    for row in windows:
        for piece in ev.tokenizer.decode(row.tolist()).split(eos):
            assert piece in corpus, piece
    pysource = record["sets"][2]
    assert len(pysource["ce_per_step"]) == 5 and len(pysource["energy_per_step"]) == 5
    # Independent references on the same windows: the twin's CE through F.cross_entropy, and the
    # thinking CE after k steps through think() with the evaluation's seed.
    ctx, tgt = windows[:, :-1], windows[:, 1:]
    with torch.no_grad():
        logits = twin.model(ctx)
    want_twin = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), tgt.reshape(-1)).item()
    assert abs(pysource["twin_ce"] - want_twin) < 1e-5 * max(1.0, want_twin)
    r = think(ev.model, ctx, 4, targets=tgt, generator=torch.Generator().manual_seed(1234))
    assert pysource["ce_per_step"] == pytest.approx(r.ce_per_step, rel=1e-9)
    # best-of-1 is the plain curve at the trained steps (2 for the S1 test config); the gain is
    # what the derived fields say it is.
    assert pysource["best_of"]["1"] == pytest.approx(pysource["ce_per_step"][2], rel=1e-9)
    assert pysource["system2_gain"] == pytest.approx(pysource["ce_per_step"][2] - pysource["ce_per_step"][4])
    assert pysource["longer_does_not_hurt"] == (pysource["ce_per_step"][4] <= pysource["ce_per_step"][2])
    assert 1.0 <= pysource["early_stop_steps"] <= 4.0


def test_eval_of_an_export_without_its_run_uses_the_ood_sets(runs, tmp_path):
    export = export_checkpoint(runs / "ebt", tmp_path / "export", log=lambda *_: None)
    record = run_eval(str(export), ood=["pydoc"], steps=2, samples=(1,), batches=1, batch_size=2,
                      out=str(tmp_path / "out"), log=lambda *_: None)
    # the export's source checkpoint is still there, so the validation split is found through it
    assert [s["name"] for s in record["sets"]] == ["val (in-dist.)", "pydoc"]


@pytest.mark.parametrize("args,needle", [
    (["--ood", "pydoc,klingon"], "--ood: unknown set 'klingon'"),
    (["--steps", "0"], "must be >= 1"),
])
def test_eval_bad_options_are_one_line_errors(runs, args, needle, capsys):
    assert ebt_main(["eval", str(runs / "ebt"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ebt eval: error: ") and needle in err[0], err


def test_eval_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a run")
    assert ebt_main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path}: not a run folder" in err[0], err
    assert ebt_main(["eval", str(tmp_path / "missing")]) == 2
    assert "no such run folder" in capsys.readouterr().err
