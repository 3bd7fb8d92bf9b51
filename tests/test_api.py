"""``__all__`` is true: every exported name of every module exists."""

from __future__ import annotations

import importlib
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "flowmatch"
MODULES = sorted(
    ".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")
    for p in PKG.rglob("*.py") if p.name != "__main__.py"
)


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name):
    mod = importlib.import_module(name)
    exported = getattr(mod, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    missing = [n for n in exported if not hasattr(mod, n)]
    assert not missing, f"{name}.__all__ names missing attributes: {missing}"
    assert len(set(exported)) == len(exported), f"{name}.__all__ has duplicates"


def test_version_and_time_convention_documented():
    import flowmatch

    assert flowmatch.__version__.count(".") == 2
    assert "t = 0" in flowmatch.__doc__ and "t = 1" in flowmatch.__doc__
