"""The activation store: one model × one ordered list of samples × one preprocessing, as a Zarr v3 group.

This module docstring is the format specification (``FORMAT_VERSION`` below). Everything downstream of
extraction reads only this.

Layout::

    model.zarr/
      zarr.json                 root attributes, key "repsim" (see below)
      samples/ids               (n,) str      sample ids in store order
      samples/labels            (n,) int64    class index, -1 where unknown
      inputs/pixels             (n, 3, H, W)  optional: the preprocessed model input (``--save-inputs``)
      acts/<layer>              (n, ...)      one array per captured layer, in network order:
                                              (n, T, D) tokens | (n, C, H, W) maps | (n, D) vectors
      attn/<layer>/...          optional (``--attention``): per-image attention statistics of one attention
                                layer (see "Attention" below)
      grams/<layer>             optional (``--grams``): (n_chunks, m(m-1)/2) float32, row c = the strict upper
                                triangle (row-major, ``torch.triu_indices(m, m, 1)``) of the U-centred linear
                                Gram (Székely–Rizzo 2014) of the flattened, per-batch column-centred features
                                of sample chunk c (m = its row count; m = chunk_size but for the last chunk,
                                whose unused tail is 0). These are exactly the per-batch terms of minibatch
                                CKA (Nguyen et al. 2021) with the store's chunks as batches: the diagonal of a
                                U-centred Gram is 0, so ⟨K̃,L̃⟩ = 2·⟨triu K̃, triu L̃⟩ and the factor 2 cancels.
                                A last chunk of fewer than 4 rows has no unbiased Gram: its row is all 0 and
                                its samples are left out (root attribute ``grams.rows_used``).
      quality/fp16_error        (n_chunks, n_layers) float32: per chunk and layer, the float16 storage error η
                                (see "Precision") measured on the chunk's first rows; 0 for float32 layers
      progress/chunk_digest     (n_chunks, k) uint32: CRC32C of the decoded bytes each chunk wrote into each of
                                the k arrays named in the root attribute ``digest_arrays`` (activations,
                                inputs, extra arrays), written before the chunk's flag. Every chunk object
                                also carries the CRC32C of its own bytes; this digest is what finds two
                                intact chunks of one array exchanged (``repsim verify``)
      progress/chunk_done       (n_chunks,) uint8, one Zarr chunk per flag: 1 once every array's rows of
                                that sample chunk are on disk
      progress/shards_of_<N>    optional, (N,) str, one Zarr chunk per shard: written by a ``--shard k/N``
                                run once all its chunks are flagged: JSON {shard, of, chunks [start, stop),
                                rows [start, stop), host, pid, finished (UTC ISO 8601), seconds}; "" until then

Root attribute ``repsim`` (JSON)::

    format_version, repsim_version, created (UTC ISO 8601),
    model          {name, source, source_id, family, weights{kind, file, sha256 | tag}, num_prefix_tokens,
                    patch_size, grid, num_classes}
    dataset        {name, root, n, seed, fingerprint (sha256 of "\\n".join(ids)), classes, params, skipped[]}
    preprocessing  {img_size, mean, std, interpolation, crop_pct, crop_mode}
    extraction     {pool, spatial_pool, dtype, batch_size, chunk_size, layers_requested, save_inputs, grams,
                    acts (false with ``--no-acts``: no ``acts/`` arrays, Grams only)}
    grams          optional: {batch_rows (= chunk_size), dtype, tokens ("flatten"), source_dtype (the values
                    the Grams were computed from: the stored dtype, or float32 without activations),
                    rows_used}
    layers         [layer names in network order]
    perturbation   optional (``--perturb``, :mod:`repsim.perturbations`): {kind, level, patch_px (patch-drop's
                    grid in input pixels, else null), seed (null for the deterministic occlude-centre)}: every
                    preprocessed input was perturbed, seeded per sample id. ``dataset`` (ids, fingerprint) stays
                    the clean data set's, so a clean and a perturbed store compare row by row; absent: clean
    config_hash    sha256 of the canonical JSON of everything above that determines the arrays' contents
    libraries      {python, torch, timm, zarr, numpy, ...}
    complete       bool; completed (UTC ISO 8601) once complete

Precision: activations are stored as float16 unless ``--dtype float32``. Float16 keeps 11 significant
bits: a value v is stored with an error of at most |v|·2^-11 (and 2^-25 absolute below 6.1e-5; values under
about 3e-8 become 0, values over 65504 overflow and are refused). What matters to CKA and probes is the
error relative to a layer's variation about its per-feature mean, η = Σ(fp16(x) − x)² / Σ(x − x̄)²: about
2e-8 for well-scaled features, but near 1 when a large per-feature offset (massive activations) or tiny
values (underflow) swamp the variation. At planning, η is measured per layer on the first images; a layer
with η > ``FP16_MAX_ERROR`` (1e-4) is stored as float32 instead (per-layer attributes ``dtype`` and
``fp16_error``). During extraction η is measured again on every chunk (``quality/fp16_error``); ``repsim
info`` shows each layer's worst chunk and ``repsim verify`` fails on a float16 layer above the limit.

Per-layer attributes (``acts/<layer>`` zarr.json): ``kind`` (tokens | map | vector), ``module`` (module path),
``call_index`` (which call of a module used several times per forward, else null), ``tap`` (what was taken
from the module output, e.g. "output" or "output[0]"), ``layout_in`` (the module's native layout, e.g. nhwc),
``pool`` (the pooling actually applied), ``num_prefix_tokens`` and ``grid`` (tokens: how many leading tokens
are CLS / register / distillation tokens, and the (gh, gw) patch grid of the rest; null where unknown),
``shape`` (per-sample shape).

Attention (optional; root attribute ``attention`` = {layers: [...], attn_keep: K, info: {layer: {kind,
num_heads, num_prefix_tokens, grid, patch_size (token stride in input pixels), window_size, shift_size,
query_map}}})::

      attn/<layer>/distance     (n, heads) float32  mean attention distance in pixels
      attn/<layer>/prefix_mass  (n, heads) float32  attention on prefix tokens (mean over patch queries)
      attn/<layer>/entropy      (n, heads) float32  row entropy in nats (mean over patch queries)
      attn/<layer>/aligned      (n_chunks, heads, 2gh-1, 2gw-1) float32  per-sample-chunk sums of the
                                     aligned attention maps (Walmer et al. 2023); sum over axis 0 for the total
      attn/<layer>/query_map    (n, heads, gh·gw) float32  per image: the CLS query's attention over the patch
                                     keys renormalised over them, or without prefix tokens the mean patch
                                     query's (info ``query_map``: "cls" | "mean"); for attention as
                                     segmentation (:mod:`repsim.attention_segmentation`). Global-attention
                                     layers only; float32 (4·heads·gh·gw bytes per image, 3 % of ViT-B/16's
                                     float16 tokens) keeps the small weights that the mass rule sums. Stores
                                     written before it existed lack it: re-extract with ``--attention``
      attn/<layer>/maps         (K, heads, N, N) float16  full probabilities of the first K images
                                     (global-attention layers only)

Extra arrays are declared in the root attribute ``extra_arrays`` = [{name, rows}] where ``rows`` says how
the first axis relates to samples: ``samples`` (one row per sample), ``chunks`` (one row per sample chunk)
or ``first`` (one row per sample for the first rows only).

Dimension names: every array carries Zarr v3 ``dimension_names`` (:func:`dimension_names`), so each group opens
in xarray (``xr.open_zarr(path, group="acts", consolidated=False)``) with named axes. xarray needs one size per
name within a group, hence the qualified and distinct names below::

    samples/ids, samples/labels     (sample,)
    inputs/pixels                   (sample, channel, height, width)
    acts/<layer>                    tokens (sample, token:<layer>, channel:<layer>) | map (sample, channel:<layer>,
                                    height:<layer>, width:<layer>) | vector (sample, channel:<layer>): layers
                                    share the group and differ in size, so their axes carry the layer name
    attn/<layer>/distance, prefix_mass, entropy   (sample, head)
    attn/<layer>/aligned            (chunk, head, dy, dx)          dy, dx: offsets -(g-1)..g-1 from the query
    attn/<layer>/cls_map            (chunk, head, grid_y, grid_x)
    attn/<layer>/query_map          (sample, head, patch)
    attn/<layer>/maps               (kept_sample, head, query, key)  kept_sample: the first K images only
    grams/<layer>                   (chunk, pair)                  pair: the packed strict upper triangle
    quality/fp16_error              (chunk, layer)                 layer: in the order of root ``layers``
    progress/chunk_done             (chunk,)
    progress/chunk_digest           (chunk, digest_array)          digest_array: root ``digest_arrays`` order
    progress/shards_of_<N>          (shard_of_<N>,)

An extra array the table does not name gets its first axis from ``rows`` (sample | chunk | kept_sample) and
``<array>_<i>`` after it. Names are metadata only: stores written before they existed have none and read in
repsim exactly as before (xarray refuses arrays without ``dimension_names``; re-extract to get them).

Chunking: every array is chunked along samples only (``chunk_size`` rows, whole feature dims per chunk),
stored uncompressed (activations compress only 1.15-1.4x whatever the codec, and compression slowed the
writer by 1.4x, see issue #14's note) with a CRC32C checksum per chunk (a damaged chunk raises on decoding;
older stores, Blosc lz4 + bitshuffle without checksum, read as before). Float arrays have fill value NaN,
so a chunk that is missing on disk reads as NaN and every analysis refuses it instead of reading zeros;
``progress/chunk_digest`` finds intact chunks that were exchanged. All arrays share ``chunk_size`` so a
sample chunk is the unit of writing,
resuming and (later) sharding. Exactly one writer touches a chunk (Zarr loses data when several writers
share one chunk or shard). Sample order is a seeded random permutation of the data set (see
:mod:`repsim.data`), so any contiguous block of rows is a uniform random sample.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from repsim.errors import NewerFormatError, RepsimError, UsageError

FORMAT_VERSION = 1
ATTR_KEY = "repsim"
LOCK_NAME = ".repsim-writer.lock"


FP16_MAX_ERROR = 1e-4  # largest float16 error η (share of a layer's variation) stored without promotion


def _compressor() -> tuple[Crc32cCodec]:
    # No compression: float activations compress only 1.15-1.4x with any codec (Blosc lz4 / zstd, with or
    # without (bit)shuffle, on real ResNet maps), and on the 2-core machine zarr wrote 139 MB/s with lz4-1 +
    # CRC against 196 MB/s with the CRC alone (issue #14's note); the writer competes with the forward pass
    # on small machines and is the bottleneck on GPUs, and re-analysis reads fastest uncompressed.
    # The CRC32C of every chunk (hardware-accelerated, google-crc32c) makes a bit-flipped or truncated chunk
    # fail to decode instead of reading as plausible numbers (exchanged chunks: progress/chunk_digest).
    return (Crc32cCodec(),)


def _fill(dtype: Any) -> Any:
    """NaN for float arrays (a missing chunk can never pass for data), 0 otherwise."""
    return np.nan if np.dtype(dtype).kind == "f" else 0


#: first-axis name of an array by how its rows relate to samples (``ArraySpec.rows``)
ROW_DIMENSIONS = {"samples": "sample", "chunks": "chunk", "first": "kept_sample"}
#: axis names after the first, by layer kind (``acts/<layer>``, qualified with the layer name, see the docstring)
KIND_DIMENSIONS = {"tokens": ("token", "channel"), "map": ("channel", "height", "width"), "vector": ("channel",)}
#: axis names of the fixed arrays, by path
ARRAY_DIMENSIONS = {
    "samples/ids": ("sample",), "samples/labels": ("sample",),
    "inputs/pixels": ("sample", "channel", "height", "width"),
    "quality/fp16_error": ("chunk", "layer"),
    "progress/chunk_done": ("chunk",), "progress/chunk_digest": ("chunk", "digest_array"),
}
#: axis names of the attention statistics ``attn/<layer>/<stat>``, by ``<stat>``
ATTENTION_DIMENSIONS = {
    "distance": ("sample", "head"), "prefix_mass": ("sample", "head"), "entropy": ("sample", "head"),
    "aligned": ("chunk", "head", "dy", "dx"), "cls_map": ("chunk", "head", "grid_y", "grid_x"),
    "maps": ("kept_sample", "head", "query", "key"), "query_map": ("sample", "head", "patch"),
}


def dimension_names(name: str, ndim: int, *, rows: str = "samples", kind: str | None = None) -> tuple[str, ...]:
    """The Zarr v3 ``dimension_names`` of the store array at path ``name`` with ``ndim`` axes (see the module
    docstring, "Dimension names"): the fixed arrays and attention statistics by table, ``acts/<layer>`` by
    ``kind`` with every axis after ``sample`` qualified as ``<axis>:<layer>``, ``grams/<layer>`` (chunk, pair).
    Anything else (an extra array this table does not know, or a shape that does not match it) gets its first
    axis from ``rows`` and ``<leaf>_<i>`` for the others: unique, so xarray can still open its group."""
    parts = name.split("/")
    known: tuple[str, ...] | None = ARRAY_DIMENSIONS.get(name)
    if parts[0] == "acts" and len(parts) == 2 and kind in KIND_DIMENSIONS:
        # one group holds every layer and layers differ in size, while xarray needs one size per dimension name
        known = ("sample", *(f"{axis}:{parts[1]}" for axis in KIND_DIMENSIONS[kind]))
    elif parts[0] == "attn" and len(parts) == 3:
        known = ATTENTION_DIMENSIONS.get(parts[2])
    elif parts[0] == "grams" and len(parts) == 2:
        known = ("chunk", "pair")
    elif parts[0] == "progress" and parts[-1].startswith("shards_of_"):
        known = (parts[-1].replace("shards_of_", "shard_of_"),)  # shards_of_2 and shards_of_4 differ in size
    if known is not None and len(known) == ndim:
        return known
    return (ROW_DIMENSIONS.get(rows, "row"), *(f"{parts[-1]}_{i}" for i in range(1, ndim)))[:ndim]


def layer_kind(info: dict[str, Any], layer: str) -> str:
    """``tokens`` | ``map`` | ``vector`` of a layer from its attributes (:meth:`ActivationStore.layer_info`): the
    recorded ``kind``, else the one its per-sample shape implies ((T, D) tokens, (C, H, W) map, (D,) vector: the
    store format has no other layouts); UsageError for anything else."""
    kind = info.get("kind")
    if kind is None:
        ndim = len(tuple(info.get("shape", ())))
        kind = next((k for k, axes in KIND_DIMENSIONS.items() if len(axes) == ndim), None)
    if kind not in KIND_DIMENSIONS:
        raise UsageError(f"layer {layer!r} has unknown kind {info.get('kind')!r} (expected tokens, map or vector)")
    return kind


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


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``config`` (sorted keys, no whitespace)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def fingerprint_ids(ids: Sequence[str]) -> str:
    """sha256 hex of the ordered sample ids joined by newlines (utf-8)."""
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def is_url(path: str) -> bool:
    """An fsspec URL (``s3://``, ``gs://``, ``memory://``, ...) rather than a local path."""
    return "://" in str(path) and not str(path).startswith("file://")


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
    the one read interface of the CKA engine (:mod:`repsim.cka_engine`) and the probes (:mod:`probes.features`)."""

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


def shard_lock_name(shard: tuple[int, int] | None) -> str:
    """Writer-lock file name of one shard ``(k, N)`` of a store, or of an unsharded writer (None)."""
    return LOCK_NAME if shard is None else f".repsim-writer-shard-{shard[0]}-of-{shard[1]}.lock"


class WriterLock:
    """An exclusive lock file (by default inside the store): a second concurrent writer is refused.

    A lock left by a killed process on this host (its pid no longer alive) is taken over. ``name`` picks
    another lock file in ``folder`` (per-shard writers, store creation).
    """

    def __init__(self, folder: str, name: str = LOCK_NAME):
        self.path = os.path.join(folder, name)
        self.held = False

    def acquire(self, wait: float = 0.0) -> None:
        """Take the lock; with ``wait`` > 0, poll up to that many seconds while a live process holds it."""
        import time

        me = {"pid": os.getpid(), "host": socket.gethostname()}
        deadline = time.monotonic() + wait
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner and owner.get("host") == me["host"] and not _pid_alive(int(owner.get("pid", -1))):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)  # stale: its writer was killed
                    continue
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                who = f"pid {owner.get('pid')} on {owner.get('host')}" if owner else "another process"
                raise UsageError(
                    f"{os.path.dirname(self.path)} is being written by {who}; wait for it to finish "
                    f"(or delete {self.path} if that process is gone)"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return

    def holder_alive(self) -> bool:
        """Whether the lock file exists and names a live process (always True for another host's process)."""
        owner = self._owner()
        if owner is None:
            return os.path.exists(self.path)
        if owner.get("host") != socket.gethostname():
            return True
        return _pid_alive(int(owner.get("pid", -1)))

    def _owner(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.held = False


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
                compressors=_compressor(),
                fill_value=_fill(layer_dtype),
                dimension_names=dimension_names(f"acts/{spec.name}", 1 + len(spec.shape), kind=spec.attrs.get("kind")),
            )
            arr.attrs.update(spec.attrs)
        if input_shape is not None:
            group.create_array(
                "inputs/pixels",
                shape=(n, *input_shape),
                chunks=(chunk, *input_shape),
                dtype="float16",
                compressors=_compressor(),
                fill_value=_fill("float16"),
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
                compressors=_compressor(),
                fill_value=_fill(spec.dtype),
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


def chunk_digest(block: Any, dtype: Any) -> int:
    """CRC32C of the bytes of ``block`` as stored (C order, in ``dtype``): the per-chunk content digest."""
    import google_crc32c

    return int(google_crc32c.value(np.ascontiguousarray(np.asarray(block), dtype=dtype).tobytes()))


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
