"""Imports only point down (docs/design.md, Layers): a module may import its own layer or a lower one, never a
higher one. The layer order is defined here, once; a new top-level module must be placed in it."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module belongs to the longest prefix listed.
LAYERS: list[tuple[str, ...]] = [
    (
        "seminar_ray",
        "seminar_ray.errors",
        "seminar_ray.memory",
        "seminar_ray.storage",
        "seminar_ray.runtime",
        "seminar_ray.runs",
        "seminar_ray.metrics",
        "seminar_ray.autoscaling",
    ),
    ("seminar_ray.data",),
    ("seminar_ray.retrieval",),
    ("seminar_ray.models",),
    ("seminar_ray.train", "seminar_ray.rule_rankers"),
    ("seminar_ray.serving",),
    ("jobs", "serve_app"),
    ("seminar_ray.testing", "bench", "tests"),
]
RANK = {prefix: rank for rank, prefixes in enumerate(LAYERS) for prefix in prefixes}


def layer_of(module: str) -> int | None:
    """The rank of the longest listed prefix of `module`; None for a module outside the project."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        rank = RANK.get(".".join(parts[:n]))
        if rank is not None:
            return rank
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, in functions too; relative imports resolved."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            name = ".".join(p for p in (base, node.module or "") if p)
            found += [(node.lineno, f"{name}.{a.name}") for a in node.names]  # `from pkg import module` too
    return found


def python_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / p for p in out.split()]


def upward_imports(files: list[Path]) -> list[str]:
    bad = []
    for path in files:
        own = layer_of(module_name(path))
        for line, name in imported(path):
            rank = layer_of(name)
            if own is not None and rank is not None and rank > own:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name} (layer {rank} > {own})")
    return bad


def test_every_project_module_has_a_layer():
    unplaced = [str(p.relative_to(ROOT)) for p in python_files() if layer_of(module_name(p)) is None]
    assert unplaced == [], f"place these in LAYERS: {unplaced}"


def test_imports_only_point_down():
    assert upward_imports(python_files()) == []


def test_an_upward_import_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "seminar_ray" / "models").mkdir(parents=True)
    bad = tmp_path / "seminar_ray" / "models" / "x.py"
    bad.write_text("def f():\n    from seminar_ray.serving import stages\nfrom . import config\n")
    assert upward_imports([bad]) == ["seminar_ray/models/x.py:2 imports seminar_ray.serving.stages (layer 5 > 3)"]
