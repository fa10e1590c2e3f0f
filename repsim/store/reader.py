"""Reading an activation store: :class:`ActivationStore`, :func:`open_store` and the row / layer helpers every
analysis shares (see :mod:`repsim.store` for the format).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import zarr

from repsim.errors import NewerFormatError, RepsimError, UsageError
from repsim.store.format import ATTR_KEY, FORMAT_VERSION, chunk_digest, is_url


def consecutive_slice(idx: np.ndarray) -> slice | None:
    """``idx`` as a slice when it is a non-empty run of consecutive ascending integers, else None (a view
    instead of a gather)."""
    if len(idx) == 0 or not bool((np.diff(idx) == 1).all()):
        return None
    return slice(int(idx[0]), int(idx[-1]) + 1)


def gather_rows(read: Callable[[int, int], np.ndarray], positions: np.ndarray, *, n: int, chunk_size: int,
                max_read_rows: int, what: str = "store") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(idx, rows)`` with ``rows = `` the rows ``positions[idx]`` of a chunked array read through
    ``read(lo, hi)`` (n rows, chunks of ``chunk_size``), covering every position once.

    Reads whole chunks in ascending order, each touched chunk exactly once, in runs of consecutive chunks of
    at most ``max_read_rows`` rows (at least one chunk): never row-by-row random access. ``what`` names the
    array in the error raised when a read returns the wrong number of rows.
    """
    cs = int(chunk_size)
    order = np.argsort(positions, kind="stable")
    sp = np.asarray(positions)[order]
    if sp.size == 0:
        return
    chunks = np.unique(sp // cs)
    max_chunks = max(1, max_read_rows // cs)
    runs: list[tuple[int, int]] = []
    start = prev = int(chunks[0])
    for c in chunks[1:]:
        c = int(c)
        if c == prev + 1 and c - start < max_chunks:
            prev = c
            continue
        runs.append((start, prev))
        start = prev = c
    runs.append((start, prev))
    for c0, c1 in runs:
        lo, hi = c0 * cs, min((c1 + 1) * cs, int(n))
        block = read(lo, hi)
        if block.shape[0] != hi - lo:
            raise RepsimError(f"{what}: reading rows {lo}..{hi} returned {block.shape[0]} rows")
        i0, i1 = np.searchsorted(sp, [lo, hi])
        idx = sp[i0:i1] - lo
        run = consecutive_slice(idx)  # consecutive rows: a view, no gather
        yield order[i0:i1], block[idx if run is None else run]



def check_layer_names(path: str, layers: Sequence[str], names: Sequence[str]) -> None:
    """UsageError naming every one of ``names`` that is not among the store's ``layers``, each with the closest
    stored name when there is one (the one check behind every layer selection from a store)."""
    missing = [name for name in names if name not in layers]
    if missing:
        from difflib import get_close_matches

        hints = []
        for name in missing:
            close = get_close_matches(name, layers, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise UsageError(f"{path} has no layer {', '.join(hints)}; it has {len(layers)} layers (see `repsim info`)")


def is_store(path: str) -> bool:
    """True when ``path`` (a local path or an fsspec URL) holds a Zarr group carrying repsim attributes."""
    if is_url(path):
        try:
            return ATTR_KEY in zarr.open_group(path, mode="r").attrs
        except Exception:  # noqa: BLE001 - unreachable or not a group: "not a store"
            return False
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "zarr.json")):
        return False
    try:
        return ATTR_KEY in zarr.open_group(path, mode="r").attrs
    except Exception:  # noqa: BLE001 - anything unreadable is simply "not a store"
        return False


class StoreLike(Protocol):
    """What the analyses read from a store (:class:`ActivationStore` implements it; tests pass small fakes):
    the one read interface of the CKA engine (:mod:`repsim.measures.cka_engine`) and the probes (:mod:`probes.features`)."""

    path: str
    layers: list[str]
    n: int
    chunk_size: int
    attrs: dict[str, Any]

    @property
    def ids(self) -> list[str]: ...

    @property
    def labels(self) -> np.ndarray: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def complete(self) -> bool: ...

    def layer_info(self, layer: str) -> dict[str, Any]: ...

    def read(self, layer: str, start: int | None = None, stop: int | None = None) -> np.ndarray: ...


class ActivationStore:
    """Read access to a store written by ``repsim extract``.

    Attributes
    ----------
    path : str
    attrs : dict          the root ``repsim`` attributes (provenance, see the module docstring)
    layers : list[str]    captured layers in network order
    n : int               number of samples (rows of every array)
    chunk_size : int      rows per chunk, shared by all arrays
    """

    def __init__(self, path: str):
        path = str(path)
        self.path = path if is_url(path) else os.path.abspath(path)
        if not is_url(path) and not os.path.exists(self.path):
            raise UsageError(f"no store at {path}")
        if not is_store(self.path):
            if is_url(path):
                raise UsageError(f"no repsim store at {path} (unreachable, missing, or without repsim attributes)")
            raise UsageError(f"{path} is not a repsim store (no Zarr group with repsim attributes)")
        self._group = zarr.open_group(self.path, mode="r")
        self.attrs: dict[str, Any] = dict(self._group.attrs[ATTR_KEY])
        if self.attrs.get("format_version", 0) > FORMAT_VERSION:
            raise NewerFormatError(
                f"{path} has store format {self.attrs['format_version']}, newer than this repsim "
                f"understands ({FORMAT_VERSION}): upgrade repsim"
            )
        try:
            self.layers: list[str] = [str(x) for x in self.attrs["layers"]]
            self.n: int = int(self.attrs["dataset"]["n"])
            self.chunk_size: int = int(self.attrs["extraction"]["chunk_size"])
            if self.n < 0 or self.chunk_size < 1:
                raise ValueError(f"n={self.n}, chunk_size={self.chunk_size}")
        except (KeyError, TypeError, ValueError) as err:
            raise UsageError(f"{path}: the root attributes (zarr.json) are damaged ({_why(err)}): the store cannot "
                             "be read") from None
        self._digest_columns: dict[str, np.ndarray] | None = None  # per array, the writer's chunk digests
        self._ids: list[str] | None = None
        self._complete: bool | None = None

    # -- metadata -------------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """Marked complete in the root attributes *and* every sample chunk flagged written (checked once)."""
        if self._complete is None:
            self._complete = (bool(self.attrs.get("complete", False)) and not self.initialising
                              and bool(self.chunks_done().all()))
        return self._complete

    @property
    def initialising(self) -> bool:
        """True for a store whose creation was killed before its arrays were all laid out."""
        return bool(self.attrs.get("initialising", False))

    @property
    def fingerprint(self) -> str:
        return str(self.attrs["dataset"]["fingerprint"])

    @property
    def model_name(self) -> str:
        return str(self.attrs["model"]["name"])

    @property
    def ids(self) -> list[str]:
        if self._ids is None:
            self._ids = [str(s) for s in self._read_checked("samples/ids", self._whole("samples/ids"), None, None)]
        return self._ids

    @property
    def labels(self) -> np.ndarray:
        """int64 (n,), -1 where unknown."""
        # no presence check: zarr does not write a chunk equal to the fill value -1 (a store of unlabelled images)
        return np.asarray(self._read_checked("samples/labels", self._rows_checked("samples/labels", self.n), None,
                                             None), dtype=np.int64)

    @property
    def has_inputs(self) -> bool:
        return "inputs" in self._group and "pixels" in self._group["inputs"]

    def n_chunks(self) -> int:
        return -(-self.n // self.chunk_size)

    def chunks_done(self) -> np.ndarray:
        """bool (n_chunks,): which sample chunks are completely written."""
        arr = self._node("progress/chunk_done")
        if arr.shape[0] != self.n_chunks():
            raise self._damage("progress/chunk_done", f"has {arr.shape[0]} flags, the store has {self.n_chunks()} chunks")
        return np.asarray(self._read_checked("progress/chunk_done", arr, None, None), dtype=bool)

    def shard_records(self) -> dict[int, list[dict[str, Any] | None]]:
        """Completion records of sharded extraction runs: {N: [record of shard k, or None while unfinished]}."""
        out: dict[int, list[dict[str, Any] | None]] = {}
        try:
            names = sorted(self._group["progress"].array_keys())
        except Exception as err:  # noqa: BLE001 - damaged metadata: one line naming it
            raise self._damage("progress", f"cannot be listed ({_why(err)})") from None
        for name in names:
            if name.startswith("shards_of_"):
                key = f"progress/{name}"
                values = self._read_checked(key, self._node(key), None, None)
                try:
                    out[int(name.rsplit("_", 1)[1])] = [json.loads(v) if v else None for v in values]
                except ValueError as err:
                    raise self._damage(key, f"holds a record that is not JSON ({_why(err)})") from None
        return out

    def nbytes_on_disk(self) -> int:
        """Bytes the store occupies (its files, or its objects under a URL)."""
        if is_url(self.path):
            import fsspec

            fs, root = fsspec.core.url_to_fs(self.path)
            return int(fs.du(root))
        total = 0
        for root, _, files in os.walk(self.path):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total

    # -- data -----------------------------------------------------------------------------------------
    def _check_layer(self, layer: str) -> None:
        if layer not in self.layers:
            check_layer_names(self.path, self.layers, [layer])

    def _array(self, layer: str) -> zarr.Array:
        self._check_layer(layer)
        if not self.has_acts:
            raise UsageError(f"{self.path} holds Gram matrices only (extracted with --no-acts), not the activations "
                             f"of {layer!r}: this analysis needs a store extracted without --no-acts")
        return self._rows_checked(f"acts/{layer}", self.n)

    @property
    def has_acts(self) -> bool:
        """False for a Gram-only store (``--no-acts``): it has ``grams/`` but no ``acts/`` arrays."""
        return bool(self.attrs["extraction"].get("acts", True))

    # -- Gram tier (``--grams``) ------------------------------------------------------------------------
    @property
    def gram_info(self) -> dict[str, Any] | None:
        """``{batch_rows, dtype, tokens, source_dtype, rows_used}`` of the stored Grams, or None without them."""
        g = self.attrs.get("grams")
        return dict(g) if g else None

    def gram_batch_rows(self) -> list[int]:
        """Rows m of each chunk's Gram (the batch sizes of the Gram plan); 0 for a chunk left out (< 4 rows)."""
        cs, n = self.chunk_size, self.n
        rows = [min(cs, n - c * cs) for c in range(self.n_chunks())]
        return [m if m >= 4 else 0 for m in rows]

    def read_grams(self, layer: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Packed U-centred Grams of chunks ``[start, stop)`` of ``layer``: (chunks, cs(cs-1)/2), see the format."""
        self._check_layer(layer)
        if self.gram_info is None:
            raise UsageError(f"{self.path} holds no Gram matrices: extract with --grams")
        key = f"grams/{layer}"
        return self._read_checked(key, self._rows_checked(key, self.n_chunks()), start, stop)

    def layer_info(self, layer: str) -> dict[str, Any]:
        """Per-layer attributes: kind, shape (per sample), num_prefix_tokens, grid, module, pool, dtype."""
        self._check_layer(layer)
        if self.has_acts:
            arr = self._node(f"acts/{layer}")
            info = dict(arr.attrs)
            info["shape"] = tuple(arr.shape[1:])
            info["dtype"] = str(arr.dtype)
            return info
        if layer not in self.attrs.get("layer_attrs", {}):
            raise self._damage("the root attributes", f"record no layer_attrs of {layer!r}")
        info = dict(self.attrs["layer_attrs"][layer])  # Gram-only stores keep the layer table in the root
        info["shape"] = tuple(info["shape"])
        return info

    def fp16_errors(self) -> dict[str, float]:
        """Worst float16 storage error η per layer over the chunks written (see "Precision"); {} if unmeasured."""
        if "quality/fp16_error" not in self._group:
            return {}
        e = np.asarray(self._read_checked("quality/fp16_error", self._rows_checked("quality/fp16_error", self.n_chunks()),
                                          None, None), dtype=np.float64)
        done = self.chunks_done()
        e = e[done] if done.any() else e[:0]
        if e.size == 0:
            return {layer: 0.0 for layer in self.layers}
        return {layer: float(np.nanmax(e[:, i])) for i, layer in enumerate(self.layers)}

    def read(self, layer: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` of ``layer`` in store order, in the stored dtype (float16 by default)."""
        return self._read_checked(f"acts/{layer}", self._array(layer), start, stop)

    def row_count(self, name: str) -> int:
        """Rows (first-axis length) of a layer's activation array, or of ``inputs/pixels``, as stored."""
        return int(self._node(name if name == "inputs/pixels" else f"acts/{name}").shape[0])

    def read_inputs(self, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Preprocessed inputs (rows, 3, H, W), when extracted with ``save_inputs``."""
        if not self.has_inputs:
            raise UsageError(f"{self.path} has no saved inputs: extract with --save-inputs")
        return self._read_checked("inputs/pixels", self._rows_checked("inputs/pixels", self.n), start, stop)

    def iter_batches(
        self, layers: Sequence[str], batch_size: int, *, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
        """Yield ``(rows, {layer: array})`` for consecutive row blocks of ``batch_size`` (the last may be smaller)."""
        if batch_size < 1:
            raise UsageError(f"batch size must be >= 1, got {batch_size}")
        arrays = {layer: self._array(layer) for layer in layers}
        stop = self.n if stop is None else min(stop, self.n)
        for lo in range(start, stop, batch_size):
            rows = slice(lo, min(lo + batch_size, stop))
            yield rows, {layer: self._read_checked(f"acts/{layer}", arr, rows.start, rows.stop)
                         for layer, arr in arrays.items()}

    @property
    def extra_arrays(self) -> list[str]:
        """Paths of the extra arrays (attention statistics, ...) declared in the root attributes."""
        return [e["name"] for e in self.attrs.get("extra_arrays", [])]

    def extra_shape(self, name: str) -> tuple[int, ...]:
        """Full shape of the extra array ``name`` (first axis: samples, chunks or the first K samples)."""
        if name not in self.extra_arrays:
            raise UsageError(f"{self.path} has no array {name!r}")
        return tuple(self._node(name).shape)

    def read_extra(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` of the extra array ``name`` (see :attr:`extra_arrays`)."""
        if name not in self.extra_arrays:
            raise UsageError(f"{self.path} has no array {name!r}")
        return self._read_checked(name, self._extra_checked(name), start, stop)

    # -- attention statistics (``--attention``) -------------------------------------------------------------
    @property
    def attention_layers(self) -> list[str]:
        """Attention layers whose statistics the store holds (empty unless extracted with ``--attention``)."""
        return list(self.attrs.get("attention", {}).get("layers", []))

    def attention_info(self, layer: str) -> dict[str, Any]:
        """Geometry of one attention layer: kind, num_heads, num_prefix_tokens, grid, patch_size (px), ..."""
        self._check_attention_layer(layer)
        return dict(self.attrs["attention"]["info"][layer])

    def read_attention(self, layer: str, stat: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """One attention statistic of ``layer``: ``distance`` | ``prefix_mass`` | ``entropy`` (rows, heads),
        ``aligned`` (n_chunks, heads, 2gh-1, 2gw-1) per-chunk sums, ``query_map`` (rows, heads, gh·gw) or ``maps``
        (first K images)."""
        self._check_attention_layer(layer)
        key = f"attn/{layer}/{stat}"
        if stat not in ("distance", "prefix_mass", "entropy", "aligned", "query_map", "maps"):
            raise UsageError(f"unknown attention statistic {stat!r}")
        if stat == "maps" and key not in self._group:
            raise UsageError(f"{self.path} keeps no attention maps of {layer} (extract with --attn-keep K > 0)")
        if stat == "query_map" and key not in self.extra_arrays:
            raise UsageError(f"{self.path} keeps no query maps of {layer} (windowed attention, or a store written "
                             "before repsim kept them: re-extract with --attention)")
        return self._read_checked(key, self._extra_checked(key), start, stop)

    def _check_attention_layer(self, layer: str) -> None:
        if not self.attention_layers:
            raise UsageError(f"{self.path} holds no attention statistics: extract with --attention")
        if layer not in self.attention_layers:
            raise UsageError(f"{layer!r} is not an attention layer of {self.path} "
                             f"(it has {', '.join(self.attention_layers[:4])}...)")

    def chunk_digests(self) -> tuple[list[str], np.ndarray] | None:
        """(array names, (n_chunks, k) uint32 CRC32C per chunk and array) as recorded by the writer; None for a
        store written before digests were recorded."""
        names = list(self.attrs.get("digest_arrays", []))
        if not names or "progress/chunk_digest" not in self._group:
            return None
        return names, np.asarray(self._group["progress/chunk_digest"][:], dtype=np.uint32)

    def declared_arrays(self) -> dict[str, int | None]:
        """Every array the root attributes promise, with the rows it must have (None: not fixed by n)."""
        out: dict[str, int | None] = {"samples/ids": self.n, "samples/labels": self.n,
                                      "progress/chunk_done": self.n_chunks()}
        if self.has_acts:
            out.update({f"acts/{layer}": self.n for layer in self.layers})
        if self.attrs["extraction"].get("save_inputs"):
            out["inputs/pixels"] = self.n
        for e in self.attrs.get("extra_arrays", []):
            out[e["name"]] = {"samples": self.n, "chunks": self.n_chunks()}.get(e["rows"])
        if self.attrs.get("digest_arrays"):
            # promised by the root attributes: without it exchanged chunks would go unnoticed
            out["progress/chunk_digest"] = self.n_chunks()
        return out

    def require_complete(self) -> None:
        """Refuse (UsageError, one line) a store that is unfinished, was killed while being created, or whose
        arrays' metadata is missing, unreadable or of the wrong length: every analysis calls this first."""
        if self.initialising or not self.attrs.get("complete", False):
            raise UsageError(f"{self.path} is incomplete (an extraction is unfinished or was killed): rerun the same "
                             "`repsim extract` command to finish it")
        for name, rows in self.declared_arrays().items():
            self._node(name) if rows is None else self._rows_checked(name, rows)
        if not self.complete:
            raise self._damage("progress/chunk_done", "has chunks not flagged written although the store is marked "
                                                      "complete")

    # -- damage: every failure to read becomes one line naming the array (and chunk) and `repsim verify` ------
    def _damage(self, name: str, what: str) -> UsageError:
        if self.initialising:
            return UsageError(f"{self.path} was killed while being created ({name} {what}): rerun the same "
                              "`repsim extract` command, which recreates it")
        return UsageError(f"{self.path}: {name} {what}; the store is damaged: run `repsim verify {self.path}`")

    def _node(self, name: str) -> zarr.Array:
        """The array ``name``; missing or unreadable metadata (zarr.json) is a UsageError naming it."""
        try:
            node = self._group[name]
        except MemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - KeyError, JSONDecodeError, zarr metadata errors, OSError ...
            raise self._damage(name, f"cannot be opened ({_why(err)})") from None
        if not isinstance(node, zarr.Array):
            raise self._damage(name, "is a group, not an array")
        return node

    def _whole(self, name: str) -> zarr.Array:
        """A one-chunk sample-table array whose chunk must exist on disk (its fill value would pass for data)."""
        arr = self._rows_checked(name, self.n)
        try:
            present = arr.nchunks_initialized
        except Exception as err:  # noqa: BLE001 - unlistable store
            raise self._damage(name, f"cannot be listed ({_why(err)})") from None
        if present < arr.nchunks:
            raise self._damage(name, f"has {arr.nchunks - present} of its {arr.nchunks} chunks missing on disk")
        return arr

    def _rows_checked(self, name: str, rows: int) -> zarr.Array:
        arr = self._node(name)
        if not arr.shape or arr.shape[0] != rows:
            raise self._damage(name, f"has {arr.shape[0] if arr.shape else 0} rows where the store needs {rows}")
        return arr

    def _extra_checked(self, name: str) -> zarr.Array:
        mode = next((e["rows"] for e in self.attrs.get("extra_arrays", []) if e["name"] == name), None)
        want = {"samples": self.n, "chunks": self.n_chunks()}.get(mode)
        return self._node(name) if want is None else self._rows_checked(name, want)

    def _read_checked(self, name: str, arr: zarr.Array, start: int | None, stop: int | None) -> np.ndarray:
        """Rows ``[start, stop)`` of ``arr``: a chunk that fails to decode (checksum, codec, shape) or is missing
        on disk (float arrays read it as the fill value NaN, which no stored value is) is a UsageError naming it."""
        sel = slice(start, stop)
        try:
            out = arr[sel]
        except MemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - ValueError (checksum), RuntimeError (blosc), ...
            c = self._first_bad_chunk(arr, sel)
            raise self._damage(name, f"{'a chunk' if c is None else self._chunk_text(arr, c)} does not decode "
                                     f"({_why(err)})") from None
        if out.dtype.kind == "f" and out.ndim and out.shape[0] and out[0].size:
            lo, hi, _ = sel.indices(arr.shape[0])
            cs = arr.chunks[0]
            for c in range(lo // cs, -(-hi // cs)):
                if np.isnan(out[max(c * cs, lo) - lo].flat[0]):
                    raise self._damage(name, f"{self._chunk_text(arr, c)} reads as NaN (missing on disk)")
        self._check_digests(name, arr, sel, out)
        return out

    def _check_digests(self, name: str, arr: zarr.Array, sel: slice, out: np.ndarray) -> None:
        """Compare every whole chunk in ``out`` with the writer's content digest (``progress/chunk_digest``): a
        chunk that decodes but holds another chunk's rows (files exchanged) is damage, not data."""
        if self._digest_columns is None:
            try:
                recorded = self.chunk_digests()
            except Exception:  # noqa: BLE001 - a damaged digest array: verify reports it; reads go on unchecked
                recorded = None
            self._digest_columns = {} if recorded is None else {nm: recorded[1][:, j]
                                                                for j, nm in enumerate(recorded[0])}
        digests = self._digest_columns.get(name)
        if digests is None or not out.ndim:
            return
        lo, hi, _ = sel.indices(arr.shape[0])
        cs = arr.chunks[0]
        for c in range(-(-lo // cs), min(len(digests), -(-hi // cs))):
            a, b = c * cs, min((c + 1) * cs, arr.shape[0])
            if b <= hi and digests[c] and chunk_digest(out[a - lo:b - lo], arr.dtype) != digests[c]:
                raise self._damage(name, f"{self._chunk_text(arr, c)} does not hold what was written there "
                                         "(its content digest differs: chunks exchanged or rewritten)")

    @staticmethod
    def _chunk_text(arr: zarr.Array, c: int) -> str:
        cs = arr.chunks[0]
        return f"chunk {c} (rows {c * cs}..{min((c + 1) * cs, arr.shape[0]) - 1})"

    @staticmethod
    def _first_bad_chunk(arr: zarr.Array, sel: slice) -> int | None:
        lo, hi, _ = sel.indices(arr.shape[0])
        cs = arr.chunks[0]
        for c in range(lo // cs, -(-hi // cs)):
            try:
                arr[c * cs:min((c + 1) * cs, arr.shape[0])]
            except Exception:  # noqa: BLE001 - this is the one
                return c
        return None

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return f"ActivationStore({self.path!r}, model={self.model_name!r}, n={self.n}, layers={len(self.layers)}, {state})"


def _why(err: BaseException) -> str:
    """``Type: first line`` of an exception, at most 160 characters (for one-line errors)."""
    text = str(err).strip().splitlines()[0][:160] if str(err).strip() else "no details"
    return f"{type(err).__name__}: {text}"


def open_store(path: str) -> ActivationStore:
    """Open a store written by ``repsim extract`` for reading: a local path or any fsspec URL
    (``s3://bucket/vit.zarr`` with s3fs installed, ``gs://``, ``memory://`` ...)."""
    return ActivationStore(path)


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


