"""Device choice and matmul precision shared by every torch computation in repsim, hooks and probes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from repsim.errors import UsageError


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cpu`` / ``cuda`` / ``cuda:N`` checked (UsageError)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UsageError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but no CUDA GPU is available; use device='cpu' or 'auto'")
    return dev


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """TF32 rounds float32 matmul inputs to 10 mantissa bits on Ampere+ GPUs: far too coarse for Grams and
    probe fits. Switched off inside the block, restored after."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
