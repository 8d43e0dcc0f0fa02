"""The run-config schema: merge order, strictness, one-line errors, cross-field checks."""
from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import CONFIG_ROOT, ConfigError, RunConfig, config_from_dict, load_config, to_container


def test_default_experiment_is_the_embedded_default():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.model.arch == "ebt"
    assert cfg.data.sources == ["shakespeare"]
    assert cfg.thinking.num_steps_max == 4 and cfg.thinking.eval_steps == 8 and cfg.thinking.loss_on == "last"  # S2, 2-4 steps
    s1 = load_config(["s1"])
    assert s1.thinking.num_steps == 2 and s1.thinking.num_steps_max is None and s1.thinking.loss_on == "mean"
    assert s1.model.step_size == 500.0 and s1.model.learn_step_size and s1.optim.alpha_lr_multiplier == 1500.0


def test_merge_order_defaults_then_files_then_overrides(tmp_path: Path):
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  max_steps: 7\n  seed: 3\n")
    top = tmp_path / "top.yaml"
    top.write_text("defaults: [base.yaml]\ntrain:\n  seed: 4\n")
    cfg = load_config([str(top)], ["train.seed=5", "optim.lr=0.01"])
    assert cfg.train.max_steps == 7  # from the included file
    assert cfg.train.seed == 5  # CLI beats both files
    assert cfg.optim.lr == 0.01
    assert cfg.train.log_every == RunConfig().train.log_every  # untouched default


def test_every_shipped_config_loads():
    for path in sorted((CONFIG_ROOT / "experiments").glob("*.yaml")):
        load_config([str(path)])
    for path in sorted((CONFIG_ROOT / "model").glob("*.yaml")) + sorted((CONFIG_ROOT / "recipe").glob("*.yaml")):
        load_config(["default", str(path)])


def test_model_sizes_match_the_spec():
    sizes = {"4xs": (2, 2, 128), "3xs": (4, 4, 256), "xxs": (6, 6, 384), "xs": (12, 6, 384),
             "small": (12, 12, 768), "medium": (24, 16, 1024), "large": (24, 16, 1536), "xl": (24, 32, 2048)}
    for name, (layers, heads, dim) in sizes.items():
        m = load_config(["default", str(CONFIG_ROOT / "model" / f"{name}.yaml")], ["model.max_seq_len=256"]).model
        assert (m.num_layers, m.num_heads, m.dim) == (layers, heads, dim), name


def test_recipes_match_the_spec():
    s2 = load_config(["default", str(CONFIG_ROOT / "recipe" / "s2.yaml")])
    th = s2.thinking
    assert (th.num_steps, th.num_steps_max, th.detach_between_steps, th.create_graph, th.loss_on) == (2, 3, False, "last", "last")
    assert (s2.model.step_size, s2.model.learn_step_size, th.step_size_jitter, th.langevin_std) == (5.0, False, 2.0, 3.0)
    assert (th.replay_size, th.replay_fraction, th.eval_steps, th.eval_noise_std) == (192, 0.5, 6, 3.0)
    # one landscape: the energy does not depend on the step index (the per-step variant is a
    # separately, honestly named experiment)
    assert s2.model.ebt_type == "default" and load_config([]).model.ebt_type == "default"
    assert load_config(["s2_step_embeddings"]).model.ebt_type == "time_embed"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.max_step=3", "unknown config key 'train.max_steps'".replace("max_steps", "max_step")),
        ("train.max_step=3", "did you mean 'train.max_steps'"),
        ("modle.dim=3", "did you mean 'model'"),
        ("thinking.num_stesp=3", "did you mean 'thinking.num_steps'"),
    ],
)
def test_unknown_key_names_it_and_the_closest(override: str, expected: str):
    with pytest.raises(ConfigError) as err:
        load_config(["default"], [override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_a_file_names_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'optim\.lrr'.*did you mean 'optim\.lr'"):
        load_config([str(bad)])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.max_steps=abc", "train.max_steps: expected integer, got 'abc'"),
        ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
        ("thinking.detach_between_steps=maybe", "thinking.detach_between_steps"),
    ],
)
def test_wrong_type_names_key_and_value(override: str, expected: str):
    with pytest.raises(ConfigError) as err:
        load_config(["default"], [override])
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.global_batch_size=30", "train.grad_accum=4"], "train.global_batch_size"),
        (["train.micro_batch_size=8", "train.global_batch_size=32"], "train.micro_batch_size"),
        (["data.seq_len=128", "model.max_seq_len=64"], "model.max_seq_len"),
        (["model.num_heads=3"], "model.num_heads"),
        (["thinking.create_graph=last"], "thinking.create_graph"),
        (["train.precision=fp16"], "train.precision"),
        (["model.ebt_type=time_embed", "model.num_step_embeddings=3"], "model.num_step_embeddings: 3 > the 2 trained"),
        (["data.val_fraction=0.9"], "data.val_fraction"),
        (["parallel.tp=0"], "parallel.tp: must be >= 1"),
        (["parallel.dp=3"], "train.global_batch_size"),
        (["parallel.zero_stage=3", "parallel.dp=2"], "parallel.zero_stage: 3 is not one of 0, 1, 2 (ZeRO-3 releases"),
        (["parallel.zero_stage=1"], "parallel.zero_stage: 1 needs parallel.dp > 1"),
        (["parallel.activation_checkpointing=full"], "parallel.activation_checkpointing"),
        (["parallel.pp=64"], "parallel.pp=64 exceeds model.num_layers"),
        (["parallel.pp=2", "parallel.pp_microbatches=3"], "parallel.pp_microbatches=3 does not divide"),
        (["parallel.pp=2", "parallel.activation_checkpointing=step"], "parallel.activation_checkpointing='step' is not supported"),
        (["parallel.pp=2", "parallel.pp_layers=[1]"], "parallel.pp_layers=[1]"),
        (["parallel.pp_schedule=1f1b"], "parallel.pp_schedule"),
    ],
)
def test_cross_field_and_range_checks_say_what_to_change(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(["s1"], overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_micro_batch_is_derived_from_global_batch_and_accumulation():
    cfg = load_config(["default"], ["train.global_batch_size=32", "train.grad_accum=4"])
    assert cfg.micro_batch_size == 8


def test_config_round_trips_through_plain_data():
    cfg = load_config(["default"], ["train.seed=9"])
    again = config_from_dict(to_container(cfg))
    assert again == cfg


def test_bad_config_names():
    with pytest.raises(ConfigError, match="did you mean 'default'"):
        load_config(["defualt"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(["/nonexistent/x.yaml"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(["default"], ["=3"])


def test_defaults_cycle_and_bad_yaml(tmp_path: Path):
    a = tmp_path / "a.yaml"
    a.write_text("defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config([str(a)])
    b = tmp_path / "b.yaml"
    b.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([str(b)])


def test_groups_are_chosen_by_name_like_hydra():
    cfg = load_config([], ["model=small", "recipe=s1"])
    assert (cfg.model.num_layers, cfg.model.num_heads, cfg.model.dim) == (12, 12, 768)
    assert cfg.thinking.loss_on == "mean" and cfg.model.step_size == 500.0  # recipe s1 over the default's s2
    assert cfg.model.max_seq_len == 64  # the experiment's own keys under the chosen size stay
    # The same as naming the files; `key=value` overrides still win over a group choice.
    by_path = load_config(["default", str(CONFIG_ROOT / "model" / "small.yaml"), str(CONFIG_ROOT / "recipe" / "s1.yaml")])
    assert to_container(cfg) == to_container(by_path)
    assert load_config([], ["model=small", "model.dim=384"]).model.dim == 384
    assert to_container(load_config([], ["experiment=s1"])) == to_container(load_config(["s1"]))


@pytest.mark.parametrize(
    "override, names",
    [("model=smal", "did you mean 'small'? available: 3xs, 4xs, large, medium, small, xl, xs, xxs"),
     ("recipe=s3", "available: s1, s2"),
     ("experiment=nope", "available: default, s1, s2, s2_step_embeddings, test_tiny, transformerpp"),
     ("model=", "available: 3xs, 4xs")],
)
def test_unknown_group_name_lists_the_available_ones_in_one_line(override: str, names: str):
    with pytest.raises(ConfigError) as err:
        load_config([], [override])
    assert names in str(err.value) and "\n" not in str(err.value)


def test_a_section_set_to_a_scalar_says_how_to_set_it():
    with pytest.raises(ConfigError, match=r"'data=foo': data is a config section: set its keys \(data.KEY=VALUE\)"):
        load_config([], ["data=foo"])


def test_configs_come_from_the_package_not_the_working_directory(tmp_path: Path, monkeypatch):
    import configs

    monkeypatch.chdir(tmp_path)
    assert CONFIG_ROOT == Path(configs.__file__).parent
    assert load_config(["test_tiny"], ["model=4xs"]).model.num_layers == 2
