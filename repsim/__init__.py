"""repsim: how vision networks represent images.

Per-layer activations of any vision model are extracted into Zarr stores (``hooks``); analyses read those
stores: CKA and other similarity measures, attention statistics, probes. See README.md and DESIGN.md.

The analysis entry points (``repsim.cka``, ``repsim.cka_matrix``, ...) are imported on first use so that
``import repsim`` and the CLI start without loading torch.
"""

from typing import Any

from repsim.errors import RepsimError, UsageError
from repsim.store.reader import ActivationStore, open_store

__version__ = "0.1.0"

# public name -> module that defines it (PEP 562 lazy attributes)
_LAZY = {
    "cka": "repsim.measures.cka_engine",
    "cka_matrix": "repsim.measures.cka_engine",
    "CKAResult": "repsim.measures.cka_engine",
    "attention_distance": "repsim.attention.statistics",
    "aligned_attention": "repsim.attention.statistics",
    "classify_heads": "repsim.attention.statistics",
    "attention_rollout": "repsim.attention.statistics",
    "attention_report": "repsim.attention.report",
    "similarity": "repsim.measures.beyond_cka",
    "MEASURES": "repsim.measures.beyond_cka",
    "compare_matrix": "repsim.measures.compare",
    "robustness_profile": "repsim.robustness",
    "robustness_profiles": "repsim.robustness",
    "RobustnessResult": "repsim.robustness",
    "Perturbation": "repsim.data.perturbations",
}

__all__ = ["ActivationStore", "RepsimError", "UsageError", "open_store", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'repsim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
