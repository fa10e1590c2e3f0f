"""Writing an activation store: :class:`StoreWriter` lays out the arrays, writes sample chunks and records
completion, so a killed extraction resumes from its last complete chunk (see :mod:`repsim.store`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from repsim.errors import UsageError
from repsim.store.format import (
    ATTR_KEY,
    array_codecs,
    chunk_digest,
    dimension_names,
    fill_value_for,
)
from repsim.store.reader import is_store


@dataclass
class LayerSpec:
    """What the writer needs to preallocate one ``acts/<layer>`` array."""

    name: str
    shape: tuple[int, ...]  # per sample
    attrs: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None  # None: the store's dtype; "float32" for a layer float16 would damage


ROW_MODES = ("samples", "chunks", "first")


@dataclass
class ArraySpec:
    """An extra array written chunk by chunk alongside the activations (e.g. attention statistics).

    ``name`` is the array's path in the group, ``shape`` its per-row shape; ``rows`` how its first axis maps
    to samples: ``samples`` (n rows), ``chunks`` (one row per sample chunk: a per-chunk reduction) or
    ``first`` (the first ``first_rows`` samples only).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    rows: str = "samples"
    first_rows: int = 0
    attrs: dict[str, Any] = field(default_factory=dict)



class StoreWriter:
    """Creates (or reopens for resuming) a store and writes whole sample chunks.

    Use :meth:`create` for a new store and :meth:`reopen` to resume; :meth:`write_chunk` writes every array's
    rows of one chunk and only then sets that chunk's completion flag, so a killed writer never leaves a
    chunk marked done with partial data.
    """

    def __init__(self, path: str, group: zarr.Group):
        self.path = path
        self._group = group
        self.attrs: dict[str, Any] = dict(group.attrs[ATTR_KEY])
        self.chunk_size = int(self.attrs["extraction"]["chunk_size"])
        self.n = int(self.attrs["dataset"]["n"])
        self.layers = list(self.attrs["layers"])
        has_acts = bool(self.attrs["extraction"].get("acts", True))
        self._arrays = {layer: group[f"acts/{layer}"] for layer in self.layers} if has_acts else {}
        self._inputs = group["inputs/pixels"] if self.attrs["extraction"].get("save_inputs") else None
        self._extra = {e["name"]: (group[e["name"]], e["rows"]) for e in self.attrs.get("extra_arrays", [])}
        self._done = group["progress/chunk_done"]
        self._digest_names = list(self.attrs.get("digest_arrays", []))
        self._digest = group["progress/chunk_digest"] if self._digest_names else None
        # stored dtype of every digested array, from the arrays opened above (no metadata read per chunk)
        opened = {f"acts/{layer}": arr for layer, arr in self._arrays.items()}
        opened.update({name: arr for name, (arr, _) in self._extra.items()})
        if self._inputs is not None:
            opened["inputs/pixels"] = self._inputs
        self._digest_dtypes = {name: opened[name].dtype for name in self._digest_names if name in opened}

    @classmethod
    def create(
        cls,
        path: str,
        attrs: dict[str, Any],
        layers: Sequence[LayerSpec],
        ids: Sequence[str],
        labels: np.ndarray,
        *,
        dtype: str,
        input_shape: tuple[int, int, int] | None = None,
        extra: Sequence[ArraySpec] = (),
        acts: bool = True,
    ) -> "StoreWriter":
        """Preallocate every array for ``len(ids)`` rows and write the sample table and root attributes.

        ``acts=False`` (a Gram-only store) creates no ``acts/`` arrays; the layers' attributes then live in the
        root attribute ``layer_attrs`` and ``extra`` must hold what is kept instead (the Grams)."""
        n = len(ids)
        chunk = int(attrs["extraction"]["chunk_size"])
        n_chunks = -(-n // chunk)
        group = zarr.open_group(path, mode="w")
        # Mark the group first, so a store killed while being laid out is recognised (and recreated).
        group.attrs[ATTR_KEY] = dict(attrs, initialising=True)
        id_arr = group.create_array("samples/ids", shape=(n,), chunks=(max(n, 1),), dtype=str,
                                    dimension_names=dimension_names("samples/ids", 1))
        id_arr[:] = np.asarray(list(ids), dtype=object)
        lab = group.create_array("samples/labels", shape=(n,), chunks=(max(n, 1),), dtype="int64", fill_value=-1,
                                 dimension_names=dimension_names("samples/labels", 1))
        lab[:] = np.asarray(labels, dtype=np.int64)
        for spec in layers if acts else ():
            layer_dtype = spec.dtype or dtype
            arr = group.create_array(
                f"acts/{spec.name}",
                shape=(n, *spec.shape),
                chunks=(chunk, *spec.shape),
                dtype=layer_dtype,
                compressors=array_codecs(),
                fill_value=fill_value_for(layer_dtype),
                dimension_names=dimension_names(f"acts/{spec.name}", 1 + len(spec.shape), kind=spec.attrs.get("kind")),
            )
            arr.attrs.update(spec.attrs)
        if input_shape is not None:
            group.create_array(
                "inputs/pixels",
                shape=(n, *input_shape),
                chunks=(chunk, *input_shape),
                dtype="float16",
                compressors=array_codecs(),
                fill_value=fill_value_for("float16"),
                dimension_names=dimension_names("inputs/pixels", 1 + len(input_shape)),
            )
        for spec in extra:
            if spec.rows not in ROW_MODES:
                raise ValueError(f"rows must be one of {ROW_MODES}, got {spec.rows!r}")
            rows = {"samples": n, "chunks": n_chunks, "first": min(spec.first_rows, n)}[spec.rows]
            arr = group.create_array(
                spec.name,
                shape=(rows, *spec.shape),
                chunks=(1 if spec.rows == "chunks" else max(1, min(chunk, rows)), *spec.shape),
                dtype=spec.dtype,
                compressors=array_codecs(),
                fill_value=fill_value_for(spec.dtype),
                dimension_names=dimension_names(spec.name, 1 + len(spec.shape), rows=spec.rows),
            )
            arr.attrs.update(spec.attrs)
        group.create_array("progress/chunk_done", shape=(n_chunks,), chunks=(1,), dtype="uint8", fill_value=0,
                           dimension_names=dimension_names("progress/chunk_done", 1))
        digest_names = ([f"acts/{s.name}" for s in layers] if acts else []) + \
            (["inputs/pixels"] if input_shape is not None else []) + [e.name for e in extra]
        group.create_array("progress/chunk_digest", shape=(n_chunks, max(1, len(digest_names))),
                           chunks=(1, max(1, len(digest_names))), dtype="uint32", fill_value=0,
                           dimension_names=dimension_names("progress/chunk_digest", 2))
        attrs = dict(attrs, complete=False, layers=[s.name for s in layers],
                     extra_arrays=[{"name": e.name, "rows": e.rows} for e in extra], digest_arrays=digest_names)
        if not acts:
            attrs["layer_attrs"] = {s.name: dict(s.attrs, shape=list(s.shape), dtype=s.dtype or dtype) for s in layers}
        attrs.pop("initialising", None)
        group.attrs[ATTR_KEY] = attrs
        return cls(path, group)

    @classmethod
    def reopen(cls, path: str) -> "StoreWriter":
        return cls(path, zarr.open_group(path, mode="r+"))

    def chunks_done(self) -> np.ndarray:
        return np.asarray(self._done[:], dtype=bool)

    def chunk_rows(self, chunk_index: int) -> slice:
        lo = chunk_index * self.chunk_size
        return slice(lo, min(lo + self.chunk_size, self.n))

    def write_chunk(
        self,
        chunk_index: int,
        acts: dict[str, np.ndarray],
        inputs: np.ndarray | None = None,
        extra: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Write all layers' rows of one sample chunk (and of every extra array), then flag the chunk complete.

        ``extra[name]`` holds the chunk's rows of a ``samples`` or ``first`` array (for ``first``, the rows past
        its length are ignored) or the one row of a ``chunks`` array.
        """
        rows = self.chunk_rows(chunk_index)
        written: dict[str, np.ndarray] = {}  # what each array received, for the chunk digest
        for layer, arr in self._arrays.items():
            arr[rows] = written[f"acts/{layer}"] = acts[layer]
        if self._inputs is not None:
            if inputs is None:
                raise ValueError("this store keeps inputs: pass them to write_chunk")
            self._inputs[rows] = written["inputs/pixels"] = inputs
        extra = extra or {}
        missing = set(self._extra) - set(extra)
        if missing:
            raise ValueError(f"write_chunk is missing extra arrays {sorted(missing)}")
        for name, (arr, mode) in self._extra.items():
            value = extra[name]
            if mode == "chunks":
                arr[chunk_index] = written[name] = value
            elif mode == "samples":
                arr[rows] = written[name] = value
            elif rows.start < arr.shape[0]:  # "first": only the leading rows are kept
                stop = min(rows.stop, arr.shape[0])
                arr[rows.start:stop] = written[name] = value[: stop - rows.start]
        if self._digest is not None:
            self._digest[chunk_index] = np.array(
                [chunk_digest(written[name], self._digest_dtypes[name]) if name in written else 0
                 for name in self._digest_names], dtype=np.uint32)
        self._done[chunk_index] = 1

    def record_shard(self, k: int, total: int, record: dict[str, Any]) -> None:
        """Record that shard ``k`` of ``total`` finished (``progress/shards_of_<total>``, see the format above).

        Creating the array is not safe against a concurrent creation: callers serialise it (the extraction's
        creation lock); writing one shard's element is, since every element is its own Zarr chunk.
        """
        name = f"progress/shards_of_{total}"
        if name in self._group:
            arr = self._group[name]
        else:
            arr = self._group.create_array(name, shape=(total,), chunks=(1,), dtype=str, fill_value="",
                                           dimension_names=dimension_names(name, 1))
        arr[k] = json.dumps(dict(record, shard=k, of=total), sort_keys=True)

    def update_attrs(self, **changes: Any) -> None:
        self.attrs.update(changes)
        self._group.attrs[ATTR_KEY] = self.attrs



def is_initialising(path: str) -> bool:
    """True for a store whose creation was interrupted before its arrays were all laid out."""
    return bool(zarr.open_group(path, mode="r").attrs[ATTR_KEY].get("initialising", False))


def remove_store(path: str) -> None:
    """Delete a store (used by ``--overwrite``); refuses paths that are not repsim stores."""
    if os.path.isdir(path) and not is_store(path) and os.listdir(path):
        raise UsageError(f"{path} exists and is not a repsim store: refusing to delete it")
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        raise UsageError(f"{path} exists and is a file, not a store")
