"""The package table of DESIGN.md: no circular imports between repsim/, hooks/ and probes/."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# package -> packages it must not import (repsim's application layer, the CLI and the demo, is the exception:
# nothing in the library imports it)
FORBIDDEN = {"repsim": {"hooks", "probes"}, "hooks": {"probes"}, "probes": {"hooks"}}
CLI_LAYER = {ROOT / "repsim" / "cli.py", ROOT / "repsim" / "demo.py"}


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_forbidden_imports():
    bad = []
    for package, forbidden in FORBIDDEN.items():
        for path in (ROOT / package).rglob("*.py"):
            if path in CLI_LAYER:
                continue
            hit = _imports(path) & forbidden
            if hit:
                bad.append(f"{path.relative_to(ROOT)} imports {sorted(hit)}")
    assert not bad, bad


def test_library_has_no_click():
    for package in ("repsim", "hooks", "probes"):
        for path in (ROOT / package).rglob("*.py"):
            if path != ROOT / "repsim" / "cli.py":
                assert "click" not in _imports(path), path


def test_lazy_names_do_not_collide_with_submodules():
    """A public function named like a submodule would be replaced by the module once the submodule is
    imported (``import pkg.name`` sets ``pkg.name``): the API would then depend on import order."""
    import pkgutil

    import probes
    import repsim

    for pkg in (repsim, probes):
        submodules = {m.name for m in pkgutil.iter_modules(pkg.__path__)}
        assert not submodules & set(pkg._LAZY), (pkg.__name__, submodules & set(pkg._LAZY))
