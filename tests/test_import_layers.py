"""qtool's modules form layers, and every import points down the pipeline.

    base  ->  data, models  ->  quant  ->  train  ->  export | lowbit  ->  bench  ->  cli, pipeline

A module may import modules of its own group and of any lower layer, never a higher layer nor
the other group of its own layer (``exporters`` and ``lowbit`` are peers: neither imports the
other). The walk reads every ``import``/``from`` statement of qtool/, models/ and exporters/ with
``ast``, module level and function level alike: a function-local import is for keeping an
optional dependency (torch, onnx, brevitas, yaml, ...) off a path that does not need it, such as
the torch-free ``qtool bench``, and never for getting around a cycle, so it must obey the same
rule. Imports of third-party packages are not part of the graph. A new module must be placed in
``LAYERS`` (the test fails until it is).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"qtool": "qtool", "models": "qtool.models", "exporters": "qtool.exporters"}  # folder -> import name

# Lowest first. Each layer: group -> module prefixes (a prefix covers its submodules).
LAYERS: list[tuple[str, dict[str, list[str]]]] = [
    ("base", {"base": ["qtool.errors", "qtool.atomic", "qtool.timing", "qtool.options", "qtool.launch",
                       "qtool.plots", "qtool.onnxrt", "qtool.emulated_cpu", "qtool.arm_sysroot",
                       "qtool.native"]}),
    ("data", {"data": ["qtool.data"], "models": ["qtool.models"]}),
    ("quant", {"quant": ["qtool.quant", "qtool.checkpoint"]}),
    ("train", {"train": ["qtool.train", "qtool.evaluate"]}),
    ("export / lowbit", {"export": ["qtool.exporters"], "lowbit": ["qtool.lowbit"]}),
    ("bench", {"bench": ["qtool.bench", "qtool.lowbit.bench", "qtool.lowbit.bench_model", "qtool.lowbit.bench_cli",
                         "qtool.lowbit.roofline"]}),
    ("top", {"top": ["qtool.cli", "qtool.__main__", "qtool.pipeline", "qtool.runs", "qtool.progress"]}),
]
PACKAGE_INIT = {"qtool": "top"}  # ``qtool/__init__.py``: its lazy ``prepare``/``export`` re-exports sit on top


def modules() -> dict[str, Path]:
    found = {}
    for folder, name in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = [name, *path.relative_to(REPO / folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The qtool modules ``name`` imports, anywhere in the file (``from pkg import mod`` counts
    as ``pkg.mod``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [[alias.name] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            candidates = [[f"{base}.{alias.name}", base] for alias in node.names]
        else:
            continue
        for options in candidates:
            target = next((option for option in options if option in known), None)
            if target is not None and target != name:
                targets.add(target)
    return targets


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def place(module: str) -> tuple[int, str] | None:
    """(layer index, group) of the longest prefix naming ``module``."""
    if module in PACKAGE_INIT:
        group = PACKAGE_INIT[module]
        return next(i for i, (_, groups) in enumerate(LAYERS) if group in groups), group
    best = None
    for index, (_, groups) in enumerate(LAYERS):
        for group, prefixes in groups.items():
            for prefix in prefixes:
                if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), index, group)
    return None if best is None else best[1:]


def test_every_module_has_a_layer():
    unplaced = sorted(name for name in modules() if place(name) is None)
    assert not unplaced, f"place these modules in LAYERS: {unplaced}"


def test_every_import_points_down_the_pipeline():
    wrong = []
    for source, targets in graph().items():
        (low, group) = place(source)
        for target in sorted(targets):
            level, other = place(target)
            if level > low or (level == low and other != group):
                wrong.append(f"{source} ({LAYERS[low][0]}/{group}) imports {target} ({LAYERS[level][0]}/{other})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_walk_sees_function_local_and_relative_imports():
    edges = graph()
    assert "qtool.pipeline" in edges["qtool.cli"]  # imported inside the command function
    assert "qtool.models.resnet" in edges["qtool.models"]  # ``from .resnet import ...``
    assert "qtool.lowbit.ops" in edges["qtool.lowbit.runtime"]  # ``from qtool.lowbit import ops``
