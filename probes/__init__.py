"""Trained read-outs on stored activations: linear / k-NN transfer probes, spatial-localisation probes and
attribution probes (see the project's issues). Reads stores through :mod:`repsim`; never imports ``hooks``.

Linear transfer (:mod:`probes.linear`, :mod:`probes.knn`, :mod:`probes.features`)::

    import probes, repsim
    store = repsim.open_store("vit_b16.zarr")
    res = probes.linear_probe(store, features="cls", method="logreg", split=0.2, seed=0)
    print(res.summary()); res.to_json("probe.json"); res.plot("probe.png", others=[probes.knn_probe(store)])

Spatial localisation (:mod:`probes.localization`, Raghu et al. 2021 Sec. 7): ``probes.localize(store)`` gives
per layer the token ↔ input-patch CKA localisation score (needs ``--save-inputs``) and a linear position-probe
accuracy; :func:`token_patch_cka` / :func:`position_probe` do one layer.

Array-level functions work without a store: :func:`fit_logreg`, :func:`ridge_classify`, :func:`knn_classify`.
Names are imported on first use so that ``import probes`` does not load torch.
"""

from typing import Any

# public name -> module that defines it (PEP 562 lazy attributes)
_LAZY = {
    "linear_probe": "probes.linear",
    "fit_logreg": "probes.linear",
    "ridge_classify": "probes.linear",
    "accuracy_scores": "probes.linear",
    "LinearFit": "probes.linear",
    "ProbeResult": "probes.linear",
    "ProbeRow": "probes.linear",
    "DEFAULT_LAMBDAS": "probes.linear",
    "knn_probe": "probes.knn",
    "knn_classify": "probes.knn",
    "FEATURE_MODES": "probes.features",
    "read_layer_features": "probes.features",
    "stratified_holdout": "probes.features",
    "localize": "probes.localization",
    "token_patch_cka": "probes.localization",
    "position_probe": "probes.localization",
    "LocalizeResult": "probes.localization",
    "TokenPatchCKA": "probes.localization",
    "PositionProbe": "probes.localization",
    "token_class_probe": "probes.localization",
    "TokenClassProbe": "probes.localization",
    "object_localization": "probes.foreground_probe",
    "ObjectLocalizationResult": "probes.foreground_probe",
    "ObjectLocalizationRow": "probes.foreground_probe",
    "shapes_masks": "probes.foreground_probe",
    "foreground_fractions": "probes.foreground_probe",
    "token_iou": "probes.foreground_probe",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'probes' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
