"""Model registry, weight loading and preprocessing.

No test touches the network: "pretrained" loads are exercised against fake Hugging Face / torch hub caches
built in tmp_path from randomly initialised models, and the loaded outputs are compared with the source's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from hooks.capture.layers import default_layers, infer_family
from hooks.models.preprocess import Preprocessing, crop_pct_for
from hooks.models.registry import REGISTRY, list_models, load_model, resolve_name
from hooks.models.weights import apply_weights, load_state_dict_file
from repsim.errors import UsageError

REQUIRED = ["vit_s16", "vit_b16", "vit_b32", "vit_l16", "deit_t16", "deit_s16", "deit_b16", "deit_b16_distilled",
            "dino_b16", "dinov2_b14", "dinov2_b14_reg4", "clip_b16", "mae_b16", "beit_b16", "swin_t", "convnext_t",
            "convnext_b", "resnet18", "resnet50", "resnet101", "mixer_b16", "nfnet_f0", "levit_128", "efficientnet_b0"]
X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture()
def empty_caches(tmp_path, monkeypatch):
    """Point the HF hub cache and torch hub at empty directories (no network is ever used either way)."""
    from huggingface_hub import constants

    hf = tmp_path / "hf_cache"
    hf.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return hf, tmp_path / "torch_home"


def _random(seed: int, changes: dict | None = None) -> dict:
    """The provenance record of a random-init model (default scheme)."""
    return {"kind": "random", "seed": seed, "init": "branches-on", "init_changes": changes or {}}


def _fake_hub_repo(cache: os.PathLike, repo_id: str, files: dict[str, str], commit: str = "a" * 40) -> str:
    """Lay files out like huggingface_hub does: models--org--name/{refs/main, snapshots/<commit>/<file>}."""
    root = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(root, "snapshots", commit)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(commit)
    for name, src in files.items():
        shutil.copy(src, os.path.join(snap, name))
    return snap


# -- names -------------------------------------------------------------------------------------------------
def test_every_short_name_maps_to_a_known_pretrained_timm_id():
    pretrained = set(timm.list_models(pretrained=True))
    assert set(REQUIRED) <= set(REGISTRY)
    for name, entry in REGISTRY.items():
        source, ident = resolve_name(name)
        assert source == "timm" and ident == entry.timm_id
        assert ident in pretrained, ident
        assert "." in ident  # a pinned pretrained tag, not timm's moving default
    assert resolve_name("VIT-B16") == ("timm", REGISTRY["vit_b16"].timm_id)


def test_registry_families_match_the_built_architectures():
    # built on the meta device: structure only, no memory, no init cost
    for name, entry in REGISTRY.items():
        arch = entry.timm_id.split(".")[0]
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False)
        assert infer_family(model) == entry.family, name
        paths = default_layers(model, entry.family)
        names = dict(model.named_modules())
        assert all(p in names for p in paths), name


def test_registry_prefix_tokens_are_what_the_names_promise():
    expect = {"deit_b16_distilled": 2, "dinov2_b14_reg4": 5, "dinov2_b14": 1, "vit_b16": 1, "resnet50": 0}
    for name, n in expect.items():
        with torch.device("meta"):
            model = timm.create_model(REGISTRY[name].timm_id.split(".")[0], pretrained=False)
        assert int(getattr(model, "num_prefix_tokens", 0)) == n, name


def test_unknown_short_name_suggests_close_names():
    with pytest.raises(UsageError, match="vit_b16"):
        resolve_name("vit_b61")
    with pytest.raises(UsageError, match="resnet50"):
        resolve_name("resnet_50")
    with pytest.raises(UsageError, match="timm:vit_tiny_patch16_224"):
        resolve_name("vit_tiny_patch16_224")  # a timm id without the prefix
    with pytest.raises(UsageError, match="empty model name"):
        resolve_name("")


def test_prefixed_specs_parse():
    assert resolve_name("timm:resnet18") == ("timm", "resnet18")
    assert resolve_name("timm:resnet18.tv_in1k") == ("timm", "resnet18.tv_in1k")
    assert resolve_name("hf:google/vit-base-patch16-224") == ("hf", "google/vit-base-patch16-224")
    assert resolve_name("hf:/some/dir") == ("hf", "/some/dir")
    assert resolve_name("torchvision:resnet18") == ("torchvision", "resnet18")
    assert resolve_name("py:models/my.py:build") == ("py", "models/my.py:build")
    assert resolve_name("py:C:/x/my.py:build") == ("py", "C:/x/my.py:build")
    with pytest.raises(UsageError, match="timm:resnet18"):
        resolve_name("timm:resnt18")
    with pytest.raises(UsageError, match="tv_in1k"):
        resolve_name("timm:resnet18.no_such_tag")
    with pytest.raises(UsageError, match="torchvision:resnet18"):
        resolve_name("torchvision:resnet1")
    with pytest.raises(UsageError, match="FACTORY"):
        resolve_name("py:model.py")
    with pytest.raises(UsageError, match="timm:"):
        resolve_name("tim:resnet18")
    with pytest.raises(UsageError, match="'hf:' names no model"):
        resolve_name("hf:")


def test_list_models_rows():
    rows = list_models()
    from hooks.models.reference_models import REFERENCE_MODELS

    assert [r["name"] for r in rows] == [*REGISTRY, *REFERENCE_MODELS]
    for r in rows:
        assert set(r) >= {"name", "source", "id", "family", "weights_offline"}
        assert isinstance(r["weights_offline"], bool)
    json.dumps(rows)


# -- geometry read from the model --------------------------------------------------------------------------
def _tokens_of_first_block(module: nn.Module, x: torch.Tensor) -> int:
    seen = []
    h = module.blocks[0].register_forward_hook(lambda _m, _i, o: seen.append(o.shape[1]))
    with torch.no_grad():
        module(x)
    h.remove()
    return seen[0]


def test_vit_random_init_geometry():
    m = load_model("timm:vit_tiny_patch16_224", random_init=True, img_size=32)
    assert m.info.weights == _random(0)  # a timm ViT has no switched-off branch: nothing changed
    assert m.info.num_prefix_tokens == 1 and m.info.grid == (2, 2) and m.info.patch_size == (16, 16)
    assert m.preprocessing.img_size == (32, 32)
    assert m.info.family == "vit" and m.info.num_classes == 1000
    assert m.info.source_id == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # the default tag, recorded
    assert not m.module.training
    # the recorded geometry is the one the model really uses
    assert _tokens_of_first_block(m.module, X32) == 1 + 2 * 2
    d = m.info.to_dict()
    assert d["grid"] == [2, 2] and json.loads(json.dumps(d)) == d


def test_random_init_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = load_model("timm:vit_tiny_patch16_224", random_init=True, img_size=32)
    after = torch.rand(1)
    assert torch.equal(before, after)  # the caller's RNG stream is untouched
    b = load_model("timm:vit_tiny_patch16_224", random_init=True, img_size=32)
    c = load_model("timm:vit_tiny_patch16_224", random_init=True, img_size=32, init_seed=1)
    with torch.no_grad():
        assert torch.equal(a.module(X32), b.module(X32))
        assert not torch.allclose(a.module(X32), c.module(X32))
    assert c.info.weights == _random(1)


def test_distilled_and_register_prefix_tokens():
    deit = load_model("timm:deit_tiny_distilled_patch16_224", random_init=True, img_size=32)
    assert deit.info.num_prefix_tokens == 2 and deit.info.grid == (2, 2)
    assert _tokens_of_first_block(deit.module, X32) == 2 + 4
    reg = load_model("dinov2_b14_reg4", random_init=True, img_size=28)
    assert reg.info.num_prefix_tokens == 5 and reg.info.grid == (2, 2) and reg.info.patch_size == (14, 14)
    assert _tokens_of_first_block(reg.module, torch.zeros(1, 3, 28, 28)) == 5 + 4
    assert reg.preprocessing.crop_pct == 1.0  # DINOv2's own evaluation crop


def test_cnn_has_no_prefix_or_grid():
    m = load_model("resnet18", random_init=True, img_size=48)
    assert m.info.num_prefix_tokens == 0 and m.info.grid is None and m.info.patch_size is None
    assert m.preprocessing.img_size == (48, 48)
    assert m.info.source_id == "resnet18.tv_in1k" and m.preprocessing.interpolation == "bilinear"
    assert m.module(torch.zeros(1, 3, 48, 48)).shape == (1, 1000)


def test_img_size_must_fit_the_patch_grid():
    with pytest.raises(UsageError, match="multiple of the patch size"):
        load_model("timm:vit_tiny_patch16_224", random_init=True, img_size=40)
    with pytest.raises(UsageError, match="img_size must be a positive integer, got 0"):
        load_model("timm:vit_tiny_patch16_224", random_init=True, img_size=0)


def test_overrides_apply():
    m = load_model("resnet18", random_init=True, img_size=32, mean=(0.1, 0.2, 0.3), std=(1, 2, 3),
                   interpolation="nearest", crop_pct=1.0)
    p = m.preprocessing
    assert p.mean == (0.1, 0.2, 0.3) and p.std == (1.0, 2.0, 3.0) and p.interpolation == "nearest" and p.crop_pct == 1
    with pytest.raises(UsageError, match="std must be > 0 for every channel"):
        load_model("resnet18", random_init=True, std=(1, 0, 1))
    with pytest.raises(UsageError, match="exclude"):
        load_model("resnet18", random_init=True, weights=__file__)


# -- random initialisation: no switched-off branches -------------------------------------------------------
def _linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Biased linear CKA (Kornblith et al. 2019) of (n, ...) activations, float64, features centred first."""
    x = a.reshape(len(a), -1).double()
    y = b.reshape(len(b), -1).double()
    x, y = x - x.mean(0), y - y.mean(0)
    k, l = x @ x.T, y @ y.T
    return float((k * l).sum() / (k.norm() * l.norm()))


def _outputs(module: nn.Module, names: list[str], x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    mods = dict(module.named_modules())
    out: dict[str, torch.Tensor] = {}
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: out.setdefault(n, o.detach())) for n in names]
    with torch.no_grad():
        logits = module(x)
    for h in hooks:
        h.remove()
    return out, logits


RESNET_TAPS = ["maxpool", *(f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1))]


def test_random_init_resnet_blocks_are_not_identities():
    """timm zero-initialises each block's last BN scale: untouched, layer1.0 == maxpool bit for bit, CKA 1."""
    from repsim.data.sources import open_dataset

    m = load_model("resnet18", random_init=True, img_size=64)
    src = open_dataset("shapes", n=32, seed=0, image_size=64)
    transform = m.preprocessing.transform()
    x = torch.stack([transform(src.load(i)) for i in range(len(src))])
    out, logits = _outputs(m.module, RESNET_TAPS, x)
    pairs = [(a, b) for a, b in zip(RESNET_TAPS, RESNET_TAPS[1:]) if out[a].shape == out[b].shape]
    assert len(pairs) == 5  # maxpool→layer1.0 and within each stage
    for a, b in pairs:
        change = float((out[b] - out[a]).norm() / out[a].norm())
        assert change > 0.1, (a, b, change)  # a block's residual branch moves the stream
        assert _linear_cka(out[a], out[b]) < 0.999, (a, b)
    assert float(logits.std(0).mean()) > 1e-3  # the logits depend on the image
    w = m.info.weights
    assert w["init"] == "branches-on" and w["seed"] == 0
    assert w["init_changes"] == {"norm_scale_0_to_1": [f"{t}.bn2.weight" for t in RESNET_TAPS[1:]]}
    # the framework's own initialisation stays available (a training run's start) and is the degenerate one
    fw = load_model("resnet18", random_init=True, img_size=64, init_scheme="framework")
    fw_out, _ = _outputs(fw.module, RESNET_TAPS, x)
    assert torch.equal(fw_out["maxpool"], fw_out["layer1.0"]) and torch.equal(fw_out["layer4.0"], fw_out["layer4.1"])
    assert fw.info.weights == {"kind": "random", "seed": 0, "init": "framework", "init_changes": {}}
    with pytest.raises(UsageError, match="init scheme"):
        load_model("resnet18", random_init=True, init_scheme="zeros")


@pytest.mark.parametrize("spec,size,rule,count", [
    ("timm:vit_small_patch14_dinov2", 28, "gate_to_1", 24),        # layer scale 1e-5 on both branches of 12 blocks
    ("timm:test_convnext.r160_in1k", 64, "gate_to_1", 9),          # ConvNeXt layer scale 1e-6, 9 blocks
    ("timm:mixer_s16_224", 32, "zero_weight_to_default_init", 1),  # zero classifier: constant logits
])
def test_random_init_switches_layer_scales_and_zero_heads_on(spec, size, rule, count):
    m = load_model(spec, random_init=True, img_size=size)
    names = default_layers(m.module, m.info.family)
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    out, logits = _outputs(m.module, names, x)
    assert len(m.info.weights["init_changes"][rule]) == count
    assert float(logits.std(0).mean()) > 1e-3
    for a, b in zip(names[:-1], names[1:-1]):  # consecutive blocks of one stage (the logits aside)
        if out[a].shape == out[b].shape:
            assert float((out[b] - out[a]).norm() / out[a].norm()) > 5e-3, (a, b)


def test_random_init_leaves_timm_vit_and_weight_files_alone(tmp_path):
    # timm's ViT initialisation switches nothing off (its head is trunc-normal, not zero)
    m = load_model("timm:vit_tiny_patch16_224", random_init=True, img_size=32)
    assert m.info.weights["init_changes"] == {}
    with torch.no_grad():
        assert float(m.module(X32).std(0).mean()) > 1e-3
    # weights from a file are loaded as they are, zero norm scales included: only random init is changed
    sd = load_model("resnet18", random_init=True, img_size=32, init_scheme="framework").module.state_dict()
    assert not sd["layer1.0.bn2.weight"].any()
    path = str(tmp_path / "zero_bn.safetensors")
    _save(sd, path, "safetensors")
    assert not load_model("resnet18", weights=path).module.state_dict()["layer1.0.bn2.weight"].any()


def test_reload_model_rebuilds_the_recorded_random_init():
    from hooks.models.registry import reload_model

    m = load_model("resnet18", random_init=True, img_size=32, init_seed=5)
    attrs = {"model": json.loads(json.dumps(m.info.to_dict())), "preprocessing": m.preprocessing.to_dict()}
    again = reload_model(attrs)
    assert again.info.weights == m.info.weights
    for k, v in m.module.state_dict().items():
        assert torch.equal(again.module.state_dict()[k], v), k
    # a store written before the scheme was recorded was built with the framework's init: rebuilt so
    del attrs["model"]["weights"]["init"], attrs["model"]["weights"]["init_changes"]
    legacy = reload_model(attrs)
    assert legacy.info.weights["init"] == "framework" and not legacy.module.state_dict()["layer1.0.bn2.weight"].any()


# -- offline behaviour ---------------------------------------------------------------------------------------
def test_offline_without_cache_is_one_quick_usage_error(empty_caches):
    hf_cache, torch_home = empty_caches
    t0 = time.monotonic()
    with pytest.raises(UsageError, match="no pretrained weights for vit_b16") as err:
        load_model("vit_b16", offline=True)
    msg = str(err.value)
    assert time.monotonic() - t0 < 10
    assert "--weights" in msg and "--random-init" in msg and str(hf_cache) in msg
    assert "timm/vit_base_patch16_224.augreg_in21k_ft_in1k" in msg and "\n" not in msg
    with pytest.raises(UsageError, match="no pretrained weights for torchvision:resnet18") as err:
        load_model("torchvision:resnet18", offline=True)
    assert "--weights" in str(err.value) and "--random-init" in str(err.value)
    assert os.path.join(str(torch_home), "hub", "checkpoints") in str(err.value)
    t0 = time.monotonic()
    with pytest.raises(UsageError, match="no pretrained weights for hf:some-org/not-cached-model") as err:
        load_model("hf:some-org/not-cached-model", offline=True)
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert "--weights" in msg and "--random-init" in msg and "some-org/not-cached-model" in msg
    # hub models need a cache; the bundled reference models never do
    assert all(r["weights_offline"] is (r["source"] == "reference") for r in list_models())


def test_pretrained_from_hf_cache_equals_source(empty_caches, tmp_path):
    from safetensors.torch import save_file

    hf_cache, _ = empty_caches
    # resnet18 (plain) and the AugReg ViT-Ti (whose timm config asks for the .npz loader on its URL file)
    for name, size in (("resnet18", 32), ("vit_t16", 224)):
        torch.manual_seed(3)
        ident = REGISTRY[name].timm_id
        src = timm.create_model(ident.split(".")[0], pretrained=False).eval()
        f = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(f))
        snap = _fake_hub_repo(hf_cache, "timm/" + ident, {"model.safetensors": str(f)})
        assert next(r for r in list_models() if r["name"] == name)["weights_offline"] is True
        m = load_model(name)
        w = m.info.weights
        assert w["kind"] == "hub" and w["tag"] == ident and w["cache_file"] == os.path.join(snap, "model.safetensors")
        assert w["revision"] == "a" * 40 and w["hub_id"] == "timm/" + ident and w["filename"] == "model.safetensors"
        assert w["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(m.module(x), src(x), rtol=0, atol=0)


def test_pretrained_from_torch_hub_cache_equals_source(empty_caches):
    from torchvision.models import get_model, get_model_weights

    _, torch_home = empty_caches
    torch.manual_seed(4)
    src = get_model("resnet18", weights=None).eval()
    url = get_model_weights("resnet18").DEFAULT.url
    ckpt = os.path.join(str(torch_home), "hub", "checkpoints")
    os.makedirs(ckpt)
    torch.save(src.state_dict(), os.path.join(ckpt, os.path.basename(url)))
    m = load_model("torchvision:resnet18")
    assert m.info.weights["kind"] == "hub" and m.info.weights["cache_file"].startswith(ckpt)
    assert m.info.weights["sha256"] == hashlib.sha256(open(m.info.weights["cache_file"], "rb").read()).hexdigest()
    with torch.no_grad():
        torch.testing.assert_close(m.module(X32), src(X32), rtol=0, atol=0)
    assert m.preprocessing.img_size == (224, 224) and m.preprocessing.resize_size() == (256, 256)


# -- weight files ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def r18_source():
    torch.manual_seed(5)
    return timm.create_model("resnet18", pretrained=False).eval()


def _save(sd, path, fmt):
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    elif fmt == "legacy":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(sd, path)


@pytest.mark.parametrize("fmt,fname,wrap", [
    ("zip", "w.pt", lambda sd: sd),
    ("zip", "w.bin", lambda sd: sd),
    ("legacy", "w.pth", lambda sd: sd),
    ("safetensors", "w.safetensors", lambda sd: sd),
    ("zip", "nested.pth", lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}),
    ("legacy", "nested_legacy.th", lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}}),
    ("zip", "ema.pt", lambda sd: {"ema": sd, "step": torch.tensor(10)}),
    ("zip", "compiled.pt", lambda sd: {"_orig_mod." + k: v for k, v in sd.items()}),
])
def test_weight_formats_round_trip(tmp_path, r18_source, fmt, fname, wrap):
    path = str(tmp_path / fname)
    _save(wrap(r18_source.state_dict()), path, fmt)
    m = load_model("timm:resnet18", weights=path, img_size=32)
    with torch.no_grad():
        fresh = timm.create_model("resnet18", pretrained=False).eval()(X32)
        ref = r18_source(X32)
        assert not torch.allclose(fresh, ref)  # a fresh random model differs: equality below means loaded
        torch.testing.assert_close(m.module(X32), ref, rtol=0, atol=0)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert m.info.weights == {"kind": "file", "file": os.path.abspath(path), "sha256": digest}


def test_file_with_other_class_count_sizes_the_classifier(tmp_path):
    torch.manual_seed(6)
    src = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    path = str(tmp_path / "cifar.pt")
    torch.save(src.state_dict(), path)
    m = load_model("timm:resnet18", weights=path, img_size=32)
    assert m.info.num_classes == 10
    with torch.no_grad():
        torch.testing.assert_close(m.module(X32), src(X32), rtol=0, atol=0)


def test_mismatched_keys_are_a_usage_error(tmp_path, r18_source):
    sd = dict(r18_source.state_dict())
    sd["layer1.0.conv1.weightX"] = sd.pop("layer1.0.conv1.weight")
    sd["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    path = str(tmp_path / "bad.pt")
    torch.save(sd, path)
    with pytest.raises(UsageError) as err:
        load_model("timm:resnet18", weights=path)
    msg = str(err.value)
    assert "layer1.0.conv1.weight" in msg and "layer1.0.conv1.weightX" in msg and "conv1.weight" in msg
    assert "missing" in msg and "unexpected" in msg and "mis-shaped" in msg
    # a different depth: many missing keys, only the first few named
    ok = str(tmp_path / "ok.pt")
    torch.save(r18_source.state_dict(), ok)
    with pytest.raises(UsageError, match=r"missing: .*\(\+\d+ more\)"):
        apply_weights(timm.create_model("resnet34", pretrained=False), ok)


def test_unreadable_or_odd_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # garbage is never unpickled with weights_only=False
        with pytest.raises(UsageError, match="cannot read"):
            load_state_dict_file(str(garbage))
    bad_st = tmp_path / "x.safetensors"
    bad_st.write_bytes(b"\x00" * 64)
    with pytest.raises(UsageError, match="safetensors"):
        load_state_dict_file(str(bad_st))
    with pytest.raises(UsageError, match="not found"):
        load_state_dict_file(str(tmp_path / "missing.pt"))
    with pytest.raises(UsageError, match="no state dict"):
        torch.save({"epoch": 3, "note": "nothing"}, str(tmp_path / "empty.pt"))
        load_state_dict_file(str(tmp_path / "empty.pt"))
    # non-tensor objects: refused in a zip checkpoint and a legacy one alike, loaded only under trust_pickle
    from hooks.models.weights import trust_pickle

    obj = {"state_dict": {"w": torch.ones(2)}, "acc": np.float64(0.9)}
    torch.save(obj, str(tmp_path / "obj_zip.pt"))
    with pytest.raises(UsageError, match="--trust-pickle"):
        load_state_dict_file(str(tmp_path / "obj_zip.pt"))
    torch.save(obj, str(tmp_path / "obj_legacy.pt"), _use_new_zipfile_serialization=False)
    with pytest.raises(UsageError, match="--trust-pickle"):
        load_state_dict_file(str(tmp_path / "obj_legacy.pt"))
    with trust_pickle():
        sd, _ = load_state_dict_file(str(tmp_path / "obj_legacy.pt"))
    assert list(sd) == ["w"]


def test_missing_num_batches_tracked_is_accepted(tmp_path, r18_source):
    # PyTorch < 0.4.1 checkpoints have no BatchNorm num_batches_tracked; nothing in eval depends on it
    sd = {k: v for k, v in r18_source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = str(tmp_path / "old.pt")
    torch.save(sd, path)
    m = load_model("timm:resnet18", weights=path)
    with torch.no_grad():
        torch.testing.assert_close(m.module(X32), r18_source(X32), rtol=0, atol=0)


# -- Hugging Face ------------------------------------------------------------------------------------------
HF_KW = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=64)


@pytest.fixture(scope="module")
def hf_vit_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(7)
    model = ViTForImageClassification(ViTConfig(**HF_KW)).eval()
    d = tmp_path_factory.mktemp("hfvit")
    model.save_pretrained(str(d))
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(d))
    return str(d), model


def _fire_order(module, paths, x):
    mods = dict(module.named_modules())
    order = []
    hs = [mods[p].register_forward_hook(lambda _m, _i, _o, p=p: order.append(p)) for p in paths]
    with torch.no_grad():
        y = module(x)
    for h in hs:
        h.remove()
    return list(dict.fromkeys(order)), y


def test_hf_local_dir(hf_vit_dir):
    d, ref = hf_vit_dir
    m = load_model(f"hf:{d}")
    assert m.info.source == "hf" and m.info.family == "hf_vit"
    assert m.info.num_prefix_tokens == 1 and m.info.grid == (4, 4) and m.info.patch_size == (8, 8)
    assert m.info.num_classes == 2
    with open(os.path.join(d, "model.safetensors"), "rb") as f:
        assert m.info.weights == {"kind": "file", "file": os.path.join(os.path.abspath(d), "model.safetensors"),
                                  "sha256": hashlib.sha256(f.read()).hexdigest()}
    p = m.preprocessing
    assert p.img_size == (32, 32) and p.mean == (0.5, 0.5, 0.5) and p.interpolation == "bilinear"
    assert p.crop_mode == "squash" and p.crop_pct == 1.0
    with torch.no_grad():
        # eager attention here vs. the reference's fused SDPA: equal up to float rounding
        torch.testing.assert_close(m.module(X32), ref(pixel_values=X32).logits, rtol=1e-5, atol=1e-6)
    paths = default_layers(m.module, m.info.family)
    assert len(paths) == 1 + 2 + 2  # embeddings, 2 layers, final norm, classifier
    order, _ = _fire_order(m.module, paths, X32)
    assert order == paths
    assert m.module.model.config._attn_implementation == "eager"


def test_hf_other_size_and_random_init(hf_vit_dir):
    d, ref = hf_vit_dir
    big = load_model(f"hf:{d}", img_size=64)  # pretrained: position embeddings interpolated
    assert big.info.grid == (8, 8) and big.preprocessing.img_size == (64, 64)
    x = torch.randn(1, 3, 64, 64)
    seen = []
    layer0 = dict(big.module.named_modules())[default_layers(big.module, "hf_vit")[1]]
    h = layer0.register_forward_hook(lambda _m, _i, o: seen.append((o[0] if isinstance(o, tuple) else o).shape[1]))
    with torch.no_grad():
        big.module(x)
    h.remove()
    assert seen == [1 + 64]
    wfile = os.path.join(os.path.dirname(d), "hf_weights.safetensors")
    _save(ref.state_dict(), wfile, "safetensors")
    fromfile = load_model(f"hf:{d}", weights=wfile)
    assert fromfile.info.weights["kind"] == "file"
    with torch.no_grad():
        torch.testing.assert_close(fromfile.module(X32), ref(pixel_values=X32).logits, rtol=1e-5, atol=1e-6)
    rnd = load_model(f"hf:{d}", random_init=True)
    assert rnd.info.weights == _random(0)
    with torch.no_grad():
        assert not torch.allclose(rnd.module(X32), ref(pixel_values=X32).logits)


def test_hf_prefix_tokens_from_embeddings(tmp_path):
    from transformers import (DeiTConfig, DeiTForImageClassificationWithTeacher, Dinov2WithRegistersConfig,
                              Dinov2WithRegistersForImageClassification)

    cases = [(DeiTForImageClassificationWithTeacher(DeiTConfig(**HF_KW)), 2),
             (Dinov2WithRegistersForImageClassification(Dinov2WithRegistersConfig(num_register_tokens=4, **HF_KW)), 5)]
    for i, (model, prefix) in enumerate(cases):
        d = str(tmp_path / f"m{i}")
        model.eval().save_pretrained(d)
        with pytest.warns(UserWarning, match="preprocessor_config"):
            m = load_model(f"hf:{d}")
        assert m.info.num_prefix_tokens == prefix and m.info.grid == (4, 4), type(model).__name__
        paths = default_layers(m.module, m.info.family)
        order, y = _fire_order(m.module, paths, X32)
        assert order == paths and y.shape == (2, 2)


def test_hf_hub_id_from_cache(empty_caches, hf_vit_dir, tmp_path):
    hf_cache, _ = empty_caches
    d, ref = hf_vit_dir
    staged = tmp_path / "staged"
    shutil.copytree(d, staged)
    files = {f: str(staged / f) for f in os.listdir(staged)}
    _fake_hub_repo(hf_cache, "tiny-org/tiny-vit", files)
    m = load_model("hf:tiny-org/tiny-vit")
    assert m.info.weights["kind"] == "hub" and m.info.weights["tag"] == "tiny-org/tiny-vit"
    assert m.info.weights["revision"] == "a" * 40
    with torch.no_grad():
        torch.testing.assert_close(m.module(X32), ref(pixel_values=X32).logits, rtol=1e-5, atol=1e-6)


def test_hf_checkpoint_missing_weights(tmp_path):
    from transformers import ViTConfig, ViTModel

    d = str(tmp_path / "backbone")
    ViTModel(ViTConfig(**HF_KW), add_pooling_layer=False).eval().save_pretrained(d)
    with pytest.warns(UserWarning, match="preprocessor_config"):
        m = load_model(f"hf:{d}")  # a backbone: its output is the last hidden state, no classifier
    assert m.info.num_classes == 0 and m.module(X32).shape == (2, 17, 32)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["architectures"] = ["ViTForImageClassification"]  # claims a head the checkpoint does not have
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(UsageError, match="classifier"):
        load_model(f"hf:{d}")
    del cfg["architectures"]  # no architecture named: the backbone is loaded without a random head
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.warns(UserWarning, match="preprocessor_config"):
        m = load_model(f"hf:{d}")
    assert type(m.module.model).__name__ == "ViTModel" and m.info.num_classes == 0


def test_hf_not_a_model_dir(tmp_path):
    with pytest.raises(UsageError, match="not a transformers model directory"):
        load_model(f"hf:{tmp_path}")
    with pytest.raises(UsageError, match="no such model directory"):
        load_model(f"hf:{tmp_path}/missing/dir")


# -- py: and torchvision: ------------------------------------------------------------------------------------
PY_MODEL = '''
import torch
from torch import nn

class PatchEmbed(nn.Module):
    def __init__(self, img_size):
        super().__init__()
        self.patch_size = (8, 8)
        self.grid_size = (img_size // 8, img_size // 8)
        self.proj = nn.Conv2d(3, 16, 8, 8)
    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)

class Tiny(nn.Module):
    num_prefix_tokens = 1
    def __init__(self, img_size=224):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, 16))
        self.blocks = nn.Sequential(*[nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)) for _ in range(2)])
        self.head = nn.Linear(16, 5)
    def forward(self, x):
        t = self.patch_embed(x)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        return self.head(self.blocks(t)[:, 0])

def build(img_size=224, pretrained=True):
    return Tiny(img_size)

def plain():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 224 * 224, 3))

def not_a_module():
    return 42
'''


def test_py_factory(tmp_path):
    f = tmp_path / "mymodel.py"
    f.write_text(PY_MODEL)
    m = load_model(f"py:{f}:build", img_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), random_init=True)
    assert m.preprocessing.img_size == (32, 32) and m.preprocessing.mean == (0.5,) * 3
    assert m.preprocessing.std == (0.25,) * 3
    assert m.info.num_prefix_tokens == 1 and m.info.grid == (4, 4) and m.info.patch_size == (8, 8)
    assert m.info.weights == _random(0) and m.info.num_classes == 5 and m.info.source == "py"
    assert m.module(X32).shape == (2, 5)
    order, _ = _fire_order(m.module, default_layers(m.module, m.info.family), X32)
    assert order == default_layers(m.module, m.info.family)

    d = load_model(f"py:{f}:plain")
    assert d.preprocessing.img_size == (224, 224) and d.preprocessing.mean == (0.485, 0.456, 0.406)
    assert d.info.weights["kind"] == "factory"
    assert d.info.weights["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()

    # --weights into a py model, strictly
    src = load_model(f"py:{f}:build", img_size=32).module
    torch.nn.init.normal_(src.head.weight)
    wpath = str(tmp_path / "tiny.safetensors")
    _save(src.state_dict(), wpath, "safetensors")
    w = load_model(f"py:{f}:build", img_size=32, weights=wpath)
    torch.testing.assert_close(w.module(X32), src(X32), rtol=0, atol=0)


def test_py_factory_errors(tmp_path):
    f = tmp_path / "mymodel.py"
    f.write_text(PY_MODEL)
    with pytest.raises(UsageError, match="build"):
        load_model(f"py:{f}:buld")
    with pytest.raises(UsageError, match="not a torch.nn.Module"):
        load_model(f"py:{f}:not_a_module")
    with pytest.raises(UsageError, match="not found"):
        load_model(f"py:{tmp_path}/nope.py:build")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(UsageError, match="boom"):
        load_model(f"py:{broken}:build")


def test_torchvision_resnet18_matches_timm_preset():
    tv = load_model("torchvision:resnet18", random_init=True, img_size=32)
    tm = load_model("resnet18", random_init=True, img_size=32)
    assert tv.info.family == tm.info.family == "resnet"
    tv_paths = default_layers(tv.module, tv.info.family)
    tm_paths = default_layers(tm.module, tm.info.family)
    # same names everywhere but the pooling module (torchvision: avgpool, timm: global_pool)
    assert tv_paths == [("avgpool" if p == "global_pool" else p) for p in tm_paths]
    order, y = _fire_order(tv.module, tv_paths, X32)
    assert order == tv_paths and y.shape == (2, 1000)
    assert tv.info.weights == _random(0) and tv.info.grid is None  # torchvision: BN scales start at 1


def test_torchvision_preprocessing_from_weights_meta():
    m = load_model("torchvision:resnet50", random_init=True)
    p = m.preprocessing
    assert p.img_size == (224, 224) and p.resize_size() == (232, 232) and p.interpolation == "bilinear"


# -- Preprocessing -------------------------------------------------------------------------------------------
def test_transform_shape_and_normalisation():
    p = Preprocessing(img_size=(40, 48), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    t = p.transform()
    out = t(Image.new("RGB", (97, 61), (128, 128, 128)))
    assert out.shape == (3, 40, 48) and out.dtype == torch.float32
    expect = (128 / 255 - torch.tensor(p.mean)) / torch.tensor(p.std)
    torch.testing.assert_close(out, expect[:, None, None].expand(3, 40, 48), rtol=0, atol=1e-6)
    # greyscale and RGBA inputs give three channels
    assert t(Image.new("L", (50, 50), 128)).shape == (3, 40, 48)
    torch.testing.assert_close(t(Image.new("L", (50, 50), 128)), out[:, :, :48][:, :40], rtol=0, atol=1e-6)
    assert t(Image.new("RGBA", (50, 50), (1, 2, 3, 4))).shape == (3, 40, 48)


def test_crop_pct_semantics():
    # 64 px image with a white 4-px frame: crop_pct 0.875 at 56 px resizes to floor(56 / 0.875) = 64 and
    # crops the frame away exactly; crop_pct 1.0 resizes 64 -> 56 and keeps it
    a = np.zeros((64, 64, 3), np.uint8)
    a[:4], a[-4:], a[:, :4], a[:, -4:] = 255, 255, 255, 255
    img = Image.fromarray(a)
    p = Preprocessing(img_size=(56, 56), mean=(0, 0, 0), std=(1, 1, 1), interpolation="nearest", crop_pct=0.875)
    assert p.resize_size() == (64, 64)
    assert p.transform()(img).abs().max() == 0
    full = p.with_overrides(crop_pct=1.0).transform()(img)
    assert full.max() == 1.0 and full[:, 0, :].min() == 1.0
    # squash keeps the aspect ratio out of it: a 2:1 image squashed fills the square
    wide = Image.fromarray(np.concatenate([np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)], 1))
    sq = Preprocessing((32, 32), (0, 0, 0), (1, 1, 1), "nearest", 1.0, "squash").transform()(wide)
    assert sq[:, :, :16].max() == 0 and sq[:, :, 16:].min() == 1
    ctr = Preprocessing((32, 32), (0, 0, 0), (1, 1, 1), "nearest", 1.0, "center").transform()(wide)
    assert ctr[:, :, :16].max() == 0 and ctr[:, :, 16:].min() == 1  # centre crop of the middle
    assert crop_pct_for(224, 232) and int(224 / crop_pct_for(224, 232)) == 232


def test_preprocessing_dict_round_trip_and_validation():
    p = Preprocessing(img_size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear",
                      crop_pct=0.9, crop_mode="squash")
    d = p.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert Preprocessing.from_dict(json.loads(json.dumps(d))) == p
    assert Preprocessing.from_dict(d).to_dict() == d
    q = p.with_overrides(img_size=96, mean=[0.1, 0.2, 0.3])
    assert q.img_size == (96, 96) and q.mean == (0.1, 0.2, 0.3) and q.std == p.std and p.img_size == (224, 224)
    for bad, msg in ((dict(std=(1, 0, 1)), "std must be > 0 for every channel"),
                     (dict(mean=(1, 2)), "mean must be three finite numbers"),
                     (dict(interpolation="lanczos9"), "interpolation must be one of .*got 'lanczos9'"),
                     (dict(crop_pct=0), r"crop_pct must be in \(0, 1\], got 0"),
                     (dict(crop_pct=1.5), r"crop_pct must be in \(0, 1\], got 1.5"),
                     (dict(crop_mode="zoom"), "crop_mode must be one of .*got 'zoom'"),
                     (dict(img_size=(0, 3)), r"img_size must be positive, got \(0, 3\)")):
        with pytest.raises(UsageError, match=msg):
            Preprocessing(**{**dict(img_size=(8, 8), mean=(0, 0, 0), std=(1, 1, 1)), **bad})
    with pytest.raises(UsageError, match="unknown"):
        Preprocessing.from_dict({**d, "extra": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Preprocessing.from_dict({"img_size": [8, 8], "mean": [0, 0, 0], "std": [1, 1, 1]})
