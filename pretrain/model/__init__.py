"""Models: the autoregressive EBT and the Transformer++ baseline, built from one config."""
from __future__ import annotations

import torch.nn as nn

from .config import ModelConfig, as_model_config
from .ebt import Context, EnergyTransformer, candidate_probs
from .transformer_pp import TransformerPP

__all__ = ["ModelConfig", "EnergyTransformer", "TransformerPP", "Context", "build_model", "candidate_probs"]


def build_model(cfg) -> nn.Module:
    """The model described by the model section of a config (dataclass, dict or OmegaConf)."""
    cfg = as_model_config(cfg)
    if cfg.arch == "ebt":
        return EnergyTransformer(cfg)
    return TransformerPP(cfg)
