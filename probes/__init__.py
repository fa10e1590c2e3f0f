"""Trained read-outs on stored activations: linear / k-NN transfer probes, spatial-localisation probes and
attribution probes (see the project's issues). Reads stores through :mod:`repsim`; never imports ``hooks``.

Linear transfer (:mod:`probes.linear`, :mod:`probes.solvers`, :mod:`probes.knn`, :mod:`probes.features`)::

    import probes, repsim
    store = repsim.open_store("vit_b16.zarr")
    res = probes.linear_probe(store, features="cls", method="logreg", split=0.2, seed=0)
    print(res.summary()); res.to_json("probe.json"); res.plot("probe.png", others=[probes.knn_probe(store)])

Spatial localisation (:mod:`probes.localisation`, Raghu et al. 2021 Sec. 7): ``probes.localise(store)`` gives
per layer the token ↔ input-patch CKA localisation score (needs ``--save-inputs``) and a linear position-probe
accuracy; :func:`token_patch_cka` / :func:`position_probe` do one layer.

Array-level functions work without a store: :func:`fit_logreg`, :func:`ridge_classify`, :func:`knn_classify`.
Names are imported on first use so that ``import probes`` does not load torch.
"""

from typing import Any

# public name -> module that defines it (PEP 562 lazy attributes)
_LAZY = {
    "linear_probe": "probes.linear",
    "fit_logreg": "probes.solvers",
    "ridge_classify": "probes.solvers",
    "accuracy_scores": "probes.solvers",
    "LinearFit": "probes.solvers",
    "ProbeResult": "probes.linear",
    "ProbeRow": "probes.linear",
    "DEFAULT_LAMBDAS": "probes.solvers",
    "knn_probe": "probes.knn",
    "knn_classify": "probes.knn",
    "FEATURE_MODES": "probes.features",
    "read_layer_features": "probes.features",
    "stratified_holdout": "probes.features",
    "localise": "probes.localisation",
    "token_patch_cka": "probes.localisation",
    "position_probe": "probes.localisation",
    "LocalisationResult": "probes.localisation",
    "TokenPatchCKA": "probes.localisation",
    "PositionProbe": "probes.localisation",
    "token_class_probe": "probes.localisation",
    "TokenClassProbe": "probes.localisation",
    "object_localisation": "probes.foreground_probe",
    "ObjectLocalisationResult": "probes.foreground_probe",
    "ObjectLocalisationRow": "probes.foreground_probe",
    "shapes_masks": "probes.foreground_probe",
    "foreground_fractions": "probes.foreground_probe",
    "token_iou": "probes.foreground_probe",
}

# US spellings of earlier releases -> the UK names the code now uses (issue 18): still resolved, with a
# FutureWarning, so scripts keep working while they are updated
_RENAMED = {
    "localize": "localise",
    "LocalizeResult": "LocalisationResult",
    "object_localization": "object_localisation",
    "ObjectLocalizationResult": "ObjectLocalisationResult",
    "ObjectLocalizationRow": "ObjectLocalisationRow",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _RENAMED:
        import warnings

        warnings.warn(f"probes.{name} is now probes.{_RENAMED[name]} (UK spelling); the old name will be removed",
                      FutureWarning, stacklevel=2)
        return __getattr__(_RENAMED[name])
    raise AttributeError(f"module 'probes' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
