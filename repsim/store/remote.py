"""Extraction into an fsspec URL (``s3://``, ``gs://``, ``memory://``, ...): stage locally, then upload.

Object stores have no exclusive create and no rename, which the local writer relies on (writer locks,
atomic chunk flags, resume). So an extraction whose ``--out`` is a URL writes a normal local store in a
*staging folder* (``$REPSIM_STAGING_DIR``, default ``~/.cache/repsim/staging``, one folder per URL) with all
of the local guarantees (resume after a kill, bit-identical result), and uploads it once it is complete:

1. every data object first, then the ``zarr.json`` metadata documents, deepest first, the root's last. A
   reader recognises a store by the root document, so an interrupted upload never looks like a store, and
   rerunning the command uploads again;
2. the uploaded store is opened from the URL and checked against the staged one (configuration hash, sample
   fingerprint, every chunk flagged); only then is the staging folder deleted.

A URL that already holds a complete store with the same configuration is left alone (nothing to do); one
with another configuration is refused unless ``overwrite``. Sharded runs (``--shard``, ``--workers``) need
a shared file system path: they coordinate through lock files next to the store.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Any

from repsim.errors import RepsimError, UsageError
from repsim.store.reader import ActivationStore, is_store


def staging_dir() -> str:
    """The folder that holds staged stores: ``$REPSIM_STAGING_DIR`` or ``~/.cache/repsim/staging``."""
    return os.environ.get("REPSIM_STAGING_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "repsim",
                                                                "staging")


def staging_path(url: str) -> str:
    """The local staging store of ``url`` (stable across runs, so a killed run resumes)."""
    tail = url.rstrip("/").rsplit("/", 1)[-1] or "store.zarr"
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return os.path.join(staging_dir(), f"{digest}-{tail}")


def remote_state(url: str, attrs: dict[str, Any], overwrite: bool) -> bool:
    """Whether ``url`` already holds this extraction, complete. Refuses another configuration (unless
    ``overwrite``, which deletes it), objects that are not a store (unless they are this extraction's own
    interrupted upload: its staged store is still there) and an unreachable URL."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
        exists = fs.exists(root)
    except Exception as err:  # noqa: BLE001 - missing driver (s3fs, gcsfs), credentials, network
        raise UsageError(f"--out {url}: cannot reach it ({type(err).__name__}: {err})") from None
    if not exists:
        return False
    if not is_store(url):
        if fs.ls(root) and not overwrite and not is_store(staging_path(url)):
            raise UsageError(f"{url} exists and is not a repsim store (an interrupted upload?): pass --overwrite "
                             "to replace it, or choose another --out")
        return False
    existing = ActivationStore(url).attrs
    if overwrite:
        fs.rm(root, recursive=True)
        return False
    if existing.get("config_hash") != attrs["config_hash"]:
        raise UsageError(f"{url} holds an extraction with another configuration: use --overwrite to replace it, "
                         "or another --out")
    return bool(existing.get("complete"))


def upload_store(local: str, url: str) -> ActivationStore:
    """Upload the complete local store ``local`` to ``url`` (data first, metadata last), check it, and
    delete ``local``. Returns the store opened from the URL."""
    import fsspec

    staged = ActivationStore(local)
    if not staged.complete:
        raise UsageError(f"{local} is not complete: nothing is uploaded before every chunk is written")
    fs, root = fsspec.core.url_to_fs(url)
    data, meta = [], []
    for folder, _, files in os.walk(local):
        for name in files:
            if name.endswith(".lock"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, local).replace(os.sep, "/")
            (meta if name == "zarr.json" else data).append((path, f"{root.rstrip('/')}/{rel}"))
    meta.sort(key=lambda pair: -pair[1].count("/"))  # deepest first: the root document goes last
    try:
        for batch in (data, meta):
            if batch:
                fs.put([lp for lp, _ in batch], [rp for _, rp in batch])
    except Exception as err:  # noqa: BLE001 - network, credentials, quota: all end with the staged store kept
        raise RepsimError(f"the upload to {url} failed ({type(err).__name__}: {err}); the staged store is kept at "
                          f"{local}: rerun the same command to upload it again") from err
    remote = ActivationStore(url)
    if (remote.attrs.get("config_hash") != staged.attrs.get("config_hash") or remote.fingerprint != staged.fingerprint
            or not remote.complete or not bool(remote.chunks_done().all())):
        raise UsageError(f"the upload to {url} does not read back as the staged store; it is kept at {local}: "
                         "rerun the command to upload again")
    shutil.rmtree(local)
    return remote


__all__ = ["staging_dir", "staging_path", "remote_state", "upload_store"]
