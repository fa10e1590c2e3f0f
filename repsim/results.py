"""Analysis results: the base class every result derives from (:class:`Result`), and atomic output of results
as JSON and as figures (a reader never sees a half-written file; an old one survives a crash)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any, ClassVar, TypeVar

R = TypeVar("R", bound="Result")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path in ``path``'s folder (same extension) to write; on success it replaces ``path``
    (``os.replace``: a reader never sees a half-written file, and an old one survives a crash), with the
    user's normal permissions (``0o666`` less the process umask, as ``open`` would give, not the temporary
    file's private ``0o600``); on failure it is removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically (:func:`atomic_output`). NaN / Inf are refused
    (``allow_nan=False``): they are not JSON and hide failed measurements."""
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=1, allow_nan=False)
        f.write("\n")


def save_figure_atomic(fig: Any, path: str | os.PathLike, *, dpi: int = 150) -> None:
    """Save the matplotlib ``fig`` to ``path`` atomically (:func:`atomic_output`), in the format its extension
    names (PNG, PDF, SVG, ...); PNG at exactly ``path`` when it has no extension (matplotlib would append one)."""
    ext = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=ext or "png")


def _umask() -> int:
    """The process umask (read by setting it and restoring it at once; there is no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_json_result(source: str | os.PathLike | dict[str, Any], kind: str) -> dict[str, Any]:
    """A result written by a ``to_json``: ``source`` is the dict itself or a path to the file; its ``kind``
    field must be ``kind`` (e.g. ``"repsim.cka"``), else a UsageError names what it is instead."""
    if not isinstance(source, dict):
        with open(source) as f:
            source = json.load(f)
    if source.get("kind") != kind:
        from repsim.errors import UsageError

        raise UsageError(f"not a {kind} result (kind {source.get('kind')!r})")
    return source


def finish_result(d: dict[str, Any], kind: str, path: str | os.PathLike | None) -> dict[str, Any]:
    """The last step of every result's ``to_json``: ``d`` tagged with its ``kind`` (e.g. ``"repsim.cka"``, the tag
    :func:`read_json_result` checks), written atomically to ``path`` when given (:func:`write_json_atomic`)."""
    d["kind"] = kind
    if path is not None:
        write_json_atomic(path, d)
    return d


def result_fields(cls: type, source: str | os.PathLike | dict[str, Any], kind: str) -> dict[str, Any]:
    """The first step of every result's ``from_json``: the entries of a ``kind`` result (:func:`read_json_result`)
    that are fields of the dataclass ``cls`` (keys added by later versions, and ``kind`` itself unless ``cls`` has
    a field of that name, are left out)."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in read_json_result(source, kind).items() if k in known}


def jsonable(x: Any) -> Any:
    """``x`` with numpy arrays / scalars turned into lists and Python numbers, dict keys into strings, and
    non-finite floats into None (JSON has no NaN; a missing value stays visible as null)."""
    import math

    import numpy as np

    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


class Result:
    """Base class of every analysis result (a dataclass: its numbers and their provenance).

    A subclass sets ``result_kind`` (the JSON tag, e.g. ``"repsim.cka"``; a tag is a file-format name and never
    changes with the code), lists in ``memory_only`` the fields that never go to JSON (per-image arrays, figure
    data), and overrides :meth:`json_fields` for derived entries, :meth:`from_fields` when rebuilding needs
    more than the stored fields (arrays, nested rows), and :meth:`plot`.
    """

    result_kind: ClassVar[str]
    memory_only: ClassVar[tuple[str, ...]] = ()

    def json_fields(self) -> dict[str, Any]:
        """The JSON entries before tagging: every dataclass field but the ``memory_only`` ones (nested
        dataclasses as dicts)."""
        d = dataclasses.asdict(self)
        for name in self.memory_only:
            d.pop(name, None)
        return d

    def to_json(self, path: str | os.PathLike | None = None) -> dict[str, Any]:
        """The result as a JSON-ready dict tagged ``kind`` = :attr:`result_kind` (arrays as lists, non-finite
        numbers as null); written atomically to ``path`` when given."""
        return finish_result(jsonable(self.json_fields()), self.result_kind, path)

    @classmethod
    def from_fields(cls, fields: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments from the stored ``fields`` (the JSON entries that are fields) and the whole
        JSON ``raw``; the default takes the fields as they are."""
        return fields

    @classmethod
    def from_json(cls: type[R], source: str | os.PathLike | dict[str, Any]) -> R:
        """Inverse of :meth:`to_json`: ``source`` is the dict or a path to the JSON file. A result whose JSON
        leaves out required in-memory fields cannot be rebuilt: UsageError."""
        raw = read_json_result(source, cls.result_kind)
        args = cls.from_fields(result_fields(cls, raw, cls.result_kind), raw)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in args and f.init
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            from repsim.errors import UsageError

            raise UsageError(f"a {cls.result_kind} result cannot be rebuilt from JSON: it holds no {', '.join(missing)}")
        return cls(**args)

    def plot(self, path: str | os.PathLike | None = None, **options: Any) -> Any:
        """The result's figure, saved to ``path`` (atomically) when given; returns the matplotlib object."""
        raise NotImplementedError(f"{type(self).__name__} has no figure")
