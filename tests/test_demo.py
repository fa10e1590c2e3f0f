"""`repsim demo` end to end on the bundled models (quick setting), and the structure its numbers must show."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli
import repsim
from repsim.app.demo import PhaseProgress, cka_correspondence_sentence, cka_within_sentence
from repsim.measures.intervals import (HalfSampleCKA, bootstrap_mean, correspondence, newcombe_difference,
                              statistic, verdict, wilson_interval)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    res = run_cli("demo", "--out", str(out), "--n", "128", "--localise-images", "64", "--quiet")
    assert res.exit_code == 0, res.output
    assert f"report: {out / 'report.md'}" in res.output
    (out / "cli_output.log").write_text(res.output)  # what a log file of the run holds (not a terminal)
    return out


@pytest.mark.slow
def test_report_shows_every_figure(demo_dir):
    report = (demo_dir / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(links) >= 8
    for link in links:
        assert (demo_dir / link).stat().st_size > 10_000, link  # a real PNG, not an empty axis
    # two sentences under every figure
    for block in report.split("## ")[1:]:
        text = block.split(")\n\n", 1)[1].strip()
        assert text.count(". ") + text.endswith(".") >= 2, block[:200]


@pytest.mark.slow
def test_demo_numbers_show_real_structure(demo_dir):
    s = json.loads((demo_dir / "summary.json").read_text())
    for name, m in s["models"].items():
        assert m["accuracy"] > 3 * m["chance"], (name, m["accuracy"])  # trained: far above chance (12.5%)
    for name, d in s["cka_within"].items():
        cka = json.loads((demo_dir / "json" / f"cka_{name}.json").read_text())
        assert np.diag(cka["values"]) == pytest.approx(1.0, abs=1e-6)
        assert d["adjacent_minus_first_vs_last"]["low"] > 0, name  # decays away from the diagonal, resolved
    for name, p in s["probes"].items():
        assert p["best_top1"] > p["first_top1"], name  # the class becomes more readable with depth
    for name, a in s["attention"].items():
        assert len(a["distance_px_per_layer"]) == 6 and all(len(h) == 4 for h in a["distance_px_per_layer"])
        assert all(0 < d < 64 for layer in a["distance_px_per_layer"] for d in layer)


@pytest.mark.slow
def test_demo_keeps_json_with_provenance(demo_dir):
    files = sorted(os.listdir(demo_dir / "json"))
    assert "cka_ref_vit.json" in files and "cka_ref_vit_vs_ref_resnet.json" in files
    cka = json.loads((demo_dir / "json" / "cka_ref_vit.json").read_text())
    assert cka["kind"] == "repsim.cka" and cka["n"] == 128
    res = run_cli("verify", str(demo_dir / "stores" / "ref_vit-n128.zarr"))
    assert res.exit_code == 0, res.output


@pytest.mark.slow
def test_summary_backs_every_comparison_with_an_interval(demo_dir):
    s = json.loads((demo_dir / "summary.json").read_text())
    for name, m in s["models"].items():
        assert m["accuracy_low"] <= m["accuracy"] <= m["accuracy_high"]
        assert "head" not in m["comparable_layers"] and "fc" not in m["comparable_layers"]
    for key, c in s["cka_across"].items():
        # the correspondence rests on stem + blocks only: no pre-logits / logits layer
        assert not {"head", "head_drop", "fc", "global_pool"} & set(c["layers_a"] + c["layers_b"]), key
        assert c["slope"]["low"] <= c["slope"]["high"] and c["slope"]["verdict"] in ("higher", "lower", "not resolved")
        assert c["max_abs_difference_to_map"] < 1e-3
    for name, d in s["cka_within"].items():
        assert d["first_layer"] == d["layers"][0] and d["last_layer"] not in ("head", "fc")
    diff = s["localisation"]["cls_minus_gap"]["score"]
    assert diff["low"] <= diff["value"] <= diff["high"]
    report = (demo_dir / "report.md").read_text()
    assert "transfer accuracy" not in report and "first vs last layer" not in report
    claims = ([c["slope"] for c in s["cka_across"].values()]
              + [d["adjacent_minus_first_vs_last"] for d in s["cka_within"].values()]
              + [s["localisation"]["cls_minus_gap"]["score"], s["localisation"]["cls_minus_gap"]["position_accuracy"]]
              + [p["pre_logits_minus_first"] for p in s["probes"].values()]
              + [o["best_gain_over_all_foreground"] for o in s["objects"].values()])
    for c in claims:
        assert c["verdict"] == verdict(c["low"], c["high"])
    if any(c["verdict"] == "not resolved" for c in claims):
        assert "not resolved" in report


def _logits_correct(store) -> np.ndarray:
    """Per image: the argmax of the stored logits (the last layer) equals the label (numpy, from the store)."""
    logits = np.asarray(store.read(store.layers[-1]), dtype=np.float64)
    assert logits.shape == (store.n, 8)
    return (logits.argmax(1) == np.asarray(store.labels)).astype(float)


def _debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Debiased linear CKA from Song et al.'s (2012) unbiased HSIC written out term by term (tests/test_cka.py)."""
    from test_cka import _hsic_unbiased_song

    x = x.reshape(len(x), -1) - x.reshape(len(x), -1).mean(0)
    y = y.reshape(len(y), -1) - y.reshape(len(y), -1).mean(0)
    k, l = x @ x.T, y @ y.T
    return _hsic_unbiased_song(k, l) / np.sqrt(_hsic_unbiased_song(k, k) * _hsic_unbiased_song(l, l))


@pytest.mark.slow
def test_robustness_section_recomputes_from_the_stores(demo_dir):
    """Issue 15: the robustness entries equal an argmax count on the perturbed stores' logits (Wilson interval),
    the ViT − ResNet drop difference the mean of per-image drop differences, the first layer below 0.5 numpy
    debiased CKA of clean vs perturbed activations; the report's sentences quote those numbers."""
    from repsim.app.demo import ROBUSTNESS_LEVELS, ROBUSTNESS_PATCH_PX
    from repsim.measures.intervals import ci_text
    from repsim.store.reader import open_store

    s = json.loads((demo_dir / "summary.json").read_text())["robustness"]
    report = (demo_dir / "report.md").read_text()
    section = report.split("## Robustness to patch drop", 1)[1].split("\n## ", 1)[0]
    stores = demo_dir / "stores"
    assert s["levels"] == list(ROBUSTNESS_LEVELS) and set(s["models"]) == {"ref_vit", "ref_vit_gap", "ref_resnet"}
    drops = {}
    for m, entry in s["models"].items():
        clean = open_store(str(stores / f"{m}-n128.zarr"))
        ok_clean = _logits_correct(clean)
        for level in ROBUSTNESS_LEVELS:
            pert = open_store(str(stores / f"{m}-n128-patch-drop{level:g}-p{ROBUSTNESS_PATCH_PX}.zarr"))
            assert pert.attrs["perturbation"]["kind"] == "patch-drop" and list(pert.ids) == list(clean.ids)
            ok = _logits_correct(pert)
            e = entry["levels"][f"{level:g}"]
            assert e["accuracy"]["value"] == pytest.approx(ok.mean(), abs=1e-12)
            assert (e["accuracy"]["low"], e["accuracy"]["high"]) == pytest.approx(wilson_interval(int(ok.sum()), 128))
            assert e["accuracy_drop"]["value"] == pytest.approx(ok_clean.mean() - ok.mean(), abs=1e-12)
            assert ci_text(**{k: e["accuracy"][k] for k in ("value", "low", "high")}, digits=1, scale=100,
                           unit="%") in section
            drops[(m, level)] = ok_clean - ok
            # the first layer below 0.5, against numpy CKA (float16 stores: a layer within 0.02 of 0.5 is skipped)
            layers = entry["layers"]
            stop = layers.index(e["first_below"]) if e["first_below"] else len(layers)
            for layer in layers[: stop + 1][-3:]:
                if layer not in clean.layers:
                    continue
                c = _debiased_cka(np.asarray(clean.read(layer), dtype=np.float64),
                                  np.asarray(pert.read(layer), dtype=np.float64))
                if abs(c - 0.5) > 0.02:
                    assert (c < 0.5) == (layer == e["first_below"]), (m, level, layer, c)
            if "first_below_cka" in e:
                c = e["first_below_cka"]
                assert c["verdict_against_threshold"] == verdict(c["low"], c["high"], 0.5)
                assert ci_text(c["value"], c["low"], c["high"]) in section
    for key, d in s["vit_minus_resnet_drop"].items():
        v, level = key.split("@")
        assert d["value"] == pytest.approx((drops[(v, float(level))] - drops[("ref_resnet", float(level))]).mean())
        assert d["low"] <= d["value"] <= d["high"] and d["verdict"] == verdict(d["low"], d["high"])
        assert ci_text(d["value"], d["low"], d["high"], digits=1, scale=100, unit=" points") in section
        if d["verdict"] == "not resolved":
            assert f"whether {v} or ref_resnet loses more points is not resolved" in section
    assert len(s["vit_minus_resnet_drop"]) == 2 * len(ROBUSTNESS_LEVELS)
    # the share of the above-chance accuracy kept, (acc_p - chance) / (acc_clean - chance), recomputed by hand
    chance = json.loads((demo_dir / "summary.json").read_text())["models"]["ref_resnet"]["chance"]
    for key, d in s["vit_minus_resnet_kept_share"].items():
        v, level = key.split("@")
        kept = {}
        for m in (v, "ref_resnet"):
            clean = _logits_correct(open_store(str(stores / f"{m}-n128.zarr")))
            pert = _logits_correct(open_store(str(stores / f"{m}-n128-patch-drop{level}-p{ROBUSTNESS_PATCH_PX}.zarr")))
            kept[m] = (pert.mean() - chance) / (clean.mean() - chance)
        assert d["chance"] == pytest.approx(chance) and d["value"] == pytest.approx(kept[v] - kept["ref_resnet"])
        assert d["low"] <= d["value"] <= d["high"] and d["verdict"] == verdict(d["low"], d["high"])
        assert ci_text(d["value"], d["low"], d["high"]) in section
        word = {"higher": f"{v} keeps a larger share", "lower": f"{v} keeps a smaller share",
                "not resolved": "which keeps more is not resolved"}[d["verdict"]]
        assert word in section
    assert len(s["vit_minus_resnet_kept_share"]) == 2 * len(ROBUSTNESS_LEVELS)


@pytest.mark.slow
def test_segmentation_section_recomputes_from_the_stores(demo_dir):
    """Issue 15: the best head's Jaccard and the all-foreground reference equal numpy on the stored query maps
    (DINO's 60% mass rule) and the re-rendered shapes masks; the report quotes them with their intervals."""
    from repsim.measures.intervals import ci_text
    from repsim.data.masks import store_input_masks
    from repsim.store.reader import open_store

    s = json.loads((demo_dir / "summary.json").read_text())["segmentation"]
    report = (demo_dir / "report.md").read_text()
    assert set(s) == {"ref_vit", "ref_vit_gap"}
    for m, e in s.items():
        store = open_store(str(demo_dir / "stores" / f"{m}-n128.zarr"))
        assert all(f"attn/{ly}/query_map" in store.extra_arrays for ly in store.attention_layers)
        qmap = np.asarray(store.read_attention(e["best_layer"], "query_map"), dtype=np.float64)[:, e["best_head"]]
        gh, gw = store.attention_info(e["best_layer"])["grid"]
        cover = store_input_masks(store, np.arange(store.n))  # (n, H, W) coverage in [0, 1]
        ph, pw = cover.shape[1] // gh, cover.shape[2] // gw
        fg = cover.reshape(store.n, gh, ph, gw, pw).mean((2, 4)).reshape(store.n, -1) > 0.5
        order = np.sort(qmap, axis=1)[:, ::-1]
        k = (np.cumsum(order, axis=1) < 0.6 - 1e-9).sum(1)  # the k-th largest weight reaches 60% of the mass
        keep = qmap >= order[np.arange(store.n), k][:, None]
        scored = fg.any(1)
        jac = (keep & fg).sum(1)[scored] / (keep | fg).sum(1)[scored]
        assert e["n_scored"] == scored.sum()
        assert e["best_jaccard"]["value"] == pytest.approx(jac.mean(), abs=1e-9)
        assert e["all_foreground_jaccard"]["value"] == pytest.approx(fg.mean(1)[scored].mean(), abs=1e-9)
        assert e["best_gain"]["value"] == pytest.approx(jac.mean() - fg.mean(1)[scored].mean(), abs=1e-9)
        section = report.split(f"## Attention as segmentation: {m}", 1)[1].split("\n## ", 1)[0]
        for key in ("best_jaccard", "all_foreground_jaccard", "best_gain", "held_out_gain",
                    "best_head_spatial_entropy"):
            st = e[key]
            assert st["low"] <= st["value"] <= st["high"], key
            assert ci_text(st["value"], st["low"], st["high"]) in section, key
        assert e["held_out_gain"]["verdict"] == verdict(e["held_out_gain"]["low"], e["held_out_gain"]["high"])


def test_segmentation_and_robustness_sentences_follow_the_intervals():
    """A straddling interval is worded 'not resolved'; a resolved one names its direction (hand-built entries)."""
    from repsim.app.demo import _first_below_words, segmentation_sentence

    def st(v, lo, hi):
        return statistic(v, lo, hi)

    e = {"mass": 0.6, "n_scored": 10, "best_layer": "blocks.5.attn", "best_head": 2,
         "best_jaccard": st(0.3, 0.25, 0.35), "all_foreground_jaccard": st(0.2, 0.18, 0.22),
         "best_gain": st(0.1, 0.05, 0.15), "held_out_layer": "blocks.4.attn", "held_out_head": 1,
         "held_out_gain": st(0.02, -0.01, 0.05), "best_head_spatial_entropy": st(0.4, 0.3, 0.5)}
    text = segmentation_sentence("vit", e)
    assert "gain 0.10 [0.05, 0.15]: above the reference" in text
    assert "blocks.4.attn head 1 gains 0.02 [-0.01, 0.05]: not resolved against the reference" in text
    names = {"b3": "b3", "b5": "b5"}
    straddles = {"first_below": "b3", "first_below_resolved": "b5",
                 "first_below_cka": {"value": 0.45, "low": 0.3, "high": 0.6, "verdict_against_threshold": "not resolved"}}
    assert _first_below_words(straddles, 0.5, names) == ("CKA first below 0.5 at b3 (0.45 [0.30, 0.60], not resolved "
                                                         "against 0.5; first resolved below at b5)")
    assert _first_below_words({"first_below": None}, 0.5, names) == "CKA stays at or above 0.5 at every layer"


@pytest.mark.slow
def test_demo_rerun_reuses_the_stores(demo_dir, tmp_path):
    # a copy of the first run's ResNet store (file times kept), so the shared demo_dir's report and
    # summary.json stay those of the full run for the other tests
    out = tmp_path / "rerun"
    shutil.copytree(demo_dir / "stores" / "ref_resnet-n128.zarr", out / "stores" / "ref_resnet-n128.zarr")
    before = os.path.getmtime(out / "stores" / "ref_resnet-n128.zarr" / "zarr.json")
    res = run_cli("demo", "--out", str(out), "--n", "128", "--localise-images", "64", "--quiet",
                  "--models", "ref_resnet")
    assert res.exit_code == 0, res.output
    assert os.path.getmtime(out / "stores" / "ref_resnet-n128.zarr" / "zarr.json") == before
    res = run_cli("demo", "--out", str(out), "--n", "64", "--localise-images", "32", "--quiet",
                  "--models", "ref_resnet")  # other settings, same folder: a new store, not a refusal
    assert res.exit_code == 0, res.output
    assert (out / "stores" / "ref_resnet-n64.zarr").is_dir()


@pytest.mark.slow
def test_every_phase_reports_progress_in_a_log(demo_dir):
    """Issue 13: no phase sits silent. In a log (not a terminal) every phase prints its start and one line per
    finished step, k/total with the step's time; no carriage-return bar updates; summary.json keeps each
    phase's wall time."""
    out = (demo_dir / "cli_output.log").read_text()
    s = json.loads((demo_dir / "summary.json").read_text())
    totals = {"extraction": 3, "cka_within": 9, "cka_across": 4, "attention": 2, "localisation": 3,
              "localisation_bootstrap": 3, "objects": 3, "probes": 3, "robustness": 7, "segmentation": 2}
    assert set(s["phase_seconds"]) == set(totals)
    for key, total in totals.items():
        steps = re.findall(rf"^\[ *\d+ s\]   {key} (\d+)/{total}: .+ \(\d+ s\)$", out, flags=re.M)
        assert steps == [str(k) for k in range(1, total + 1)], (key, out)
    assert "\r" not in out
    lines = [ln for ln in out.splitlines() if ln.startswith("[")]
    stamps = [int(re.match(r"\[ *(\d+) s\]", ln).group(1)) for ln in lines]
    assert stamps == sorted(stamps) and len(lines) >= sum(totals.values()) + len(totals)


def test_phase_progress_lines_and_bars(capsys):
    """Without a terminal: the phase line, then one line per finished step; with bars: the phase line only (the
    bar goes to stderr). A step that raises prints no line and the phase's time is still kept."""
    logged = []
    ph = PhaseProgress(logged.append, bars=False)
    with ph.phase("probes", "linear probes", 2) as step:
        for m in ("a", "b"):
            with step(m):
                pass
    assert [ln.split("] ", 1)[1] for ln in logged] == ["linear probes", "  probes 1/2: a (0 s)", "  probes 2/2: b (0 s)"]
    with pytest.raises(RuntimeError, match="boom"):
        with ph.phase("objects", "objects", 2) as step:
            with step("a"):
                raise RuntimeError("boom")
    assert logged[-1].endswith("] objects") and set(ph.seconds) == {"probes", "objects"}

    logged.clear()
    ph = PhaseProgress(logged.append, bars=True)
    with ph.phase("probes", "linear probes", 2) as step:
        for m in ("a", "b"):
            with step(m):
                pass
    assert [ln.split("] ", 1)[1] for ln in logged] == ["linear probes"]
    assert "probes" in capsys.readouterr().err  # the bar, on stderr
    with ph.phase("extraction", "extracting", 1, bar=False) as step:  # the step draws its own bar
        with step("m"):
            pass
    assert logged[-1].split("] ", 1)[1] == "  extraction 1/1: m (0 s)"


@pytest.mark.parametrize("args, pattern", [
    (["--models", "ref_vit,vit_b16"], "unknown demo model"),
    (["--n", "10"], "n >= 64"),
])
def test_demo_bad_input(tmp_path, args, pattern):
    assert_one_line_error(run_cli("demo", "--out", str(tmp_path / "d"), *args), pattern)


# ---------------------------------------------------------------------------------------------------------
# The statistics behind the report's sentences (repsim.measures.intervals, repsim.app.demo), against independent references
# ---------------------------------------------------------------------------------------------------------



def test_wilson_and_newcombe_match_published_values():
    # Newcombe (1998a) Table I: 81/263 -> 0.2553, 0.3662; Newcombe (1998b) example: 56/70 - 48/80, method 10
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    d, lo, hi = newcombe_difference(56, 70, 48, 80)
    assert (d, lo, hi) == pytest.approx((0.2, 0.0524, 0.3339), abs=1e-4)


def test_bootstrap_paired_resamples_images_jointly():
    """Every replicate draws the same image indices in all arrays: a statistic of two identical arrays' difference
    is 0 in every replicate; the interval of a ratio of means matches a hand loop with the same generator."""
    from repsim.measures.intervals import bootstrap_paired

    rng = np.random.default_rng(3)
    a, b = rng.random(50), rng.random(50)
    same = bootstrap_paired(lambda x, y: x.mean() - y.mean(), a, a.copy(), n_boot=200)
    assert (same["value"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    ratio = bootstrap_paired(lambda x, y: x.mean() / y.mean(), a, b, n_boot=300, seed=7)
    gen = np.random.default_rng(7)
    reps = [a[i].mean() / b[i].mean() for i in gen.integers(0, 50, size=(300, 50))]
    assert ratio["value"] == pytest.approx(a.mean() / b.mean(), abs=1e-15)
    assert (ratio["low"], ratio["high"]) == pytest.approx(tuple(np.quantile(reps, [0.025, 0.975])), abs=1e-15)


def test_half_sample_cka_is_debiased_cka_on_all_images_and_on_each_half():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(80, 4))
    x = z @ rng.normal(size=(4, 30)) + rng.normal(size=(80, 30))
    y = z @ rng.normal(size=(4, 12)) + 2 * rng.normal(size=(80, 12))
    h = HalfSampleCKA.from_features({"x": x}, {"y": y}, resamples=4)
    assert h.observed[0, 0] == pytest.approx(repsim.cka(x, y, debiased=True), abs=1e-12)
    for half, rep in zip(h.halves, h.replicates):
        assert len(set(half)) == 40  # no image twice: no copy pairs in the U-statistic
        assert rep[0, 0] == pytest.approx(repsim.cka(x[half], y[half], debiased=True), abs=1e-12)


def test_half_sample_spread_matches_the_sampling_spread():
    # the interval must be as wide as the estimator really varies between independent data sets of size n
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3, 20)), rng.normal(size=(3, 10))

    def draw(n):
        z = rng.normal(size=(n, 3))
        return z @ a + rng.normal(size=(n, 20)), z @ b + 1.5 * rng.normal(size=(n, 10))

    truth_sd = np.std([repsim.cka(*draw(120), debiased=True) for _ in range(150)])
    half_sd = np.mean([HalfSampleCKA.from_features({"x": x}, {"y": y}, resamples=150, seed=s).replicates[:, 0, 0].std()
                       for s, (x, y) in enumerate(draw(120) for _ in range(6))])
    assert 0.7 < half_sd / truth_sd < 1.4, (half_sd, truth_sd)


def test_verdict_says_not_resolved_when_the_interval_straddles_zero():
    assert verdict(0.01, 0.2) == "higher" and verdict(-0.3, -0.01) == "lower"
    assert verdict(-0.05, 0.2) == "not resolved" and verdict(float("nan"), 1.0) == "not resolved"
    planted = {"layers_a": ["patch_embed", "blocks.0"], "best_match": ["maxpool", "layer1.0"],
               "slope": statistic(0.12, -0.05, 0.31)}
    text = cka_correspondence_sentence("a", "b", planted)
    assert "not resolved" in text and "0.12 [-0.05, 0.31]" in text
    within = {"first_layer": "patch_embed", "last_layer": "blocks.5", "adjacent_mean": statistic(0.5, 0.4, 0.6),
              "first_vs_last": statistic(0.45, 0.3, 0.6), "adjacent_minus_first_vs_last": statistic(0.05, -0.1, 0.2)}
    assert "no resolved decay" in cka_within_sentence("m", within) and "not resolved" in cka_within_sentence("m", within)
    within["adjacent_minus_first_vs_last"] = statistic(0.3, 0.2, 0.4)
    assert "decays away from the diagonal" in cka_within_sentence("m", within)


def test_correspondence_slope():
    eye = np.eye(5)
    assert correspondence(eye)["slope"] == pytest.approx(1.0)
    one_column = np.zeros((5, 7))
    one_column[:, 1] = 1
    assert correspondence(one_column)["slope"] == 0.0  # every layer matches the same depth
    # a planted map whose only trend is in the two head rows / columns: with them the slope is large,
    # on the comparable (stem + block) part it is 0, which is what the demo computes
    v = np.full((6, 6), 0.1)
    v[:4, 0] = 0.5
    v[4, 4] = v[5, 5] = 0.9
    assert correspondence(v)["slope"] > 0.5 and correspondence(v[:4, :4])["slope"] == 0.0


def test_bootstrap_mean_pairs_and_drops_undefined_images():
    a = np.array([1.0, 2.0, np.nan, 4.0])
    r = bootstrap_mean(a, np.zeros(4), n_boot=200)
    assert r["n"] == 3 and r["value"] == pytest.approx(7 / 3) and r["low"] <= r["value"] <= r["high"]
    same = bootstrap_mean(a, a, n_boot=50)
    assert same["value"] == same["low"] == same["high"] == 0.0
