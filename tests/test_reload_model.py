"""``reload_model`` for every model source (issue 18): the rebuilt model reproduces the store's own numbers, and
other weights than the store's are refused in one line.

Each case extracts a tiny store through the CLI (float32, the model's logits as a layer), rebuilds the model from
the store's attributes alone and runs it on the store's images: the logits must equal the stored ones. Sources:
``py:`` factories (weights made by the factory; a local ``--weights`` file), ``hf:`` (a local directory, and the
hub through the fake hub of ``test_hub_download``), ``torchvision:`` (weights in a private torch hub cache) and
timm hub weights (recorded revision and sha256 checked).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import torch

from conftest import run_cli
from hooks.gradients.erf import store_images
from hooks.models.registry import reload_model
from repsim import open_store
from repsim.errors import UsageError

TINY = pathlib.Path(__file__).resolve().parent / "user_models" / "tiny.py"
DATA = ["--data", "shapes", "--n", "8", "--batch-size", "8", "--dtype", "float32", "--quiet"]


def _extract(out: pathlib.Path, model: str, *args: str) -> "object":
    res = run_cli("extract", "--model", model, *args, *DATA, "--out", str(out))
    assert res.exit_code == 0, res.output
    return open_store(str(out))


def _assert_reproduces(store, layer: str, **reload_kw) -> None:
    """The rebuilt model, run on the store's images, gives the stored values of ``layer`` (its output)."""
    loaded = reload_model(store.attrs, **reload_kw)
    x = store_images(store, store.n, loaded.preprocessing.transform())
    with torch.no_grad():
        out = loaded.module(x)
    out = getattr(out, "logits", out)
    stored = store.read(layer)
    assert np.abs(stored).max() > 0
    np.testing.assert_allclose(out.numpy(), stored, rtol=1e-5, atol=1e-5 * np.abs(stored).max())


def _forged(store, **weights) -> dict:
    attrs = json.loads(json.dumps(store.attrs))
    attrs["model"]["weights"].update(weights)
    for key, value in weights.items():
        if value is None:
            del attrs["model"]["weights"][key]
    return attrs


# -- py: ------------------------------------------------------------------------------------------------------
def test_py_factory_weights_and_weights_file(tmp_path):
    s = _extract(tmp_path / "f.zarr", f"py:{TINY}:cnn", "--img-size", "32", "--layers", "head")
    assert s.attrs["model"]["weights"]["kind"] == "factory"
    with pytest.raises(UsageError, match="pass --trust-code if you trust it"):
        reload_model(s.attrs)
    _assert_reproduces(s, "head", trust_code=True)

    # a local state dict for the same factory: recorded as a file and its sha256, checked on reload
    torch.manual_seed(5)
    from user_models.tiny import TinyCNN

    weights = tmp_path / "w.pt"
    torch.save(TinyCNN().state_dict(), weights)
    s = _extract(tmp_path / "w.zarr", f"py:{TINY}:cnn", "--weights", str(weights), "--img-size", "32",
                 "--layers", "head")
    w = s.attrs["model"]["weights"]
    assert w["kind"] == "file" and w["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    _assert_reproduces(s, "head", trust_code=True)
    torch.save(TinyCNN().state_dict(), weights)  # other weights under the same name
    with pytest.raises(UsageError, match=r"w\.pt changed since the extraction \(sha256 differs\)"):
        reload_model(s.attrs, trust_code=True)


# -- hf: local directory ------------------------------------------------------------------------------------------
def _tiny_hf_vit(folder: pathlib.Path, seed: int) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64, num_labels=5)
                              ).save_pretrained(folder)


def test_hf_local_directory(tmp_path):
    folder = tmp_path / "tiny_vit"
    _tiny_hf_vit(folder, seed=3)
    s = _extract(tmp_path / "h.zarr", f"hf:{folder}", "--layers", "model.classifier")
    w = s.attrs["model"]["weights"]
    assert w["kind"] == "file" and w["file"] == str(folder / "model.safetensors")
    _assert_reproduces(s, "model.classifier")
    _tiny_hf_vit(folder, seed=4)  # retrained in place
    with pytest.raises(UsageError, match="changed since the extraction"):
        reload_model(s.attrs)


# -- hf: and timm: from the (fake) hub ------------------------------------------------------------------------------
@pytest.fixture()
def hub(tmp_path, monkeypatch):
    from test_hub_download import FakeHub, _point_hub_at

    fake = FakeHub()
    cache = _point_hub_at(monkeypatch, fake.url, str(tmp_path / "hf_home"))
    try:
        yield fake, cache
    finally:
        fake.close()


def test_hf_hub_model_rebuilt_at_the_recorded_commit(hub, tmp_path):
    from test_hub_download import COMMIT

    fake, cache = hub
    _tiny_hf_vit(tmp_path / "src", seed=11)
    files = {f: (tmp_path / "src" / f).read_bytes() for f in os.listdir(tmp_path / "src")}
    fake.repos["tiny-org/tiny-vit"] = files
    s = _extract(tmp_path / "h.zarr", "hf:tiny-org/tiny-vit", "--img-size", "32", "--layers", "model.classifier")
    w = s.attrs["model"]["weights"]
    assert (w["kind"], w["revision"]) == ("hub", COMMIT)
    shutil.rmtree(cache)  # downloaded again, at the recorded commit
    n = len(fake.log)
    _assert_reproduces(s, "model.classifier")
    assert any(f"/resolve/{COMMIT}/model.safetensors" in p for _, p in fake.log[n:])
    assert not any("/resolve/main/" in p for _, p in fake.log[n:])
    with pytest.raises(UsageError, match="not the ones the store was extracted with"):
        reload_model(_forged(s, sha256="1" * 64))


def test_timm_hub_weights_need_the_recorded_sha256_and_revision(hub, tmp_path):
    import timm

    from test_hub_download import COMMIT, TIMM_ID, TIMM_REPO, _safetensors_bytes

    fake, _ = hub
    torch.manual_seed(7)
    fake.repos[TIMM_REPO] = {"model.safetensors": _safetensors_bytes(
        timm.create_model("test_vit", pretrained=False).state_dict()), "config.json": b"{}"}
    s = _extract(tmp_path / "t.zarr", "timm:" + TIMM_ID, "--img-size", "32", "--layers", "head")
    assert s.attrs["model"]["weights"]["revision"] == COMMIT
    _assert_reproduces(s, "head")
    n = len(fake.log)
    # a store that records no sha256 cannot be checked: refused before anything is fetched
    with pytest.raises(UsageError, match="records no sha256 of the hub weights"):
        reload_model(_forged(s, sha256=None))
    assert len(fake.log) == n
    # the store names a branch, the cache resolves it to a commit: not provably the extraction's revision
    with pytest.raises(UsageError, match=f"found at revision {COMMIT}, the store was extracted at main"):
        reload_model(_forged(s, revision="main"))
    with pytest.raises(UsageError, match="has no revision"):
        reload_model(_forged(s, revision="f" * 40))


# -- torchvision ----------------------------------------------------------------------------------------------
def test_torchvision_weights_from_the_torch_hub_cache(tmp_path, monkeypatch):
    from torchvision.models import get_model, get_model_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = get_model_weights("squeezenet1_1").DEFAULT.url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(url)
    cached.parent.mkdir(parents=True)
    torch.manual_seed(2)
    torch.save(get_model("squeezenet1_1").state_dict(), cached)  # stands in for the download (offline)
    s = _extract(tmp_path / "v.zarr", "torchvision:squeezenet1_1", "--img-size", "64", "--offline",
                 "--layers", "classifier.3")
    w = s.attrs["model"]["weights"]
    assert (w["kind"], w["url"], w["sha256"]) == ("hub", url, hashlib.sha256(cached.read_bytes()).hexdigest())
    loaded = reload_model(s.attrs, offline=True)
    x = store_images(s, s.n, loaded.preprocessing.transform())
    with torch.no_grad():  # classifier.3 is the pooled logits' input: AdaptiveAvgPool2d output (n, 1000, 1, 1)
        np.testing.assert_allclose(loaded.module(x).numpy(), s.read("classifier.3").reshape(s.n, -1), rtol=1e-5,
                                   atol=1e-6)
    torch.manual_seed(3)
    torch.save(get_model("squeezenet1_1").state_dict(), cached)  # the cache now holds other weights
    with pytest.raises(UsageError, match="not the ones the store was extracted with"):
        reload_model(s.attrs, offline=True)
