"""Small text helpers shared by the CLI, the demo and the extraction code.

This module imports nothing beyond the standard library, so commands that only print metadata (``repsim
info``) stay fast: they must not load torch or the extraction code to format a size.
"""

from __future__ import annotations


def human_bytes(nbytes: float) -> str:
    """Bytes as a short human-readable string, 1024-based units: ``512 B``, ``1.5 KB``, ``28.9 MB``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1024 or unit == "TB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} TB"
