"""The package tree is the architecture: layers import only downward, modules stay small.

Layers, lowest first (README, "Layout"). A module may import modules of its own layer and of the
layers below it; importing ``b2fast.a.b`` also runs the package ``b2fast.a``, so that counts as
an import too. Imports are read from the source (every ``import`` statement, also those inside functions),
so a lazy upward import is caught as well.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernels", ("b2fast._C", "b2fast.kernels")),
    ("foundations", ("b2fast.utils", "b2fast.config", "b2fast.distributed")),
    ("ops", ("b2fast", "b2fast.ops")),
    ("data and fixtures", ("b2fast.testing", "b2fast.prompts", "b2fast.toy", "b2fast.toy.grammar", "b2fast.toy.world",
                           "b2fast.toy.detector", "b2fast.toy.model")),
    ("algorithm", ("b2fast.core",)),
    ("rewards", ("b2fast.rewards", "b2fast.toy.reward", "b2fast.toy.ladder")),
    ("evaluation", ("b2fast.eval", "b2fast.eval.evaluator")),
    ("run machinery", ("b2fast.run",)),
    ("entry points", ("b2fast.train", "b2fast.sample", "b2fast.__main__", "b2fast.eval.cli", "b2fast.eval.__main__",
                      "b2fast.bench", "b2fast.toy.pretrain", "b2fast.toy.distill_lcm")),
]
MAX_LINES = 500


def layer_of(module: str) -> int:
    """The layer of the longest listed prefix of ``module`` (the root ``b2fast`` is listed for
    itself alone: a prefix of every module, it would place any unlisted one)."""
    best, depth = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            covers = module == prefix or (prefix != "b2fast" and module.startswith(prefix + "."))
            if covers and prefix.count(".") > depth:
                best, depth = index, prefix.count(".")
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS and README's Layout")
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path, module: str) -> set[str]:
    """Every b2fast module ``path`` imports, with the packages those imports run."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # ``from pkg import name`` may import the submodule pkg.name
            names = [base] + [f"{base}.{alias.name}" for alias in node.names
                              if _is_module(f"{base}.{alias.name}")]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found.add(name)
            # the packages it runs; the root ``b2fast`` imports nothing eagerly (only names it)
            found.update(".".join(parts[:i]) for i in range(2, len(parts)))
    return {m for m in found if m == "b2fast" or m.startswith("b2fast.")}


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def package_modules() -> list[Path]:
    return sorted((ROOT / "b2fast").rglob("*.py"))


def test_every_module_is_in_a_layer():
    for path in package_modules():
        layer_of(module_name(path))


def test_layers_import_only_downward():
    upward = []
    for path in package_modules():
        module = module_name(path)
        own = layer_of(module)
        for target in sorted(imported_modules(path, module)):
            if layer_of(target) > own:
                upward.append(f"{module} ({LAYERS[own][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_an_unlisted_module_is_in_no_layer():
    with pytest.raises(AssertionError, match="b2fast.brand_new is in no layer"):
        layer_of("b2fast.brand_new")
    assert layer_of("b2fast") == layer_of("b2fast.ops")  # the root package itself is listed


def test_the_checker_sees_an_upward_import(tmp_path):
    """The check above can fail: a core module importing the trainer is reported."""
    fake = ROOT / "b2fast" / "core" / "sampling.py"
    source = fake.read_text(encoding="utf-8") + "\n\ndef _x():\n    from b2fast.run import trainer\n"
    copy = tmp_path / "sampling.py"
    copy.write_text(source, encoding="utf-8")
    targets = imported_modules(copy, "b2fast.core.sampling")
    assert "b2fast.run.trainer" in targets and "b2fast.run" in targets
    assert layer_of("b2fast.run.trainer") > layer_of("b2fast.core.sampling")


@pytest.mark.parametrize("folder", ["b2fast", "tests", "benchmarks"])
def test_no_python_file_over_the_limit(folder):
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in sorted((ROOT / folder).rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not long, f"files over {MAX_LINES} lines:\n" + "\n".join(long)


def test_flat_package_holds_only_entry_points_and_foundations():
    """What a newcomer sees at the top of ``b2fast/``: the CLI and the shared foundations; the
    algorithm, ops, run machinery, evaluation and benchmarks live in their subpackages."""
    top = sorted(p.name for p in (ROOT / "b2fast").glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "config.py", "distributed.py", "prompts.py",
                   "sample.py", "train.py", "utils.py"]


def test_no_top_level_package_shadows_an_installed_one():
    """Python puts the working folder first on sys.path: a top-level ``kernels/`` package in the
    checkout hid Hugging Face's ``kernels`` (imported by transformers), breaking every command
    run from the checkout root. Only ``b2fast`` may be an importable package at the top."""
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert packages == ["b2fast"]
