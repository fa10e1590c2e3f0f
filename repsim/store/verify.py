"""Integrity check of an activation store (``repsim verify``).

Every array the root attributes declare (sample table, completion flags, activations, saved inputs, attention
statistics, Grams, float16 quality) is opened on its own, so one damaged array never hides another: its
metadata (``zarr.json``) must be readable, its first axis must have the rows the store needs, every chunk must
be present on disk and decode (the CRC32C codec catches bit flips and truncation), and float chunks must hold
no NaN / Inf (a missing chunk reads as the fill value NaN). The sample table is checked against the recorded
fingerprint (ids unique, hash equal); completion flags and shard records against the root attributes; a
float16 layer whose measured storage error exceeds ``FP16_MAX_ERROR`` on some chunk is reported (see
:mod:`repsim.store`, "Precision"). Each problem names the array and, where it is one, the chunk and its rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from repsim.errors import UsageError
from repsim.store.format import FP16_MAX_ERROR, chunk_digest, fingerprint_ids
from repsim.store.reader import ActivationStore, _why


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_store`: ``ok`` is True when ``problems`` is empty."""

    path: str
    problems: list[str] = field(default_factory=list)
    chunks_checked: int = 0
    layers_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "problems": self.problems,
                "chunks_checked": self.chunks_checked, "layers_checked": self.layers_checked}


def _message(err: UsageError, path: str) -> str:
    """A reader error without the store path and the advice to run verify (we are verify)."""
    return str(err).removeprefix(f"{path}: ").split("; the store is damaged")[0]


def _present_chunks(arr) -> list[bool] | None:
    """Per chunk along the first axis: whether every one of its chunk objects exists (None: cannot tell)."""
    try:
        from zarr.core.sync import sync

        prefix = arr.store_path.path
        n0 = arr.cdata_shape[0] if hasattr(arr, "cdata_shape") else -(-arr.shape[0] // arr.chunks[0])
        present = [True] * n0
        for coords in arr._iter_chunk_coords():
            key = arr.metadata.encode_chunk_key(coords)
            if not sync(arr.store.exists(f"{prefix}/{key}" if prefix else key)):
                present[coords[0]] = False
        return present
    except Exception:  # noqa: BLE001 - private zarr API changed: decoding still finds NaN-filled float chunks
        return None


#: arrays whose fill value is a legitimate value (labels -1 = unknown, flags 0 = not written): an absent chunk is
#: that value, not damage (zarr never writes a chunk equal to the fill value); the flags are checked below
_FILL_IS_DATA = ("samples/labels", "progress/chunk_done")


def _check_array(store: ActivationStore, report: VerifyReport, name: str, rows: int | None, bar,
                 unwritten=lambda lo, c: False, digests: np.ndarray | None = None) -> None:
    """Open, count rows, and decode chunk by chunk one array; every finding goes into ``report``.
    ``unwritten(first_row, chunk)``: a chunk an unfinished extraction has not written yet (not damage).
    ``digests``: the writer's CRC32C of each chunk's content (0: not recorded), compared with what decodes."""
    problem = report.problems.append
    try:
        arr = store._group[name]
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - KeyError (deleted), JSONDecodeError (broken), zarr metadata errors
        problem(f"{name}: its metadata ({name}/zarr.json) is missing or damaged ({_why(err)})")
        return
    report.layers_checked += 1
    if not arr.shape:
        problem(f"{name}: is a scalar array, not one row per sample")
        return
    if rows is not None and arr.shape[0] != rows:
        problem(f"{name}: the array has {arr.shape[0]} rows where the store needs {rows} (truncated or resized)")
    declared = arr.attrs.get("shape") if name.startswith("acts/") else None
    if declared is not None and tuple(declared) != tuple(arr.shape[1:]):
        problem(f"{name}: per-sample shape {tuple(arr.shape[1:])}, its attributes say {tuple(declared)}")
    cs = arr.chunks[0]
    n0 = -(-arr.shape[0] // cs)
    present = _present_chunks(arr)
    is_float = arr.dtype.kind == "f"
    for c in range(n0):
        lo, hi = c * cs, min((c + 1) * cs, arr.shape[0])
        where = f"{name}: chunk {c} (rows {lo}..{hi - 1})"
        if bar is not None:
            bar.update()
        if unwritten(lo, c):
            continue
        if present is not None and not present[c]:
            if name in _FILL_IS_DATA:
                continue  # zarr writes no chunk equal to the fill value: absent means all -1 / all 0
            problem(f"{where} is missing on disk")
            continue
        try:
            block = arr[lo:hi]
        except MemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - checksum, codec, reshape: any decoding failure is a finding
            problem(f"{where} does not decode ({_why(err)})")
            continue
        report.chunks_checked += 1
        if digests is not None and c < len(digests) and digests[c] and chunk_digest(block, arr.dtype) != digests[c]:
            problem(f"{where} does not hold what was written there (content digest differs: chunks exchanged "
                    "or rewritten)")
        if is_float:
            bad = int(block.size - np.count_nonzero(np.isfinite(block)))
            if bad == block.size and bad:
                problem(f"{where} is all NaN (missing on disk, or never written)")
            elif bad:
                problem(f"{where} holds {bad} NaN/Inf values")


def _guard(report: VerifyReport, path: str, what: str, check) -> None:
    """Run one metadata-level check; a reader error becomes a finding instead of stopping verify."""
    try:
        check()
    except UsageError as err:
        report.problems.append(f"{what}: {_message(err, path)}")


def verify_store(store: ActivationStore, *, progress: bool = False) -> VerifyReport:
    """Check every array and chunk of ``store``; returns a report listing every problem found."""
    from tqdm.auto import tqdm

    report = VerifyReport(store.path)
    problem = report.problems.append
    if store.initialising:
        problem("the store was killed while being created (its arrays were being laid out): rerun the same "
                "`repsim extract` command, which recreates it")
    try:
        declared = store.declared_arrays()
    except (KeyError, TypeError, ValueError) as err:
        problem(f"the root attributes are damaged ({_why(err)})")
        return report
    total = 0
    for name in declared:
        try:
            arr = store._group[name]
            total += -(-arr.shape[0] // arr.chunks[0]) if arr.shape else 0
        except Exception:  # noqa: BLE001 - reported by _check_array
            pass
    try:
        done = store.chunks_done()
    except UsageError:
        done = None  # reported below, by the check of progress/chunk_done itself
    marked = bool(store.attrs.get("complete", False)) and not store.initialising
    cs, n, nc = store.chunk_size, store.n, store.n_chunks()

    def unwritten_for(name: str, rows: int | None):
        if name == "progress/chunk_done":  # a flag is written when its chunk is: absent = 0 until complete
            return lambda lo, c: not marked
        if done is None or marked or name.startswith("samples/"):
            return lambda lo, c: False
        if rows == n:
            return lambda lo, c: lo // cs < nc and not done[lo // cs]
        if rows == nc:
            return lambda lo, c: not done[lo] if lo < nc else False
        return lambda lo, c: lo // cs < nc and not done[lo // cs]

    bar = tqdm(total=total, desc="verify", unit="chunk", disable=not progress)
    try:
        recorded = store.chunk_digests()
    except Exception as err:  # noqa: BLE001 - a damaged digest array is a finding, the chunks are still checked
        problem(f"progress/chunk_digest: does not decode ({_why(err)})")
        recorded = None
    digest_of = {} if recorded is None else {nm: recorded[1][:, j] for j, nm in enumerate(recorded[0])}
    for name, rows in declared.items():
        _check_array(store, report, name, rows, bar, unwritten_for(name, rows), digest_of.get(name))
    bar.close()

    def sample_table() -> None:
        ids = store.ids
        if len(set(ids)) != len(ids):
            problem(f"samples/ids holds {len(ids) - len(set(ids))} duplicated ids")
        if fingerprint_ids(ids) != store.fingerprint:
            problem("sample fingerprint does not match samples/ids (ids changed or damaged after extraction)")

    def flags() -> None:
        done = store.chunks_done()
        if not done.all() and marked:
            missing = np.flatnonzero(~done)
            problem(f"the store is marked complete but {len(missing)} of its {len(done)} sample chunks are not "
                    f"flagged written (first: chunk {missing[0]}, rows {missing[0] * store.chunk_size}..): "
                    "progress/chunk_done is damaged, or the chunks are")
        elif not done.all():
            missing = np.flatnonzero(~done)
            problem(f"{len(missing)} of {len(done)} sample chunks never completed (first: chunk {missing[0]}, "
                    f"rows {missing[0] * store.chunk_size}..): rerun the same `repsim extract` command to resume")
        elif not store.attrs.get("complete", False) and not store.initialising:
            problem("all chunks are written but the store is not marked complete")
        for total_, records in store.shard_records().items():
            for k, rec in enumerate(records):
                if rec is None:
                    continue
                lo, hi = rec.get("chunks", [0, 0])
                if (lo, hi) != (k * store.n_chunks() // total_, (k + 1) * store.n_chunks() // total_):
                    problem(f"shard {k}/{total_} recorded chunks {lo}..{hi - 1}, not its own range")
                elif not done[lo:hi].all():
                    problem(f"shard {k}/{total_} is recorded finished but chunk "
                            f"{lo + int(np.flatnonzero(~done[lo:hi])[0])} is not flagged written")

    def precision() -> None:
        for layer, err in store.fp16_errors().items():
            if store.layer_info(layer)["dtype"] == "float16" and not err <= FP16_MAX_ERROR:
                problem(f"{layer}: float16 storage lost {err:.3g} of its variation on some chunk (limit "
                        f"{FP16_MAX_ERROR:g}): re-extract with --dtype float32")

    if not any(p.startswith(("samples/ids:",)) for p in report.problems):
        _guard(report, store.path, "samples/ids", sample_table)
    if done is not None:
        _guard(report, store.path, "progress", flags)
    if not any(p.startswith(("quality/", "acts/")) for p in report.problems):
        _guard(report, store.path, "quality/fp16_error", precision)
    return report
