"""A user ViT built from nn.TransformerEncoder / nn.MultiheadAttention declares its token geometry
(hooks.models.geometry): `repsim extract --attention` and `repsim localise` then work on it from the CLI."""

from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_cli as _cli
from hooks.capture.attention import AttentionCapture, find_attention_layers
from hooks.models.geometry import GEOMETRY_ATTR, TokenGeometry, declared_geometry, parse_geometry, parse_grid
from repsim.errors import UsageError
from repsim.store.reader import open_store

IMG, PATCH, GRID = 32, 8, 4  # 4 x 4 patch tokens of 8 px, one CLS token

MODEL_FILE = textwrap.dedent('''
    import torch
    from torch import nn


    class MhaViT(nn.Module):
        """ViT from torch's own blocks: conv patchify, CLS token, nn.TransformerEncoder (batch first)."""

        def __init__(self, img=32, patch=8, dim=32, heads=2, depth=2, declare=True):
            super().__init__()
            g = img // patch
            self.proj = nn.Conv2d(3, dim, patch, stride=patch)
            self.cls = nn.Parameter(torch.randn(1, 1, dim))
            self.pos = nn.Parameter(torch.randn(1, 1 + g * g, dim))
            layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
            self.head = nn.Linear(dim, 8)
            if declare:
                self.repsim_geometry = {"grid": (g, g), "num_prefix_tokens": 1, "patch_size": patch}

        def forward(self, x):
            t = self.proj(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos
            t = self.encoder(t)
            return self.head(t[:, 0])


    def build():
        torch.manual_seed(0)
        return MhaViT()


    def build_plain():
        torch.manual_seed(0)
        return MhaViT(declare=False)
''')


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("user_vit") / "mha_vit.py"
    path.write_text(MODEL_FILE)
    return str(path)


def _user_module(model_file: str, factory: str = "build") -> nn.Module:
    import importlib.util

    spec = importlib.util.spec_from_file_location("mha_vit_for_test", model_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, factory)().eval()


def _hand_distance(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Mean attention distance (images, heads) per self_attn, computed independently: each encoder layer's
    input is fed to its MultiheadAttention for per-head weights; then in float64 numpy, per patch query, the CLS
    key is dropped, the row renormalised, and the pixel distance between patch centres averaged."""
    inputs: dict[str, torch.Tensor] = {}
    handles = [layer.register_forward_pre_hook(lambda _m, a, i=i: inputs.__setitem__(i, a[0]))
               for i, layer in enumerate(model.encoder.layers)]
    with torch.no_grad():
        model(x)
        for h in handles:
            h.remove()
        out = {}
        for i, layer in enumerate(model.encoder.layers):
            t = inputs[i]
            _, w = layer.self_attn(t, t, t, need_weights=True, average_attn_weights=False)
            a = w.double().numpy()  # (B, H, 17, 17)
            cells = [(r, c) for r in range(GRID) for c in range(GRID)]
            d = np.array([[PATCH * math.hypot(rk - rq, ck - cq) for (rk, ck) in cells] for (rq, cq) in cells])
            patch = a[..., 1:, 1:]
            patch = patch / patch.sum(-1, keepdims=True)
            out[f"encoder.layers.{i}.self_attn"] = (patch * d).sum(-1).mean(-1)
    return out


def test_declared_geometry_is_read_by_the_capture(model_file):
    model = _user_module(model_file)
    layers = find_attention_layers(model)
    assert [ly.path for ly in layers] == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    for ly in layers:
        assert (ly.kind, ly.num_heads, ly.num_prefix_tokens, ly.grid, ly.patch_size) == \
            ("torch_mha", 2, 1, (GRID, GRID), (PATCH, PATCH))
    with AttentionCapture(model) as cap:
        model(torch.randn(3, 3, IMG, IMG))
    rec = cap.records["encoder.layers.0.self_attn"][0]
    assert rec.probs.shape == (3, 2, 17, 17) and rec.num_prefix_tokens == 1 and rec.grid == (GRID, GRID)
    # without a declaration the layout is unknown (never guessed)
    plain = _user_module(model_file, "build_plain")
    assert all(ly.grid is None and ly.num_prefix_tokens is None for ly in find_attention_layers(plain))


def test_malformed_declarations_are_usage_errors():
    m = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))  # the attribute sits above the MHA
    assert declared_geometry(m) is None
    for bad, msg in (({"grid": (4, 4), "num_prefix_tokens": 1}, "lacks patch_size"),
                     ({"grid": (4, 0), "num_prefix_tokens": 1, "patch_size": 8}, "grid"),
                     ({"grid": 4, "num_prefix_tokens": -1, "patch_size": 8}, "num_prefix_tokens"),
                     ({"grid": 4, "num_prefix_tokens": 1, "patch_size": 8, "cls": 1}, "unknown key 'cls'"),
                     ((4, 1, 8), "must be a dict")):
        setattr(m, GEOMETRY_ATTR, bad)
        with pytest.raises(UsageError, match=msg):
            declared_geometry(m)
        with pytest.raises(UsageError, match=msg):
            find_attention_layers(m)
    assert parse_geometry({"grid": 4, "num_prefix_tokens": 0, "patch_size": (8, 16)}) == \
        TokenGeometry((4, 4), 0, (8, 16))
    assert parse_grid("6x10") == (6, 10) and parse_grid("14") == (14, 14) and parse_grid(None) is None
    for bad in ("6x", "0x4", "ax4", "4x4x4"):
        with pytest.raises(UsageError, match="--grid"):
            parse_grid(bad)


@pytest.mark.parametrize("how", ["attribute", "flags"])
def test_cli_extract_attention_and_localize_on_a_user_vit(model_file, tmp_path, how):
    out = str(tmp_path / "u.zarr")
    spec = f"py:{model_file}:" + ("build" if how == "attribute" else "build_plain")
    flags = [] if how == "attribute" else ["--grid", "4x4", "--prefix-tokens", "1", "--patch-size", "8"]
    res = _cli("extract", "--model", spec, "--img-size", str(IMG), "--data", "shapes", "--n", "24",
               "--batch-size", "8", "--layers", "encoder.layers.*", "--attention", "--save-inputs",
               "--dtype", "float32", "--out", out, "--quiet", *flags)
    assert res.exit_code == 0, res.output
    store = open_store(out)
    model_attrs = store.attrs["model"]
    assert (model_attrs["num_prefix_tokens"], model_attrs["grid"], model_attrs["patch_size"]) == \
        (1, [GRID, GRID], [PATCH, PATCH])
    assert store.attention_layers == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    info = store.layer_info("encoder.layers.1")
    assert info["num_prefix_tokens"] == 1 and list(info["grid"]) == [GRID, GRID]

    # the stored mean attention distance equals a hand computation on the stored inputs
    x = torch.from_numpy(store.read_inputs().astype(np.float32))
    hand = _hand_distance(_user_module(model_file), x)
    for layer, ref in hand.items():
        got = store.read_attention(layer, "distance").astype(np.float64)
        assert got.shape == ref.shape == (24, 2)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
        assert 0 < got.min() and got.max() < PATCH * math.hypot(GRID - 1, GRID - 1)

    res = _cli("attention", out, "--out", str(tmp_path / "a.json"))
    assert res.exit_code == 0, res.output
    a = json.loads((tmp_path / "a.json").read_text())
    assert [ly["grid"] for ly in a["layers"]] == [[GRID, GRID]] * 2

    res = _cli("localise", out, "--images", "24", "--out", str(tmp_path / "loc.json"))
    assert res.exit_code == 0, res.output
    loc = json.loads((tmp_path / "loc.json").read_text())
    assert "encoder.layers.1" in json.dumps(loc)


def test_cli_geometry_errors_are_one_line(model_file, tmp_path):
    base = ["extract", "--model", f"py:{model_file}:build_plain", "--img-size", str(IMG), "--data", "shapes",
            "--n", "8", "--batch-size", "8", "--layers", "encoder.layers.*", "--quiet"]
    cases = [
        ([], "token geometry of attention layer"),  # no declaration, no flags: refused, not guessed
        (["--grid", "4x4"], "--prefix-tokens, --patch-size"),
        (["--grid", "3x3", "--prefix-tokens", "1", "--patch-size", "8"], "covers 24x24 px but the input is 32x32"),
        (["--grid", "4by4", "--prefix-tokens", "1", "--patch-size", "8"], "--grid must be GHxGW"),
    ]
    for i, (flags, msg) in enumerate(cases):
        res = _cli(*base, "--attention", "--out", str(tmp_path / f"e{i}.zarr"), *flags)
        assert res.exit_code == 2, res.output
        assert msg in res.output and res.output.count("error:") == 1 and "Traceback" not in res.output
    # a timm ViT's own geometry may not be contradicted
    res = _cli("extract", "--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "32", "--data",
               "shapes", "--n", "8", "--out", str(tmp_path / "t.zarr"), "--quiet", "--grid", "4x4",
               "--prefix-tokens", "0", "--patch-size", "8")
    assert res.exit_code == 2 and "may not contradict" in res.output, res.output
