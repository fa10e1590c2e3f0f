"""The package table of DESIGN.md: no circular imports between repsim/, hooks/ and probes/, nor between any two
of their modules; `repsim info` prints metadata without loading torch."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# package -> packages it must not import (repsim's application layer, repsim/app/: the CLI and the demo, is the
# exception: nothing in the library imports it)
FORBIDDEN = {"repsim": {"hooks", "probes"}, "hooks": {"probes"}, "probes": {"hooks"}}
APP = ROOT / "repsim" / "app"


def _in_app(path: pathlib.Path) -> bool:
    """Whether ``path`` is a file of the application layer (any file under repsim/app/)."""
    return APP in path.parents


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
            if _in_app(path):
                continue
            hit = _imports(path) & forbidden
            if hit:
                bad.append(f"{path.relative_to(ROOT)} imports {sorted(hit)}")
    assert not bad, bad


def test_library_has_no_click():
    for package in ("repsim", "hooks", "probes"):
        for path in (ROOT / package).rglob("*.py"):
            if not _in_app(path):
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


PACKAGES = ("repsim", "hooks", "probes")


def _module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_imports(path: pathlib.Path, modules: set[str], root: pathlib.Path = ROOT) -> set[str]:
    """The project modules ``path`` imports anywhere in its body: module level, inside functions, under
    ``if TYPE_CHECKING`` (a cycle hidden in a function or a type-checking block is still a cycle between the
    two modules' responsibilities). ``from pkg import name`` counts ``pkg`` and, when ``name`` is a submodule,
    ``pkg.name``; relative imports are resolved against the module's package."""
    me = _module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            deps.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            deps.add(base)
            deps.update(f"{base}.{a.name}" for a in node.names)
    return {d for d in deps if d in modules and d != me}


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports, for every module of repsim/, hooks/ and probes/."""
    paths = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    return {name: _module_imports(path, set(paths)) for name, path in paths.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan): every import cycle, direct or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_cycle_finder_on_hand_built_graphs():
    """Known answers: a direct pair, a three-module ring, and a chain that is no cycle."""
    assert import_cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_function_level_and_type_checking_imports_count(tmp_path):
    """The three ways the old cycles hid (inside a function, under TYPE_CHECKING, relative) are all seen."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    modules = {"pkg", "pkg.a", "pkg.b", "pkg.c"}
    graph = {_module_name(p, tmp_path): _module_imports(p, modules, tmp_path) for p in pkg.glob("*.py")}
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg", "pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_no_two_modules_import_each_other():
    """No import cycle among the modules of repsim/, hooks/ and probes/, counting imports inside functions:
    plot modules take results as data, shared helpers sit below both users (issue 13)."""
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def _is_app(module: str) -> bool:
    return module == "repsim.app" or module.startswith("repsim.app.")


def test_library_does_not_import_the_application_layer():
    """Nothing in repsim/, hooks/ or probes/ outside repsim/app/ imports repsim.app (``import repsim.app.cli``,
    ``from repsim.app import demo``, ``from repsim import app``, relative, inside functions: all counted)."""
    bad = {m: sorted(filter(_is_app, deps)) for m, deps in import_graph().items() if not _is_app(m)}
    assert not any(bad.values()), {m: deps for m, deps in bad.items() if deps}


def test_info_does_not_load_torch(tmp_path):
    """`repsim info` prints metadata: it must not import torch, timm or the extraction code (it took 10-20 s
    when it did). Checked in a fresh interpreter, on a store laid out by the store writer alone."""
    from repsim.store.writer import StoreWriter

    attrs = {
        "format_version": 1, "repsim_version": "0", "model": {"name": "m", "source": "timm", "source_id": "m",
                                                              "family": "vit", "weights": {"kind": "random"}},
        "dataset": {"name": "shapes", "root": None, "n": 4, "seed": 0, "fingerprint": "0" * 64},
        "preprocessing": {"img_size": [8, 8], "mean": [0, 0, 0], "std": [1, 1, 1], "interpolation": "bicubic",
                          "crop_pct": 1.0},
        "extraction": {"pool": "none", "spatial_pool": None, "dtype": "float16", "batch_size": 4, "chunk_size": 4},
    }
    from repsim.store.writer import LayerSpec

    path = str(tmp_path / "s.zarr")
    StoreWriter.create(path, attrs, [LayerSpec("blocks.0", (5, 3), {"kind": "tokens"})], [f"s{i}" for i in range(4)],
                       [0, 1, 2, 3], dtype="float16")
    code = ("import sys\nfrom repsim.app.cli import cli\ntry:\n    cli(['info', sys.argv[1]], prog_name='repsim')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('LOADED', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm', 'hooks', 'probes', "
            "'sklearn', 'matplotlib'}))")
    res = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "blocks.0" in res.stdout and "disk" in res.stdout, res.stdout  # it did print the store
    assert res.stdout.strip().splitlines()[-1] == "LOADED []", res.stdout


# The layout of issue 18, in the order data flows. Top-level modules and subpackages each package may have:
LAYOUT = {
    "repsim": {"modules": {"errors", "formatting", "devices", "results", "robustness"},
               "packages": {"app", "store", "data", "measures", "attention", "plotting"}},
    "hooks": {"modules": set(), "packages": {"models", "capture", "extract", "gradients"}},
    "probes": {"modules": {"features", "solvers", "linear", "knn", "localisation", "foreground_probe"},
               "packages": set()},
}
# Rank of each part of the library: a module may import only modules of its own rank or below (the package
# faces ``repsim``/``hooks``/``probes`` and the application layer are outside the ranking). So the store
# never reads data sets or analyses, plots take results as data, and analyses sit on the store.
RANK = {"repsim.errors": 0, "repsim.formatting": 0, "repsim.devices": 0, "repsim.results": 0,
        "repsim.store": 1, "repsim.data": 2, "repsim.plotting": 2, "repsim.measures": 3,
        "repsim.attention": 4, "repsim.robustness": 4, "hooks": 5, "probes": 5}


def _rank(module: str) -> int | None:
    """The rank of ``module`` from the longest ``RANK`` key it falls under; None for the package faces and
    for modules the table does not place."""
    if module in ("repsim", "hooks", "probes"):
        return None
    keys = [k for k in RANK if module == k or module.startswith(k + ".")]
    return RANK[max(keys, key=len)] if keys else None


def test_layout_is_the_documented_one():
    """repsim/, hooks/ and probes/ hold exactly the top-level modules and subpackages of ``LAYOUT`` (a module
    added at the top instead of into its subpackage fails here), and every subpackage has an ``__init__``."""
    for package, allowed in LAYOUT.items():
        root = ROOT / package
        modules = {p.stem for p in root.glob("*.py")} - {"__init__"}
        packages = {p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.py"))}
        assert modules == allowed["modules"], (package, modules ^ allowed["modules"])
        assert packages == allowed["packages"], (package, packages ^ allowed["packages"])
        for sub in packages:
            assert (root / sub / "__init__.py").exists(), f"{package}/{sub} has no __init__.py"


def test_imports_run_down_the_ranks():
    """store → data/plotting → measures → attention/robustness → hooks/probes: no module imports a module of a
    higher rank (e.g. the store importing a data set, a plot importing the analysis it draws)."""
    bad = []
    for module, deps in import_graph().items():
        mine = _rank(module)
        if mine is None or _is_app(module):
            continue
        for dep in deps:
            theirs = _rank(dep)
            if theirs is not None and theirs > mine:
                bad.append(f"{module} (rank {mine}) imports {dep} (rank {theirs})")
    assert not bad, bad


def test_rank_table_covers_every_library_module():
    """Every module of the library has a rank (a new top-level part must be placed in the table)."""
    unranked = [m for m in import_graph() if _rank(m) is None and not _is_app(m)
                and m not in ("repsim", "hooks", "probes")]
    assert not unranked, unranked
