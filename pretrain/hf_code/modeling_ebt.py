"""`transformers.AutoModel` for an exported Energy-Based Transformer (remote code, see
pretrain/hf_code/__init__.py).

    model = AutoModel.from_pretrained(export_dir, trust_remote_code=True)
    model(input_ids, candidate_logits).energies        # (B, S): E(x, y), lower is better
    model.generate(input_ids, max_new_tokens=16)       # greedy, every token found by thinking

The network is the project's own EnergyTransformer (ebt.py and its modules, copied beside this
file). `generate` thinks each next token by gradient descent on the energy (System-2 thinking):
y0 ~ N(0, 1) from a torch.Generator seeded with `seed`, then `thinking_steps` updates
y <- softmax(y) - alpha * dE/dsoftmax(y), and the argmax of the final y is the token. It
recomputes the whole context for every step (no KV cache): slow, simple, and the same tokens
as `ebt generate` (tests/unit/test_hf_export.py checks both).
"""
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .config import ModelConfig
from .configuration_ebt import EBTConfig
from .ebt import EnergyTransformer
from .layers import rope_tables


@dataclass
class EBTOutput(ModelOutput):
    energies: Optional[torch.Tensor] = None


class EBTModel(PreTrainedModel):
    config_class = EBTConfig
    base_model_prefix = "ebt"
    main_input_name = "input_ids"

    def __init__(self, config: EBTConfig):
        super().__init__(config)
        self.ebt = EnergyTransformer(ModelConfig(**config.ebt_model))
        self.post_init()

    def _init_weights(self, module):
        # Every weight comes from model.safetensors; only the RoPE tables (non-persistent
        # buffers, absent from the file) are computed here.
        if isinstance(module, EnergyTransformer):
            cfg = module.cfg
            cos, sin = rope_tables(cfg.max_seq_len + 2, cfg.head_dim, cfg.rope_theta)
            module.rope_cos.data = cos.float().to(module.rope_cos.device)
            module.rope_sin.data = sin.float().to(module.rope_sin.device)

    def forward(self, input_ids: torch.Tensor, candidate_logits: torch.Tensor, step: int = 0, **kwargs) -> EBTOutput:
        """Energies (B, S) of candidate next-token logits (B, S, V) after each prefix of input_ids."""
        return EBTOutput(energies=self.ebt.energy(input_ids, candidate_logits, step))

    def _think_next(self, ids: torch.Tensor, steps: int, alpha: torch.Tensor, generator) -> torch.Tensor:
        ebt = self.ebt
        vocab = ebt.vocab_size
        dtype = ebt.energy_head.weight.dtype
        y = torch.randn((ids.shape[0], 1, vocab), generator=generator, dtype=dtype).to(ids.device)
        for k in range(steps):
            with torch.enable_grad():
                p = torch.softmax(y.detach().float(), dim=-1).to(dtype).requires_grad_(True)
                # A candidate at every position, uniform before the last (positions are independent).
                before = p.new_full((ids.shape[0], ids.shape[1] - 1, vocab), 1.0 / vocab)
                with torch.no_grad():
                    context = ebt.prepare(ids, k)
                energy = ebt.energy_from_probs(context, torch.cat([before, p], dim=1), k)[:, -1]
                (grad,) = torch.autograd.grad(energy.sum(), p)
            y = p.detach() - alpha * grad
        return y[:, 0]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 16, thinking_steps: Optional[int] = None,
                 step_size: Optional[float] = None, seed: int = 0, **kwargs) -> torch.Tensor:
        """Greedy continuation (B, S + max_new_tokens); the context window slides at max_seq_len."""
        gen_cfg = getattr(self, "generation_config", None)
        steps = thinking_steps if thinking_steps is not None else getattr(gen_cfg, "thinking_steps", 2)
        step_size = step_size if step_size is not None else getattr(gen_cfg, "step_size", None)
        alpha = self.ebt.effective_step_size().detach() if step_size is None else torch.tensor(float(step_size))
        generator = torch.Generator().manual_seed(seed)
        out = input_ids
        limit = self.ebt.cfg.max_seq_len
        for _ in range(max_new_tokens):
            logits = self._think_next(out[:, -limit:], steps, alpha, generator)
            out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
        return out
