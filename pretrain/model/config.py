"""The model section of a run config: one dataclass for the EBT and the Transformer++ baseline.

Every field has a one-line meaning; `__post_init__` checks the local invariants with
messages that name the key to change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

ARCHS = ("ebt", "transformer++")
EBT_TYPES = ("default", "time_embed", "adaln")
ATTENTIONS = ("reference", "two_stream")
CONTEXT_ATTENTIONS = ("sdpa", "math")


@dataclass
class ModelConfig:
    arch: str = "ebt"
    """`ebt` (energy transformer) or `transformer++` (the autoregressive baseline)."""
    vocab_size: Optional[int] = None
    """Vocabulary size V; `None` takes it from the run's tokenizer."""
    dim: int = 128
    """Hidden width D."""
    num_layers: int = 2
    """Number of transformer blocks."""
    num_heads: int = 2
    """Attention heads; must divide `dim`, and the head width must be even (RoPE)."""
    max_seq_len: int = 64
    """Longest context S the model accepts (RoPE table size)."""
    ffn_mult: float = 1.0
    """SwiGLU hidden width = round(ffn_mult * dim); the reference uses 1.0."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    ebt_type: str = "default"
    """Step conditioning: `default` (none), `time_embed` (a learned token per step), `adaln`."""
    num_step_embeddings: int = 3
    """Distinct step embeddings for `time_embed`/`adaln`; later steps reuse the last one."""
    attention: str = "two_stream"
    """`reference`: one masked full-sequence pass per energy call (readable, slow);
    `two_stream`: context stream computed separately (and once per batch for `default`),
    prediction stream attends to cached context keys/values plus itself."""
    context_attention: str = "sdpa"
    """Kernel for the context stream in `two_stream` mode. The context stream never depends on
    the candidate, so it needs only first-order gradients: `sdpa` (PyTorch's fused kernels) is
    exact for training; `math` is explicit softmax attention, differentiable to any order."""
    step_size: float = 500.0
    """Initial thinking step size alpha (S1 500, S2 5)."""
    learn_step_size: bool = True
    """Whether alpha is a trained parameter (S1) or fixed (S2)."""
    step_size_min: float = 1e-4
    """alpha is clamped to at least this value in the forward pass."""

    def __post_init__(self) -> None:
        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"model.{key}: {msg}")

        if self.arch not in ARCHS:
            raise bad("arch", f"{self.arch!r} is not one of {ARCHS}")
        if self.ebt_type not in EBT_TYPES:
            raise bad("ebt_type", f"{self.ebt_type!r} is not one of {EBT_TYPES}")
        if self.attention not in ATTENTIONS:
            raise bad("attention", f"{self.attention!r} is not one of {ATTENTIONS}")
        if self.context_attention not in CONTEXT_ATTENTIONS:
            raise bad("context_attention", f"{self.context_attention!r} is not one of {CONTEXT_ATTENTIONS}")
        for key in ("dim", "num_layers", "num_heads", "max_seq_len", "num_step_embeddings"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise bad("vocab_size", f"must be >= 2, got {self.vocab_size}")
        if self.dim % self.num_heads:
            raise bad("num_heads", f"{self.num_heads} does not divide model.dim={self.dim}")
        if (self.dim // self.num_heads) % 2:
            raise bad("num_heads", f"head width dim/num_heads={self.dim // self.num_heads} must be even for RoPE")
        if self.ffn_mult <= 0:
            raise bad("ffn_mult", f"must be > 0, got {self.ffn_mult}")
        if self.step_size <= 0:
            raise bad("step_size", f"must be > 0, got {self.step_size}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        return max(1, int(round(self.ffn_mult * self.dim)))


def as_model_config(cfg) -> ModelConfig:
    """Accepts a ModelConfig, a dict or an OmegaConf node with the same fields."""
    if isinstance(cfg, ModelConfig):
        return cfg
    if hasattr(cfg, "items"):
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a hard dependency
            pass
        fields = set(ModelConfig.__dataclass_fields__)
        unknown = sorted(set(cfg) - fields)
        if unknown:
            import difflib

            hint = difflib.get_close_matches(unknown[0], fields, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"model.{unknown[0]}: unknown key{extra}")
        return ModelConfig(**dict(cfg))
    raise TypeError(f"cannot build a ModelConfig from {type(cfg).__name__}")
