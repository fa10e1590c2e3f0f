"""`repsim demo` end to end on the bundled models (quick setting), and the structure its numbers must show."""

from __future__ import annotations

import json
import os
import re

import pytest

from conftest import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    res = run_cli("demo", "--out", str(out), "--n", "128", "--localize-images", "64", "--quiet")
    assert res.exit_code == 0, res.output
    assert f"report: {out / 'report.md'}" in res.output
    return out


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


def test_demo_numbers_show_real_structure(demo_dir):
    s = json.loads((demo_dir / "summary.json").read_text())
    for name, m in s["models"].items():
        assert m["accuracy"] > 3 * m["chance"], (name, m["accuracy"])  # trained: far above chance (12.5%)
    for name, d in s["cka_within"].items():
        assert d["diagonal_min"] == pytest.approx(1.0, abs=1e-6)
        assert d["diagonal_max"] == pytest.approx(1.0, abs=1e-6)
        assert d["adjacent_mean"] > d["first_last"], name  # decays away from the diagonal
    for name, p in s["probes"].items():
        assert p["best_top1"] > p["first_top1"], name  # the class becomes more readable with depth
    for name, a in s["attention"].items():
        assert len(a["distance_px_per_layer"]) == 6 and all(len(h) == 4 for h in a["distance_px_per_layer"])
        assert all(0 < d < 64 for layer in a["distance_px_per_layer"] for d in layer)


def test_demo_keeps_json_with_provenance(demo_dir):
    files = sorted(os.listdir(demo_dir / "json"))
    assert "cka_ref_vit.json" in files and "cka_ref_vit_vs_ref_resnet.json" in files
    cka = json.loads((demo_dir / "json" / "cka_ref_vit.json").read_text())
    assert cka["kind"] == "repsim.cka" and cka["n"] == 128
    res = run_cli("verify", str(demo_dir / "stores" / "ref_vit-n128.zarr"))
    assert res.exit_code == 0, res.output


def test_demo_rerun_reuses_the_stores(demo_dir):
    before = os.path.getmtime(demo_dir / "stores" / "ref_resnet-n128.zarr" / "zarr.json")
    res = run_cli("demo", "--out", str(demo_dir), "--n", "128", "--localize-images", "64", "--quiet",
                  "--models", "ref_resnet")
    assert res.exit_code == 0, res.output
    assert os.path.getmtime(demo_dir / "stores" / "ref_resnet-n128.zarr" / "zarr.json") == before
    res = run_cli("demo", "--out", str(demo_dir), "--n", "64", "--localize-images", "32", "--quiet",
                  "--models", "ref_resnet")  # other settings, same folder: a new store, not a refusal
    assert res.exit_code == 0, res.output
    assert (demo_dir / "stores" / "ref_resnet-n64.zarr").is_dir()


@pytest.mark.parametrize("args, pattern", [
    (["--models", "ref_vit,vit_b16"], "unknown demo model"),
    (["--n", "10"], "n >= 64"),
])
def test_demo_bad_input(tmp_path, args, pattern):
    assert_one_line_error(run_cli("demo", "--out", str(tmp_path / "d"), *args), pattern)
