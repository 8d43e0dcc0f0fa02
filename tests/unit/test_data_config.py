"""The `data:` config section: OmegaConf structured-config compatible, every field documented,
bad values rejected with one line that names the key."""
import ast
import inspect
from dataclasses import fields

import pytest
from omegaconf import OmegaConf

from data_pipeline.config import DataConfig, default_cache_dir


def test_defaults_make_the_shakespeare_demo():
    cfg = DataConfig()
    assert cfg.sources == ["shakespeare"] and cfg.tokenizer == "bpe:2048" and 64 <= cfg.seq_len <= 128
    assert cfg.path is None and cfg.on_bad_shard == "error" and cfg.cache_dir == default_cache_dir()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EBT_CACHE_DIR", str(tmp_path))
    assert DataConfig().cache_dir == str(tmp_path)


def test_omegaconf_structured_merge_and_back():
    schema = OmegaConf.structured(DataConfig)
    merged = OmegaConf.merge(schema, OmegaConf.from_dotlist(["seq_len=64", "weights=[2.0,1.0]",
                                                             "sources=[shakespeare,pydoc]"]))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, DataConfig) and cfg.seq_len == 64 and cfg.weights == [2.0, 1.0]
    with pytest.raises(Exception, match="seq_lenn"):
        OmegaConf.merge(schema, OmegaConf.from_dotlist(["seq_lenn=64"]))


def test_every_field_has_a_docstring():
    tree = ast.parse(inspect.getsource(DataConfig))
    body = tree.body[0].body
    documented = {
        node.target.id for node, after in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
    }
    assert documented == {f.name for f in fields(DataConfig)}


@pytest.mark.parametrize("override,key", [
    (dict(sources=[]), "sources"),
    (dict(sources=[""]), "sources"),
    (dict(weights=[1.0, 2.0]), "weights"),
    (dict(weights=[1.0, -1.0], sources=["shakespeare", "pydoc"]), "weights"),
    (dict(weights=[float("nan")]), "weights"),
    (dict(tokenizer="bpe:100"), "tokenizer"),
    (dict(tokenizer="bpe:lots"), "tokenizer"),
    (dict(tokenizer=""), "tokenizer"),
    (dict(seq_len=0), "seq_len"),
    (dict(path=""), "path"),
    (dict(cache_dir=""), "cache_dir"),
    (dict(val_fraction=0.9), "val_fraction"),
    (dict(val_fraction=-0.1), "val_fraction"),
    (dict(shard_size_mb=0.0), "shard_size_mb"),
    (dict(on_bad_shard="ignore"), "on_bad_shard"),
    (dict(num_workers=-1), "num_workers"),
    (dict(seed=-5), "seed"),
    (dict(text_field=""), "text_field"),
    (dict(on_bad_record="ignore"), "on_bad_record"),
    (dict(remote_cache=""), "remote_cache"),
    (dict(remote_retries=-1), "remote_retries"),
    (dict(remote_timeout_s=0.0), "remote_timeout_s"),
    (dict(remote_backoff_s=-1.0), "remote_backoff_s"),
    (dict(remote_threads=0), "remote_threads"),
    (dict(readahead_mb=0.0), "readahead_mb"),
])
def test_bad_values_give_one_line_naming_the_key(override, key):
    with pytest.raises(ValueError) as err:
        DataConfig(**override)
    message = str(err.value)
    assert message.startswith(f"data.{key}: ") and "\n" not in message
