"""The bundled reference models: cards, weights, loading, provenance, and the training script itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from hooks.models import reference_models as rm
from hooks.models.registry import load_model, reload_model, resolve_name
from hooks.models.weights import sha256_file
from repsim.errors import UsageError
from repsim.data.shapes import SHAPE_CLASSES, render_shape_sample
from conftest import assert_one_line_error, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = list(rm.REFERENCE_MODELS)


def _held_out(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    samples = [render_shape_sample(0, i, size) for i in range(n)]
    return np.stack([img for img, _, _ in samples]), np.array([label for _, _, label in samples])


def _accuracy(loaded, images: np.ndarray, labels: np.ndarray) -> float:
    p = loaded.preprocessing
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(p.mean).view(1, 3, 1, 1)) / torch.tensor(p.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return float((loaded.module(x).argmax(1).numpy() == labels).mean())


@pytest.mark.parametrize("name", NAMES)
def test_card_matches_weights(name):
    ref = rm.get_reference(name)
    card = rm.reference_card(name)
    assert card["name"] == name
    assert card["weights"]["sha256"] == sha256_file(ref.weights_file)
    assert os.path.getsize(ref.weights_file) <= 3 * 2 ** 20  # the 3 MB cap
    assert card["classes"] == list(SHAPE_CLASSES)
    assert card["architecture"]["timm_arch"] == ref.timm_arch
    # trained, not random: well above chance on held-out images
    assert card["evaluation"]["top1_accuracy"] > 3 * card["evaluation"]["chance"] == 0.375
    assert card["training"]["data"].startswith(f"shapes v1 seed {rm.TRAIN_SEED}")
    from safetensors import safe_open

    with safe_open(ref.weights_file, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} <= {torch.float16, torch.int64}


@pytest.mark.parametrize("name", NAMES)
def test_bundled_weights_classify_held_out_shapes(name):
    """The shipped weights reproduce the card's held-out accuracy on an independent subset (seed 0)."""
    loaded = load_model(name)
    assert loaded.info.source == "reference"
    assert loaded.info.weights["kind"] == "bundled"
    assert loaded.info.weights["sha256"] == rm.reference_card(name)["weights"]["sha256"]
    assert loaded.preprocessing.img_size == (64, 64) and loaded.preprocessing.crop_pct == 1.0
    images, labels = _held_out(256, 64)
    acc = _accuracy(loaded, images, labels)
    card_acc = rm.reference_card(name)["evaluation"]["top1_accuracy"]
    # 256 images: binomial standard error <= 0.031; 4 SE of slack
    assert abs(acc - card_acc) < 0.125, (acc, card_acc)
    assert acc > 0.3


def test_geometry_and_families():
    vit, gap, res = (load_model(n).info for n in NAMES)
    assert (vit.family, vit.num_prefix_tokens, vit.patch_size, vit.grid) == ("vit", 1, (8, 8), (8, 8))
    assert (gap.family, gap.num_prefix_tokens, gap.grid) == ("vit", 0, (8, 8))
    assert (res.family, res.num_prefix_tokens, res.grid) == ("resnet", 0, None)
    assert vit.num_classes == gap.num_classes == res.num_classes == len(SHAPE_CLASSES)
    assert resolve_name("REF-VIT") == ("reference", "ref_vit")


def test_random_init_needs_no_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(rm, "WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(UsageError, match="missing"):
        load_model("ref_vit")
    a = load_model("ref_vit", random_init=True, init_seed=3)
    b = load_model("ref_vit", random_init=True, init_seed=3)
    assert a.info.weights == {"kind": "random", "seed": 3, "init": "branches-on", "init_changes": {}}
    for (k, va), vb in zip(a.module.state_dict().items(), b.module.state_dict().values()):
        assert torch.equal(va, vb), k


def test_tampered_weights_are_refused(monkeypatch, tmp_path):
    for name in ("ref_resnet",):
        shutil.copy(rm.get_reference(name).card_file, tmp_path)
        shutil.copy(rm.get_reference(name).weights_file, tmp_path)
    monkeypatch.setattr(rm, "WEIGHTS_DIR", str(tmp_path))
    load_model("ref_resnet")  # an intact copy loads
    with open(tmp_path / "ref_resnet.safetensors", "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    with pytest.raises(UsageError, match="does not match its model card"):
        load_model("ref_resnet")


def test_other_input_size_resamples_vit_positions():
    loaded = load_model("ref_vit", img_size=32)
    assert loaded.info.grid == (4, 4) and loaded.preprocessing.img_size == (32, 32)
    with torch.no_grad():
        assert loaded.module(torch.zeros(2, 3, 32, 32)).shape == (2, 8)
    with pytest.raises(UsageError, match="multiple of the patch size"):
        load_model("ref_vit", img_size=36)


def test_store_provenance_and_reload(tmp_path):
    out = str(tmp_path / "r.zarr")
    res = run_cli("extract", "--model", "ref_resnet", "--data", "shapes", "--n", "64", "--out", out, "--quiet")
    assert res.exit_code == 0, res.output
    from repsim.store.reader import open_store

    s = open_store(out)
    w = s.attrs["model"]["weights"]
    assert w["kind"] == "bundled" and w["sha256"] == rm.reference_card("ref_resnet")["weights"]["sha256"]
    again = reload_model(s.attrs)
    assert again.info.weights["sha256"] == w["sha256"]
    info = run_cli("info", out)
    assert "bundled ref_resnet.safetensors" in info.output
    attrs = json.loads(json.dumps(s.attrs))
    attrs["model"]["weights"]["sha256"] = "0" * 64
    with pytest.raises(UsageError, match="changed since the extraction"):
        reload_model(attrs)


def test_models_command_lists_reference_models():
    res = run_cli("models")
    for name in NAMES:
        assert name in res.output
    rows = json.loads(run_cli("models", "--json").output)
    ref = {r["name"]: r for r in rows if r["source"] == "reference"}
    assert set(ref) == set(NAMES) and all(r["weights_offline"] for r in ref.values())


def test_unknown_reference_name_is_one_line():
    res = run_cli("layers", "ref_vitt")
    assert_one_line_error(res, "did you mean ref_vit")


def test_training_script_quick_run(tmp_path):
    """A few steps of the real recipe: files, card fields, and the output loads strictly as --weights."""
    out = tmp_path / "w"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train_reference_models.py"),
                           "--models", "ref_resnet", "--steps", "3", "--n-eval", "32", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    card = json.loads((out / "ref_resnet.json").read_text())
    wfile = out / "ref_resnet.safetensors"
    assert card["weights"]["sha256"] == sha256_file(str(wfile))
    assert card["training"]["steps"] == 3 and card["training"]["batch"] == 128
    loaded = load_model("ref_resnet", weights=str(wfile))
    assert loaded.info.weights["kind"] == "file"
    # the card's accuracy is the shipped (float16) weights' top-1 on shapes seed 0, images 0..31, recomputed here
    ref = rm.REFERENCE_MODELS["ref_resnet"]
    samples = [render_shape_sample(0, i, ref.img_size) for i in range(32)]
    x = torch.from_numpy(np.stack([img.transpose(2, 0, 1) for img, _, _ in samples])).float() / 255.0
    x = (x - torch.tensor(ref.mean).view(1, 3, 1, 1)) / torch.tensor(ref.std).view(1, 3, 1, 1)
    with torch.no_grad():
        pred = loaded.module(x).argmax(dim=1).numpy()
    top1 = float(np.mean(pred == np.array([label for _, _, label in samples])))
    assert card["evaluation"]["top1_accuracy"] == round(top1, 4)
