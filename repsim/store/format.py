"""The on-disk format of an activation store: version, codecs, array dimension names, digests and hashes.

The specification itself is the docstring of :mod:`repsim.store`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from zarr.codecs import Crc32cCodec

from repsim.errors import UsageError

FORMAT_VERSION = 1
ATTR_KEY = "repsim"


FP16_MAX_ERROR = 1e-4  # largest float16 error η (share of a layer's variation) stored without promotion


def array_codecs() -> tuple[Crc32cCodec]:
    # No compression: float activations compress only 1.15-1.4x with any codec (Blosc lz4 / zstd, with or
    # without (bit)shuffle, on real ResNet maps), and on the 2-core machine zarr wrote 139 MB/s with lz4-1 +
    # CRC against 196 MB/s with the CRC alone (issue #14's note); the writer competes with the forward pass
    # on small machines and is the bottleneck on GPUs, and re-analysis reads fastest uncompressed.
    # The CRC32C of every chunk (hardware-accelerated, google-crc32c) makes a bit-flipped or truncated chunk
    # fail to decode instead of reading as plausible numbers (exchanged chunks: progress/chunk_digest).
    return (Crc32cCodec(),)


def fill_value_for(dtype: Any) -> Any:
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


def chunk_digest(block: Any, dtype: Any) -> int:
    """CRC32C of the bytes of ``block`` as stored (C order, in ``dtype``): the per-chunk content digest."""
    import google_crc32c

    return int(google_crc32c.value(np.ascontiguousarray(np.asarray(block), dtype=dtype).tobytes()))

