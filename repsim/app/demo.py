"""``repsim demo``: the whole toolkit on the bundled reference models, offline, in a few minutes on a CPU.

:func:`run_demo` extracts ``ref_vit``, ``ref_vit_gap`` and ``ref_resnet`` (see :mod:`hooks.models.reference_models`)
on held-out ``shapes`` images, then computes and draws

1. each model's accuracy on those images (from the stored logits),
2. CKA maps within each model and across models (minibatch linear CKA, Nguyen et al. 2021),
3. attention distance per head and the head kinds of both ViTs (Raghu et al. 2021, Fig. 3),
4. spatial localisation: token ↔ input-patch CKA and a position probe per layer, CLS vs GAP ViT
   (Raghu et al. 2021, Fig. 10), and the object-foreground probe,
5. linear probes of every layer (Kornblith et al. 2019 protocol),
6. robustness to random patch drop (Naseer et al. 2021): top-1 per drop level and where CKA(clean,
   perturbed) falls below 0.5, ViT vs ResNet (:mod:`repsim.robustness`),
7. attention as segmentation (Caron et al. 2021; Peruzzo et al. 2022) of both ViTs
   (:mod:`repsim.attention.segmentation`).

Each phase is one step function (``_extraction_step`` … ``_segmentation_step``, listed in :func:`run_demo`):
it reads a :class:`DemoContext` and returns a :class:`StepOutput` (its ``summary.json`` entries, report sections
and figures). The demo writes ``DIR/report.md``: every figure with two sentences on what it shows, sentences
written *from the measured numbers* (a published effect the models do not show is reported as absent, not asserted).
Every result is also kept as JSON with its provenance under ``DIR/json/``; ``DIR/summary.json`` holds the
headline numbers the report quotes.

Like :mod:`repsim.app.cli`, this module is an application layer over all three packages (``repsim``,
``hooks``, ``probes``): nothing in the library imports it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hooks.extract.loop import plan_extraction, run_extraction
from hooks.models.reference_models import REFERENCE_MODELS
from hooks.models.registry import load_model
from repsim.measures.cka_engine import CKAResult, cka_matrix
from repsim.data.sources import open_dataset
from repsim.errors import UsageError
from repsim.measures.intervals import (HALF_SAMPLE_METHOD, LEVEL, N_RESAMPLES, HalfSampleCKA, adjacent_minus_far,
                              bootstrap_mean, bootstrap_paired, centred_gram, ci_text, correspondence,
                              newcombe_difference, percentile_interval, statistic, verdict, wilson_interval)
from repsim.results import jsonable, save_figure_atomic, write_json_atomic
from repsim.robustness import logits_of, robustness_profiles, top1_correct
from repsim.store.format import layer_kind
from repsim.store.reader import ActivationStore

DEMO_MODELS = ("ref_vit", "ref_vit_gap", "ref_resnet")
#: the held-out data: shapes seed 0 (the reference models were trained on another seed)
DEMO_SEED = 0
#: L2 strengths searched by the demo's logistic-regression probes
PROBE_LAMBDAS = np.logspace(-3, 2, 11)
#: the robustness section's patch-drop fractions (a few, to keep the demo's time in check)
ROBUSTNESS_LEVELS = (0.25, 0.5)
#: patch grid of the drop in input pixels: the ViTs' token size on the 64 px images (one dropped patch = one token)
ROBUSTNESS_PATCH_PX = 8


@dataclass
class DemoResult:
    """Where the demo wrote its report, figures and JSON, and the headline numbers (``summary``)."""

    out: str
    report: str
    figures: dict[str, str]
    summary: dict[str, Any]
    seconds: float
    sections: list[tuple[str, str, str]] = field(default_factory=list)  # (title, figure key, two sentences)


class PhaseProgress:
    """Progress of the demo: a timestamped line when each phase starts, and within a phase one bar over its steps
    on a terminal, or one line per finished step otherwise (a log file, ``--quiet``); never nested bars (the
    library calls inside a step run without their own bars, except extraction's, which replaces the phase bar).
    ``seconds[phase]`` records each phase's wall time."""

    def __init__(self, log: Callable[[str], None], bars: bool, t0: float | None = None):
        self.log, self.bars = log, bars
        self.t0 = time.perf_counter() if t0 is None else t0
        self.seconds: dict[str, float] = {}

    def line(self, msg: str) -> None:
        self.log(f"[{time.perf_counter() - self.t0:5.0f} s] {msg}")

    @contextlib.contextmanager
    def phase(self, key: str, title: str, total: int, bar: bool = True) -> Iterator[Callable[[str], Any]]:
        """``with progress.phase(key, title, total) as step: with step("what"): ...`` once per step; ``bar=False``:
        no phase bar (the step draws its own), lines only when bars are off."""
        from tqdm.auto import tqdm

        start = time.perf_counter()
        self.line(title)
        pbar = tqdm(total=total, desc=key, unit="step", leave=False, dynamic_ncols=True) \
            if self.bars and bar else None
        done = [0]

        @contextlib.contextmanager
        def step(what: str) -> Iterator[None]:
            t = time.perf_counter()
            if pbar is not None:
                pbar.set_postfix_str(what)  # what is running now
            yield
            done[0] += 1
            if pbar is not None:
                pbar.update(1)
            else:
                self.line(f"  {key} {done[0]}/{total}: {what} ({time.perf_counter() - t:.0f} s)")

        try:
            yield step
        finally:
            if pbar is not None:
                pbar.close()
            self.seconds[key] = round(time.perf_counter() - start, 1)


def _fmt(v: float) -> str:
    return f"{v:.2f}"


def _classes(store: ActivationStore) -> list[str]:
    return list(store.attrs["dataset"]["classes"])


def _correct(store: ActivationStore) -> np.ndarray:
    """Per image, 1.0 where the argmax of the model's logits (its last stored layer) is the label, else 0.0."""
    layer, why = logits_of(store)
    if layer is None:
        raise UsageError(f"{store.path}: no class logits to score ({why})")
    return top1_correct(store, layer)


def comparable_layers(store: ActivationStore) -> list[str]:
    """The layers a depth comparison may use: the token / map layers (stem and blocks), in network order.

    The pooled pre-logits vector and the logits (vector layers) are left out: they are the classifier's input
    and output, trained towards the same labels in every model, so their mutual similarity says nothing about
    whether two networks compute their features in the same order.
    """
    return [layer for layer in store.layers if layer_kind(store.layer_info(layer), layer) in ("tokens", "map")]


def _grams(store: ActivationStore, layers: Sequence[str]) -> dict[str, Any]:
    """Centred float64 Grams (n, n) of each layer's flattened features (the rows of ``tokens="flatten"``)."""
    import torch

    from repsim.measures.cka_engine import layer_features

    return {layer: centred_gram(layer_features(store, layer, tokens="flatten", dtype=torch.float32).numpy())
            for layer in layers}


def _check_against_map(stat: HalfSampleCKA, result: CKAResult) -> float:
    """Largest |difference| between the statistics' CKA matrix and the plotted map on the same layers."""
    ia = [result.layers_a.index(x) for x in stat.layers_a]
    ib = [result.layers_b.index(x) for x in stat.layers_b]
    diff = float(np.abs(np.asarray(result.values)[np.ix_(ia, ib)] - stat.observed).max())
    if diff > 1e-3:
        raise RuntimeError(f"the half-sample CKA ({diff:.2e} off) does not reproduce the plotted map: a bug")
    return diff


def cka_within_statistics(stat: HalfSampleCKA) -> dict[str, Any]:
    """Decay away from the diagonal on the comparable layers: adjacent-layer mean, first vs last, difference."""
    first, last = stat.layers_a[0], stat.layers_a[-1]
    adjacent = stat.interval(lambda v: float(np.mean(np.diag(v, 1))))
    far = stat.interval(lambda v: float(v[0, -1]))
    decay = stat.interval(adjacent_minus_far)
    return {"layers": stat.layers_a, "first_layer": first, "last_layer": last, "adjacent_mean": adjacent,
            "first_vs_last": far, "adjacent_minus_first_vs_last": decay}


def cka_within_sentence(name: str, d: dict[str, Any]) -> str:
    dec = d["adjacent_minus_first_vs_last"]
    word = {"higher": "decays away from the diagonal", "lower": "*rises* away from the diagonal",
            "not resolved": "has no resolved decay away from the diagonal"}[dec["verdict"]]
    return (f"{name} {word}: adjacent layers {ci_text(**_v(d['adjacent_mean']))} vs "
            f"{d['first_layer']} against {d['last_layer']} {ci_text(**_v(d['first_vs_last']))} "
            f"(difference {ci_text(**_v(dec))}{'' if dec['verdict'] != 'not resolved' else ', not resolved'})")


def _v(stat: dict[str, Any]) -> dict[str, float]:
    return {"value": stat["value"], "low": stat["low"], "high": stat["high"]}


def cka_correspondence_statistics(stat: HalfSampleCKA) -> dict[str, Any]:
    """Where each comparable layer of A best matches B, and the slope of that match depth on A's depth."""
    c = correspondence(stat.observed)
    slope = stat.interval(lambda v: correspondence(v)["slope"])
    return {"layers_a": stat.layers_a, "layers_b": stat.layers_b,
            "best_match": [stat.layers_b[j] for j in c["best"]],
            "best_match_relative_depth": c["best_relative_depth"],
            "best_match_cka": [float(stat.observed[i, j]) for i, j in enumerate(c["best"])],
            "slope": slope,
            "rests_on": (f"debiased CKA between the {len(stat.layers_a)} x {len(stat.layers_b)} token / map layers "
                         "(stem and blocks); the pooled pre-logits and the logits are excluded")}


def cka_correspondence_sentence(a: str, b: str, d: dict[str, Any]) -> str:
    sl = d["slope"]
    groups: dict[str, list[str]] = {}
    for la, lb in zip(d["layers_a"], d["best_match"]):
        groups.setdefault(lb, []).append(la)
    matches = "; ".join(f"{', '.join(v)} → {k}" for k, v in groups.items())
    if sl["verdict"] == "higher" and sl["low"] > 0.5:
        claim = f"later {a} layers find their best match later in {b}, close to a diagonal band"
    elif sl["verdict"] == "higher":
        claim = (f"the best match moves down {b} as {a} deepens, but by much less than a diagonal band would "
                 "(slope 1)")
    elif sl["verdict"] == "lower":
        claim = f"the best match moves *up* {b} as {a} deepens"
    else:
        claim = "a depth correspondence is not resolved (the interval of the slope includes 0)"
    return (f"{a} vs {b}: best matches {matches}; slope of best-match depth on depth "
            f"{ci_text(**_v(sl))} (1 = diagonal band, 0 = same depth throughout): {claim}")


def _attention_statistics(store: ActivationStore, rep: Any, seed: int = 0) -> dict[str, Any]:
    """First- and last-layer spread of the heads' mean distances, with a bootstrap over images."""
    uniform = float(rep.layers[0].uniform_distance_px)
    out: dict[str, Any] = {"uniform_distance_px": uniform}
    rng = np.random.default_rng(seed)
    for which, ly in (("first", rep.layers[0]), ("last", rep.layers[-1])):
        d = np.asarray(store.read_attention(ly.layer, "distance"), dtype=np.float64)  # (n, heads)
        idx = rng.integers(0, d.shape[0], size=(N_RESAMPLES * 5, d.shape[0]))
        means = d[idx].mean(axis=1)  # (B, heads)
        spread_b = means.max(axis=1) - means.min(axis=1)
        shortest_b = means.min(axis=1) / uniform
        m = d.mean(axis=0)
        lo, hi = percentile_interval(spread_b)
        slo, shi = percentile_interval(shortest_b)
        # a "mix of local and global heads": the heads' distances differ by more than a quarter of uniform
        mix = percentile_interval(spread_b - 0.25 * uniform)
        out[which] = {"layer": ly.layer, "distance_px": m.tolist(),
                      "spread_px": statistic(float(m.max() - m.min()), lo, hi, n=int(d.shape[0])),
                      "shortest_over_uniform": statistic(float(m.min() / uniform), slo, shi, n=int(d.shape[0])),
                      "spread_minus_quarter_uniform": statistic(float(m.max() - m.min() - 0.25 * uniform), *mix,
                                                                n=int(d.shape[0]))}
    out["method"] = "percentile bootstrap over images of the per-image mean distances (1000 resamples)"
    return out


def _attention_sentence(name: str, st: dict[str, Any], kinds: dict[str, int]) -> str:
    f, la = st["first"], st["last"]
    u = st["uniform_distance_px"]
    mix = f["spread_minus_quarter_uniform"]["verdict"]
    verdict = {"higher": "the early mix of local and global heads that Raghu et al. report for ViTs",
               "lower": "no early mix of local and global heads (spread below a quarter of the uniform distance), "
                        "unlike the ImageNet ViTs of Raghu et al. (Fig. 3)",
               "not resolved": "whether the first layer mixes local and global heads is not resolved"}[mix]
    return (f"Each dot is one head's mean attention distance in pixels with its 95% interval over images; uniform "
            f"attention over the grid gives {u:.1f} px. In the first layer ({f['layer']}) the heads span "
            f"{min(f['distance_px']):.1f}–{max(f['distance_px']):.1f} px (spread "
            f"{ci_text(**_v(f['spread_px']), digits=1)} px; the most local head at "
            f"{ci_text(**_v(f['shortest_over_uniform']), digits=2)} of uniform), in the last ({la['layer']}) "
            f"{min(la['distance_px']):.1f}–{max(la['distance_px']):.1f} px: {verdict}. Head kinds (rule-based labels "
            "of repsim.attention.statistics.classify_heads on the aligned maps, not estimates): "
            + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])) + ".")


def _plot_cka_panels(results: Sequence[CKAResult], titles: Sequence[str], path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.4 * len(results), 5.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(results)))
    for ax, res, title in zip(axes, results, titles):
        res.plot(None, ax=ax)  # its title carries the models, estimator, tokens and n
        ax.set_title(f"{title}\n{ax.get_title().split(chr(10), 1)[-1]}", fontsize=9)
    save_figure_atomic(fig, path, dpi=130)


def _plot_localisation(results: dict[str, Any], final: dict[str, dict[str, Any]], path: str) -> None:
    """Localisation score and position-probe accuracy against relative depth, one curve per model, with 95 %
    bootstrap intervals (score: final layer; probe: every layer). Legends outside the axes."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(11, 4.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for k, (name, res) in enumerate(results.items()):
        c = f"C{k}"
        x = np.linspace(0, 1, len(res.rows))
        ax1.plot(x, [np.nan if r.score is None else r.score for r in res.rows], marker="o", color=c, label=name)
        if name in final:
            f = final[name]
            ax1.errorbar([x[-1]], [f["score"]], yerr=[[max(0.0, f["score"] - f["low"])], [max(0.0, f["high"] - f["score"])]], color=c,
                         capsize=4, lw=2, fmt="none")
        acc = np.array([np.nan if r.position_accuracy is None else 100 * r.position_accuracy for r in res.rows])
        lo = np.array([np.nan if r.position_accuracy_low is None else 100 * r.position_accuracy_low for r in res.rows])
        hi = np.array([np.nan if r.position_accuracy_high is None else 100 * r.position_accuracy_high
                       for r in res.rows])
        ax2.errorbar(x, acc, yerr=[np.clip(np.nan_to_num(acc - lo), 0, None), np.clip(np.nan_to_num(hi - acc), 0, None)], marker="o", color=c,
                     capsize=2.5, label=name)
        ax2.plot(x, [np.nan if r.position_chance is None else 100 * r.position_chance for r in res.rows],
                 ls=":", color=c, lw=1)
    ax1.axhline(0, color="0.5", lw=0.8, ls=":")
    ax1.set_ylabel("localisation score (own − other patch CKA)")
    n_img = next(iter(results.values())).protocol.get("n_images")
    ax1.set_title(f"token ↔ input-patch CKA (biased, n = {n_img} images)\nbar: 95% bootstrap CI at the last layer",
                  fontsize=9)
    ax2.set_ylabel("position-probe test accuracy (%), 95% CI")
    ax2.set_title("linear probe of each token's grid position\n(dotted: chance = 1 / grid positions)", fontsize=9)
    for ax in (ax1, ax2):
        ax.set_xlabel("relative depth (first tap = 0, last token/map layer = 1)")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=f"C{k}", marker="o", label=name) for k, name in enumerate(results)]
    handles.append(Line2D([], [], color="0.4", ls=":", label="chance (position probe)"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    save_figure_atomic(fig, path, dpi=130)


def _probe_intervals(res: Any) -> list[dict[str, Any]]:
    n = int(res.protocol.get("n_test"))
    out = []
    for row in res.rows:
        k = int(round(row.top1 * n))
        lo, hi = wilson_interval(k, n)
        out.append({"layer": row.layer, "top1": row.top1, "low": lo, "high": hi, "correct": k, "n_test": n})
    return out


def _plot_probes(results: dict[str, Any], intervals: dict[str, list[dict[str, Any]]], chance: float,
                 path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.5, 4.4), layout="constrained")
    ax = fig.subplots()
    for k, (name, res) in enumerate(results.items()):
        iv = intervals[name]
        x = np.linspace(0, 1, len(iv))
        y = np.array([100 * r["top1"] for r in iv])
        err = np.clip([y - np.array([100 * r["low"] for r in iv]), np.array([100 * r["high"] for r in iv]) - y], 0, None)
        ax.errorbar(x, y, yerr=err, marker="o", capsize=2.5, color=f"C{k}", label=name)
    ax.axhline(100 * chance, ls=":", color="0.5", label=f"chance ({100 * chance:.1f}%)")
    ax.set_ylim(0, 100)
    ax.set_xlabel("relative depth (stem = 0, pre-logits = second-to-last point, logits = 1)")
    ax.set_ylabel("in-distribution probe accuracy (%), 95% Wilson CI")
    first = next(iter(results.values()))
    p = first.protocol
    ax.set_title(f"logistic-regression probe per layer: trained on {p.get('n_train')} + {p.get('n_val')} (val) "
                 f"and tested on {p.get('n_test')} held-out shapes images", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    save_figure_atomic(fig, path, dpi=130)


def _attention_analysis(m: str, store: ActivationStore, fig: Callable[[str], str], js: Callable[[str], str]
                        ) -> tuple[dict[str, Any], list[tuple[str, str, str]], dict[str, str]]:
    """One ViT's attention step: report, JSON and figures (distance, aligned maps, rollout), the statistics behind
    its sentences. Returns (summary entry, report sections, figure paths by key)."""
    from repsim.plotting.attention import figure_paths, relative_to_uniform
    from repsim.attention.report import attention_report

    figures: dict[str, str] = {}
    sections: list[tuple[str, str, str]] = []
    rep = attention_report(store)
    rep.to_json(js(f"attention_{m}.json"))
    figures[f"attention_{m}"] = fig(f"attention_{m}.png")
    drawn = rep.plot(figures[f"attention_{m}"], store=store, rollout_images=2)
    paths = figure_paths(figures[f"attention_{m}"])
    figures[f"aligned_{m}"] = paths["aligned"]
    if drawn.get("rollout") is not None:
        figures[f"rollout_{m}"] = paths["rollout"]
    kinds: dict[str, int] = {}
    for ly in rep.layers:
        for h in ly.heads:
            kinds[h.kind] = kinds.get(h.kind, 0) + 1
    st = _attention_statistics(store, rep)
    summary = {"distance_px_per_layer": [[h.distance_px for h in ly.heads] for ly in rep.layers],
               "head_kinds": kinds, **st}
    sections.append((f"Attention distance: {m}", f"attention_{m}", _attention_sentence(m, st, kinds)))
    centre = {(ly.layer, h): float(relative_to_uniform(rep.aligned[ly.layer])[h][
        (rep.aligned[ly.layer].shape[1] - 1) // 2, (rep.aligned[ly.layer].shape[2] - 1) // 2])
        for ly in rep.layers for h in range(ly.num_heads)}
    (cl, ch), cmax = max(centre.items(), key=lambda kv: kv[1])
    summary["centre_over_uniform_max"] = {"layer": cl, "head": ch, "value": cmax}
    sections.append((f"Aligned attention maps: {m}", f"aligned_{m}", (
        "Each panel is one head's attention re-centred on its query patch, averaged over queries and images and "
        "divided, offset by offset, by what uniform attention would give there (uniform attention aligned "
        "this way is a pyramid, the count of queries that reach each offset, so the raw map always peaks at "
        "the centre): white is uniform (a global head is flat white), a red centre is a local head, a red spot "
        f"off the + an offset head. The strongest centre is x{cmax:.2f} uniform ({cl} head {ch}); the colour "
        "scale spans the maps' range, at least x1/2 to x2 (descriptive: no interval is computed for these "
        "maps).")))
    if f"rollout_{m}" in figures:
        sections.append((f"Attention rollout: {m}", f"rollout_{m}", (
            "Attention rollout (Abnar & Zuidema 2020) multiplies the layers' head-averaged attention (plus the "
            f"identity for the residual stream) to estimate how much each input patch reaches {m}'s read-out "
            "token, for the first two images, each map scaled to its maximum. It is an illustration of single "
            "images, not a statistic: no claim in this report rests on it.")))
    return summary, sections, figures


@dataclass
class DemoContext:
    """What the demo's steps share: settings, where to write, the progress reporter, and what earlier steps
    produced (the stores, the loaded models and image sources, the centred Grams of the CKA step)."""

    out: str
    n: int
    localise_images: int
    device: str
    bars: bool  # draw progress bars (stderr is a terminal)
    ph: PhaseProgress
    stores: dict[str, ActivationStore] = field(default_factory=dict)
    loaded_models: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, Any] = field(default_factory=dict)
    grams: dict[str, dict[str, Any]] = field(default_factory=dict)
    accs: str = ""  # the held-out accuracies as the report's first paragraph quotes them
    chance: float = 0.0  # chance accuracy in percent

    def fig(self, name: str) -> str:
        return os.path.join(self.out, "figures", name)

    def js(self, name: str) -> str:
        return os.path.join(self.out, "json", name)


@dataclass
class StepOutput:
    """One demo step's share of the output: top-level ``summary.json`` entries, report sections (title, figure
    key, text) and figure paths by key."""

    summary: dict[str, Any] = field(default_factory=dict)
    sections: list[tuple[str, str, str]] = field(default_factory=list)
    figures: dict[str, str] = field(default_factory=dict)


def run_demo(
    out: str,
    *,
    n: int = 512,
    localise_images: int = 256,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
    models: Sequence[str] = DEMO_MODELS,
) -> DemoResult:
    """Run the demo into folder ``out`` (created; existing stores there are reused when complete).

    ``n``: held-out ``shapes`` images extracted per model (seed :data:`DEMO_SEED`); ``localise_images``: images
    for the token ↔ patch CKA (memory grows with its square). ``models``: a subset of :data:`DEMO_MODELS`
    (the comparisons that need a missing model are skipped). ``log`` receives a timestamped line when each phase
    starts; ``progress``: one bar per phase when stderr is a terminal, else (and with ``progress=False``) one
    ``log`` line per finished step of a phase (:class:`PhaseProgress`). ``summary["phase_seconds"]`` keeps each
    phase's wall time.
    """
    t0 = time.perf_counter()
    unknown = [m for m in models if m not in REFERENCE_MODELS]
    if unknown:
        raise UsageError(f"unknown demo model(s) {', '.join(unknown)}; choose from {', '.join(DEMO_MODELS)}")
    if n < 64:
        raise UsageError(f"the demo needs n >= 64 images, got {n}")
    for folder in ("stores", "json", "figures"):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    # one bar per phase on a terminal, one line per finished step in a log (issue 13: phases sat silent)
    bars = progress and sys.stderr.isatty()
    ctx = DemoContext(out=out, n=n, localise_images=localise_images, device=device, bars=bars,
                      ph=PhaseProgress(log, bars, t0))
    summary: dict[str, Any] = {
        "n_images": n, "data": f"shapes seed {DEMO_SEED} (held out)", "models": {},
        "uncertainty": {"level": LEVEL, "cka": HALF_SAMPLE_METHOD.format(r=N_RESAMPLES),
                        "accuracy": "Wilson score interval; differences: Newcombe hybrid score interval",
                        "localisation": f"percentile bootstrap over images ({N_RESAMPLES} resamples)",
                        "per-image means": "percentile bootstrap over images (1000 resamples)",
                        "verdict": "'higher' / 'lower' only when the interval excludes 0, else 'not resolved'"}}
    figures: dict[str, str] = {}
    sections: list[tuple[str, str, str]] = []

    # the plan: each step reads the context (and what earlier steps left in it) and returns its share
    for step in (_extraction_step, _cka_within_step, _cka_across_step, _attention_step, _localisation_step,
                 _objects_step, _probes_step, _robustness_step, _segmentation_step):
        done = step(ctx, list(models))
        summary.update(done.summary)
        sections += done.sections
        figures.update(done.figures)

    seconds = time.perf_counter() - t0
    summary["seconds"] = seconds
    summary["phase_seconds"] = dict(ctx.ph.seconds)  # wall time of each phase (figures and report not included)
    write_json_atomic(os.path.join(out, "summary.json"), jsonable(summary))
    report = os.path.join(out, "report.md")
    _write_report(report, out, summary, sections, figures, ctx.accs, ctx.chance)
    ctx.ph.line(f"done: {report}")
    return DemoResult(out=out, report=report, figures=figures, summary=summary, seconds=seconds, sections=sections)


def _extraction_step(ctx: DemoContext, models: list[str]) -> StepOutput:
    """Extract every model on the held-out images (ViTs with attention statistics); accuracy from the logits."""
    with ctx.ph.phase("extraction", f"extracting {', '.join(models)} on {ctx.n} held-out shapes images",
                      len(models), bar=False) as step:  # extraction's own bar (images) is the finer one
        for name in models:
            with step(name):
                loaded = ctx.loaded_models[name] = load_model(name)
                source = ctx.sources[name] = open_dataset("shapes", n=ctx.n, seed=DEMO_SEED,
                                                          image_size=loaded.preprocessing.img_size[0])
                is_vit = loaded.info.family == "vit"
                # n in the name: a rerun with another --n in the same folder extracts anew instead of being refused
                plan = plan_extraction(loaded, source, os.path.join(ctx.out, "stores", f"{name}-n{ctx.n}.zarr"),
                                       batch_size=64, save_inputs=True, attention=is_vit,
                                       attn_keep=4 if is_vit else 0, progress=ctx.bars)
                ctx.stores[name] = run_extraction(plan, device=ctx.device, progress=ctx.bars)
    entries = {}
    for name in models:
        store = ctx.stores[name]
        correct = _correct(store)
        acc = float(correct.mean())
        lo, hi = wilson_interval(int(correct.sum()), int(correct.size))
        entries[name] = {"accuracy": acc, "accuracy_low": lo, "accuracy_high": hi,
                         "chance": 1 / len(_classes(store)),
                         "weights_sha256": ctx.loaded_models[name].info.weights.get("sha256"),
                         "layers": list(store.layers), "comparable_layers": comparable_layers(store)}
    ctx.accs = ", ".join(f"{m} {ci_text(v['accuracy'], v['accuracy_low'], v['accuracy_high'], 1, 100, '%')}"
                         for m, v in entries.items())
    ctx.chance = 100 / len(_classes(next(iter(ctx.stores.values()))))
    ctx.ph.line(f"held-out accuracy: {ctx.accs} (chance {ctx.chance:.1f}%)")
    return StepOutput(summary={"models": entries})


def _cka_within_step(ctx: DemoContext, models: list[str]) -> StepOutput:
    """CKA map of each model's own layers; decay away from the diagonal with half-sample intervals."""
    within, entries = {}, {}
    with ctx.ph.phase("cka_within", "CKA maps within each model (debiased CKA on all images; half-sample intervals)",
                      3 * len(ctx.stores)) as step:
        for m, s in ctx.stores.items():
            with step(f"{m}: map"):
                within[m] = cka_matrix(s, estimator="debiased", device=ctx.device, progress=False)
                within[m].to_json(ctx.js(f"cka_{m}.json"))
            with step(f"{m}: Grams of the stem and blocks"):
                ctx.grams[m] = _grams(s, comparable_layers(s))
            with step(f"{m}: half-sample intervals ({N_RESAMPLES} splits)"):
                stat = HalfSampleCKA(ctx.grams[m])
                d = cka_within_statistics(stat)
                d["max_abs_difference_to_map"] = _check_against_map(stat, within[m])
                entries[m] = d
    path = ctx.fig("cka_within.png")
    _plot_cka_panels(list(within.values()), [f"{m}: CKA of its own layers" for m in within], path)
    diag = np.concatenate([np.diag(np.asarray(r.values)) for r in within.values()])
    text = (f"Each cell is the debiased linear CKA of two layers of one model on the same {ctx.n} images (features "
            f"flattened); the diagonal is {_fmt(diag.min())}–{_fmt(diag.max())} (a layer against itself), and the "
            "statistics below use the stem and blocks only (pre-logits and logits left out). "
            + "; ".join(cka_within_sentence(m, v) for m, v in entries.items()) + ". Intervals: 95%, half-samples of "
            "the images.")
    return StepOutput({"cka_within": entries}, [("CKA within each model", "cka_within", text)],
                      {"cka_within": path})


def _cka_across_step(ctx: DemoContext, models: list[str]) -> StepOutput:
    """CKA maps across models (ViT vs ResNet, CLS vs GAP ViT) and the depth correspondence with its interval."""
    stores = ctx.stores
    pairs = [(a, b) for a, b in (("ref_vit", "ref_resnet"), ("ref_vit", "ref_vit_gap")) if a in stores and b in stores]
    if not pairs:
        return StepOutput()
    across, entries, text = {}, {}, []
    with ctx.ph.phase("cka_across", "CKA maps across models: " + ", ".join(f"{a} vs {b}" for a, b in pairs),
                      2 * len(pairs)) as step:
        for a, b in pairs:
            with step(f"{a} vs {b}: map"):
                res = across[(a, b)] = cka_matrix(stores[a], stores[b], estimator="debiased", device=ctx.device,
                                                  progress=False)
                res.to_json(ctx.js(f"cka_{a}_vs_{b}.json"))
            with step(f"{a} vs {b}: half-sample intervals ({N_RESAMPLES} splits)"):
                stat = HalfSampleCKA(ctx.grams[a], ctx.grams[b])
                c = cka_correspondence_statistics(stat)
                c["max_abs_difference_to_map"] = _check_against_map(stat, res)
                entries[f"{a}_vs_{b}"] = c
                text.append(cka_correspondence_sentence(a, b, c))
    path = ctx.fig("cka_across.png")
    _plot_cka_panels(list(across.values()), [f"{a} (rows) vs {b} (columns)" for a, b in across], path)
    return StepOutput({"cka_across": entries}, [("CKA across models", "cka_across", (
        "Rows are the first model's layers and columns the second's; a bright band along the diagonal would "
        "mean the two networks compute their features in the same order. The correspondence rests on the "
        "stem and block layers only (the pre-logits and logits rows and columns, trained towards the same "
        "labels, are left out): " + ". ".join(text) + "."))], {"cka_across": path})


def _attention_step(ctx: DemoContext, models: list[str]) -> StepOutput:
    """Attention distances, aligned maps and rollout of every ViT (:func:`_attention_analysis`)."""
    vits = [m for m in ctx.stores if ctx.stores[m].attention_layers]
    done = StepOutput({"attention": {}})
    with ctx.ph.phase("attention", "attention distances and head kinds of " + ", ".join(vits), len(vits)) as step:
        for m in vits:
            with step(m):
                done.summary["attention"][m], more_sections, more_figures = _attention_analysis(
                    m, ctx.stores[m], ctx.fig, ctx.js)
            done.sections += more_sections
            done.figures.update(more_figures)
    return done


def _localisation_step(ctx: DemoContext, models: list[str]) -> StepOutput:
    """Token ↔ input-patch CKA and the position probe per layer; CLS vs GAP ViT with paired intervals; the
    last block's token maps."""
    import probes
    from probes.localisation import localisation_interval, plot_token_maps

    stores, images = ctx.stores, min(ctx.localise_images, ctx.n)
    loc, final = {}, {}
    with ctx.ph.phase("localisation", "spatial localisation (token ↔ input-patch CKA, position probe)",
                      len(stores)) as step:
        for m in stores:
            with step(f"{m} ({len(comparable_layers(stores[m]))} layers)"):
                loc[m] = probes.localise(stores[m], images=images, device=ctx.device, progress=False)
                loc[m].to_json(ctx.js(f"localize_{m}.json"))
    with ctx.ph.phase("localisation_bootstrap",
                      f"localisation: bootstrap of the last layer's score ({N_RESAMPLES} resamples per model)",
                      len(loc)) as step:
        for m, r in loc.items():
            with step(f"{m} ({r.rows[-1].layer})"):
                final[m] = localisation_interval(stores[m], r.rows[-1].layer, images=images,
                                                 n_boot=N_RESAMPLES, seed=0, device=ctx.device)
    done = StepOutput(figures={"localisation": ctx.fig("localisation.png")})
    _plot_localisation(loc, final, done.figures["localisation"])
    entries: dict[str, Any] = {
        m: {"final_layer": r.rows[-1].layer,
            "final_score": statistic(final[m]["score"], final[m]["low"], final[m]["high"], n=final[m]["n"],
                                     method=final[m]["method"]),
            "final_position_accuracy": statistic(r.rows[-1].position_accuracy, r.rows[-1].position_accuracy_low,
                                                 r.rows[-1].position_accuracy_high,
                                                 chance=r.rows[-1].position_chance),
            "scores": [row.score for row in r.rows]} for m, r in loc.items()}
    done.summary["localisation"] = entries
    text = "; ".join(f"{m} ({v['final_layer']}) {ci_text(**_v(v['final_score']), digits=3)}"
                     for m, v in entries.items())
    if "ref_vit" in loc and "ref_vit_gap" in loc:
        same_rows = list(stores["ref_vit"].ids) == list(stores["ref_vit_gap"].ids)
        diff = final["ref_vit"]["samples"] - final["ref_vit_gap"]["samples"]  # same seed and n: paired resamples
        dlo, dhi = percentile_interval(diff) if same_rows else (float("nan"), float("nan"))
        sdiff = statistic(final["ref_vit"]["score"] - final["ref_vit_gap"]["score"], dlo, dhi,
                          method="paired percentile bootstrap over the same images")
        pa = loc["ref_vit"].probes[loc["ref_vit"].rows[-1].layer].image_accuracy
        pb = loc["ref_vit_gap"].probes[loc["ref_vit_gap"].rows[-1].layer].image_accuracy
        pd = bootstrap_mean(pa, pb)
        pdiff = statistic(pd["value"], pd["low"], pd["high"], n=pd["n"],
                          method="paired percentile bootstrap over the test images")
        entries["cls_minus_gap"] = {"score": sdiff, "position_accuracy": pdiff}
        verdict_s = {
            "higher": "the CLS-token ViT's last tokens stay tied to their own patches more than the GAP ViT's, as in "
                      "Raghu et al. Fig. 10",
            "lower": "the GAP ViT's last tokens stay tied to their own patches *more*, the opposite of Raghu et al. "
                     "Fig. 10",
            "not resolved": "the difference is not resolved, so these models neither reproduce nor contradict "
                            "Raghu et al. Fig. 10"}[sdiff["verdict"]]
        verdict_p = {"higher": "higher for the CLS ViT", "lower": "higher for the GAP ViT",
                     "not resolved": "not resolved"}[pdiff["verdict"]]
        loc_text = (f"CLS − GAP score {ci_text(**_v(sdiff), digits=3)}: {verdict_s}. The position probe on the same "
                    f"layer reads {100 * loc['ref_vit'].rows[-1].position_accuracy:.1f}% vs "
                    f"{100 * loc['ref_vit_gap'].rows[-1].position_accuracy:.1f}% (difference "
                    f"{ci_text(**_v(pdiff), digits=1, scale=100, unit=' points')}: {verdict_p}), so a token's "
                    "position stays linearly decodable in both even where its CKA to its own patch differs")
    else:
        loc_text = "(the CLS vs GAP comparison needs both ViTs)"
    done.sections.append(("Spatial localisation", "localisation", (
        "Left: how much more a token resembles its own input patch than the other patches (biased CKA over "
        f"{images} images, 0 = no localisation); right: how well a linear probe recovers each "
        f"token's grid position (95% intervals over images). Last-layer scores: {text}. {loc_text}.")))
    pair = {m: loc[m].maps[loc[m].rows[-1].layer] for m in ("ref_vit", "ref_vit_gap") if m in loc and loc[m].maps}
    if pair:
        done.figures["token_maps"] = ctx.fig("token_maps.png")
        plot_token_maps(pair, done.figures["token_maps"])
        done.sections.append(("Token ↔ patch maps of the last block", "token_maps", (
            "CKA between the token at the outlined position of each ViT's last block and every input patch, both "
            "rows on one colour scale. A bright square only at the outline means the token still encodes its own "
            "location; a flat map means its content has been mixed across the image; the row labels give the "
            "localisation score whose interval is in the previous section.")))
    return done


def _objects_step(ctx: DemoContext, models: list[str]) -> StepOutput:
    """The object-foreground probe per layer: best IoU and its gain over calling every cell foreground."""
    import probes
    from probes.foreground_probe import plot_object_localisation

    obj = {}
    with ctx.ph.phase("objects", "object-foreground probe", len(ctx.stores)) as step:
        for m, s in ctx.stores.items():
            with step(f"{m} ({len(comparable_layers(s))} layers)"):
                obj[m] = probes.object_localisation(s, images=min(512, ctx.n), device=ctx.device, progress=False)
                obj[m].to_json(ctx.js(f"objects_{m}.json"))
    entries = {}
    for m, r in obj.items():
        iou = np.asarray(r.iou, dtype=float)
        best = r.rows[int(np.nanargmax(iou))]
        entries[m] = {
            "best_layer": best.layer, "best_iou": statistic(best.iou_mean, best.iou_low, best.iou_high,
                                                            n=best.n_scored_images),
            "best_gain_over_all_foreground": statistic(best.gain_over_all_foreground, best.gain_low,
                                                       best.gain_high, n=best.n_scored_images),
            "no_foreground_predicted": [row.layer for row in r.rows if row.predicted_foreground_share == 0],
            "baseline_iou": r.rows[0].baseline_iou}
    path = ctx.fig("objects.png")
    plot_object_localisation(obj, path)
    parts = []
    for m, v in entries.items():
        g = v["best_gain_over_all_foreground"]
        word = {"higher": "above", "lower": "below", "not resolved": "not resolved against"}[g["verdict"]]
        parts.append(f"{m} {ci_text(**_v(v['best_iou']))} at {v['best_layer']} ({word} the all-foreground "
                     f"reference by {ci_text(**_v(g))})")
    dead = [f"{m}: {', '.join(v['no_foreground_predicted'])}" for m, v in entries.items()
            if v["no_foreground_predicted"]]
    return StepOutput({"objects": entries}, [("Where is the object?", "objects", (
        "A linear probe per layer predicts, for each token or feature-map position, whether more than half of it "
        "lies on the shape; the curve is the IoU of the predicted with the true foreground on the test images "
        "(95% bootstrap intervals), the dotted lines the IoU of calling every cell foreground. Best IoU: "
        + "; ".join(parts) + ". "
        + (("Hollow points (" + "; ".join(dead) + ") are grids so coarse that almost no cell is more than half "
            "covered, so the probe predicts background everywhere and the IoU is 0 by construction, not because "
            "the layer lost the object.") if dead else "Every layer's probe predicts some foreground.")))],
        {"objects": path})


def _probes_step(ctx: DemoContext, models: list[str]) -> StepOutput:
    """Logistic-regression probes of every layer; first tap vs pre-logits with a Newcombe interval."""
    import probes

    pr = {}
    with ctx.ph.phase("probes", "linear probes of every layer", len(ctx.stores)) as step:
        for m, s in ctx.stores.items():
            with step(f"{m} ({len(s.layers)} layers)"):
                # 11 strengths in [1e-3, 1e2] instead of the default 45 in [1e-6, 1e5]: a tenth of the time
                # (measured: 19 s vs 230 s on these stores), best-layer accuracies within 3 points of the default
                # grid's; tiny strengths barely converge on a few hundred separable images.
                pr[m] = probes.linear_probe(s, method="logreg", device=ctx.device, progress=False,
                                            lambdas=PROBE_LAMBDAS)
                pr[m].to_json(ctx.js(f"probe_{m}.json"))
    intervals = {m: _probe_intervals(r) for m, r in pr.items()}
    path = ctx.fig("probes.png")
    _plot_probes(pr, intervals, ctx.chance / 100, path)
    entries, parts = {}, []
    for m, r in pr.items():
        iv = intervals[m]
        stem, pre = iv[0], iv[-2]  # the first tap and the pre-logits (the vector the classifier reads)
        d, lo, hi = newcombe_difference(pre["correct"], pre["n_test"], stem["correct"], stem["n_test"])
        best = max(iv, key=lambda row: row["top1"])
        entries[m] = {"per_layer": iv, "first_layer": stem["layer"], "pre_logits_layer": pre["layer"],
                      "first_top1": stem["top1"], "pre_logits_top1": pre["top1"],
                      "pre_logits_minus_first": statistic(d, lo, hi, method="Newcombe hybrid score"),
                      "best_layer": best["layer"], "best_top1": best["top1"]}
        word = {"higher": "rises", "lower": "falls", "not resolved": "has no resolved change"}[verdict(lo, hi)]
        parts.append(f"{m} {word} from {ci_text(stem['top1'], stem['low'], stem['high'], 0, 100, '%')} at "
                     f"{stem['layer']} to {ci_text(pre['top1'], pre['low'], pre['high'], 0, 100, '%')} at the "
                     f"pre-logits ({pre['layer']}; difference {ci_text(d, lo, hi, 0, 100, ' points')})")
    protocol = pr[next(iter(pr))].protocol
    return StepOutput({"probes": entries}, [("Linear probes", "probes", (
        "In-distribution probe accuracy: a logistic-regression probe on each layer's mean token / pooled "
        f"features, trained on {protocol.get('n_train')} images of the same held-out shapes "
        "set (strength chosen on a validation split) and tested on "
        f"{protocol.get('n_test')} others, with 95% Wilson intervals. Accuracy "
        + "; ".join(parts) + f" (chance {ctx.chance:.1f}%)."))], {"probes": path})




def _robustness_step(ctx: DemoContext, models: list[str]) -> StepOutput:
    """Robustness profiles under random patch drop (Naseer et al. 2021; :mod:`repsim.robustness`): each model
    re-extracted on the same images at :data:`ROBUSTNESS_LEVELS`, top-1 per level, the first layer whose
    CKA(clean, perturbed) falls below 0.5, and each ViT's accuracy drop against the ResNet's (paired bootstrap)."""
    from hooks.extract.loop import extract
    from repsim.data.perturbations import Perturbation
    from repsim.plotting.cka_map import layer_labels

    levels, patch = ROBUSTNESS_LEVELS, ROBUSTNESS_PATCH_PX
    perturbed: dict[tuple[str, float], ActivationStore] = {}
    with ctx.ph.phase("robustness", f"robustness: patch-drop {', '.join(f'{v:g}' for v in levels)} "
                      f"({patch} px patches) of {', '.join(models)}", len(models) * len(levels) + 1,
                      bar=False) as step:  # extraction and the profile draw their own bars
        for name in models:
            for level in levels:
                with step(f"{name} patch-drop {level:g}"):
                    p = Perturbation.parse(f"patch-drop:{level:g}", patch_px=patch)
                    path = os.path.join(ctx.out, "stores", f"{name}-n{ctx.n}-patch-drop{level:g}-p{patch}.zarr")
                    # logits and CKA only: no inputs or attention statistics (a third of the clean extraction time)
                    perturbed[(name, level)] = extract(ctx.loaded_models[name], ctx.sources[name], path, batch_size=64,
                                                       perturbation=p, device=ctx.device, progress=ctx.bars)
        with step(f"CKA(clean, perturbed) per layer ({N_RESAMPLES} half-samples)"):
            result = robustness_profiles([ctx.stores[m] for m in models] + list(perturbed.values()),
                                         resamples=N_RESAMPLES, seed=0, progress=ctx.bars)
    result.to_json(ctx.js("robustness.json"))
    path = ctx.fig("robustness.png")
    result.plot(path)

    entries: dict[str, Any] = {"kind": "patch-drop", "levels": list(levels), "patch_px": patch,
                               "threshold": result.threshold, "models": {}, "vit_minus_resnet_drop": {},
                               "vit_minus_resnet_kept_share": {}}
    chance = ctx.chance / 100
    parts = []
    for prof in result.models:
        m = prof.model
        # readable names (the figure's tick labels: timm's head_drop / head are the pre-logits / logits)
        names = {layer: (label if label == layer else f"the {label} ({layer})")
                 for layer, label in zip(prof.layers, layer_labels(prof.layers))}
        per_level, words = {}, []
        for lv in prof.levels:
            level = float(lv.perturbation["level"])
            acc, drop = lv.accuracy, lv.accuracy_drop
            e: dict[str, Any] = {
                "accuracy": statistic(acc["value"], acc["low"], acc["high"], n=acc["n"], correct=acc["correct"],
                                      method="Wilson score interval"),
                "accuracy_drop": statistic(drop["value"], drop["low"], drop["high"], n=drop["n"],
                                           method="clean minus perturbed top-1, paired percentile bootstrap over "
                                                  "images"),
                "first_below": lv.first_below, "first_below_resolved": lv.first_below_resolved}
            if lv.first_below is not None and lv.first_below not in lv.constant_layers:
                i = prof.layers.index(lv.first_below)
                e["first_below_cka"] = {"value": lv.cka[i], "low": lv.cka_low[i], "high": lv.cka_high[i],
                                        "level": LEVEL, "relative_depth": prof.relative_depth[i],
                                        "verdict_against_threshold": verdict(lv.cka_low[i], lv.cka_high[i],
                                                                             result.threshold)}
            per_level[f"{level:g}"] = e
            words.append(f"at {level:g} top-1 {ci_text(**_v(e['accuracy']), digits=1, scale=100, unit='%')} (drop "
                         f"{ci_text(**_v(e['accuracy_drop']), digits=1, scale=100, unit=' points')}), "
                         + _first_below_words(e, result.threshold, names))
        entries["models"][m] = {
            "clean_accuracy": statistic(prof.accuracy["value"], prof.accuracy["low"], prof.accuracy["high"],
                                        n=prof.accuracy["n"], method="Wilson score interval"),
            "layers": prof.layers, "levels": per_level}
        parts.append(f"{m}: " + "; ".join(words))
    # ViT vs ResNet: the drop difference per image pair (the same images in every store), paired bootstrap
    comparisons = []
    vits = [m for m in models if m in ("ref_vit", "ref_vit_gap")]
    if "ref_resnet" in models:
        for v in vits:
            if ctx.stores[v].fingerprint != ctx.stores["ref_resnet"].fingerprint:
                continue
            for level in levels:
                cv, pv = _correct(ctx.stores[v]), _correct(perturbed[(v, level)])
                cr, pr = _correct(ctx.stores["ref_resnet"]), _correct(perturbed[("ref_resnet", level)])
                b = bootstrap_mean(cv - pv, cr - pr, n_boot=N_RESAMPLES * 5, seed=0)
                s = statistic(b["value"], b["low"], b["high"], n=b["n"],
                              method="paired percentile bootstrap over images of the per-image drop difference")
                entries["vit_minus_resnet_drop"][f"{v}@{level:g}"] = s
                word = {"lower": f"{v} loses fewer points than ref_resnet",
                        "higher": f"{v} loses more points than ref_resnet",
                        "not resolved": f"whether {v} or ref_resnet loses more points is not resolved"}[s["verdict"]]
                # Points lost depend on where a model starts: one far above chance has more to lose. The share of
                # its above-chance accuracy a model keeps, (acc_perturbed - chance) / (acc_clean - chance), compares
                # models that start at different accuracies; paired bootstrap over the same images.
                r = bootstrap_paired(lambda a, b, c, d: _kept(a, b, chance) - _kept(c, d, chance), cv, pv, cr, pr,
                                     n_boot=N_RESAMPLES * 5, seed=0)
                kept = statistic(r["value"], r["low"], r["high"], n=r["n"], chance=chance,
                                 method="difference of (top-1 perturbed - chance) / (top-1 clean - chance), paired "
                                        "percentile bootstrap over images")
                entries["vit_minus_resnet_kept_share"][f"{v}@{level:g}"] = kept
                kept_word = {"higher": f"{v} keeps a larger share", "lower": f"{v} keeps a smaller share",
                             "not resolved": "which keeps more is not resolved"}[kept["verdict"]]
                comparisons.append(
                    f"at {level:g}, {v} − ref_resnet drop {ci_text(**_v(s), digits=1, scale=100, unit=' points')}: "
                    f"{word}; share of the above-chance accuracy kept, {v} − ref_resnet "
                    f"{ci_text(**_v(kept))}: {kept_word}")
    compare = ("ViT minus ResNet (paired bootstrap over the same images; the models start at different accuracies, "
               "so the share of the above-chance accuracy kept, (perturbed − chance) / (clean − chance), is the "
               "comparison that does not favour the model with less to lose): " + "; ".join(comparisons)
               + " (Naseer et al. 2021 report that ImageNet ViTs keep more of their accuracy than CNNs)"
               if comparisons else "(the ViT vs ResNet comparison needs ref_resnet and a ViT)")
    text = (f"Each model re-extracted on the same {ctx.n} images with "
            f"{' and '.join(f'{100 * v:g}%' for v in levels)} of the {patch} px patches dropped at random (set to "
            "the mean colour, seeded per image: the same pixels for every model). First panel: top-1 against the "
            "drop level (95% Wilson intervals); the others: debiased CKA between each layer's clean and perturbed "
            "activations of the same images (95% half-sample bands), 0.5 dashed. "
            + ". ".join(parts) + ". " + compare + ".")
    return StepOutput({"robustness": entries}, [("Robustness to patch drop", "robustness", text)],
                      {"robustness": path})


def _kept(correct_clean: np.ndarray, correct_perturbed: np.ndarray, chance: float) -> float:
    """Share of a model's above-chance top-1 kept under a perturbation: (acc_perturbed − chance) /
    (acc_clean − chance) over the same images (1: nothing lost, 0: down to chance); NaN at chance when clean."""
    above = float(np.mean(correct_clean)) - chance
    return (float(np.mean(correct_perturbed)) - chance) / above if above > 0 else float("nan")


def _first_below_words(e: dict[str, Any], threshold: float, names: dict[str, str]) -> str:
    """Where CKA(clean, perturbed) first falls below ``threshold``, worded from its interval (``names``: the
    layers' readable names)."""
    if e["first_below"] is None:
        return f"CKA stays at or above {threshold:g} at every layer"
    c = e.get("first_below_cka")
    if c is None:  # a layer constant over the images: no CKA (repsim.robustness counts it as below)
        return f"{names[e['first_below']]} no longer varies over the images (no CKA; counted as below {threshold:g})"
    words = {"lower": "resolved below", "higher": "resolved above",
             "not resolved": "not resolved against"}[c["verdict_against_threshold"]]
    return (f"CKA first below {threshold:g} at {names[e['first_below']]} ({ci_text(**_v(c))}, {words} "
            f"{threshold:g}" + (f"; first resolved below at {names[e['first_below_resolved']]}"
                                if e["first_below_resolved"] not in (None, e["first_below"]) else "") + ")")


def _segmentation_step(ctx: DemoContext, models: list[str]) -> StepOutput:
    """Attention as segmentation (DINO's mass rule, Caron et al. 2021; :mod:`repsim.attention.segmentation`) for
    every ViT: the best head's Jaccard against the object masks vs the all-foreground reference, the same with the
    head chosen on other images, and the spatial entropy (Peruzzo et al. 2022) of its maps."""
    from repsim.attention.segmentation import attention_segmentation

    vits = [m for m in ctx.stores if ctx.stores[m].attention_layers]
    for m in vits:  # the demo's ViT stores are extracted with --attention, which stores the query maps
        missing = [ly for ly in ctx.stores[m].attention_layers
                   if f"attn/{ly}/query_map" not in ctx.stores[m].extra_arrays]
        if missing:
            raise UsageError(f"{ctx.stores[m].path} keeps no query map for {', '.join(missing)}: delete the store "
                             "and rerun the demo (it was extracted before repsim stored query maps)")
    done = StepOutput({"segmentation": {}})
    with ctx.ph.phase("segmentation", "attention as segmentation of " + ", ".join(vits), len(vits)) as step:
        for m in vits:
            with step(m):
                seg = attention_segmentation(ctx.stores[m], seed=0)
                seg.to_json(ctx.js(f"segmentation_{m}.json"))
                done.figures[f"segmentation_{m}"] = ctx.fig(f"segmentation_{m}.png")
                seg.plot(done.figures[f"segmentation_{m}"])
            b, o = seg.best, seg.best_held_out
            head = seg.layer(b["layer"]).heads[b["head"]]
            e = {"mass": seg.mass, "n_scored": b["n_scored"], "best_layer": b["layer"], "best_head": b["head"],
                 "best_jaccard": statistic(b["jaccard"], b["jaccard_low"], b["jaccard_high"], n=b["n_scored"]),
                 "all_foreground_jaccard": statistic(b["baseline"], b["baseline_low"], b["baseline_high"],
                                                     n=b["n_scored"]),
                 "best_gain": statistic(b["gain"], b["gain_low"], b["gain_high"], n=b["n_scored"],
                                        method="paired percentile bootstrap over images"),
                 "held_out_layer": o.get("layer"), "held_out_head": o.get("head"),
                 "held_out_gain": statistic(o["gain"], o["gain_low"], o["gain_high"], n=o["n_scored"],
                                            method="head chosen on the even images, scored on the odd ones; paired "
                                                   "percentile bootstrap") if o else None,
                 "best_head_spatial_entropy": statistic(head.spatial_entropy, head.entropy_low, head.entropy_high,
                                                        n=head.n_entropy, unit="nats")}
            done.summary["segmentation"][m] = e
            done.sections.append((f"Attention as segmentation: {m}", f"segmentation_{m}",
                                  segmentation_sentence(m, e)))
    return done


def segmentation_sentence(name: str, e: dict[str, Any]) -> str:
    """The segmentation section's text, every number from the summary entry ``e`` with its interval."""
    word = {"higher": "above", "lower": "below", "not resolved": "not resolved against"}
    g, h = e["best_gain"], e["held_out_gain"]
    held = ("" if h is None else
            f" Chosen on the even images and scored on the odd ones (the best head above is chosen and scored on "
            f"the same images, which favours it), {e['held_out_layer']} head {e['held_out_head']} gains "
            f"{ci_text(**_v(h))}: {word[h['verdict']]} the reference.")
    ent = e["best_head_spatial_entropy"]
    return (f"Each head's attention of the read-out query over the patches, thresholded to keep {e['mass']:.0%} of "
            f"its mass (DINO's rule), against the object's patches on {e['n_scored']} images (Jaccard, 95% bootstrap "
            f"intervals over images); the overlays show the best heads. {name}'s best head, {e['best_layer']} head "
            f"{e['best_head']}, reaches Jaccard {ci_text(**_v(e['best_jaccard']))} against "
            f"{ci_text(**_v(e['all_foreground_jaccard']))} for calling every patch foreground (gain "
            f"{ci_text(**_v(g))}: {word[g['verdict']]} the reference).{held} Its maps' spatial entropy (Peruzzo "
            f"et al. 2022; 0 = one blob) is {ci_text(**_v(ent))} nats.")


def _write_report(path: str, out: str, summary: dict[str, Any], sections: list[tuple[str, str, str]],
                  figures: dict[str, str], accs: str, chance: float) -> None:
    import repsim

    lines = [
        "# repsim demo report", "",
        f"Models: the bundled reference networks ({', '.join(summary['models'])}), trained on repsim's `shapes` "
        f"data set; data: {summary['n_images']} held-out `shapes` images (seed {DEMO_SEED}, 8 classes). "
        f"Held-out accuracy of each model's own classifier (95% Wilson interval): {accs} (chance {chance:.1f}%).",
        "",
        f"repsim {getattr(repsim, '__version__', '?')}; {summary['seconds']:.0f} s. Every number below is in "
        "`summary.json`, each comparison with its 95% interval and the verdict it supports ('not resolved' when "
        "the interval includes no difference); every result with its provenance is in `json/`; the activation "
        "stores are in `stores/` (open them with `repsim info`).", "",
    ]
    for title, key, text in sections:
        if key not in figures:
            continue
        rel = os.path.relpath(figures[key], out)
        lines += [f"## {title}", "", f"![{title}]({rel})", "", text, ""]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(path + ".tmp", path)


__all__ = ["DEMO_MODELS", "DEMO_SEED", "ROBUSTNESS_LEVELS", "ROBUSTNESS_PATCH_PX", "DemoContext", "DemoResult",
           "StepOutput", "comparable_layers", "run_demo", "segmentation_sentence"]
