"""Integrity check of an activation store (``repsim verify``).

Every chunk of every array is decoded and checked for NaN / Inf (a chunk missing on disk reads as the fill
value NaN, so it is found too); every array must have one row per sample; the sample table is checked against
the recorded fingerprint (ids unique, hash equal); completion flags, shapes and labels are checked against the
root attributes; a float16 layer whose measured storage error exceeds ``FP16_MAX_ERROR`` on some chunk is
reported (see :mod:`repsim.store`, "Precision").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from repsim.store import FP16_MAX_ERROR, ActivationStore, fingerprint_ids


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


def verify_store(store: ActivationStore, *, progress: bool = False) -> VerifyReport:
    """Decode every chunk of ``store`` and check it; returns a report listing every problem found."""
    from tqdm.auto import tqdm

    report = VerifyReport(store.path)
    ids = store.ids
    if len(ids) != store.n:
        report.problems.append(f"samples/ids has {len(ids)} rows, attributes say n={store.n}")
    if len(set(ids)) != len(ids):
        report.problems.append(f"samples/ids holds {len(ids) - len(set(ids))} duplicated ids")
    if fingerprint_ids(ids) != store.fingerprint:
        report.problems.append("sample fingerprint does not match samples/ids (ids changed after extraction?)")
    if len(store.labels) != store.n:
        report.problems.append(f"samples/labels has {len(store.labels)} rows, expected {store.n}")
    done = store.chunks_done()
    if not done.all():
        missing = np.flatnonzero(~done)
        report.problems.append(
            f"{len(missing)} of {len(done)} sample chunks never completed (first: chunk {missing[0]}, "
            f"rows {missing[0] * store.chunk_size}..): rerun the same `repsim extract` command to resume"
        )
    elif not store.complete:
        report.problems.append("all chunks are written but the store is not marked complete")
    for total, records in store.shard_records().items():
        for k, rec in enumerate(records):
            if rec is None:
                continue
            lo, hi = rec.get("chunks", [0, 0])
            if (lo, hi) != (k * store.n_chunks() // total, (k + 1) * store.n_chunks() // total):
                report.problems.append(f"shard {k}/{total} recorded chunks {lo}..{hi - 1}, not its own range")
            elif not done[lo:hi].all():
                report.problems.append(f"shard {k}/{total} is recorded finished but chunk "
                                       f"{lo + int(np.flatnonzero(~done[lo:hi])[0])} is not flagged written")

    for layer, err in store.fp16_errors().items():
        if store.layer_info(layer)["dtype"] == "float16" and not err <= FP16_MAX_ERROR:
            report.problems.append(f"{layer}: float16 storage lost {err:.3g} of its variation on some chunk (limit "
                                   f"{FP16_MAX_ERROR:g}): re-extract with --dtype float32")
    arrays = (list(store.layers) if store.has_acts else []) + (["inputs/pixels"] if store.has_inputs else [])
    for name in arrays:
        rows = store.row_count(name)
        if rows != store.n:
            report.problems.append(f"{name}: the array has {rows} rows, the store has {store.n} samples")
    bar = tqdm(total=len(arrays) * store.n_chunks(), desc="verify", unit="chunk", disable=not progress)
    for name in arrays:
        read = store.read_inputs if name == "inputs/pixels" else (lambda a, b, _n=name: store.read(_n, a, b))
        expected = None if name == "inputs/pixels" else tuple(store.layer_info(name)["shape"])
        for c in range(store.n_chunks()):
            lo, hi = c * store.chunk_size, min((c + 1) * store.chunk_size, store.n)
            try:
                block = read(lo, hi)
            except Exception as err:  # noqa: BLE001 - any decoding failure is a finding
                report.problems.append(f"{name}: chunk {c} does not decode ({type(err).__name__}: {err})")
                bar.update()
                continue
            report.chunks_checked += 1
            if expected is not None and tuple(block.shape[1:]) != expected:
                report.problems.append(f"{name}: chunk {c} has shape {block.shape[1:]}, attributes say {expected}")
            bad = int(block.size - np.count_nonzero(np.isfinite(block)))
            if bad:
                report.problems.append(f"{name}: chunk {c} (rows {lo}..{hi - 1}) holds {bad} NaN/Inf values")
            bar.update()
        report.layers_checked += 1
    for name in store.extra_arrays:  # attention statistics etc.: decode and check in blocks of chunk_size rows
        try:
            total = store.extra_shape(name)[0]
            for lo in range(0, total, store.chunk_size):
                block = store.read_extra(name, lo, min(lo + store.chunk_size, total))
                report.chunks_checked += 1
                bad = int(block.size - np.count_nonzero(np.isfinite(block)))
                if bad:
                    report.problems.append(f"{name}: rows {lo}.. hold {bad} NaN/Inf values")
        except Exception as err:  # noqa: BLE001 - any decoding failure is a finding
            report.problems.append(f"{name}: does not decode ({type(err).__name__}: {err})")
        report.layers_checked += 1
    bar.close()
    return report
