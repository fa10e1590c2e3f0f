"""The extraction loop: images → model → hooks → :class:`repsim.store.writer.StoreWriter`.

Two steps, so the CLI can show the plan (bytes per image, total, free disk) before any work:

    plan = plan_extraction(loaded_model, source, "vit.zarr", layers=None, pool="none")
    store = run_extraction(plan, progress=True)

Design points:

- The store is preallocated for n rows; rows are written in whole sample chunks by one background writer
  thread (the model never waits on disk; exactly one writer per chunk). ``chunk_size`` is a multiple of the
  batch size, so a resumed run forms exactly the same batches as an uninterrupted one and its arrays are
  bit-identical.
- A chunk's completion flag is set only after all its arrays are written; rerunning the same command on a
  killed store continues with the chunks not yet flagged. A store with another configuration (model,
  weights, preprocessing, samples, layers, pooling, dtype, batching, library versions) is refused unless
  ``overwrite``.
- Images are decoded and transformed by a thread pool one batch ahead of the forward pass.
- Each hooked output is pooled and cast to its stored dtype once, inside the hook (the cast is also the copy
  that protects it from in-place ops); non-finite values are refused with one read-only pass per layer.
- Float16 safety (``repsim.store`` "Precision"): the planning forward pass measures each layer's float16
  error η on the first images; a layer above ``FP16_MAX_ERROR`` is stored as float32. Every chunk measures η
  again on its first rows (``quality/fp16_error``); a float16 layer above the limit is reported at the end.
- ``grams=True`` (``--grams``) also stores, per layer and sample chunk, the packed U-centred Gram of the
  chunk's rows (:mod:`repsim.measures.gram`): minibatch CKA with the chunks as batches, without the activations
  (``acts=False``: Grams only, ~100x+ smaller for token layers). Chunks default to 256 rows then.
"""

from __future__ import annotations

import collections
import contextlib
import os
import platform
import queue
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

import repsim
from repsim.data.sources import CorruptImageError, ImageSource
from repsim.devices import resolve_device as _resolve_device
from repsim.devices import tf32_off
from repsim.errors import UsageError
from repsim.formatting import human_bytes  # re-exported: hooks.extract.loop.human_bytes stays importable
from repsim.measures.gram import MIN_UNBIASED, pack_triu, packed_size, unbiased_gram
from repsim.data.perturbations import Perturbation
from repsim.store.format import FORMAT_VERSION, FP16_MAX_ERROR, config_hash, fingerprint_ids, is_url
from repsim.store.locks import WriterLock, shard_lock_name
from repsim.store.reader import ActivationStore, is_store
from repsim.store.writer import ArraySpec, LayerSpec, StoreWriter, is_initialising, remove_store

from hooks.capture.attention import AttentionCapture, find_attention_layers, no_attention_reason
from hooks.capture.attention_reduce import AttentionReducer
from hooks.capture.activations import ActivationCapture, TapInfo, finite_or_raise
from hooks.capture.layers import default_layers, layer_layout, select_layers
from hooks.models.loaded import LoadedModel
from repsim.store.remote import remote_state, staging_path, upload_store

DTYPES = ("float16", "float32")
DEFAULT_CHUNK_ROWS = 64
DEFAULT_GRAM_ROWS = 256  # chunk (= Gram batch) rows with --grams: repsim cka's default minibatch size
PROBE_ROWS = 4  # images of the planning forward pass (fixes the taps, measures float16 error)
FP16_CHECK_ROWS = 8  # rows of each chunk on which the float16 error is measured again
QUALITY_ARRAY = "quality/fp16_error"


class SubsetSource:
    """A view of an :class:`ImageSource` keeping only ``keep`` (indices into its order)."""

    def __init__(self, source: ImageSource, keep: Sequence[int]):
        self._source = source
        self._keep = list(keep)
        self.name, self.root, self.classes = source.name, source.root, source.classes
        self.ids = [source.ids[i] for i in self._keep]
        self.labels = np.asarray(source.labels)[self._keep]

    def __len__(self) -> int:
        return len(self._keep)

    def load(self, i: int):
        return self._source.load(self._keep[i])

    @property
    def fingerprint(self) -> str:
        return fingerprint_ids(self.ids)

    def describe(self) -> dict[str, Any]:
        d = dict(self._source.describe())
        d.update(n=len(self.ids), fingerprint=self.fingerprint)
        return d


def scan_images(
    source: ImageSource, *, strict: bool, progress: bool = False
) -> tuple[ImageSource, list[dict[str, str]]]:
    """Decode every image of a file-based source once; drop corrupt ones (or fail under ``strict``).

    Returns the (possibly reduced) source and the skipped samples as ``[{"id", "error"}]``. Generated and
    array sources (shapes, digits, npz) cannot hold corrupt images and are returned as they are.
    """
    if source.name not in ("imagefolder", "folder"):
        return source, []
    from tqdm.auto import tqdm

    def check(i: int) -> str | None:
        try:
            source.load(i)
        except CorruptImageError as err:
            return str(err)
        return None

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        errors = list(
            tqdm(pool.map(check, range(len(source))), total=len(source), desc="checking images",
                 unit="img", disable=not progress, leave=False)
        )
    bad = [i for i, e in enumerate(errors) if e is not None]
    if not bad:
        return source, []
    if strict:
        raise UsageError(f"corrupt image (--strict): {errors[bad[0]]}")
    skipped = [{"id": source.ids[i], "error": str(errors[i])} for i in bad]
    for s in skipped:
        warnings.warn(f"skipping corrupt image {s['id']}: {s['error']}", stacklevel=2)
    keep = [i for i in range(len(source)) if errors[i] is None]
    if not keep:
        raise UsageError("every image of the data set is unreadable")
    return SubsetSource(source, keep), skipped


@dataclass
class ExtractionPlan:
    """Everything decided before the first chunk is written (see :func:`plan_extraction`)."""

    out: str
    model: LoadedModel
    source: ImageSource
    paths: list[str]  # module paths hooked
    taps: list[TapInfo]  # stored arrays (a module called twice gives two taps)
    attrs: dict[str, Any]  # root attributes to write
    dtype: str
    batch_size: int
    chunk_size: int
    pool: str
    spatial_pool: int | None
    save_inputs: bool
    resume: bool  # an existing store with the same configuration continues
    already_complete: bool
    bytes_per_image: int
    skipped: list[dict[str, str]] = field(default_factory=list)
    attention_layers: list[Any] = field(default_factory=list)  # hooks.capture.attention.AttentionLayer
    attn_keep: int = 0
    extra_bytes: int = 0  # arrays not proportional to n (kept attention maps)
    shard: tuple[int, int] | None = None  # (k, N): this process writes the k-th of N chunk ranges
    remote: str | None = None  # an fsspec URL: ``out`` is then its local staging store, uploaded when complete
    grams: bool = False  # also store each chunk's packed U-centred Gram per layer
    acts: bool = True  # store the activations (False: Grams only)
    layer_dtypes: dict[str, str] = field(default_factory=dict)  # stored dtype per tap
    fp16_probe: dict[str, float] = field(default_factory=dict)  # float16 error η per tap at planning
    perturbation: Perturbation | None = None  # applied to every preprocessed batch (``--perturb``)

    @property
    def measure_fp16(self) -> bool:
        """Whether chunks measure float16 error (some layer is stored as float16)."""
        return self.acts and "float16" in self.layer_dtypes.values()

    def path_dtypes(self) -> dict[str, torch.dtype]:
        """Capture dtype per hooked module path: the stored dtype, float32 without activations."""
        out: dict[str, torch.dtype] = {}
        for t in self.taps:
            dt = torch.float16 if self.acts and self.layer_dtypes[t.name] == "float16" else torch.float32
            out[t.module] = torch.float32 if out.get(t.module) == torch.float32 else dt
        return out

    def extra_specs(self) -> list[ArraySpec]:
        """Gram and float16-quality arrays written with every chunk (besides attention statistics)."""
        specs = []
        if self.grams:
            specs += [ArraySpec(f"grams/{t.name}", (packed_size(self.chunk_size),), "float32", rows="chunks")
                      for t in self.taps]
        if self.measure_fp16:
            specs.append(ArraySpec(QUALITY_ARRAY, (len(self.taps),), "float32", rows="chunks"))
        return specs

    def shard_chunks(self) -> range:
        """The sample chunks this run writes: all, or the k-th of N contiguous, disjoint chunk ranges."""
        n_chunks = -(-self.n // self.chunk_size)
        if self.shard is None:
            return range(n_chunks)
        k, total = self.shard
        return range(k * n_chunks // total, (k + 1) * n_chunks // total)

    @property
    def n(self) -> int:
        return len(self.source)

    @property
    def total_bytes(self) -> int:
        """Uncompressed size of every array (an upper bound on the disk use)."""
        return self.bytes_per_image * self.n + self.extra_bytes

    def free_bytes(self) -> int:
        parent = os.path.dirname(os.path.abspath(self.out)) or "."
        return shutil.disk_usage(parent).free

    def check_disk(self, force: bool = False) -> None:
        """Refuse a new store whose uncompressed size exceeds the free disk, unless ``force``."""
        if self.resume or force:
            return
        if self.total_bytes > self.free_bytes():
            raise UsageError(
                f"the store needs up to {human_bytes(self.total_bytes)} but only {human_bytes(self.free_bytes())} is free "
                "next to it: use --pool / --spatial-pool / fewer --layers, or --force (compression usually saves 10-40%)"
            )


def library_versions() -> dict[str, str]:
    import timm
    import zarr

    return {
        "python": platform.python_version(),
        "repsim": repsim.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
    }


def _load_batch(source: ImageSource, transform: Callable, indices: range,
                perturbation: Perturbation | None = None) -> torch.Tensor:
    """Preprocessed inputs (B, 3, H, W) of samples ``indices``, perturbed by sample id when asked (``--perturb``)."""
    x = torch.stack([transform(source.load(i)) for i in indices])
    return x if perturbation is None else perturbation.apply(x, [source.ids[i] for i in indices])


def plan_extraction(
    model: LoadedModel,
    source: ImageSource,
    out: str,
    *,
    layers: Sequence[str] | None = None,
    pool: str = "none",
    spatial_pool: int | None = None,
    dtype: str = "float16",
    batch_size: int = 32,
    chunk_size: int | None = None,
    save_inputs: bool = False,
    attention: bool = False,
    attn_keep: int = 0,
    overwrite: bool = False,
    strict: bool = False,
    progress: bool = False,
    shard: tuple[int, int] | None = None,
    grams: bool = False,
    acts: bool = True,
    perturbation: Perturbation | None = None,
) -> ExtractionPlan:
    """Resolve layers, probe output shapes with one small forward pass, and compare with any existing store.

    ``layers`` are module paths or glob patterns (None → the family's default preset). ``chunk_size`` (rows
    per chunk) defaults to the multiple of ``batch_size`` nearest 64 (256 with ``grams``) and must be a multiple
    of it. ``grams``: also store each chunk's U-centred Gram per layer (the chunk is the Gram batch);
    ``acts=False``: store only the Grams. A float16 layer whose storage error η exceeds ``FP16_MAX_ERROR``
    on the planning images is stored as float32 (see :mod:`repsim.store`, "Precision").
    ``attention``: also capture every attention layer's probabilities (fused kernels switched off for the
    capture) and store per image × head statistics (see :mod:`hooks.capture.attention_reduce`); ``attn_keep``: keep
    the full maps of the first ``attn_keep`` images. ``shard=(k, N)``: this run writes only the k-th of N
    contiguous chunk ranges (independent processes or machines share one store; the first to arrive
    creates it, the last to finish marks it complete). ``perturbation`` (:mod:`repsim.data.perturbations`) is applied
    to every preprocessed batch, seeded by sample id; it is recorded in the root attribute ``perturbation`` and
    in ``config_hash`` while the store keeps the clean data set's sample ids and fingerprint.
    """
    _check_storage_options(dtype, batch_size, acts, grams)
    chunk_size = _chunk_rows(chunk_size, batch_size, grams)
    out, remote = _local_output(out, shard)
    _check_shard_options(shard, overwrite)
    module, info = model.module, model.info
    if perturbation is not None:
        perturbation.check_image(model.preprocessing.img_size)
    paths = select_layers(module, layers) if layers else default_layers(module, info.family)
    layouts = {p: layer_layout(info.family, p, module) for p in paths}
    source, skipped = _readable_source(source, strict, progress)

    # Probe: one forward pass on a few real images fixes the taps (names, kinds, shapes, call counts) and
    # measures each layer's float16 storage error.
    probe, capture = _planning_capture(model, source, paths, layouts, pool, spatial_pool, perturbation)
    attn_layers, reducer = _attention_plan(model, attention, attn_keep)
    taps = _run_probe(module, probe, capture, reducer)
    fp16_probe = _fp16_errors(capture, taps)
    layer_dtypes = _stored_dtypes(taps, fp16_probe, dtype)
    if save_inputs:
        _refuse_inputs_beyond_float16(model.preprocessing, probe)
    bytes_per_image, extra_bytes = _storage_bytes(taps, layer_dtypes, probe, reducer, len(source), chunk_size,
                                                  acts=acts, grams=grams, save_inputs=save_inputs)

    extraction = {
        "pool": pool,
        "spatial_pool": spatial_pool,
        "dtype": dtype,
        "batch_size": batch_size,
        "chunk_size": chunk_size,
        "layers_requested": list(layers) if layers else None,
        "save_inputs": save_inputs,
        "attention": bool(attention),
        "attn_keep": int(attn_keep),
        "grams": bool(grams),
        "acts": bool(acts),
        "float32_layers": [t.name for t in taps if acts and dtype == "float16" and layer_dtypes[t.name] == "float32"],
    }
    attrs = _store_attrs(model, source, skipped, taps, extraction, reducer, perturbation)
    if grams:
        attrs["grams"] = _gram_attrs(len(source), chunk_size, dtype, acts)

    _check_shard_count(shard, len(source), chunk_size)
    out, resume, already_complete = _prepare_output(out, remote, attrs, overwrite)
    return ExtractionPlan(
        out=out, remote=remote, model=model, source=source, paths=paths, taps=taps, attrs=attrs, dtype=dtype,
        batch_size=batch_size, chunk_size=chunk_size, pool=pool, spatial_pool=spatial_pool,
        save_inputs=save_inputs, resume=resume, already_complete=already_complete,
        bytes_per_image=bytes_per_image, skipped=skipped, attention_layers=attn_layers, attn_keep=attn_keep,
        extra_bytes=extra_bytes, shard=shard, grams=grams, acts=acts, layer_dtypes=layer_dtypes,
        fp16_probe=fp16_probe, perturbation=perturbation,
    )


def _check_storage_options(dtype: str, batch_size: int, acts: bool, grams: bool) -> None:
    """Refuse an unknown storage dtype, a batch size < 1, and a run that would keep nothing (no activations,
    no Grams)."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if not acts and not grams:
        raise UsageError("--no-acts keeps nothing without --grams: add --grams (Gram matrices only)")


def _chunk_rows(chunk_size: int | None, batch_size: int, grams: bool) -> int:
    """Rows per sample chunk: ``chunk_size`` checked, or by default the multiple of ``batch_size`` nearest
    ``DEFAULT_CHUNK_ROWS`` (``DEFAULT_GRAM_ROWS`` with ``grams``). A chunk is a whole number of batches, so a
    resumed run forms the same batches; with ``grams`` it is the Gram batch and needs ``MIN_UNBIASED`` rows."""
    if chunk_size is None:
        target = DEFAULT_GRAM_ROWS if grams else DEFAULT_CHUNK_ROWS
        chunk_size = batch_size * max(1, round(target / batch_size))
    if grams and chunk_size < MIN_UNBIASED:
        raise UsageError(f"--grams: the chunk (the Gram batch) must hold at least {MIN_UNBIASED} rows, "
                         f"got --chunk-size {chunk_size}")
    if chunk_size < 1 or chunk_size % batch_size:
        raise UsageError(f"--chunk-size ({chunk_size}) must be a positive multiple of --batch-size ({batch_size})")
    return chunk_size


def _local_output(out: str, shard: tuple[int, int] | None) -> tuple[str, str | None]:
    """(local store path, fsspec URL or None): a URL ``out`` is written to its local staging store (its folder
    created) and uploaded when complete (:mod:`repsim.store.remote`); shards need a shared file-system path."""
    if not is_url(out):
        return out, None
    if shard is not None:
        raise UsageError(f"--out {out}: sharded extraction needs a shared file-system path (shards coordinate "
                         "through lock files next to the store); extract there, then copy the store")
    local = staging_path(out)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    return local, out


def _check_shard_options(shard: tuple[int, int] | None, overwrite: bool) -> None:
    """Refuse a shard ``(k, N)`` outside ``0 <= k < N``, and ``overwrite`` with shards (others may be writing)."""
    if shard is None:
        return
    k, total = shard
    if total < 1 or not 0 <= k < total:
        raise UsageError(f"--shard must be k/N with 0 <= k < N, got {k}/{total}")
    if overwrite:
        raise UsageError("--overwrite cannot be combined with --shard (other shards may be writing)")


def _readable_source(source: ImageSource, strict: bool, progress: bool) -> tuple[ImageSource, list[dict[str, str]]]:
    """The source without its corrupt images, and those skipped (see :func:`scan_images`); refuses an empty one."""
    source, skipped = scan_images(source, strict=strict, progress=progress)
    if len(source) == 0:
        raise UsageError("the data set is empty")
    return source, skipped


def _planning_capture(model: LoadedModel, source: ImageSource, paths: list[str], layouts: dict[str, Any], pool: str,
                      spatial_pool: int | None, perturbation: Perturbation | None
                      ) -> tuple[torch.Tensor, ActivationCapture]:
    """(probe inputs (B, 3, H, W) of the first ``PROBE_ROWS`` samples, preprocessed and perturbed as in the run;
    the activation capture of ``paths``, set to measure the float16 error on that batch)."""
    info = model.info
    transform = model.preprocessing.transform()
    probe = _load_batch(source, transform, range(min(PROBE_ROWS, len(source))), perturbation)
    capture = ActivationCapture(
        model.module, paths, layouts=layouts, num_prefix_tokens=info.num_prefix_tokens, grid=info.grid,
        pool=pool, spatial_pool=spatial_pool,
    )
    capture.measure_next(len(probe))
    return probe, capture


def _attention_plan(model: LoadedModel, attention: bool, attn_keep: int) -> tuple[list[Any], AttentionReducer | None]:
    """(attention layers, their reducer) with ``attention``, else ([], None); refuses a model without attention
    layers, a layer whose token geometry is unknown, and ``attn_keep`` without ``attention``."""
    if not attention:
        if attn_keep:
            raise UsageError("--attn-keep needs --attention")
        return [], None
    module = model.module
    attn_layers = find_attention_layers(module)
    if not attn_layers:
        raise UsageError(f"{no_attention_reason(module, model.info.name)}: drop --attention (`repsim attention "
                         "STORE --erf` gives a convolutional network's effective receptive fields)")
    unknown = [ly.path for ly in attn_layers if ly.grid is None or ly.num_heads is None or ly.patch_size is None]
    if unknown:
        raise UsageError(f"the token geometry of attention layer {unknown[0]} cannot be read from the model "
                         "(an nn.MultiheadAttention?): declare it with --grid GHxGW --prefix-tokens K --patch-size P "
                         "or a `repsim_geometry` attribute on the model (see hooks/models/geometry.py)")
    return attn_layers, AttentionReducer(attn_layers, attn_keep)


def _run_probe(module: torch.nn.Module, probe: torch.Tensor, capture: ActivationCapture,
               reducer: AttentionReducer | None) -> list[TapInfo]:
    """Run the planning forward pass on ``probe``; the taps it fixes (names, kinds, shapes, call counts). The
    attention capture runs too, proving the capture and the geometry; its numbers are dropped."""
    with capture, _attention_capture(module, reducer), torch.inference_mode():
        if reducer is not None:
            reducer.begin_batch(range(len(probe)))
        module(probe)
        capture.pop()
        if reducer is not None:
            reducer.pop_chunk()
    return capture.taps or []


def _stored_dtypes(taps: Sequence[TapInfo], fp16_probe: dict[str, float], dtype: str) -> dict[str, str]:
    """Stored dtype per tap: ``dtype``, except float32 for a layer whose float16 error η on the probe exceeds
    ``FP16_MAX_ERROR`` (see :mod:`repsim.store`, "Precision")."""
    return {t.name: ("float32" if dtype == "float32" or fp16_probe[t.name] > FP16_MAX_ERROR else "float16")
            for t in taps}


def _storage_bytes(taps: Sequence[TapInfo], layer_dtypes: dict[str, str], probe: torch.Tensor,
                   reducer: AttentionReducer | None, n: int, chunk_size: int, *, acts: bool, grams: bool,
                   save_inputs: bool) -> tuple[int, int]:
    """(bytes per image, bytes not proportional to n) of the store: activations at their stored dtypes,
    packed float32 Grams (one per layer and chunk, spread over its rows), float16 inputs, attention
    statistics; the second number is the full attention maps kept for the first images."""
    bytes_per_image = sum(int(np.prod(t.shape)) * np.dtype(layer_dtypes[t.name]).itemsize for t in taps) if acts else 0
    if grams:
        bytes_per_image += len(taps) * packed_size(chunk_size) * 4 // chunk_size
    if save_inputs:
        bytes_per_image += int(np.prod(probe.shape[1:])) * 2
    extra_bytes = 0
    if reducer is not None:
        bytes_per_image += reducer.bytes_per_image()
        extra_bytes = sum(int(np.prod(sp.shape)) * np.dtype(sp.dtype).itemsize * min(sp.first_rows, n)
                          for sp in reducer.specs() if sp.rows == "first")
    return bytes_per_image, extra_bytes


def _store_attrs(model: LoadedModel, source: ImageSource, skipped: list[dict[str, str]], taps: Sequence[TapInfo],
                 extraction: dict[str, Any], reducer: AttentionReducer | None, perturbation: Perturbation | None
                 ) -> dict[str, Any]:
    """The store's root attributes, with ``config_hash``: the hash of what determines the stored numbers (model,
    data set, preprocessing, extraction settings, taps, torch / timm versions, a perturbation when set)."""
    info = model.info
    dataset = source.describe()
    dataset.update(n=len(source), fingerprint=source.fingerprint, skipped=skipped)
    config = {
        "model": info.to_dict(),
        "dataset": dataset,
        "preprocessing": model.preprocessing.to_dict(),
        "extraction": extraction,
        "taps": [t.attrs() | {"name": t.name} for t in taps],
        "libraries": {k: v for k, v in library_versions().items() if k in ("torch", "timm")},
    }
    if perturbation is not None:  # only when set: clean stores keep the config_hash they always had
        config["perturbation"] = perturbation.to_dict()
    attrs = {
        "format_version": FORMAT_VERSION,
        "repsim_version": repsim.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": config["model"],
        "dataset": dataset,
        "preprocessing": config["preprocessing"],
        "extraction": extraction,
        "layers": [t.name for t in taps],
        "config_hash": config_hash(config),
        "libraries": library_versions(),
    }
    if reducer is not None:
        attrs["attention"] = reducer.attrs()
    if perturbation is not None:
        attrs["perturbation"] = perturbation.to_dict()
    return attrs


def _gram_attrs(n: int, chunk_size: int, dtype: str, acts: bool) -> dict[str, Any]:
    """The ``grams`` root attribute: one Gram per chunk of ``chunk_size`` rows; a last chunk shorter than
    ``MIN_UNBIASED`` rows has no unbiased Gram, so its rows are not used."""
    last = n % chunk_size
    return {"batch_rows": chunk_size, "dtype": "float32", "tokens": "flatten",
            "source_dtype": dtype if acts else "float32",
            "rows_used": n - (last if 0 < last < MIN_UNBIASED else 0)}


def _check_shard_count(shard: tuple[int, int] | None, n: int, chunk_size: int) -> None:
    """Refuse more shards than the ceil(n / chunk_size) sample chunks (a shard writes whole chunks)."""
    n_chunks = -(-n // chunk_size)
    if shard is not None and shard[1] > n_chunks:
        raise UsageError(f"--shard {shard[0]}/{shard[1]}: more shards than the {n_chunks} "
                         "sample chunks; use fewer shards or a smaller --chunk-size")


def _prepare_output(out: str, remote: str | None, attrs: dict[str, Any], overwrite: bool) -> tuple[str, bool, bool]:
    """(output path, resume, already complete): under ``overwrite`` the store at ``out`` is deleted first (never
    while another process writes it); an existing store with the same configuration resumes, another one or a
    non-store path is refused. For a URL what counts is the uploaded store: when it is complete the path is the
    URL itself."""
    with _creation_lock(out):  # never look at a store another process is laying out
        if overwrite and os.path.exists(out):
            if is_store(out):
                # the writer lock too: never delete a store another process is still writing (refused, one line)
                _acquire_writer_lock(out, None)
            remove_store(out)
        resume, already_complete = _existing_store_state(out, attrs)
    if remote is not None:
        # what counts is the URL: a staged store that is complete but not yet uploaded still has work to do
        already_complete = remote_state(remote, attrs, overwrite)
        if already_complete:
            out = remote
    return out, resume, already_complete


def _refuse_inputs_beyond_float16(prep: Any, probe: torch.Tensor) -> None:
    """``--save-inputs`` stores float16: refuse a normalisation whose inputs can overflow it (inf) instead."""
    mean, std = np.asarray(prep.mean, dtype=np.float64), np.asarray(prep.std, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = float(np.max(np.maximum(np.abs(mean), np.abs(1.0 - mean)) / np.abs(std)))
    seen = float(probe.abs().max()) if probe.numel() else 0.0
    if not (np.isfinite(bound) and max(bound, seen) <= 65504.0):
        raise UsageError(f"--save-inputs stores the model inputs as float16, but with mean {list(prep.mean)} and std "
                         f"{list(prep.std)} they reach {max(bound, seen):.3g}, beyond float16's 65504 (they would be "
                         "stored as inf): check --mean/--std, or extract without --save-inputs")


def _fp16_errors(capture: ActivationCapture, taps: Sequence[TapInfo]) -> dict[str, float]:
    """Float16 error η per tap from the capture's last measured forward pass (0 where nothing varies)."""
    out = {}
    for t in taps:
        stats = capture.quant_error.get(t.module) or []
        err, spread = stats[t.call_index or 0] if len(stats) > (t.call_index or 0) else (0.0, 0.0)
        out[t.name] = float(err / spread) if spread > 0 else (0.0 if err == 0 else float("inf"))
    for stats in capture.quant_error.values():
        stats.clear()
    return out


@contextlib.contextmanager
def _creation_lock(out: str):
    """Serialises store creation and the checks of an existing store between concurrent (shard) processes."""
    folder = os.path.dirname(os.path.abspath(out)) or "."
    lock = WriterLock(folder, f".{os.path.basename(os.path.abspath(out))}.creating.lock")
    lock.acquire(wait=600.0)
    try:
        yield
    finally:
        lock.release()


def _existing_store_state(out: str, attrs: dict[str, Any]) -> tuple[bool, bool]:
    """(resume, already_complete) for ``out``; refuses another configuration or a non-store path."""
    resume = already_complete = False
    if os.path.exists(out):
        if is_store(out) and is_initialising(out):
            pass  # an interrupted creation: recreated (under the creation lock) when the run starts
        elif not is_store(out):
            if os.path.isdir(out) and not os.listdir(out):
                pass  # an empty directory is fine
            else:
                raise UsageError(f"{out} exists and is not a repsim store: choose another --out")
        else:
            existing = ActivationStore(out).attrs
            if existing.get("config_hash") != attrs["config_hash"]:
                diff = _config_difference(existing, attrs)
                raise UsageError(
                    f"{out} holds an extraction with another configuration ({diff}): "
                    "use --overwrite to replace it, or another --out"
                )
            resume, already_complete = True, bool(existing.get("complete"))
    return resume, already_complete


def create_or_open_store(plan: ExtractionPlan) -> StoreWriter:
    """Open the store for writing, creating it if needed: concurrent shard processes serialise on a
    creation lock next to it, and the later ones reopen what the first created (same configuration)."""
    with _creation_lock(plan.out):
        if is_store(plan.out) and not is_initialising(plan.out):
            existing = ActivationStore(plan.out).attrs
            if existing.get("config_hash") != plan.attrs["config_hash"]:
                raise UsageError(f"{plan.out} was created by another process with another configuration "
                                 f"({_config_difference(existing, plan.attrs)})")
            return StoreWriter.reopen(plan.out)
        if os.path.exists(plan.out) and (is_store(plan.out) or os.listdir(plan.out)):
            remove_store(plan.out)  # an interrupted creation (remove_store refuses non-stores)
        model, source = plan.model, plan.source
        input_shape = (3, *model.preprocessing.img_size) if plan.save_inputs else None
        specs = [LayerSpec(t.name, t.shape, t.attrs() | {"fp16_error": _json_float(plan.fp16_probe.get(t.name, 0.0))},
                           dtype=plan.layer_dtypes.get(t.name)) for t in plan.taps]
        extra_specs = AttentionReducer(plan.attention_layers, plan.attn_keep).specs() if plan.attention_layers else []
        return StoreWriter.create(
            plan.out, plan.attrs, specs, source.ids, source.labels, dtype=plan.dtype, input_shape=input_shape,
            extra=[*extra_specs, *plan.extra_specs()], acts=plan.acts,
        )


def _json_float(v: float) -> float | str:
    """A float for JSON attributes (inf becomes the string "inf": JSON has no infinity)."""
    return v if np.isfinite(v) else "inf"


def _acquire_writer_lock(out: str, shard: tuple[int, int] | None) -> WriterLock:
    """This run's writer lock; refuses when a live writer holds an overlapping part of the store (the whole
    store, the same shard, or a shard of another split k/M)."""
    lock = WriterLock(out, shard_lock_name(shard))
    lock.acquire()
    for name in os.listdir(out):
        if not name.startswith(".repsim-writer") or name == shard_lock_name(shard):
            continue
        other = WriterLock(out, name)
        same_split = shard is not None and name.endswith(f"-of-{shard[1]}.lock")
        if not same_split and other.holder_alive():
            lock.release()
            raise UsageError(f"{out} is being written by another writer ({name.strip('.')}); shards of one split "
                             "k/N may run together, nothing else may")
    return lock


def _attention_capture(module: torch.nn.Module, reducer: AttentionReducer | None):
    """An AttentionCapture feeding ``reducer`` (nothing when attention is not extracted)."""
    if reducer is None:
        return contextlib.nullcontext()
    return AttentionCapture(module, layers=list(reducer.layers), callback=reducer)


def _config_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    for key in ("model", "dataset", "preprocessing", "extraction", "layers", "perturbation"):
        if old.get(key) != new.get(key):
            if key == "dataset" and old.get(key, {}).get("fingerprint") != new[key].get("fingerprint"):
                return "different samples"
            return f"different {key}"
    return "different library versions"


class _BackgroundWriter:
    """One thread that converts, writes and flags whole chunks, so the forward pass never waits on disk."""

    def __init__(self, writer: StoreWriter, depth: int = 2):
        self._writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="repsim-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain after a failure
            index, acts, inputs, extra = item
            try:  # acts arrive in their stored dtypes (cast in the hooks)
                self._writer.write_chunk(index, acts, None if inputs is None else inputs.astype(np.float16), extra)
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                self._error = err

    def put(self, index: int, acts: dict[str, np.ndarray], inputs: np.ndarray | None,
            extra: dict[str, np.ndarray] | None = None) -> None:
        self._raise()
        self._queue.put((index, acts, inputs, extra))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


def _chunk_grams(buffers: dict[str, np.ndarray], chunk: int, chunk_size: int, dev: torch.device,
                 out: str) -> dict[str, np.ndarray]:
    """Packed U-centred Gram (float32, :func:`repsim.measures.gram.pack_triu`) of every layer's rows of one chunk, computed
    on ``dev`` from exactly the values the store holds; all zeros for a last chunk of fewer than 4 rows."""
    grams = {}
    with tf32_off():
        for name, rows in buffers.items():
            m = rows.shape[0]
            packed = np.zeros(packed_size(chunk_size), dtype=np.float32)
            if m >= MIN_UNBIASED:
                g = unbiased_gram(torch.from_numpy(rows).to(dev), what=f"layer {name!r} of {out}, chunk {chunk}")
                packed[: packed_size(m)] = pack_triu(g, m).to(torch.float32).cpu().numpy()
            grams[f"grams/{name}"] = packed
    return grams


def _warn_fp16_damage(plan: ExtractionPlan) -> None:
    """Warn (once the store is complete) about float16 layers whose measured error exceeded the limit."""
    if not plan.measure_fp16:
        return
    errors = ActivationStore(plan.out).fp16_errors()
    bad = {k: v for k, v in errors.items() if plan.layer_dtypes.get(k) == "float16" and not v <= FP16_MAX_ERROR}
    if bad:
        worst = max(bad, key=lambda k: bad[k])
        warnings.warn(
            f"float16 storage lost more than {FP16_MAX_ERROR:g} of the variation of {len(bad)} layer(s) on some "
            f"chunks (worst {worst!r}: {bad[worst]:.3g}) although the planning images were fine: `repsim verify` "
            "reports them; re-extract with --dtype float32 for exact numbers", stacklevel=2)


def _pending_batches(plan: ExtractionPlan, writer: StoreWriter) -> list[tuple[int, range]]:
    """``(chunk, rows)`` of every batch still to extract: the not yet completed chunks of this process's shard, each
    cut into batches of ``plan.batch_size`` rows (a chunk's last batch may be shorter)."""
    mine = set(plan.shard_chunks())
    todo = [int(i) for i in np.flatnonzero(~writer.chunks_done()) if int(i) in mine]
    return [
        (c, range(lo, min(lo + plan.batch_size, writer.chunk_rows(c).stop)))
        for c in todo
        for lo in range(writer.chunk_rows(c).start, writer.chunk_rows(c).stop, plan.batch_size)
    ]


def _activation_capture(plan: ExtractionPlan, module: torch.nn.Module) -> ActivationCapture:
    """The capture of the planned layers of ``module``, pooled and converted to the stored dtypes."""
    info = plan.model.info
    return ActivationCapture(
        module, plan.paths, layouts={p: layer_layout(info.family, p, module) for p in plan.paths},
        num_prefix_tokens=info.num_prefix_tokens, grid=info.grid, pool=plan.pool, spatial_pool=plan.spatial_pool,
        dtype=plan.path_dtypes(),
    )


def _forward_batch(module: torch.nn.Module, capture: ActivationCapture, x: torch.Tensor, dev: torch.device,
                   expected: list[str]) -> dict[str, torch.Tensor]:
    """Run ``module`` on the batch ``x`` (B, 3, H, W) and return the captured activations by layer name, refusing a
    model whose captured layers are no longer ``expected`` (the planned names, in order)."""
    module(x.to(dev, non_blocking=True))
    acts = capture.pop()
    if list(acts) != expected:
        raise UsageError("the model's layers changed since the store was planned")
    return acts


def _chunk_quality(plan: ExtractionPlan, capture: ActivationCapture) -> np.ndarray:
    """float32 (n_layers,): the measured float16 error of each float16 layer on the first rows of a chunk (0 for
    layers stored as float32), in the order of ``plan.taps``; the row of the store's quality array."""
    eta = _fp16_errors(capture, plan.taps)
    return np.array([eta[t.name] if plan.layer_dtypes[t.name] == "float16" else 0.0 for t in plan.taps],
                    dtype=np.float32)


def _check_finite(plan: ExtractionPlan, acts: dict[str, torch.Tensor], buffer_dtypes: dict[str, str]) -> None:
    """Refuse NaN / Inf in activations that are stored (Gram-only: they show on the Gram's diagonal, and
    unbiased_gram raises)."""
    if not plan.acts:
        return
    for name, t in acts.items():
        finite_or_raise(name, t, buffer_dtypes[name])


def _fill_chunk_buffers(plan: ExtractionPlan, buffers: dict[str, np.ndarray] | None, acts: dict[str, torch.Tensor],
                        rows: range, crow: range, buffer_dtypes: dict[str, str]) -> dict[str, np.ndarray]:
    """Copy one batch's activations (rows ``rows`` of the chunk of rows ``crow``) into the chunk's buffers, one
    array (chunk rows, *layer shape) per layer in the stored dtype, allocated at the chunk's first batch; returns
    the buffers. A batch that is the whole chunk is its own buffer (no copy)."""
    if len(rows) == crow.stop - crow.start:
        return {name: t.numpy() for name, t in acts.items()}
    if buffers is None:
        buffers = {t.name: np.empty((crow.stop - crow.start, *t.shape), dtype=buffer_dtypes[t.name])
                   for t in plan.taps}
    offset = rows.start - crow.start
    for name, t in acts.items():
        buffers[name][offset:offset + len(rows)] = t.numpy()
    return buffers


def _chunk_extra_arrays(plan: ExtractionPlan, reducer: AttentionReducer | None, buffers: dict[str, np.ndarray],
                        chunk: int, dev: torch.device, quality: np.ndarray | None) -> dict[str, np.ndarray]:
    """The extra arrays of a finished chunk: its attention statistics, packed Grams and float16 quality row, as
    the plan asks."""
    extra = {} if reducer is None else reducer.pop_chunk()
    if plan.grams:
        extra.update(_chunk_grams(buffers, chunk, plan.chunk_size, dev, plan.out))
    if plan.measure_fp16:
        extra[QUALITY_ARRAY] = quality
    return extra


def _prefetched(loader: ThreadPoolExecutor, plan: ExtractionPlan,
                batches: list[tuple[int, range]]) -> Iterator[tuple[int, range, torch.Tensor]]:
    """``(chunk, rows, x)`` for every batch in order, ``x`` the preprocessed (and perturbed) inputs (B, 3, H, W);
    ``loader`` loads the next two batches while the caller works on this one."""
    source, transform = plan.source, plan.model.preprocessing.transform()
    futures = collections.deque(loader.submit(_load_batch, source, transform, r, plan.perturbation)
                                for _, r in batches[:2])
    for k, (chunk, rows) in enumerate(batches):
        x = futures.popleft().result()  # the batch's future is released here
        if k + 2 < len(batches):
            futures.append(loader.submit(_load_batch, source, transform, batches[k + 2][1], plan.perturbation))
        yield chunk, rows, x


def _put_chunk(plan: ExtractionPlan, background: _BackgroundWriter, chunk: int, buffers: dict[str, np.ndarray],
               inputs: list[np.ndarray], extra: dict[str, np.ndarray]) -> None:
    """Queue a finished chunk for writing: its activations (none for a Gram-only store), its inputs (B, 3, H, W)
    when they are saved, and its extra arrays."""
    background.put(
        chunk,
        buffers if plan.acts else {},
        np.concatenate(inputs) if plan.save_inputs else None,
        extra,
    )


def _extract_batches(plan: ExtractionPlan, writer: StoreWriter, module: torch.nn.Module, dev: torch.device,
                     batches: list[tuple[int, range]], progress: bool) -> None:
    """Forward every batch of ``batches`` (two loaded ahead on threads) and hand each finished chunk to a
    background writer; returns when all of them are on disk."""
    from tqdm.auto import tqdm

    capture = _activation_capture(plan, module)
    reducer = AttentionReducer(plan.attention_layers, plan.attn_keep) if plan.attention_layers else None
    background = _BackgroundWriter(writer)
    buffer_dtypes = {t.name: str(plan.path_dtypes()[t.module]).replace("torch.", "") for t in plan.taps}
    expected = [t.name for t in plan.taps]
    bar = tqdm(total=sum(len(r) for _, r in batches), desc=f"extract {plan.model.info.name}", unit="img",
               disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=2) as loader, capture, _attention_capture(module, reducer), \
            torch.inference_mode():
        # one buffer per layer and chunk, in the stored dtype: each batch is converted once, in place
        buffers: dict[str, np.ndarray] | None = None
        inputs: list[np.ndarray] = []
        quality: np.ndarray | None = None
        for chunk, rows, x in _prefetched(loader, plan, batches):
            if reducer is not None:
                reducer.begin_batch(rows)
            crow = writer.chunk_rows(chunk)
            measure = plan.measure_fp16 and rows.start == crow.start  # the first batch of a chunk
            if measure:
                capture.measure_next(FP16_CHECK_ROWS)
            acts = _forward_batch(module, capture, x, dev, expected)
            if measure:
                quality = _chunk_quality(plan, capture)
            _check_finite(plan, acts, buffer_dtypes)
            buffers = _fill_chunk_buffers(plan, buffers, acts, rows, crow, buffer_dtypes)
            if plan.save_inputs:
                inputs.append(x.numpy())
            bar.update(len(rows))
            if rows.stop == crow.stop:
                _put_chunk(plan, background, chunk, buffers, inputs,
                           _chunk_extra_arrays(plan, reducer, buffers, chunk, dev, quality))
                buffers, inputs = None, []
    background.close()
    bar.close()


def _finish_store(plan: ExtractionPlan, writer: StoreWriter, t_start: float) -> None:
    """After the batches: record this shard once all its chunks are done, and mark the store complete (after
    warning about float16 damage) once every chunk is; ``t_start`` is the ``time.perf_counter()`` of the run's
    start (the shard record keeps its duration, s)."""
    done = writer.chunks_done()
    span = plan.shard_chunks()  # never empty: plan_extraction refuses more shards than chunks
    if plan.shard is not None and bool(done[span.start:span.stop].all()):
        with _creation_lock(plan.out):  # the first shard to finish creates the record array
            writer.record_shard(*plan.shard, {
                "chunks": [span.start, span.stop],
                "rows": [writer.chunk_rows(span.start).start, writer.chunk_rows(span.stop - 1).stop],
                "host": socket.gethostname(), "pid": os.getpid(),
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(time.perf_counter() - t_start, 1)})
    if bool(done.all()):
        _warn_fp16_damage(plan)
        writer.update_attrs(complete=True, completed=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def run_extraction(
    plan: ExtractionPlan,
    *,
    device: str = "auto",
    progress: bool = True,
) -> ActivationStore:
    """Run (or resume) the extraction planned by :func:`plan_extraction`; returns the finished store."""
    if plan.already_complete:
        return ActivationStore(plan.out)
    dev = _resolve_device(device)
    module = plan.model.module.to(dev).eval()
    writer = create_or_open_store(plan)
    lock = _acquire_writer_lock(plan.out, plan.shard)
    t_start = time.perf_counter()
    try:
        _extract_batches(plan, writer, module, dev, _pending_batches(plan, writer), progress)
        _finish_store(plan, writer, t_start)
    finally:
        lock.release()
    store = ActivationStore(plan.out)
    if plan.remote is not None and store.complete:
        return upload_store(plan.out, plan.remote)
    return store


def extract(
    model: LoadedModel,
    source: ImageSource,
    out: str,
    *,
    layers: Sequence[str] | None = None,
    pool: str = "none",
    spatial_pool: int | None = None,
    dtype: str = "float16",
    batch_size: int = 32,
    chunk_size: int | None = None,
    save_inputs: bool = False,
    attention: bool = False,
    attn_keep: int = 0,
    overwrite: bool = False,
    strict: bool = False,
    force: bool = False,
    device: str = "auto",
    progress: bool = False,
    shard: tuple[int, int] | None = None,
    grams: bool = False,
    acts: bool = True,
    perturbation: Perturbation | None = None,
) -> ActivationStore:
    """Plan, check the disk and run an extraction in one call (the Python mirror of ``repsim extract``)."""
    plan = plan_extraction(
        model, source, out, layers=layers, pool=pool, spatial_pool=spatial_pool, dtype=dtype,
        batch_size=batch_size, chunk_size=chunk_size, save_inputs=save_inputs, attention=attention,
        attn_keep=attn_keep, overwrite=overwrite, strict=strict, progress=progress, shard=shard,
        grams=grams, acts=acts, perturbation=perturbation,
    )
    plan.check_disk(force=force)
    return run_extraction(plan, device=device, progress=progress)


__all__ = ["ExtractionPlan", "plan_extraction", "run_extraction", "extract", "scan_images", "human_bytes"]
