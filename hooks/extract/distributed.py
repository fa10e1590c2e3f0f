"""Extraction on a Dask cluster: one shard of the store per task, one task per worker (or per GPU).

The store is a shared file-system path that every worker reaches. The client first plans and creates the
store (so its configuration is fixed once), then submits ``shards`` tasks; task k loads the model and the
data set on its worker from their *specs* (short name, weights file, data spec; never pickled modules)
and writes the k-th of ``shards`` disjoint chunk ranges (:func:`hooks.extract.loop.plan_extraction` with
``shard=(k, shards)``). A task that dies with its worker is retried by Dask; a shard restarted that way
resumes from its last complete chunk. The last shard to finish marks the store complete.

With ``gpus_per_task`` the tasks ask for the Dask worker resource ``GPU`` (start workers with
``dask worker ... --resources GPU=1``), so each GPU box runs one shard at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from repsim.errors import UsageError
from repsim.store.reader import ActivationStore


@dataclass
class ExtractionSpec:
    """Everything a worker needs to rebuild the extraction: names and paths only (picklable, small)."""

    model: str
    data: str
    out: str
    n: int | None = None
    seed: int = 0
    load: dict[str, Any] = field(default_factory=dict)  # load_model keyword arguments (weights, img_size, ...)
    plan: dict[str, Any] = field(default_factory=dict)  # plan_extraction keyword arguments (layers, pool, ...)


def _plan(spec: ExtractionSpec, shard: tuple[int, int] | None):
    from hooks.extract.loop import plan_extraction
    from hooks.models.registry import load_model
    from repsim.data.sources import open_dataset

    loaded = load_model(spec.model, **spec.load)
    source = open_dataset(spec.data, n=spec.n, seed=spec.seed, image_size=loaded.preprocessing.img_size[0])
    return plan_extraction(loaded, source, spec.out, shard=shard, **spec.plan)


def run_shard(spec: ExtractionSpec, k: int, shards: int, device: str = "auto") -> dict[str, Any]:
    """Dask task: write shard ``k`` of ``shards``; returns what it did (chunks, whether the store is complete)."""
    from hooks.extract.loop import run_extraction

    plan = _plan(spec, (k, shards))
    store = run_extraction(plan, device=device, progress=False)
    chunks = plan.shard_chunks()
    return {"shard": k, "chunks": [chunks.start, chunks.stop], "complete": store.complete}


def extract_distributed(client: Any, spec: ExtractionSpec, *, shards: int | None = None,
                        gpus_per_task: int = 0, device: str = "auto", progress: bool = True) -> ActivationStore:
    """Plan and create the store here, then extract its ``shards`` (default: one per worker) on the cluster."""
    from hooks.extract.loop import create_or_open_store

    workers = len(client.scheduler_info().get("workers", {}))
    shards = shards or max(workers, 1)
    if shards < 1:
        raise UsageError(f"shards must be >= 1, got {shards}")
    plan = _plan(spec, (0, shards))  # validates the spec and the shard count on the client
    if plan.already_complete:
        return ActivationStore(spec.out)
    create_or_open_store(plan)
    resources = {"GPU": gpus_per_task} if gpus_per_task else None
    futures = [client.submit(run_shard, spec, k, shards, device, pure=False, resources=resources,
                             key=f"repsim-extract-shard-{k}-of-{shards}-{spec.out}") for k in range(shards)]
    from dask.distributed import as_completed
    from tqdm.auto import tqdm

    with tqdm(total=shards, desc="shards", unit="shard", disable=not progress) as bar:
        for future in as_completed(futures):
            future.result()  # re-raises a shard's error here
            bar.update(1)
    store = ActivationStore(spec.out)
    if not store.complete:
        raise UsageError(f"{spec.out}: every shard finished but the store is not complete; rerun to resume")
    return store


__all__ = ["ExtractionSpec", "extract_distributed", "run_shard"]
