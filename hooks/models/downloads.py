"""Weights caches and downloads: the local cache is always looked at first, so a cached model never touches the network.

Pretrained weights live in the ecosystem's standard caches: the Hugging Face hub cache (timm and transformers
models; ``HF_HOME`` / ``HF_HUB_CACHE``) and the torch hub checkpoint directory (torchvision and URL-hosted timm
weights; ``TORCH_HOME``). The cache is looked at first, so a cached model never touches the network. A miss is
downloaded into that cache with the hub's own progress bar (``hf_hub_download`` / torch hub), unless downloads
are off (``offline=True``, the CLI's ``--offline``, or ``HF_HUB_OFFLINE=1``): then it is one
:class:`~repsim.errors.UsageError` naming the ways out (``--weights FILE``, ``--random-init``, or a populated
cache). A hub model's provenance records the repo, the commit (revision) and the sha256 of the file, checked
against the hub's (see :func:`_hub_record`); :func:`hooks.models.registry.reload_model` rebuilds exactly that.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import torch

from hooks.models.weights import sha256_file
from repsim.errors import UsageError


def hf_cache_dir() -> str:
    """The Hugging Face hub cache directory (HF_HUB_CACHE / HF_HOME / ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def torch_hub_checkpoints_dir() -> str:
    """The torch hub checkpoint directory (TORCH_HOME / ~/.cache/torch → hub/checkpoints)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


_TRUE = {"1", "ON", "YES", "TRUE"}


def offline_requested(offline: bool | None = None) -> bool:
    """Whether downloads are off: ``offline=True`` (``--offline``), or ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``.

    The environment is read at each call (huggingface_hub reads it once, at import), so a variable set after
    import still counts; huggingface_hub's own import-time flag counts too. Offline applies to every source:
    the torch hub (torchvision, URL-hosted timm weights) is not contacted either.
    """
    if offline:
        return True
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().upper() in _TRUE


def _hf_cached(repo: str, filenames: Sequence[str], revision: str | None = None) -> str | None:
    """Path of the first of ``filenames`` present in the local hub cache for ``repo`` (no network).

    ``repo`` may carry a pinned revision (``org/name@rev``, timm's syntax); ``revision`` overrides it. A branch
    or tag is resolved through the cache's ``refs/``, a commit hash directly.
    """
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, pinned = repo.partition("@")
    rev = revision or pinned or None
    for fname in filenames:
        try:
            hit = try_to_load_from_cache(repo_id, fname, revision=rev, cache_dir=hf_cache_dir())
        except Exception:  # noqa: BLE001 - malformed ids are simply not cached
            return None
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def _url_cached(url: str | None) -> str | None:
    if not url:
        return None
    path = os.path.join(torch_hub_checkpoints_dir(), os.path.basename(urlparse(url).path))
    return path if os.path.isfile(path) else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _download_error(what: str, source: str, err: BaseException) -> UsageError:
    return UsageError(
        f"cannot download the weights of {what} from {source} ({type(err).__name__}: {_first_line(err)}); check the "
        "network (proxy, HF_ENDPOINT), or pass --weights FILE (a local state dict) or --random-init, or copy a "
        "populated cache here and pass --offline"
    )


def _hub_fetch(repo: str, filenames: Sequence[str], *, revision: str | None, offline: bool, what: str) -> str | None:
    """Local path of the first of ``filenames`` that the hub repo has, downloading it when it is not cached.

    The cache is consulted first for all names (no network when any is there). Offline, a miss is None.
    Online, the names are tried in order with one HEAD request each (no retries: a machine without network
    learns it in milliseconds instead of after the client's five backoffs); the first the repo has is fetched
    by ``hf_hub_download`` into the standard cache, with the hub's progress bar. None when the repo has none
    of them. Repository / revision / gating / network failures are one UsageError.
    """
    hit = _hf_cached(repo, filenames, revision)
    if hit is not None or offline:
        return hit
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import (
        GatedRepoError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, _, pinned = repo.partition("@")
    rev = revision or pinned or None
    source = f"{constants.ENDPOINT} ({repo_id}{'@' + rev if rev else ''})"
    for fname in filenames:
        try:
            get_hf_file_metadata(hf_hub_url(repo_id, fname, revision=rev), retry_on_errors=False)
            return hf_hub_download(repo_id, fname, revision=rev, cache_dir=hf_cache_dir())
        except RemoteEntryNotFoundError:
            continue
        except GatedRepoError:
            raise UsageError(f"{repo_id} is a gated hub repository: accept its terms on the hub and log in "
                             "(`hf auth login`), or pass --weights FILE") from None
        except RepositoryNotFoundError:
            raise UsageError(f"no hub repository {repo_id} at {constants.ENDPOINT} (a private one needs "
                             "`hf auth login`)") from None
        except RevisionNotFoundError:
            raise UsageError(f"hub repository {repo_id} has no revision {rev!r}") from None
        except Exception as err:  # noqa: BLE001 - network, proxy, server and disk errors all end here
            raise _download_error(what, source, err) from err
    return None


def _url_fetch(url: str, *, offline: bool, what: str) -> str | None:
    """Local path of a URL-hosted checkpoint in the torch hub cache, downloading it (progress bar) when online.

    File names carrying a hash prefix (``resnet18-f37072fd.pth``) are checked against it, as torch hub does.
    """
    hit = _url_cached(url)
    if hit is not None or offline:
        return hit
    from torch.hub import HASH_REGEX, download_url_to_file

    fname = os.path.basename(urlparse(url).path)
    dst = os.path.join(torch_hub_checkpoints_dir(), fname)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    found = HASH_REGEX.search(fname)
    try:
        download_url_to_file(url, dst, found.group(1) if found else None, progress=True)
    except Exception as err:  # noqa: BLE001 - URLError, HTTPError, hash mismatch (RuntimeError), disk full
        raise _download_error(what, url, err) from err
    return dst


def _offline_error(what: str, where: str) -> UsageError:
    return UsageError(
        f"no pretrained weights for {what} in the local caches and downloads are off (--offline / HF_HUB_OFFLINE): "
        f"run once without --offline on a machine with network, or pass --weights FILE (a local state dict) or "
        f"--random-init; the cache looked in is {where}"
    )


def _verified_sha256(path: str) -> str:
    """sha256 of a hub cache file, checked against its blob name where the hub named it by its sha256.

    LFS files (all weights) are stored as ``blobs/<sha256 the hub announced>``: a truncated or altered file is
    caught here, before anything reads it. Small git files are named by their git sha1, which says nothing
    about the sha256; they are only hashed.
    """
    try:
        digest = sha256_file(path)
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}") from None
    blob = os.path.realpath(path)
    name = os.path.basename(blob)
    if re.fullmatch(r"[0-9a-f]{64}", name) and name != digest:
        raise UsageError(f"{path} is damaged (sha256 {digest[:12]}..., the hub's is {name[:12]}...): delete {blob} "
                         "and run again to download it afresh")
    return digest


def _hub_record(cache_file: str, *, hub_id: str, tag: str | None = None,
                shards: Sequence[str] = ()) -> dict[str, Any]:
    """Provenance of a hub file: ``{"kind": "hub", "hub_id", "tag", "filename", "revision", "sha256", ...}``.

    tag : the timm id with its pretrained tag (timm models); hub_id : the repo (org/name); revision : the
    commit hash, read from the cache layout ``.../models--org--name/snapshots/<commit>/<file>``; sha256 : of
    the file's bytes (checked against the hub's, see :func:`_verified_sha256`); shards : for a sharded
    checkpoint, ``{"shards": {file: sha256}}`` of every shard besides the index file.
    """
    path = os.path.abspath(cache_file)
    rec: dict[str, Any] = {"kind": "hub", "hub_id": hub_id}
    if tag:
        rec["tag"] = tag
    parts = path.split(os.sep)
    if "snapshots" in parts:
        i = parts.index("snapshots")
        rec["revision"] = parts[i + 1]
        rec["filename"] = "/".join(parts[i + 2:])
    else:
        rec["filename"] = os.path.basename(path)
    rec["sha256"] = _verified_sha256(path)
    if shards:
        rec["shards"] = {os.path.basename(s): _verified_sha256(s) for s in shards}
    rec["cache_file"] = path
    return rec


__all__ = ["hf_cache_dir", "offline_requested", "torch_hub_checkpoints_dir"]
