"""The package layering (docs/architecture.md), checked over the imports of every module:

    ebt (the entry point)  ->  launchers  ->  pretrain  ->  parallel  ->  pretrain.model
                                               \\-> data_pipeline (imports none of the others)

* pretrain.model imports nothing of ours outside itself;
* parallel imports pretrain only through pretrain.model;
* pretrain imports neither launchers nor ebt (its `__main__` script, the `python -m pretrain`
  alias of the entry point, is the one exception);
* data_pipeline imports none of pretrain, parallel, launchers, ebt.
Imports anywhere in a module count (function-level lazy imports too)."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, Tuple

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ebt", "pretrain", "parallel", "data_pipeline", "launchers")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool) -> Iterator[str]:
    """Absolute names of everything `module` imports (relative imports resolved)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield name
            yield from (f"{name}.{alias.name}" for alias in node.names)


def violation(importer: str, imported: str) -> str | None:
    top = imported.split(".")[0]
    if top not in PACKAGES:
        return None
    within = lambda name, prefix: name == prefix or name.startswith(prefix + ".")  # noqa: E731
    if within(importer, "pretrain.model") and not within(imported, "pretrain.model"):
        return "pretrain.model imports only itself"
    if within(importer, "parallel") and top == "pretrain" and not within(imported, "pretrain.model") \
            and imported != "pretrain":
        return "parallel imports pretrain only through pretrain.model"
    if within(importer, "pretrain") and top in ("launchers", "ebt") and importer != "pretrain.__main__":
        return "pretrain imports neither launchers nor the entry point"
    if within(importer, "data_pipeline") and top in ("pretrain", "parallel", "launchers", "ebt"):
        return "data_pipeline imports none of the other packages"
    return None


def violations_in(source: str, module: str, is_package: bool = False) -> List[Tuple[str, str, str]]:
    return [(module, name, why) for name in imports_of(source, module, is_package)
            if (why := violation(module, name)) is not None]


def test_the_packages_respect_the_layering():
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found += violations_in(path.read_text(), module_name(path), path.name == "__init__.py")
    assert not found, found


def test_the_check_catches_each_kind_of_back_arrow():
    # negative controls: one forbidden import of each kind is reported
    assert violations_in("from ..thinking import unroll", "pretrain.model.ebt")
    assert violations_in("from pretrain.thinking import ThinkingConfig", "parallel.tensor")
    assert not violations_in("from pretrain.model.ebt import EnergyTransformer", "parallel.tensor")
    assert violations_in("import launchers.preemption", "pretrain.trainer")
    assert violations_in("def f():\n    from ebt.cli import main\n", "pretrain.cli")
    assert violations_in("from pretrain.config import ConfigError", "data_pipeline.config")
    assert not violations_in("from ebt.cli import main", "pretrain.__main__")
