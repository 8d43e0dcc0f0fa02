"""Hugging Face remote code that `ebt export` copies into every export (pretrain.hf_export).

`configuration_ebt.py` and `modeling_ebt.py` are imported by transformers from the export
folder (`trust_remote_code=True`), where the model's own files (pretrain/model/*.py) sit beside
them; they are not importable from here (their relative imports name those copied files).
"""
