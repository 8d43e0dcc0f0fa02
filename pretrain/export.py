"""Serving export: one folder a server can load without any training code path or pickle.

    model.safetensors   consolidated float32 weights (any training layout)
    config.json         the architecture (the model section of the run config, resolved)
    thinking.json       inference defaults: steps, step size, noise, samples, conditioning variant
    tokenizer.json      the run's tokenizer (one file, `tokenizers` format)
    + the Hugging Face files of pretrain.hf_export (config.json is then also a transformers
      config; `AutoModel.from_pretrained(dir, trust_remote_code=True)` loads the folder)
    export.json         written last: source checkpoint, sha256 of every file above, and the
                        probe batch with the values the checkpoint recorded

`export_checkpoint` builds the folder in a temporary sibling, reloads it with `load_export`
(which verifies every checksum and recomputes the probe values), refuses to finish on any
mismatch, and only then renames it into place.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import latest_checkpoint, read_full_model_state, read_metadata
from .generate import ThinkingDefaults
from .hf_export import hf_config, model_config_from_json, write_hf_files
from .model import ModelConfig, build_model
from .probe import probe_values

EXPORT_FORMAT = 2
"""2: config.json is a transformers config (pretrain.hf_export); 1 (still loaded): a plain model section."""
FILES = ("model.safetensors", "config.json", "thinking.json", "tokenizer.json")
"""Every export has these; export.json lists them and the Hugging Face files with their sha256."""
MANIFEST = "export.json"
PROBE_TOLERANCE = 1e-4


class ExportError(ValueError):
    """An export that cannot be made or loaded; one line naming the file."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def resolve_checkpoint(source: str | Path) -> Path:
    """A checkpoint folder, or the latest complete checkpoint of a run folder."""
    source = Path(source)
    if not source.exists():
        raise ExportError(f"{source}: no such run folder or checkpoint")
    if (source / "metadata.json").is_file():
        return source
    latest = latest_checkpoint(source)
    if latest is None:
        raise ExportError(f"{source}: neither a checkpoint nor a run folder with complete checkpoints")
    return latest


def consolidated_state(checkpoint: Path, meta: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Full (unsharded) float32 model weights of a checkpoint of any layout, validated against
    its metadata."""
    tensors, _ = read_full_model_state(checkpoint, meta)
    return {k: v.float().contiguous() for k, v in tensors.items()}


def _model_config(meta: Dict[str, Any], state: Dict[str, torch.Tensor]) -> ModelConfig:
    cfg = dict(meta["config"]["model"])
    if cfg.get("vocab_size") is None:  # resolved from the tokenizer at training time
        cfg["vocab_size"] = int(state["tok_embeddings.weight"].shape[0])
    return ModelConfig(**cfg)


def _thinking_defaults(meta: Dict[str, Any], state: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    thinking = meta["config"].get("thinking", {})
    defaults = ThinkingDefaults(steps=int(thinking.get("eval_steps", 2)),
                                noise_std=float(thinking.get("eval_noise_std", 0.0)))
    out = dataclasses.asdict(defaults)
    if "step_size" in state:
        out["step_size"] = float(state["step_size"])
    out["ebt_type"] = meta["config"]["model"].get("ebt_type")
    out["trained_steps"] = thinking.get("num_steps_max") or thinking.get("num_steps")
    return out


def _tokenizer_json(meta: Dict[str, Any], checkpoint: Path) -> str:
    """The run's tokenizer: saved next to the run, else rebuilt (offline) from the data config."""
    for candidate in (checkpoint.parent.parent / "tokenizer.json", checkpoint / "tokenizer.json"):
        if candidate.is_file():
            return candidate.read_text()
    from data_pipeline import DataConfig, prepare_dataset

    data = DataConfig(**meta["config"]["data"])
    return prepare_dataset(data).tokenizer.to_json()


def _eos(tokenizer_json: str):
    """(token, id) of the tokenizer's end-of-text token, or None."""
    from data_pipeline.tokenizer import TextTokenizer

    tok = TextTokenizer.from_json(tokenizer_json, origin="export")
    return (tok.tok.id_to_token(tok.eos_id), tok.eos_id) if tok.eos_id is not None else None


def export_checkpoint(source: str | Path, out: str | Path, *, log=print) -> Path:
    """Consolidates a checkpoint into a serving export at `out` and proves it (see module doc)."""
    checkpoint = resolve_checkpoint(source)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out}: already exists and is not empty; choose a new --out")
    meta = read_metadata(checkpoint)
    state = consolidated_state(checkpoint, meta)
    model_cfg = _model_config(meta, state)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        log(f"export: {checkpoint} -> {out}")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # what transformers expects
        thinking = _thinking_defaults(meta, state)
        (tmp / "config.json").write_text(json.dumps(hf_config(model_cfg, thinking), indent=1))
        (tmp / "thinking.json").write_text(json.dumps(thinking, indent=1))
        tokenizer_json = _tokenizer_json(meta, checkpoint)
        (tmp / "tokenizer.json").write_text(tokenizer_json)
        hf_files = write_hf_files(tmp, model_cfg, thinking, _eos(tokenizer_json))
        probe = meta.get("probe")
        manifest = {
            "format": EXPORT_FORMAT,
            "source": {"checkpoint": str(checkpoint), "step": meta["step"]},
            "files": {name: _sha256(tmp / name) for name in (*FILES, *hf_files)},
            "probe": probe,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        load_export(tmp)  # checksums and probe values, exactly as a server will check them
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"export: verified probe energies and checksums; wrote {', '.join(sorted(manifest['files']) + [MANIFEST])}")
    return out


@dataclasses.dataclass
class Export:
    model: torch.nn.Module
    config: ModelConfig
    thinking: ThinkingDefaults
    tokenizer_json: str
    manifest: Dict[str, Any]

    def tokenizer(self):
        from data_pipeline.tokenizer import TextTokenizer

        return TextTokenizer.from_json(self.tokenizer_json, origin="export")


def load_export(path: str | Path, *, device: str | torch.device = "cpu", verify_probe: bool = True) -> Export:
    """Loads an export after checking every file's sha256 and (by default) the probe values."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ExportError(f"{manifest_path}: missing: {path} is not a complete export")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ExportError(f"{manifest_path}: corrupt ({type(err).__name__}: {err})") from None
    if manifest.get("format") not in (1, EXPORT_FORMAT):
        raise ExportError(f"{manifest_path}: format {manifest.get('format')} is not 1 or {EXPORT_FORMAT}")
    if not isinstance(files, dict) or not set(FILES) <= set(files):
        raise ExportError(f"{manifest_path}: corrupt (files must list {', '.join(FILES)})")
    for name in files:
        if Path(name).name != name:
            raise ExportError(f"{manifest_path}: corrupt (file name {name!r} is not a plain name)")
        file = path / name
        if not file.is_file():
            raise ExportError(f"{file}: missing from the export")
        if _sha256(file) != files.get(name):
            raise ExportError(f"{file}: sha256 does not match export.json: the export was modified or damaged")
    try:
        config = model_config_from_json(json.loads((path / "config.json").read_text()))
        thinking_raw = json.loads((path / "thinking.json").read_text())
    except (TypeError, ValueError) as err:
        raise ExportError(f"{path / 'config.json'}: invalid ({err})") from None
    fields = {f.name for f in dataclasses.fields(ThinkingDefaults)}
    thinking = ThinkingDefaults(**{k: v for k, v in thinking_raw.items() if k in fields})
    model = build_model(config)
    state = load_file(str(path / "model.safetensors"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ExportError(f"{path / 'model.safetensors'}: does not fit config.json ({str(err).splitlines()[0]})") from None
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # inference only: dE/dy never needs parameter gradients
    probe = manifest.get("probe")
    if verify_probe and probe:
        now = torch.tensor(probe_values(model, torch.tensor(probe["ids"])))
        saved = torch.tensor(probe["values"])
        if now.shape != saved.shape or not torch.allclose(now, saved, rtol=PROBE_TOLERANCE, atol=PROBE_TOLERANCE):
            diff = (now - saved).abs().max().item() if now.shape == saved.shape else float("nan")
            raise ExportError(
                f"{path / 'model.safetensors'}: probe values differ from the checkpoint's (max diff {diff:.3g})"
            )
    return Export(model, config, thinking, (path / "tokenizer.json").read_text(), manifest)
