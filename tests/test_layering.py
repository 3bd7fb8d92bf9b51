"""The package's layering (ARCHITECTURE.md): a module imports only modules of its own layer or below,
and importing the core pulls in none of the heavy optional libraries."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "flowmatch"

LAYERS = {
    "config": 0, "types": 0, "utils": 0, "errors": 0, "io": 0,
    "data": 1, "paths": 1, "timesteps": 1, "solvers": 1,
    "couplings": 2,
    "models": 3,
    "training": 4,
    "reflow": 5, "distill": 5,
    "metrics": 6,
    "bench": 7, "pipelines": 7, "viz": 7, "reports": 7, "speed": 7, "evaluation": 7, "reflow_chain": 7,
    "few_step": 7,
    "cli": 8, "__main__": 8,
}


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.startswith("flowmatch.") else module
    if top not in LAYERS:
        raise AssertionError(f"module flowmatch.{top} has no layer in the test's table; add it")
    return LAYERS[top]


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        if name == "flowmatch":
            continue  # the public API re-exports from every layer
        yield name, path


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flowmatch"):
            yield node.module, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("flowmatch"):
                    yield alias.name, node.lineno


@pytest.mark.parametrize("name,path", list(_modules()), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_imports_point_down(name, path):
    own = _layer(name)
    for target, line in _imports(path):
        if target == "flowmatch":
            raise AssertionError(f"{path.name}:{line} imports the top-level package; import the submodule")
        assert _layer(target) <= own, f"{name} (L{own}) imports {target} (L{_layer(target)}) at line {line}"


def test_every_module_has_a_layer():
    names = [n for n, _ in _modules()]
    assert len(names) > 20
    for n in names:
        _layer(n)


def test_core_import_is_light():
    code = ("import sys, flowmatch, flowmatch.pipelines, flowmatch.reflow_chain, flowmatch.cli\n"
            "heavy = [m for m in ('wandb', 'matplotlib', 'scipy', 'ot', 'torchdiffeq', 'peft', 'transformers') if m in sys.modules]\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing flowmatch pulled in: {out}"
