"""The Hugging Face side of an export (`ebt export` writes it into every export folder):

    config.json              model_type "ebt", architectures ["EBTModel"], auto_map to the remote
                             code below, `ebt_model` (the model section) and `thinking`
    configuration_ebt.py     \\  remote code for `trust_remote_code=True` (pretrain/hf_code/),
    modeling_ebt.py          /   beside copies of the model's own modules (pretrain/model/*.py)
    generation_config.json   the thinking settings (thinking_steps, step_size, ...), greedy
    tokenizer_config.json    PreTrainedTokenizerFast over the run's tokenizer.json

model.safetensors (written by pretrain.export with {"format": "pt"} metadata) is what
`AutoModel.from_pretrained(dir, trust_remote_code=True)` loads; nothing here imports
transformers, so exporting does not need it installed.
"""
from __future__ import annotations

import dataclasses
import json
from importlib.resources import files
from pathlib import Path
from typing import Any, Dict, List

from .model import ModelConfig

REMOTE_CODE = ("configuration_ebt.py", "modeling_ebt.py")
MODEL_CODE = ("attention.py", "config.py", "ebt.py", "layers.py", "vocab.py")
HF_FILES = ("generation_config.json", "tokenizer_config.json", *REMOTE_CODE, *MODEL_CODE)
"""The files this module writes besides config.json (all are checksummed in export.json)."""


def hf_config(model_cfg: ModelConfig, thinking: Dict[str, Any]) -> Dict[str, Any]:
    """config.json: a transformers config that also carries our model section (`ebt_model`)."""
    hf = {
        "model_type": "ebt",
        "architectures": ["EBTModel"],
        "auto_map": {"AutoConfig": "configuration_ebt.EBTConfig", "AutoModel": "modeling_ebt.EBTModel"},
        "dtype": "float32",
    } if model_cfg.arch == "ebt" else {}
    return {**hf, "vocab_size": model_cfg.vocab_size, "max_position_embeddings": model_cfg.max_seq_len,
            "ebt_model": dataclasses.asdict(model_cfg), "thinking": thinking}


def model_config_from_json(data: Dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a config.json (this format, or a plain model section as exports of
    format 1 wrote it)."""
    return ModelConfig(**(data["ebt_model"] if "ebt_model" in data else data))


def write_hf_files(folder: Path, model_cfg: ModelConfig, thinking: Dict[str, Any], eos: tuple | None) -> List[str]:
    """Writes everything but config.json, model.safetensors and tokenizer.json (for an EBT; a
    Transformer++ export gets none of it); returns the names. `eos`: (token, id) or None."""
    if model_cfg.arch != "ebt":
        return []  # the Transformer++ baseline has no remote code (yet); its export is ours only
    generation = {
        "do_sample": False,
        "max_length": model_cfg.max_seq_len,
        "thinking_steps": thinking["steps"],
        "step_size": thinking.get("step_size"),
        "noise_std": thinking.get("noise_std", 0.0),
        "num_samples": thinking.get("num_samples", 1),
        "early_stop_tol": thinking.get("early_stop_tol"),
        "eos_token_id": eos[1] if eos else None,
    }
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=1))
    tokenizer = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_cfg.max_seq_len,
                 "clean_up_tokenization_spaces": False, **({"eos_token": eos[0]} if eos else {})}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=1))
    for name in REMOTE_CODE:
        (folder / name).write_bytes((files("pretrain.hf_code") / name).read_bytes())
    for name in MODEL_CODE:
        (folder / name).write_bytes((files("pretrain.model") / name).read_bytes())
    return list(HF_FILES)

