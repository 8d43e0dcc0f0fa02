"""An export loads in Hugging Face transformers, offline, with the remote code it ships:
AutoModel's energies equal ours, its greedy thinking tokens equal `ebt generate`'s, and
AutoTokenizer encodes like the run's tokenizer. The export's own verification stays."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pretrain.config import load_config
from pretrain.export import export_checkpoint, load_export
from pretrain.generate import EBTInference
from pretrain.trainer import train

pytest.importorskip("transformers", reason="transformers is the optional extra `hf` (scripts/test.sh installs it)")

TEXT = "To be, or not to be, that is the question"
NEW_TOKENS = 6

# Runs in a fresh interpreter so HF_HUB_OFFLINE is in force before huggingface_hub is imported.
HF_SIDE = r"""
import json, sys, torch
from transformers import AutoModel, AutoTokenizer
export, text, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoModel.from_pretrained(export, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
logits = torch.load(sys.argv[4])
out = {"ids": ids[0].tolist(), "class": type(model).__name__,
       "energies": model(ids, logits).energies.tolist(),
       "energies_step1": model(ids, logits, step=1).energies.tolist(),
       "greedy": model.generate(ids, max_new_tokens=new)[0, ids.shape[1]:].tolist(),
       "decoded": tok.decode(ids[0].tolist()),
       "thinking_steps": model.generation_config.thinking_steps}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    cfg = load_config(["test_tiny"], [f"run_dir={root / 'run'}", f"data.cache_dir={root / 'cache'}",
                                      "train.max_steps=2", "model.max_seq_len=48", "model.ebt_type=time_embed",
                                      "model.num_step_embeddings=2"])
    train(cfg, log=lambda _msg: None)
    return export_checkpoint(root / "run", root / "export", log=lambda *_: None)


def test_transformers_loads_the_export_offline_with_our_energies_and_tokens(export_dir: Path, tmp_path: Path):
    ours = load_export(export_dir)  # checksums of every file (the HF ones included) and the probe
    tok = ours.tokenizer()
    ids = torch.tensor([tok.encode(TEXT)])
    logits = torch.randn(1, ids.shape[1], ours.config.vocab_size, generator=torch.Generator().manual_seed(3))
    torch.save(logits, tmp_path / "logits.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", HF_SIDE, str(export_dir), TEXT, str(NEW_TOKENS),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert hf["class"] == "EBTModel"
    assert hf["ids"] == ids[0].tolist() and hf["decoded"] == TEXT  # AutoTokenizer == the run's tokenizer

    for step, key in ((0, "energies"), (1, "energies_step1")):  # time_embed: each step has its own landscape
        expected = ours.model.energy(ids, logits, step).double()
        got = torch.tensor(hf[key], dtype=torch.float64)
        scale = expected.abs().max()
        assert (got - expected).abs().max() <= 1e-6 * scale, key
    wrong = ours.model.energy(ids, logits, 0).double()  # negative control: the other step's energies
    assert (torch.tensor(hf["energies_step1"], dtype=torch.float64) - wrong).abs().max() > 1e-3 * wrong.abs().max()

    greedy = EBTInference(ours.model, ours.thinking).generate(ids[0].tolist(), NEW_TOKENS)
    assert hf["greedy"] == greedy
    assert hf["thinking_steps"] == ours.thinking.steps


def test_the_export_is_a_standard_hf_folder(export_dir: Path):
    config = json.loads((export_dir / "config.json").read_text())
    assert config["model_type"] == "ebt" and config["architectures"] == ["EBTModel"]
    assert config["auto_map"]["AutoModel"] == "modeling_ebt.EBTModel"
    for name in ("modeling_ebt.py", "configuration_ebt.py", "ebt.py", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (export_dir / name).is_file(), name
    with safe_open(str(export_dir / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    generation = json.loads((export_dir / "generation_config.json").read_text())
    thinking = json.loads((export_dir / "thinking.json").read_text())
    assert generation["do_sample"] is False and generation["thinking_steps"] == thinking["steps"]
    manifest = json.loads((export_dir / "export.json").read_text())
    assert {"modeling_ebt.py", "ebt.py", "generation_config.json"} <= set(manifest["files"])  # checksummed
