"""The CLI end to end on tiny models, and every error path: exit code 2, one line, no traceback."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from conftest import VIT_TINY_ARGS
from conftest import assert_one_line_error as _one_line_error
from conftest import run_cli as run

TINY = ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "32"]


def test_extract_info_verify(vit_tiny_store):
    store = vit_tiny_store
    res = run("info", store)
    assert res.exit_code == 0, res.output
    assert "complete" in res.output and "blocks.11" in res.output and "tokens" in res.output
    res = run("info", store, "--json")
    data = json.loads(res.output)
    assert data["attrs"]["dataset"]["n"] == 24 and data["chunks_done"] == data["n_chunks"]
    res = run("verify", store, "--quiet")
    # every array of the store and every chunk file on disk was checked (counted here from the files)
    root = pathlib.Path(store)
    arrays = [p.parent for p in root.rglob("zarr.json") if json.loads(p.read_text())["node_type"] == "array"]
    chunks = sum(1 for a in arrays for f in (a / "c").rglob("*") if f.is_file())
    assert res.exit_code == 0 and res.output.strip() == (
        f"{store}: ok ({len(arrays)} arrays, {chunks} chunks, no NaN/Inf, fingerprint consistent)")


def test_rerun_complete_store_is_a_noop(vit_tiny_store):
    res = run("extract", *VIT_TINY_ARGS, "--out", vit_tiny_store)
    assert res.exit_code == 0 and "already complete" in res.output


def test_models_and_layers():
    res = run("models")
    assert res.exit_code == 0 and "vit_b16" in res.output and "resnet50" in res.output
    res = run("layers", "timm:resnet18", "--random-init", "--img-size", "32")
    assert res.exit_code == 0, res.output
    assert "* layer1.0" in res.output and "layer4.1" in res.output


def test_errors_are_one_line_exit_2(vit_tiny_store, tmp_path):
    _one_line_error(run("extract", "--model", "vit_b61", "--random-init", "--data", "shapes", "--out",
                        str(tmp_path / "x.zarr")), "vit_b16")
    _one_line_error(run("extract", *TINY, "--data", "shapes", "--n", "8", "--layers", "blockz.*",
                        "--out", str(tmp_path / "y.zarr")), "blockz")
    _one_line_error(run("extract", *TINY, "--data", str(tmp_path / "missing"), "--out",
                        str(tmp_path / "z.zarr")), "missing")
    _one_line_error(run("extract", *TINY, "--data", "shapes", "--n", "24", "--batch-size", "8",
                        "--layers", "blocks.0", "--out", vit_tiny_store), "another configuration")
    _one_line_error(run("info", str(tmp_path / "nothing.zarr")), "no store")
    _one_line_error(run("extract", *TINY, "--data", "shapes", "--n", "8", "--mean", "1,2",
                        "--out", str(tmp_path / "m.zarr")), "--mean")
    _one_line_error(run("extract", *TINY, "--data", "shapes", "--n", "8", "--batch-size", "8",
                        "--chunk-size", "12", "--out", str(tmp_path / "c.zarr")), "multiple")
    _one_line_error(run("extract", "--model", "timm:vit_tiny_patch16_224", "--offline", "--data", "shapes", "--n", "8",
                        "--out", str(tmp_path / "w.zarr")), "--random-init")


def test_console_script_no_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "repsim.app.cli", "info", str(tmp_path / "absent.zarr")],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error:") and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "repsim.app.cli", "--debug", "info", str(tmp_path / "absent.zarr")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" in res.stderr
