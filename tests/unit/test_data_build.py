"""Tokenizers, packing, the shard format, the builder, the manifest, prepare_dataset's cache, and the
`data build`/`data verify` commands, on real text (pydoc topics, Shakespeare plays)."""
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

import data_pipeline.prepare as prepare_module
from data_pipeline import DataConfig, load_manifest, prepare_dataset
from data_pipeline.build import build_shards, num_val_samples, pack
from data_pipeline.cli import main
from data_pipeline.shards import encode_shard, npy_header
from data_pipeline.sources import resolve_sources
from data_pipeline.tokenizer import gpt2_tokenizer, load_tokenizer, tokenizer_from_file, train_bpe
from data_testlib import pydoc_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return pydoc_folder(tmp_path_factory.mktemp("text"), 60_000)


@pytest.fixture(scope="module")
def tokenizer(folder):
    return train_bpe([t for s in resolve_sources([str(folder)]) for t in s.read_all()], 512)


def test_bpe_training_is_deterministic_and_round_trips(folder, tokenizer, tmp_path):
    again = train_bpe([t for s in resolve_sources([str(folder)]) for t in s.read_all()], 512)
    assert again.fingerprint == tokenizer.fingerprint and tokenizer.vocab_size == 512
    text = "def f(x):\n    return x ** 2  # squares"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    saved = tokenizer_from_file(tokenizer.save(tmp_path))
    assert saved.fingerprint == tokenizer.fingerprint and saved.eos_id == tokenizer.eos_id


def test_gpt2_tokenizer_is_the_shipped_gpt2_bpe():
    tok = gpt2_tokenizer()
    assert tok.vocab_size == 50257 and tok.eos_id == 50256 and tok.dtype == np.uint16
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids
    assert tok.decode(tok.encode("To be, or not to be")) == "To be, or not to be"


def test_trained_tokenizer_is_cached_by_fingerprint(folder, tmp_path, monkeypatch):
    sources = resolve_sources([str(folder)])
    first = load_tokenizer("bpe:512", sources=sources, cache_dir=str(tmp_path))
    monkeypatch.setattr("data_pipeline.tokenizer.train_bpe", lambda *a: pytest.fail("retrained"))
    assert load_tokenizer("bpe:512", sources=sources, cache_dir=str(tmp_path)).fingerprint == first.fingerprint


def test_tokenizer_errors_name_the_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=rf"^data\.tokenizer: {bad} is not a tokenizers JSON file"):
        tokenizer_from_file(bad)
    with pytest.raises(ValueError, match=r"^data\.tokenizer: .*nope\.json does not exist$"):
        tokenizer_from_file(tmp_path / "nope.json")


def test_pack_cuts_seq_len_plus_one_every_seq_len_with_eos_after_each_document():
    docs = [np.array([1, 2, 3], np.uint16), np.array([4, 5], np.uint16)]
    samples, dropped = pack(docs, eos_id=0, seq_len=2)
    # stream 1 2 3 0 4 5 0: windows of 3 tokens every 2, neighbours share a token
    assert samples.tolist() == [[1, 2, 3], [3, 0, 4], [4, 5, 0]]
    assert dropped == 0
    samples, dropped = pack(docs, eos_id=0, seq_len=4)
    assert samples.tolist() == [[1, 2, 3, 0, 4]] and dropped == 2
    assert num_val_samples(100, 0.02) == 2 and num_val_samples(1, 0.5) == 0 and num_val_samples(2, 0.5) == 1


def test_shard_bytes_are_exactly_what_webdataset_writes_and_reads():
    tokens = np.random.default_rng(0).integers(0, 512, size=(37, 17)).astype(np.uint16)
    data, _ = encode_shard(tokens, "train-s00-00004")
    reference = io.BytesIO()
    with wds.TarWriter(reference, user="", group="", mode=0o444, mtime=0, encoder=False) as writer:
        for i, row in enumerate(tokens):
            writer.write({"__key__": f"train-s00-00004-{i:06d}", "tokens.npy": npy_header(17, "<u2") + row.tobytes()})
    assert data == reference.getvalue()


def test_build_is_deterministic_readable_by_webdataset_and_described_by_its_manifest(folder, tokenizer, tmp_path):
    shakespeare = resolve_sources(["shakespeare"])[0]
    plays = tmp_path / "plays"
    plays.mkdir()
    for doc in shakespeare.documents[:2]:
        (plays / Path(doc.path).name).write_text(Path(doc.path).read_text(encoding="utf-8"), encoding="utf-8")
    sources = resolve_sources([str(folder), str(plays)])
    outs = []
    for name in ("a", "b"):
        outs.append(tmp_path / name)
        build_shards(sources, tokenizer, outs[-1], seq_len=16, val_fraction=0.05, shard_size_mb=0.25, progress=False)
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted(p.name for p in outs[1].iterdir())
    assert all((outs[0] / f).read_bytes() == (outs[1] / f).read_bytes() for f in files)
    manifest = load_manifest(outs[0])
    assert [s["documents"] for s in manifest.sources] == [len(list(folder.iterdir())), 2]
    assert {s.source for s in manifest.shards("train")} == {0, 1} and {s.source for s in manifest.shards("val")} == {0, 1}
    for source in manifest.sources:
        n = source["train_samples"] + source["val_samples"]
        assert source["val_samples"] == num_val_samples(n, 0.05) and n == (source["tokens"] - 1) // 16
    first = manifest.shards("train")[0]
    sample = next(iter(wds.WebDataset(str(outs[0] / first.name), shardshuffle=False).decode()))
    assert sample["tokens.npy"].shape == (17,) and sample["__key__"] == f"{first.name[:-4]}-000000"
    assert tokenizer.decode(sample["tokens.npy"].tolist()).startswith(next(sources[0].read_all())[:20])
    # unigram entropy of the training targets
    counts = np.zeros(512)
    for info in manifest.shards("train"):
        for s in wds.WebDataset(str(outs[0] / info.name), shardshuffle=False).decode():
            counts += np.bincount(s["tokens.npy"][1:], minlength=512)
    p = counts[counts > 0] / counts.sum()
    assert manifest.stats["unigram_entropy"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-9)


def test_an_edited_manifest_or_a_missing_path_is_a_one_line_error(folder, tokenizer, tmp_path):
    out = tmp_path / "d"
    build_shards(resolve_sources([str(folder)]), tokenizer, out, seq_len=16, progress=False)
    raw = json.loads((out / "manifest.json").read_text())
    raw["seq_len"] = 32
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"^data\.path: .*manifest\.json was edited after it was built"):
        load_manifest(out)
    with pytest.raises(FileNotFoundError, match=rf"^data\.path: {tmp_path}/nowhere does not exist \("):
        prepare_dataset(DataConfig(path=str(tmp_path / "nowhere")))
    with pytest.raises(FileExistsError, match=r"^--out: .* already holds a dataset"):
        build_shards(resolve_sources([str(folder)]), tokenizer, out, seq_len=16, progress=False)


def test_prepare_dataset_builds_once_for_concurrent_ranks_and_then_reuses(folder, tmp_path, monkeypatch):
    calls = []
    real_build = prepare_module.build_shards

    def counting_build(*args, **kwargs):
        calls.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "build_shards", counting_build)
    cfg = DataConfig(sources=[str(folder)], tokenizer="bpe:512", seq_len=16, cache_dir=str(tmp_path / "cache"))
    results = [None] * 3
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, prepare_dataset(cfg, rank=r, world_size=3)))
               for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len({r.dir for r in results}) == 1 and len({r.manifest.fingerprint for r in results}) == 1
    again = prepare_dataset(cfg)
    assert len(calls) == 1 and again.dir == results[0].dir
    assert again.vocab_size == 512 and 0 < again.unigram_entropy < np.log(512) and again.seq_len == 16
    other = prepare_dataset(DataConfig(sources=[str(folder)], tokenizer="bpe:512", seq_len=8, cache_dir=cfg.cache_dir))
    assert len(calls) == 2 and other.dir != again.dir
    with pytest.raises(ValueError, match=r"^data\.seq_len: 32, but .* was built with seq_len 16$"):
        prepare_dataset(DataConfig(path=str(again.dir), seq_len=32))


def test_cli_build_verify_and_one_line_errors(folder, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["build", str(folder), "--out", str(out), "--tokenizer", "bpe:512", "--seq-len", "16",
            "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(args) == 0
    assert "train" in capsys.readouterr().out
    assert main(["verify", str(out)]) == 0
    shard = sorted(out.glob("train-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:-20000])
    assert main(["verify", str(out)]) == 1
    assert f"damaged shard {shard}: truncated tar" in capsys.readouterr().out
    for bad, flag in ((["--seq-len", "-3"], "--seq-len"), (["--seq-len", "0"], "--seq-len"),
                      (["--tokenizer", "bpe:7"], "--tokenizer"), (["--shard-size-mb", "0"], "--shard-size-mb"),
                      (["--workers", "-1"], "--workers")):
        assert main(["build", str(folder), "--out", str(tmp_path / "x"), "--quiet", *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"ebt data build: {flag}:") and "\n" not in err
    assert main(["build", str(tmp_path / "missing"), "--out", str(tmp_path / "y"), "--quiet"]) == 2
    assert "SRC: " in capsys.readouterr().err


def test_python_dash_m_data_pipeline_builds(folder, tmp_path):
    out = tmp_path / "m"
    run = subprocess.run([sys.executable, "-m", "data_pipeline", "build", str(folder), "--out", str(out),
                          "--tokenizer", "bpe:512", "--seq-len", "64", "--cache-dir", str(tmp_path / "cache"), "--quiet"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert load_manifest(out).tokenizer["vocab_size"] == 512
