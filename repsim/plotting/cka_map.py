"""The layer × layer CKA heat map (Kornblith et al. 2019; Raghu et al. 2021 style).

Rows are the layers of model A from the bottom up (``origin="lower"``: depth increases upwards, as in
Raghu et al. 2021), columns the layers of model B from left to right. Layer names are shortened by dropping
the dotted prefix all of a model's layers share; tick labels are thinned to at most 30 per axis.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from repsim.results import save_figure_atomic

MAX_TICKS = 30
MAX_LABEL_CHARS = 22


def model_label(name: str | None) -> str:
    """A model name short enough for a title: ``py:/long/path/file.py:factory`` → ``file.py:factory``."""
    if not name:
        return ""
    if name.startswith("py:"):
        path, _, factory = name[3:].rpartition(":")
        return f"{os.path.basename(path)}:{factory}"
    return name


def short_layer_names(layers: Sequence[str], max_chars: int = MAX_LABEL_CHARS) -> list[str]:
    """Drop the dotted prefix shared by all names ("model.blocks.3.mlp" → "3.mlp") and middle-truncate."""
    parts = [name.split(".") for name in layers]
    common = 0
    if len(parts) > 1:
        while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
            common += 1
    out = []
    for p in parts:
        s = ".".join(p[common:])
        if len(s) > max_chars:
            keep = max_chars - 1
            s = s[: keep // 2] + "…" + s[len(s) - (keep - keep // 2):]
        out.append(s)
    return out


#: module names of the layer presets (hooks.capture.layers) whose output is the pooled pre-logits vector / the logits
PRE_LOGITS_NAMES = frozenset({"head_drop", "fc_norm", "head.drop", "head.pre_logits", "global_pool", "head.global_pool",
                              "pool", "avgpool", "pooler", "layernorm"})
LOGITS_NAMES = frozenset({"head", "head.fc", "fc", "classifier", "head.proj"})


def layer_labels(layers: Sequence[str], max_chars: int = MAX_LABEL_CHARS, *, keep_context: bool = True,
                 roles: bool = True) -> list[str]:
    """Axis labels for layers in network order.

    Like :func:`short_layer_names`, but (``keep_context``) the shared prefix is never cut down to a bare index
    (``blocks.0.attn`` stays ``blocks.0.attn``, not ``0.attn``), and (``roles``) when the list ends with a
    classifier module of the layer presets (``head``, ``fc``, ...), it is labelled ``logits`` and the pooled
    vector right before it (``head_drop``, ``global_pool``, ...) ``pre-logits``.
    """
    parts = [name.split(".") for name in layers]
    common = 0
    if len(parts) > 1:
        while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
            common += 1
        if keep_context:
            while common > 0 and any(p[common][:1].isdigit() for p in parts):
                common -= 1
    out = [".".join(p[common:]) for p in parts]
    if roles and len(layers) >= 2 and layers[-1] in LOGITS_NAMES:
        out[-1] = "logits"
        if layers[-2] in PRE_LOGITS_NAMES:
            out[-2] = "pre-logits"
    for i, s in enumerate(out):
        if len(s) > max_chars:
            keep = max_chars - 1
            out[i] = s[: keep // 2] + "…" + s[len(s) - (keep - keep // 2):]
    return out


def _ticks(n: int) -> np.ndarray:
    step = max(1, int(np.ceil(n / MAX_TICKS)))
    return np.arange(0, n, step)


class CKAMap(Protocol):
    """What :func:`plot_cka` reads from a CKA result (:class:`repsim.measures.cka_engine.CKAResult` has these fields).

    A protocol rather than the engine's class: the plot module takes results as data and does not import the
    engine, which imports this module for ``CKAResult.plot`` (no import cycle)."""

    values: Any  # (len(layers_a), len(layers_b)) CKA values
    layers_a: list[str]
    layers_b: list[str]
    estimator: str
    kernel: str
    tokens: str
    n: int
    batch_size: int | None
    repeats: int
    model_a: str
    model_b: str
    path_a: str
    path_b: str


def plot_cka(result: CKAMap, path: str | os.PathLike | None, ax: Any = None) -> Any:
    """Draw ``result.values`` as a heat map on ``ax`` (a new figure when None), save to ``path`` (PNG, PDF,
    … by extension) when given, and return the Axes. Colour scale fixed to [0, 1], bar labelled "CKA"."""
    how = f"{result.estimator} CKA ({result.kernel}, tokens={result.tokens}), n={result.n}"
    if result.estimator == "minibatch" and result.batch_size:
        how += f", batch {result.batch_size}"
        if result.repeats > 1:
            how += f", {result.repeats} repeats"
    return plot_layer_map(result.values, result.layers_a, result.layers_b, model_a=result.model_a,
                          model_b=result.model_b, same_store=result.path_a == result.path_b, subtitle=how,
                          label="CKA", vmin=0.0, vmax=1.0, path=path, ax=ax)


def plot_layer_map(values: Any, layers_a: Sequence[str], layers_b: Sequence[str], *, model_a: str = "",
                   model_b: str = "", same_store: bool = False, subtitle: str = "", label: str = "",
                   vmin: float | None = None, vmax: float | None = None, reverse: bool = False,
                   path: str | os.PathLike | None = None, ax: Any = None) -> Any:
    """Layer × layer heat map (rows: ``layers_a`` from the bottom, columns: ``layers_b``), colour bar
    ``label``; ``reverse`` flips the colour map so that for distances, too, bright means alike."""
    # A bare Figure (no pyplot): renders headless with Agg, leaves the user's backend and figure list alone.
    from matplotlib.figure import Figure

    values = np.asarray(values, dtype=float)
    if ax is None:
        la, lb = values.shape
        fig = Figure(figsize=(min(max(5.0, 3 + 0.22 * lb), 14), min(max(4.0, 2.5 + 0.22 * la), 13)))
        ax = fig.subplots()
    else:
        fig = ax.figure
    im = ax.imshow(values, origin="lower", cmap="magma_r" if reverse else "magma", vmin=vmin, vmax=vmax,
                   aspect="auto", interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax)
    cbar.set_label(label)
    ya, xb = _ticks(values.shape[0]), _ticks(values.shape[1])
    # roles: the pooled pre-logits and the classifier read "pre-logits" / "logits", not timm's module names
    names_a = layer_labels(layers_a, keep_context=False)
    names_b = layer_labels(layers_b, keep_context=False)
    ax.set_yticks(ya)
    ax.set_yticklabels([names_a[i] for i in ya], fontsize=7)
    ax.set_xticks(xb)
    ax.set_xticklabels([names_b[i] for i in xb], fontsize=7, rotation=90)
    model_a = model_label(model_a) or "model A"
    model_b = model_label(model_b) or "model B"
    ax.set_ylabel(f"{model_a} layer")
    ax.set_xlabel(f"{model_b} layer")
    ax.set_title(f"{model_a}" + ("" if same_store else f" vs {model_b}") + (f"\n{subtitle}" if subtitle else ""),
                 fontsize=9)
    if path is not None:
        fig.tight_layout()
        save_figure_atomic(fig, path, dpi=150)
    return ax
