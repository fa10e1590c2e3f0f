"""The results base class (repsim.results.Result) and atomic figure output (issue 18: one home for the JSON and
figure code of every result)."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import pathlib

import numpy as np
import pytest

from repsim.errors import UsageError
from repsim.results import Result, save_figure_atomic

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_result_class_derives_from_result():
    """Every library class with a ``to_json`` is a :class:`Result` (no hand-copied JSON code left), and its
    ``result_kind`` is unique."""
    import importlib

    kinds = {}
    for package in ("repsim", "probes"):
        for path in (ROOT / package).rglob("*.py"):
            if "app" in path.relative_to(ROOT).parts:
                continue
            tree = ast.parse(path.read_text())
            for node in tree.body:
                if isinstance(node, ast.ClassDef) and node.name != "Result" and any(
                        isinstance(m, ast.FunctionDef) and m.name == "to_json" or
                        isinstance(m, ast.AnnAssign) and getattr(m.target, "id", "") == "result_kind"
                        for m in node.body):
                    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
                    cls = getattr(importlib.import_module(module), node.name)
                    assert issubclass(cls, Result), f"{module}.{node.name} does not derive from Result"
                    assert cls.result_kind not in kinds, (cls, kinds.get(cls.result_kind))
                    kinds[cls.result_kind] = cls
    assert len(kinds) >= 11, sorted(kinds)


@dataclasses.dataclass
class _Toy(Result):
    result_kind = "repsim.toy"  # plain class attribute: a dataclass field needs an annotation
    memory_only = ("per_image",)
    name: str
    values: np.ndarray
    per_image: np.ndarray | None = None

    @classmethod
    def from_fields(cls, fields, raw):
        return dict(fields, values=np.asarray(fields["values"], dtype=np.float64))


def test_result_round_trip_tags_and_leaves_memory_only_fields_out(tmp_path):
    res = _Toy("a", np.array([0.5, np.nan]), per_image=np.ones(3))
    d = res.to_json(tmp_path / "r.json")
    assert d == {"name": "a", "values": [0.5, None], "kind": "repsim.toy"}  # NaN as null, per_image left out
    assert json.loads((tmp_path / "r.json").read_text()) == d
    back = _Toy.from_json(tmp_path / "r.json")
    assert back.name == "a" and back.per_image is None
    np.testing.assert_array_equal(back.values, [0.5, np.nan])
    with pytest.raises(UsageError, match="not a repsim.toy result"):
        _Toy.from_json({"kind": "repsim.cka", "name": "a", "values": []})


def test_from_json_refuses_a_result_whose_json_lacks_a_required_field():
    @dataclasses.dataclass
    class Needs(Result):
        result_kind = "repsim.needs"
        memory_only = ("maps",)
        maps: np.ndarray

    with pytest.raises(UsageError, match="cannot be rebuilt from JSON: it holds no maps"):
        Needs.from_json({"kind": "repsim.needs"})


def test_save_figure_atomic_keeps_the_old_file_when_drawing_fails(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure()
    fig.subplots().plot([0, 1], [1, 0])
    target = tmp_path / "fig.pdf"
    save_figure_atomic(fig, target)
    assert target.read_bytes()[:5] == b"%PDF-"  # the format the extension names
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    before = target.read_bytes()
    save_figure_atomic(fig, tmp_path / "no_extension")  # PNG at exactly the named path
    assert (tmp_path / "no_extension").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "no_extension").unlink()

    class Boom(Exception):
        pass

    def fail(*args, **kwargs):
        raise Boom

    fig.savefig = fail
    with pytest.raises(Boom):
        save_figure_atomic(fig, target)
    assert target.read_bytes() == before  # the old figure survives
    assert sorted(os.listdir(tmp_path)) == ["fig.pdf"]  # no temporary file left behind


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
