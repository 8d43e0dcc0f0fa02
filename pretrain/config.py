"""The root run-config schema and its loading: defaults < YAML file(s) < `key=value` overrides.

This module owns the `optim:`, `train:` and `parallel:` sections, the top-level `run_dir`, the
composition of the section dataclasses owned elsewhere (`model:` from pretrain.model,
`thinking:` from pretrain.thinking, `data:` from data_pipeline), YAML composition through a
`defaults:` list, and every cross-section check. All errors are `ConfigError`s whose message
is one line naming the key (and, for unknown keys, the closest valid one).

YAML files are partial root configs. A file may start with `defaults: [a.yaml, b.yaml]`
(paths relative to that file); those are merged first, in order, then the file's own keys.

Config groups are chosen by name on the command line, as with Hydra: `model=small` merges
configs/model/small.yaml, `recipe=s2` configs/recipe/s2.yaml, `experiment=s1` is the same as
naming the experiment. Order: experiment(s) < group choices (in command-line order) <
`key=value` overrides. The configs ship inside the package `configs` (importlib.resources),
so an installed wheel finds them wherever it runs.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from data_pipeline.config import DataConfig

from .model.config import ModelConfig
from .thinking import ThinkingConfig

CONFIG_ROOT = Path(str(files("configs")))
"""The shipped configs (the package `configs`, the repository's top-level configs/ folder):
experiments, model sizes, recipes and launch configs are looked up here by name. pip installs
packages unzipped, so this is a real folder and `defaults:` paths resolve inside it."""
GROUPS: Dict[str, str] = {"experiment": "experiments", "model": "model", "recipe": "recipe"}
"""Command-line group choices (`model=small`): the key names a folder of CONFIG_ROOT."""
DEFAULT_EXPERIMENT = "default"
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
WANDB_MODES = ("disabled", "offline", "online")  # train.wandb (pretrain.sinks)
COMPILE_MODES = ("false", "true", "auto")  # train.compile (pretrain.compiled)
ACTIVATION_CHECKPOINTING = ("none", "block", "step", "block_vjp")  # parallel.checkpointing.MODES
PP_SCHEDULES = ("interleaved", "gpipe")  # parallel.pipeline.SCHEDULES


class ConfigError(ValueError):
    """A user-facing configuration problem; the message is one line naming the key."""


def _bad(section: str, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{section}.{key}: {msg}")


@dataclass
class OptimConfig:
    """The `optim:` section: AdamW, its parameter groups and the learning-rate schedule."""

    lr: float = 1.2e-3
    """Peak learning rate (after warm-up)."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.01
    """Decoupled weight decay; never applied to norms or to the step size alpha."""
    alpha_lr_multiplier: float = 1500.0
    """The step size alpha trains with lr x this (S1: 1500) in its own group."""
    warmup_steps: int = 10000
    """Linear warm-up from 0 to `lr` over this many optimizer steps."""
    min_lr_ratio: float = 0.1
    """Cosine decay from `lr` to `lr * min_lr_ratio` at `train.max_steps`."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise _bad("optim", "lr", f"must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise _bad("optim", "betas", f"must be two numbers in [0, 1), got {list(self.betas)}")
        if self.weight_decay < 0:
            raise _bad("optim", "weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.alpha_lr_multiplier < 0:
            raise _bad("optim", "alpha_lr_multiplier", f"must be >= 0, got {self.alpha_lr_multiplier}")
        if self.warmup_steps < 0:
            raise _bad("optim", "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise _bad("optim", "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise _bad("optim", "grad_clip", f"must be >= 0 (0 disables), got {self.grad_clip}")


@dataclass
class TrainConfig:
    """The `train:` section: the loop, batching, evaluation, logging and checkpoint cadence."""

    max_steps: int = 1000
    """Optimizer steps of the whole run (a resumed run continues up to this)."""
    seed: int = 0
    """Seeds model initialisation, the thinking noise and the data order."""
    global_batch_size: int = 32
    """Sequences per optimizer step, over all ranks and accumulation micro-steps."""
    micro_batch_size: Optional[int] = None
    """Sequences per forward/backward on one rank; `None` = global_batch_size / (grad_accum * dp)."""
    grad_accum: int = 1
    """Micro-steps whose gradients are accumulated before one optimizer step."""
    checkpoint_every: int = 500
    """Save a checkpoint every this many steps (and always at the end); 0 = only at the end."""
    keep_last_k: int = 3
    """Keep this many most recent checkpoints."""
    eval_every: int = 500
    """Evaluate on the validation split every this many steps (and at the end); 0 = only at the end."""
    eval_batches: int = 8
    """Validation batches (of global_batch_size sequences) per evaluation."""
    log_every: int = 10
    """Write a progress line and a metrics record every this many steps."""
    max_consecutive_nonfinite: int = 5
    """Stop the run after this many consecutive steps skipped for NaN/Inf loss or dE/dy."""
    precision: str = "auto"
    """`fp32`, `bf16` (autocast; needs a GPU with bf16) or `auto` (bf16 where supported, else fp32)."""
    device: str = "auto"
    """`cpu`, `cuda` or `auto` (cuda when available)."""
    peak_flops: Optional[float] = None
    """Peak FLOP/s of one device for MFU; `None` estimates it from the device (see pretrain.flops)."""
    wandb: str = "disabled"
    """Also log to Weights & Biases (W&B's mode names): `disabled`, `offline` (no network; files
    under run_dir/wandb/) or `online` (pretrain.sinks). TensorBoard and the JSONL files are written either way."""
    wandb_project: str = "ebt-pretrain"
    """The W&B project of `train.wandb` runs (the run is named after run_dir)."""
    compile: str = "auto"
    """torch.compile of the EBT's second-order thinking step (pretrain/compiled.py): `true`,
    `false` or `auto` (off: on this CPU a cold compile takes minutes per distinct step signature,
    which its ~1.5x on the S1 unroll repays only after hundreds of steps; unmeasured on CUDA;
    docs/performance.md). Exact; single process per model replica (tp = pp = 1).
    The cold-compile seconds are in the progress line and metrics (`compile_seconds`)."""

    def __post_init__(self) -> None:
        for key in ("max_steps", "global_batch_size", "grad_accum", "keep_last_k", "eval_batches", "log_every"):
            if getattr(self, key) < 1:
                raise _bad("train", key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("checkpoint_every", "eval_every"):
            if getattr(self, key) < 0:
                raise _bad("train", key, f"must be >= 0 (0 = only at the end), got {getattr(self, key)}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise _bad("train", "micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        if self.max_consecutive_nonfinite < 1:
            raise _bad("train", "max_consecutive_nonfinite", f"must be >= 1, got {self.max_consecutive_nonfinite}")
        if self.precision not in PRECISIONS:
            raise _bad("train", "precision", f"{self.precision!r} is not one of {PRECISIONS}")
        if self.device not in DEVICES:
            raise _bad("train", "device", f"{self.device!r} is not one of {DEVICES}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise _bad("train", "peak_flops", f"must be > 0, got {self.peak_flops}")
        if self.wandb not in WANDB_MODES:
            raise _bad("train", "wandb", f"{self.wandb!r} is not one of {WANDB_MODES}")
        if not self.wandb_project.strip():
            raise _bad("train", "wandb_project", "is empty")
        self.compile = str(self.compile).lower()  # a YAML `true` arrives as the string "True"
        if self.compile not in COMPILE_MODES:
            raise _bad("train", "compile", f"{self.compile!r} is not one of {COMPILE_MODES}")


@dataclass
class ParallelConfig:
    """The `parallel:` section: the layout of a multi-process run (see docs/parallel.md).
    tp x dp must equal the number of processes (torchrun --nproc-per-node, or a launcher)."""

    tp: int = 1
    """Tensor-parallel degree: attention heads, SwiGLU and the vocabulary split across tp ranks."""
    dp: int = 1
    """Data-parallel degree: each dp rank takes its slice of every global batch."""
    zero_stage: int = 0
    """0: replicated optimizer state, one gradient all-reduce per step; 1 or 2: DeepSpeed ZeRO.
    ZeRO-3 (and FSDP) cannot train EBTs: the inner dE/dy releases partitioned parameters."""
    activation_checkpointing: str = "none"
    """Non-reentrant activation checkpointing: `none`, `block`, `step`, or `block_vjp` (blocks and
    their vector-Jacobian products: the most memory saved)."""
    pp: int = 1
    """Pipeline stages (parallel/pipeline.py): contiguous blocks per stage, embeddings and W_v2e on
    the first, final norm and energy head on the last. tp x dp x pp processes in all."""
    pp_microbatches: int = 1
    """Micro-batches a pipeline step splits each rank's micro-batch into (must divide it)."""
    pp_layers: Optional[List[int]] = None
    """Blocks per pipeline stage, e.g. [3, 5]; null balances them by layer count."""
    pp_schedule: str = "interleaved"
    """`interleaved` (micro-batches overlap across thinking steps) or `gpipe` (fill/drain per phase)."""

    def __post_init__(self) -> None:
        for key in ("tp", "dp", "pp", "pp_microbatches"):
            value = getattr(self, key)
            if value < 1:
                raise _bad("parallel", key, f"must be >= 1, got {value}")
        if self.zero_stage not in (0, 1, 2):
            why = (" (ZeRO-3 releases partitioned parameters inside the thinking loop's dE/dy: not exact for EBTs)"
                   if self.zero_stage == 3 else "")
            raise _bad("parallel", "zero_stage", f"{self.zero_stage} is not one of 0, 1, 2{why}")
        if self.zero_stage and self.dp == 1:
            raise _bad("parallel", "zero_stage", f"{self.zero_stage} needs parallel.dp > 1 (it shards over dp ranks)")
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise _bad(
                "parallel",
                "activation_checkpointing",
                f"{self.activation_checkpointing!r} is not one of {ACTIVATION_CHECKPOINTING}",
            )
        if self.pp_schedule not in PP_SCHEDULES:
            raise _bad("parallel", "pp_schedule", f"{self.pp_schedule!r} is not one of {PP_SCHEDULES}")


@dataclass
class RunConfig:
    """A whole run. Sections: model, thinking, data, optim, train, parallel."""

    run_dir: str = "runs/default"
    """The run folder: config.yaml, env.json, metrics.jsonl, eval.jsonl, tensorboard/, checkpoints/.
    A folder that already holds checkpoints is resumed from its latest one."""
    # The root default fits the data section's default sequence length.
    model: ModelConfig = field(default_factory=lambda: ModelConfig(max_seq_len=DataConfig().seq_len))
    thinking: ThinkingConfig = field(default_factory=ThinkingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        tr = self.train
        ranks = tr.grad_accum * self.parallel.dp
        if tr.global_batch_size % ranks:
            raise _bad(
                "train",
                "global_batch_size",
                f"{tr.global_batch_size} is not divisible by train.grad_accum * parallel.dp = {ranks}",
            )
        if tr.micro_batch_size is not None and tr.micro_batch_size * ranks != tr.global_batch_size:
            raise _bad(
                "train",
                "micro_batch_size",
                f"{tr.micro_batch_size} x grad_accum {tr.grad_accum} x dp {self.parallel.dp} != "
                f"train.global_batch_size {tr.global_batch_size}; set it to {tr.global_batch_size // ranks} or null",
            )
        par = self.parallel
        if par.pp > 1 and tr.grad_accum > 1:
            raise _bad("train", "grad_accum", f"{tr.grad_accum} with parallel.pp={par.pp}: the pipeline's micro-batches "
                       f"are the accumulation; set train.grad_accum=1 and parallel.pp_microbatches instead")
        if tr.compile == "true" and (par.tp > 1 or par.pp > 1):
            raise _bad("train", "compile", "true needs parallel.tp = parallel.pp = 1 (tp/pp collectives are not compiled)")
        if par.pp > 1 or par.pp_microbatches > 1:
            from parallel.pipeline import validate_pipeline

            try:
                validate_pipeline(par.pp, self.model.num_layers, par.pp_microbatches, self.micro_batch_size,
                                  layers_per_stage=par.pp_layers,
                                  options={"model.attention": self.model.attention,
                                           "parallel.activation_checkpointing": par.activation_checkpointing})
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if self.data.seq_len > self.model.max_seq_len:
            raise _bad(
                "model",
                "max_seq_len",
                f"{self.model.max_seq_len} < data.seq_len={self.data.seq_len}; raise model.max_seq_len or lower data.seq_len",
            )
        trained_steps = self.thinking.num_steps_max or self.thinking.num_steps
        if self.model.arch == "ebt" and self.model.ebt_type != "default" and self.model.num_step_embeddings > trained_steps:
            raise _bad(
                "model",
                "num_step_embeddings",
                f"{self.model.num_step_embeddings} > the {trained_steps} trained thinking steps: the extra step "
                f"embeddings would never be trained yet used by evaluation's longer thinking; set it to {trained_steps}",
            )
        if self.model.arch == "ebt" and self.thinking.replay_size and self.thinking.replay_size < self.micro_batch_size:
            raise _bad(
                "thinking",
                "replay_size",
                f"{self.thinking.replay_size} is smaller than one micro-batch ({self.micro_batch_size} sequences)",
            )

    @property
    def micro_batch_size(self) -> int:
        if self.train.micro_batch_size is not None:
            return self.train.micro_batch_size
        return self.train.global_batch_size // (self.train.grad_accum * self.parallel.dp)


# -- loading -------------------------------------------------------------------------------
def _keys_of(node: Any) -> List[str]:
    if isinstance(node, DictConfig):
        return [str(k) for k in node.keys()]
    return []


def _node_at(schema: DictConfig, dotted: str) -> Any:
    node: Any = schema
    for part in dotted.split(".") if dotted else []:
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node[part]
    return node


def _unknown_key_error(schema: DictConfig, full_key: str) -> ConfigError:
    parent, _, leaf = full_key.rpartition(".")
    valid = _keys_of(_node_at(schema, parent))
    hint = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
    where = f"{parent}.{leaf}" if parent else leaf
    if hint:
        closest = f"{parent}.{hint[0]}" if parent else hint[0]
        return ConfigError(f"unknown config key {where!r} (did you mean {closest!r}?)")
    return ConfigError(f"unknown config key {where!r} (valid keys here: {', '.join(valid)})")


def _omegaconf_error(err: OmegaConfBaseException, schema: DictConfig, origin: str) -> ConfigError:
    """Turns OmegaConf's multi-line exceptions into one line naming the key."""
    full_key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, ConfigKeyError) or "not in" in msg and "Key" in msg:
        match = re.search(r"Key '([^']+)'", msg)
        leaf = match.group(1) if match else full_key.rpartition(".")[2]
        parent = full_key.rpartition(".")[0] if full_key.endswith(leaf) else full_key
        return ConfigError(f"{origin}: " + str(_unknown_key_error(schema, f"{parent}.{leaf}" if parent else leaf)))
    if isinstance(err, ValidationError):
        match = re.search(r"Value '(.*?)'(?: of type '\w+')? could not be converted to (\w+)", msg)
        if match:
            expected = match.group(2).lower()
            return ConfigError(f"{origin}: {full_key}: expected {expected}, got {match.group(1)!r}")
        return ConfigError(f"{origin}: {full_key}: {msg}")
    return ConfigError(f"{origin}: {full_key + ': ' if full_key else ''}{msg}")


def resolve_named_yaml(name: str, folder: str, what: str, error: type = ConfigError) -> Path:
    """A YAML path, or the name of a file in configs/<folder>/ (errors name the close matches)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise error(f"{what} {name!r} does not exist")
        return path
    candidate = CONFIG_ROOT / folder / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    known = available(folder)
    hint = difflib.get_close_matches(name, known, n=1)
    extra = f"did you mean {hint[0]!r}? " if hint else ""
    raise error(f"{what} {name!r} is neither a YAML file nor a name in configs/{folder} "
                f"({extra}available: {', '.join(known) or 'none'})")


def available(folder: str) -> List[str]:
    """The names of the shipped configs in configs/<folder>/."""
    return sorted(p.stem for p in (CONFIG_ROOT / folder).glob("*.yaml"))


def split_group_choices(overrides: Sequence[str]) -> Tuple[List[Tuple[str, str]], List[str]]:
    """([(group, name), ...], the other overrides): `model=small` is a choice, `model.dim=8` not."""
    choices, rest = [], []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() in GROUPS:
            if not value.strip():
                raise ConfigError(f"{item!r}: name a config in configs/{GROUPS[key.strip()]} "
                                  f"(available: {', '.join(available(GROUPS[key.strip()]))})")
            choices.append((key.strip(), value.strip()))
        else:
            rest.append(item)
    return choices, rest


def resolve_config_path(name: str) -> Path:
    """A YAML path, or the name of an experiment under configs/experiments/."""
    return resolve_named_yaml(name, "experiments", "config")


def _load_yaml(path: Path, stack: Sequence[Path] = ()) -> List[tuple]:
    """[(origin, DictConfig), ...] for a file and, first, its `defaults:` (recursively)."""
    path = path.resolve()
    if path in stack:
        raise ConfigError(f"{path}: `defaults:` include cycle")
    try:
        node = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except Exception as err:  # noqa: BLE001 - YAML errors come in many types
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if node is None:
        return []
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections")
    layers: List[tuple] = []
    defaults = node.pop("defaults", None)
    if defaults is not None:
        if not isinstance(defaults, ListConfig):
            raise ConfigError(f"{path}: `defaults:` must be a list of YAML paths relative to this file")
        for item in defaults:
            layers += _load_yaml(path.parent / str(item), (*stack, path))
    layers.append((str(path), node))
    return layers


def load_config(configs: Sequence[str] = (), overrides: Sequence[str] = ()) -> RunConfig:
    """defaults < each YAML (with its `defaults:`) < `key=value` overrides; validated.

    With no YAML the embedded default experiment (configs/experiments/default.yaml) is used.
    Group choices among the overrides (`model=small`, `recipe=s2`, `experiment=s1`; see the
    module docstring) merge after the experiments and before the `key=value` overrides.
    """
    schema = OmegaConf.structured(RunConfig)
    choices, overrides = split_group_choices(overrides)
    experiments = [*configs, *(name for group, name in choices if group == "experiment")]
    paths = [resolve_config_path(c) for c in experiments] or [resolve_config_path(DEFAULT_EXPERIMENT)]
    paths += [resolve_named_yaml(name, GROUPS[group], group) for group, name in choices
              if group != "experiment"]
    merged = schema
    for path in paths:
        for origin, layer in _load_yaml(path):
            try:
                merged = OmegaConf.merge(merged, layer)
            except OmegaConfBaseException as err:
                raise _omegaconf_error(err, schema, origin) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key = item.split("=", 1)[0].strip()
        if not key or key != key.strip(". "):
            raise ConfigError(f"override {item!r}: expected key=value with a dotted key such as train.max_steps=100")
        if isinstance(_node_at(schema, key), DictConfig):
            groups = ", ".join(f"{g}=NAME" for g in GROUPS)
            raise ConfigError(f"override {item!r}: {key} is a config section: set its keys ({key}.KEY=VALUE); "
                              f"configs chosen by name: {groups}")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _omegaconf_error(err, schema, "command line") from None
    return to_run_config(merged)


def to_run_config(node: DictConfig) -> RunConfig:
    """Instantiates the dataclasses (running every `__post_init__` check) from a merged node."""
    try:
        cfg = OmegaConf.to_object(node)
    except OmegaConfBaseException as err:
        cause = err.__cause__ or err
        if isinstance(cause, ValueError) and not isinstance(cause, OmegaConfBaseException):
            raise ConfigError(str(cause).splitlines()[0]) from None
        raise _omegaconf_error(err, OmegaConf.structured(RunConfig), "config") from None
    except ValueError as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    assert isinstance(cfg, RunConfig)
    return cfg


def config_from_dict(data: dict) -> RunConfig:
    """A RunConfig from a plain dict (e.g. the copy stored in a checkpoint), validated."""
    schema = OmegaConf.structured(RunConfig)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(data))
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err, schema, "stored config") from None
    return to_run_config(merged)


def to_container(cfg: RunConfig) -> dict:
    """The fully resolved config as plain data (for config.yaml, checkpoints, env)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)
