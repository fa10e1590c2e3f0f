"""Loading a local weights file into a model, strictly, with its sha256 recorded for provenance.

Formats: ``.safetensors``; torch ``.pt`` / ``.pth`` / ``.bin`` / ``.th`` / ``.ckpt`` files, zip (torch >= 1.6) or
legacy (non-zip) serialisation. Files are read with ``torch.load(weights_only=True)``, which unpickles tensors
and plain containers only. A checkpoint that needs more (old training checkpoints that pickled e.g. numpy
scalars, or a crafted file) would have to be unpickled with ``weights_only=False``, which runs code from the
file: that is refused in one line naming ``--trust-pickle``, and done only inside :func:`trust_pickle` (what
that flag sets).

Checkpoints are unwrapped the usual ways: a nested ``state_dict`` / ``model`` / ``ema`` entry (training
checkpoints), a pickled ``nn.Module``, and a common ``module.`` (DataParallel / DDP) or ``_orig_mod.``
(``torch.compile``) prefix on every key. Loading is strict: any missing, unexpected or mis-shaped key is a
:class:`~repsim.errors.UsageError` naming the first few, never a partially initialised model.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from repsim.errors import UsageError

#: keys under which training scripts nest the weights, in order of preference
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module", "ema", "state_dict_ema", "model_ema")
#: prefixes stripped when *every* key carries them (DataParallel / DDP, torch.compile)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 5  # keys listed per category in error messages

_TRUST_PICKLE: contextvars.ContextVar[bool] = contextvars.ContextVar("repsim_trust_pickle", default=False)


@contextlib.contextmanager
def trust_pickle(enabled: bool = True):
    """Within this block, a checkpoint that holds more than tensors is unpickled with ``weights_only=False``
    (running whatever code the file carries). What ``--trust-pickle`` sets; off by default."""
    token = _TRUST_PICKLE.set(bool(enabled))
    try:
        yield
    finally:
        _TRUST_PICKLE.reset(token)


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        msg = str(err)
        if "Weights only load failed" not in msg:
            raise UsageError(f"cannot read weights file {path}: not a torch checkpoint ({_first_line(msg)})") from None
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
        what = found.group(1) if found else "non-tensor Python objects"
        if not zipfile.is_zipfile(path) and not _is_legacy_torch_file(path):
            raise UsageError(f"cannot read weights file {path}: not a torch checkpoint") from None
        if not _TRUST_PICKLE.get():
            # Unpickling arbitrary objects runs code from the file: never without the flag that names the risk.
            kind = "checkpoint" if zipfile.is_zipfile(path) else "legacy (non-zip) pickle"
            raise UsageError(
                f"{path} is a {kind} holding {what} besides tensors; unpickling it runs code from the file, so it "
                "is refused: pass --trust-pickle if you trust it, or re-save only the weights "
                "(torch.save(state_dict, 'clean.pt') or safetensors)"
            ) from None
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err2:  # noqa: BLE001 - any failure here means the file is unreadable
            raise UsageError(f"cannot read weights file {path}: {type(err2).__name__}: {_first_line(err2)}") from None
    except Exception as err:  # noqa: BLE001 - corrupt/truncated/not-a-checkpoint all end here
        raise UsageError(f"cannot read weights file {path}: {type(err).__name__}: {_first_line(err)}") from None


def _is_legacy_torch_file(path: str) -> bool:
    """Whether the file starts like torch's legacy format: a pickle (any protocol) of torch's magic number."""
    magic = b"\x8a\x0a" + torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")
    with open(path, "rb") as f:
        head = f.read(32)
    return head[:1] == b"\x80" and magic in head


def _first_line(err: object) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else "no details"


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _unwrap(obj: Any, path: str, depth: int = 0) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a checkpoint object (nested dicts, pickled modules)."""
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping) and depth < 3:
        for key in NESTED_KEYS:
            if key in obj and (isinstance(obj[key], (Mapping, nn.Module))):
                return _unwrap(obj[key], path, depth + 1)
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            # A flat state dict with bookkeeping entries (epoch, metadata): only tensors are weights.
            dropped = sorted(str(k) for k in obj if k not in tensors)
            warnings.warn(f"{path}: ignoring non-tensor entries {dropped[:_SHOW]}", stacklevel=3)
            return tensors
    kind = type(obj).__name__
    keys = f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else ""
    raise UsageError(f"{path} holds no state dict (found a {kind}{keys})")


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed:  # e.g. "module._orig_mod." from a compiled model inside DDP
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def load_state_dict_file(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """Read a weights file → (state dict of CPU tensors with wrapper prefixes removed, sha256 hex of the file).

    Raises UsageError when the file is missing, unreadable, or holds no tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"weights file not found: {path}")
    try:
        digest = sha256_file(path)
    except OSError as err:
        raise UsageError(f"cannot read weights file {path}: {err.strerror or err}") from None
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file

            sd: dict[str, torch.Tensor] = load_file(path, device="cpu")
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise UsageError(f"cannot read safetensors file {path}: {type(err).__name__}: {_first_line(err)}") from None
        if not sd:
            raise UsageError(f"{path} holds no tensors")
    else:
        sd = _unwrap(_torch_load(path), path)
    return _strip_prefixes(sd), digest


def _fmt(keys: list[str], n: int) -> str:
    more = f" (+{n - len(keys)} more)" if n > len(keys) else ""
    return ", ".join(keys) + more


def check_state_dict(module: nn.Module, sd: Mapping[str, torch.Tensor], path: str = "weights") -> None:
    """Raise UsageError unless ``sd`` has exactly the keys and shapes of ``module.state_dict()``."""
    own = module.state_dict()
    # Checkpoints from PyTorch < 0.4.1 lack BatchNorm's num_batches_tracked; BatchNorm fills it in on load
    # and it plays no part in evaluation, so its absence is not a mismatch.
    missing = [k for k in own if k not in sd and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    misshaped = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if not (missing or unexpected or misshaped):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {_fmt(missing[:_SHOW], len(missing))}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {_fmt(unexpected[:_SHOW], len(unexpected))}")
    if misshaped:
        shown = [f"{k} file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in misshaped[:_SHOW]]
        parts.append(f"{len(misshaped)} mis-shaped: {_fmt(shown, len(misshaped))}")
    raise UsageError(f"{path} does not match the model ({type(module).__name__}): " + "; ".join(parts))


def apply_state_dict(module: nn.Module, sd: Mapping[str, torch.Tensor], path: str, sha256: str) -> dict[str, str]:
    """Strictly load an already-read state dict; returns the provenance record of :func:`apply_weights`."""
    check_state_dict(module, sd, path)
    module.load_state_dict(sd, strict=True)
    return {"kind": "file", "file": os.path.abspath(path), "sha256": sha256}


def apply_weights(module: nn.Module, path: str) -> dict[str, str]:
    """Load a weights file into ``module`` strictly (in place).

    Returns the provenance record ``{"kind": "file", "file": absolute path, "sha256": hex digest}``.
    Raises UsageError listing the first few missing / unexpected / mis-shaped keys on any mismatch.
    """
    sd, digest = load_state_dict_file(path)
    return apply_state_dict(module, sd, path, digest)
