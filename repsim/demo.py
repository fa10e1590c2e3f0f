"""``repsim demo``: the whole toolkit on the bundled reference models, offline, in a few minutes on a CPU.

:func:`run_demo` extracts ``ref_vit``, ``ref_vit_gap`` and ``ref_resnet`` (see :mod:`hooks.reference_models`)
on held-out ``shapes`` images, then computes and draws

1. each model's accuracy on those images (from the stored logits),
2. CKA maps within each model and across models (minibatch linear CKA, Nguyen et al. 2021),
3. attention distance per head and the head kinds of both ViTs (Raghu et al. 2021, Fig. 3),
4. spatial localisation: token ↔ input-patch CKA and a position probe per layer, CLS vs GAP ViT
   (Raghu et al. 2021, Fig. 10), and the object-foreground probe,
5. linear probes of every layer (Kornblith et al. 2019 protocol),

and writes ``DIR/report.md``: every figure with two sentences on what it shows, sentences written *from the
measured numbers* (a published effect the models do not show is reported as absent, not asserted).
Every result is also kept as JSON with its provenance under ``DIR/json/``; ``DIR/summary.json`` holds the
headline numbers the report quotes.

Like :mod:`repsim.cli`, this module is an application layer over all three packages (``repsim``,
``hooks``, ``probes``): nothing in the library imports it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hooks.extract import plan_extraction, run_extraction
from hooks.reference_models import REFERENCE_MODELS
from hooks.registry import load_model
from repsim.cka_engine import CKAResult, cka_matrix
from repsim.cka_plot import short_layer_names
from repsim.data import open_dataset
from repsim.errors import UsageError
from repsim.json_output import jsonable, write_json_atomic
from repsim.store import ActivationStore

DEMO_MODELS = ("ref_vit", "ref_vit_gap", "ref_resnet")
#: the held-out data: shapes seed 0 (the reference models were trained on another seed)
DEMO_SEED = 0
#: L2 strengths searched by the demo's logistic-regression probes
PROBE_LAMBDAS = np.logspace(-3, 2, 11)


@dataclass
class DemoResult:
    """Where the demo wrote its report, figures and JSON, and the headline numbers (``summary``)."""

    out: str
    report: str
    figures: dict[str, str]
    summary: dict[str, Any]
    seconds: float
    sections: list[tuple[str, str, str]] = field(default_factory=list)  # (title, figure key, two sentences)


def _fmt(v: float) -> str:
    return f"{v:.2f}"


def _classes(store: ActivationStore) -> list[str]:
    return list(store.attrs["dataset"]["classes"])


def _accuracy(store: ActivationStore) -> float:
    """Top-1 accuracy of the model's own logits (its last stored layer) against the store's labels."""
    logits = np.asarray(store.read(store.layers[-1]), dtype=np.float64)
    k = len(_classes(store))
    if logits.ndim != 2 or logits.shape[1] != k:
        raise UsageError(f"{store.path}: the last layer {store.layers[-1]} is not the {k}-way logits")
    return float((logits.argmax(1) == store.labels).mean())


def _cka_decay(result: CKAResult) -> dict[str, float]:
    """Diagonal, mean CKA of adjacent layers (|i - j| = 1) and of the farthest pair (first vs last layer)."""
    v = np.asarray(result.values, dtype=np.float64)
    k = v.shape[0]
    adjacent = float(np.mean([v[i, i + 1] for i in range(k - 1)])) if k > 1 else float("nan")
    return {"diagonal_min": float(np.diag(v).min()), "diagonal_max": float(np.diag(v).max()),
            "adjacent_mean": adjacent, "first_last": float(v[0, -1])}


def _plot_cka_panels(results: Sequence[CKAResult], titles: Sequence[str], path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(results), 4.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(results)))
    for ax, res, title in zip(axes, results, titles):
        res.plot(None, ax=ax)
        ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=130)


def _plot_localisation(results: dict[str, Any], path: str) -> None:
    """Localisation score and position-probe accuracy against relative depth, one curve per model."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for k, (name, res) in enumerate(results.items()):
        x = np.linspace(0, 1, len(res.rows))
        ax1.plot(x, [np.nan if r.score is None else r.score for r in res.rows], marker="o", color=f"C{k}",
                 label=name)
        ax2.plot(x, [np.nan if r.position_accuracy is None else 100 * r.position_accuracy for r in res.rows],
                 marker="o", color=f"C{k}", label=name)
        ax2.plot(x, [np.nan if r.position_chance is None else 100 * r.position_chance for r in res.rows],
                 ls=":", color=f"C{k}", lw=1, label=f"{name} chance (1 / grid positions)")
    ax1.axhline(0, color="0.5", lw=0.8, ls=":")
    ax1.set_ylabel("localisation score (own − other patch CKA)")
    ax1.set_title("token ↔ input-patch CKA", fontsize=10)
    ax2.set_ylabel("position-probe accuracy (%)")
    ax2.set_title("linear probe of each token's grid position", fontsize=10)
    for ax in (ax1, ax2):
        ax.set_xlabel("relative depth (first tap = 0, last = 1)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=130)


def run_demo(
    out: str,
    *,
    n: int = 512,
    localize_images: int = 256,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
    models: Sequence[str] = DEMO_MODELS,
) -> DemoResult:
    """Run the demo into folder ``out`` (created; existing stores there are reused when complete).

    ``n``: held-out ``shapes`` images extracted per model (seed :data:`DEMO_SEED`); ``localize_images``: images
    for the token ↔ patch CKA (memory grows with its square). ``models``: a subset of :data:`DEMO_MODELS`
    (the comparisons that need a missing model are skipped). ``log`` receives one line per step.
    """
    import probes
    from repsim.attention_plot import figure_paths, plot_attention_report
    from repsim.attention_summary import attention_report

    t0 = time.perf_counter()
    unknown = [m for m in models if m not in REFERENCE_MODELS]
    if unknown:
        raise UsageError(f"unknown demo model(s) {', '.join(unknown)}; choose from {', '.join(DEMO_MODELS)}")
    if n < 64:
        raise UsageError(f"the demo needs n >= 64 images, got {n}")
    os.makedirs(os.path.join(out, "stores"), exist_ok=True)
    os.makedirs(os.path.join(out, "json"), exist_ok=True)
    os.makedirs(os.path.join(out, "figures"), exist_ok=True)
    fig = lambda name: os.path.join(out, "figures", name)  # noqa: E731
    js = lambda name: os.path.join(out, "json", name)  # noqa: E731
    figures: dict[str, str] = {}
    summary: dict[str, Any] = {"n_images": n, "data": f"shapes seed {DEMO_SEED} (held out)", "models": {}}
    sections: list[tuple[str, str, str]] = []

    def step(msg: str) -> None:
        log(f"[{time.perf_counter() - t0:5.0f} s] {msg}")

    # 1. extraction -----------------------------------------------------------------------------------------
    stores: dict[str, ActivationStore] = {}
    for name in models:
        step(f"extracting {name} on {n} held-out shapes images")
        loaded = load_model(name)
        source = open_dataset("shapes", n=n, seed=DEMO_SEED, image_size=loaded.preprocessing.img_size[0])
        is_vit = loaded.info.family == "vit"
        # n in the name: a rerun with another --n in the same folder extracts anew instead of being refused
        plan = plan_extraction(loaded, source, os.path.join(out, "stores", f"{name}-n{n}.zarr"), batch_size=64,
                               save_inputs=True, attention=is_vit, attn_keep=4 if is_vit else 0,
                               progress=progress)
        stores[name] = run_extraction(plan, device=device, progress=progress)
        acc = _accuracy(stores[name])
        summary["models"][name] = {"accuracy": acc, "chance": 1 / len(_classes(stores[name])),
                                   "weights_sha256": loaded.info.weights.get("sha256"),
                                   "layers": list(stores[name].layers)}
    accs = ", ".join(f"{m} {100 * summary['models'][m]['accuracy']:.1f}%" for m in stores)
    chance = 100 / len(_classes(next(iter(stores.values()))))
    step(f"held-out accuracy: {accs} (chance {chance:.1f}%)")

    # 2. CKA ----------------------------------------------------------------------------------------------
    step("CKA maps within each model")
    within = {m: cka_matrix(s, device=device, progress=False) for m, s in stores.items()}
    for m, res in within.items():
        res.to_json(js(f"cka_{m}.json"))
    summary["cka_within"] = {m: _cka_decay(r) for m, r in within.items()}
    figures["cka_within"] = fig("cka_within.png")
    _plot_cka_panels(list(within.values()), [f"{m}: CKA of its own layers" for m in within], figures["cka_within"])
    d = summary["cka_within"]
    decays = all(v["adjacent_mean"] > v["first_last"] for v in d.values())
    sections.append(("CKA within each model", "cka_within", (
        f"Each cell is the linear CKA of two layers of one model on the same {n} images; the diagonal is "
        f"{_fmt(min(v['diagonal_min'] for v in d.values()))}–{_fmt(max(v['diagonal_max'] for v in d.values()))} "
        "(a layer compared with itself) and the block structure shows which stages compute similar features. "
        + ("Similarity decays away from the diagonal in every model: adjacent layers average "
           if decays else "Similarity does *not* decay away from the diagonal in every model: adjacent layers average ")
        + ", ".join(f"{_fmt(v['adjacent_mean'])} ({m})" for m, v in d.items())
        + " against " + ", ".join(f"{_fmt(v['first_last'])}" for v in d.values()) + " for the first vs last layer.")))

    pairs = [(a, b) for a, b in (("ref_vit", "ref_resnet"), ("ref_vit", "ref_vit_gap")) if a in stores and b in stores]
    if pairs:
        step("CKA maps across models: " + ", ".join(f"{a} vs {b}" for a, b in pairs))
        across = {(a, b): cka_matrix(stores[a], stores[b], device=device, progress=False) for a, b in pairs}
        for (a, b), res in across.items():
            res.to_json(js(f"cka_{a}_vs_{b}.json"))
        figures["cka_across"] = fig("cka_across.png")
        _plot_cka_panels(list(across.values()), [f"{a} (rows) vs {b} (columns)" for a, b in across],
                         figures["cka_across"])
        summary["cka_across"] = {}
        text = []
        for (a, b), res in across.items():
            v = np.asarray(res.values)
            best = v.argmax(axis=1)
            rel = best / max(1, v.shape[1] - 1)
            mono = float(np.corrcoef(np.arange(len(best)), best)[0, 1]) if len(set(best)) > 1 else 0.0
            summary["cka_across"][f"{a}_vs_{b}"] = {"max": float(v.max()), "final_pre_logits": float(v[-2, -2]),
                                                    "best_match_relative_depth": rel.round(3).tolist(),
                                                    "best_match_depth_correlation": mono}
            text.append(f"{a} vs {b}: best-matching depths correlate at r = {mono:.2f}, pre-logits CKA "
                        f"{_fmt(float(v[-2, -2]))}")
        sections.append(("CKA across models", "cka_across", (
            "Rows are the first model's layers and columns the second's: a bright band along the diagonal means "
            "the two networks compute their features in the same order. " + "; ".join(text) + " (r near 1: "
            "each layer's most similar counterpart moves down the other network as depth grows).")))

    # 3. attention -----------------------------------------------------------------------------------------
    vits = [m for m in stores if stores[m].attention_layers]
    summary["attention"] = {}
    for m in vits:
        step(f"attention distances and head kinds of {m}")
        rep = attention_report(stores[m])
        rep.to_json(js(f"attention_{m}.json"))
        figures[f"attention_{m}"] = fig(f"attention_{m}.png")
        plot_attention_report(rep, figures[f"attention_{m}"], store=stores[m], rollout_images=2)
        figures[f"aligned_{m}"] = figure_paths(figures[f"attention_{m}"])["aligned"]
        per_layer = [[h.distance_px for h in ly.heads] for ly in rep.layers]
        kinds: dict[str, int] = {}
        for ly in rep.layers:
            for h in ly.heads:
                kinds[h.kind] = kinds.get(h.kind, 0) + 1
        first, last = per_layer[0], per_layer[-1]
        uniform = rep.layers[0].uniform_distance_px
        summary["attention"][m] = {"distance_px_per_layer": per_layer, "head_kinds": kinds,
                                   "uniform_distance_px": uniform}
        sections.append((f"Attention distance: {m}", f"attention_{m}", (
            "Each dot is one head's mean attention distance in pixels (how far a query patch looks, weighted by "
            f"attention), per layer; uniform attention over the grid would give {uniform:.1f} px. "
            f"In the first layer heads span {min(first):.1f}–{max(first):.1f} px and in the last "
            f"{min(last):.1f}–{max(last):.1f} px"
            + (", the early mix of local and global heads that Raghu et al. report for ViTs" if
               max(first) - min(first) > 0.25 * (uniform or 1) else
               ": no early mix of local and global heads, unlike the ImageNet ViTs of Raghu et al. (Fig. 3)")
            + "; head kinds: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
            + ".")))
        sections.append((f"Aligned attention maps: {m}", f"aligned_{m}", (
            "Each panel is one head's attention re-centred on its query patch and averaged over queries and images "
            "(Raghu et al. 2021, Fig. 4 style): a peak at the centre is a local head, an off-centre peak an "
            "offset-local head, a flat map a global one. The head kinds above are read from these maps.")))

    # 4. localisation --------------------------------------------------------------------------------------
    step("spatial localisation (token ↔ input-patch CKA, position probe)")
    loc = {}
    for m in stores:
        loc[m] = probes.localize(stores[m], images=min(localize_images, n), device=device)
        loc[m].to_json(js(f"localize_{m}.json"))
    figures["localization"] = fig("localization.png")
    _plot_localisation(loc, figures["localization"])
    summary["localization"] = {m: {"final_layer": r.rows[-1].layer, "final_score": r.rows[-1].score,
                                   "final_position_accuracy": r.rows[-1].position_accuracy,
                                   "scores": [row.score for row in r.rows]} for m, r in loc.items()}
    text = ", ".join(f"{m} {r.rows[-1].score:.3f}" for m, r in loc.items())
    if "ref_vit" in loc and "ref_vit_gap" in loc:
        cls_s, gap_s = loc["ref_vit"].rows[-1].score, loc["ref_vit_gap"].rows[-1].score
        verdict = ("so the CLS-token ViT's last tokens stay tied to their own patches while the GAP ViT's do "
                   "not as much, as in Raghu et al. Fig. 10" if cls_s > gap_s else
                   "so these models do *not* reproduce Raghu et al.'s finding that CLS-token ViTs localise better "
                   "than GAP ViTs in their last layer")
    else:
        verdict = "(the CLS vs GAP comparison needs both ViTs)"
    sections.append(("Spatial localisation", "localization", (
        "Left: how much more a token resembles its own input patch than the other patches (CKA over images, 0 = "
        "no localisation); right: how well a linear probe recovers each token's grid position. "
        f"Final-layer scores: {text}, {verdict}.")))
    for m in ("ref_vit", "ref_vit_gap"):
        if m in loc and loc[m].maps:
            last = loc[m].rows[-1].layer
            figures[f"token_maps_{m}"] = fig(f"token_maps_{m}.png")
            loc[m].maps[last].plot(figures[f"token_maps_{m}"])
            sections.append((f"Token ↔ patch maps: {m}", f"token_maps_{m}", (
                f"CKA between the token at the outlined position of {m}'s last block and every input patch. "
                "A bright square only at the outline means the token still encodes its own location; a flat map "
                "means its content has been mixed across the image.")))

    step("object-foreground probe")
    obj = {m: probes.object_localization(s, images=min(512, n), device=device) for m, s in stores.items()}
    for m, r in obj.items():
        r.to_json(js(f"objects_{m}.json"))
    # a layer whose grid is too coarse for any token to be mostly on the object has no IoU (NaN): skipped
    summary["objects"] = {m: {"best_layer": r.rows[int(np.nanargmax(np.asarray(r.iou, dtype=float)))].layer,
                              "best_iou": float(np.nanmax(np.asarray(r.iou, dtype=float))),
                              "baseline_iou": r.rows[0].baseline_iou} for m, r in obj.items()}
    figures["objects"] = fig("objects.png")
    _plot_objects(obj, figures["objects"])
    sections.append(("Where is the object?", "objects", (
        "A linear probe per layer predicts, for each token or feature-map position, whether it lies on the shape; "
        "the curve is the IoU of the predicted with the true foreground. Best IoU: "
        + ", ".join(f"{m} {v['best_iou']:.2f} ({short_layer_names([v['best_layer']])[0]})"
                    for m, v in summary["objects"].items()) + ".")))

    # 5. linear probes ------------------------------------------------------------------------------------
    step("linear probes of every layer")
    # 11 strengths in [1e-3, 1e2] instead of the default 45 in [1e-6, 1e5]: a tenth of the time (measured: 19 s
    # vs 230 s on these stores), best-layer accuracies within 3 points of the default grid's; tiny strengths
    # barely converge on a few hundred separable images.
    pr = [probes.linear_probe(s, method="logreg", device=device, progress=False, lambdas=PROBE_LAMBDAS)
          for s in stores.values()]
    for m, r in zip(stores, pr):
        r.to_json(js(f"probe_{m}.json"))
    figures["probes"] = fig("probes.png")
    pr[0].plot(figures["probes"], others=pr[1:], labels=list(stores))
    summary["probes"] = {m: {"best_layer": r.rows[int(np.argmax([row.top1 for row in r.rows]))].layer,
                             "best_top1": max(row.top1 for row in r.rows), "first_top1": r.rows[0].top1}
                         for m, r in zip(stores, pr)}
    sections.append(("Linear probes", "probes", (
        "Test accuracy of a logistic-regression probe on each layer's mean token / pooled features "
        f"({pr[0].protocol.get('n_train')} training images, strength chosen on a validation split). "
        "Accuracy rises from "
        + ", ".join(f"{100 * v['first_top1']:.0f}% to {100 * v['best_top1']:.0f}% ({m})"
                    for m, v in summary["probes"].items())
        + f" against {chance:.1f}% chance: the class becomes linearly readable with depth.")))

    # report -------------------------------------------------------------------------------------------------
    seconds = time.perf_counter() - t0
    summary["seconds"] = seconds
    write_json_atomic(os.path.join(out, "summary.json"), jsonable(summary))
    report = os.path.join(out, "report.md")
    _write_report(report, out, summary, sections, figures, accs, chance)
    step(f"done: {report}")
    return DemoResult(out=out, report=report, figures=figures, summary=summary, seconds=seconds, sections=sections)


def _plot_objects(results: dict[str, Any], path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    for k, (name, res) in enumerate(results.items()):
        x = np.linspace(0, 1, len(res.rows))
        ax.plot(x, res.iou, marker="o", color=f"C{k}", label=name)
    base = next(iter(results.values())).rows[0].all_foreground_iou
    ax.axhline(base, color="0.5", ls=":", lw=1, label="all tokens foreground")
    ax.set_xlabel("relative depth (first tap = 0, last = 1)")
    ax.set_ylabel("foreground IoU (test images)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=130)


def _write_report(path: str, out: str, summary: dict[str, Any], sections: list[tuple[str, str, str]],
                  figures: dict[str, str], accs: str, chance: float) -> None:
    import repsim

    lines = [
        "# repsim demo report", "",
        f"Models: the bundled reference networks ({', '.join(summary['models'])}), trained on repsim's `shapes` "
        f"data set; data: {summary['n_images']} held-out `shapes` images (seed {DEMO_SEED}, 8 classes). "
        f"Held-out accuracy of each model's own classifier: {accs} (chance {chance:.1f}%).", "",
        f"repsim {getattr(repsim, '__version__', '?')}; {summary['seconds']:.0f} s. Every number below is in "
        "`summary.json`; every result with its provenance is in `json/`; the activation stores are in `stores/` "
        "(open them with `repsim info`).", "",
    ]
    for title, key, text in sections:
        if key not in figures:
            continue
        rel = os.path.relpath(figures[key], out)
        lines += [f"## {title}", "", f"![{title}]({rel})", "", text, ""]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(path + ".tmp", path)


__all__ = ["DEMO_MODELS", "DEMO_SEED", "DemoResult", "run_demo"]
