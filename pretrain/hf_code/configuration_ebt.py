"""The transformers config of an exported Energy-Based Transformer (remote code, see
pretrain/hf_code/__init__.py): `ebt_model` holds the model section of the run config
(pretrain/model/config.py), `thinking` the inference defaults."""
from transformers import PretrainedConfig


class EBTConfig(PretrainedConfig):
    model_type = "ebt"

    def __init__(self, ebt_model=None, thinking=None, **kwargs):
        self.ebt_model = dict(ebt_model or {})
        self.thinking = dict(thinking or {})
        super().__init__(**kwargs)
