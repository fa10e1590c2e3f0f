"""Stores open in xarray: every array carries Zarr v3 dimension names (repsim/store/, "Dimension names"), every
group of a store opens with `xr.open_zarr`, and stores written without names still read in repsim."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import zarr

from conftest import run_cli
from repsim import open_store

xr = pytest.importorskip("xarray")  # in the [test] extra; the library itself does not need it

N = 16


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A ViT store with every optional group (attention with kept maps, Grams, inputs) and a CNN store (map
    layers), extracted by the CLI."""
    root = tmp_path_factory.mktemp("xarray")
    vit, cnn = str(root / "vit.zarr"), str(root / "cnn.zarr")
    res = run_cli("extract", "--model", "ref_vit", "--data", "shapes", "--n", str(N), "--batch-size", "8",
                  "--chunk-size", "8", "--attention", "--attn-keep", "2", "--grams", "--save-inputs", "--out", vit,
                  "--quiet")
    assert res.exit_code == 0, res.output
    res = run_cli("extract", "--model", "timm:resnet18", "--random-init", "--img-size", "32", "--data", "shapes",
                  "--n", str(N), "--batch-size", "8", "--chunk-size", "8", "--out", cnn, "--quiet")
    assert res.exit_code == 0, res.output
    return open_store(vit), open_store(cnn)


def _groups(path: str) -> list[str]:
    """Every group of a store, the root ("") included, found by walking the Zarr hierarchy."""
    out = [""]
    todo = [(zarr.open_group(path, mode="r"), "")]
    while todo:
        group, prefix = todo.pop()
        for name, sub in group.groups():
            out.append(prefix + name)
            todo.append((sub, prefix + name + "/"))
    return out


def _expected(store) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """The documented names, written out by hand per array, with the sizes the store's own metadata implies."""
    n, chunks = store.n, -(-store.n // store.chunk_size)
    want = {"samples/ids": (("sample",), (n,)), "samples/labels": (("sample",), (n,)),
            "progress/chunk_done": (("chunk",), (chunks,))}
    axes = {"tokens": ("token", "channel"), "map": ("channel", "height", "width"), "vector": ("channel",)}
    for layer in store.layers:
        info = store.layer_info(layer)
        want[f"acts/{layer}"] = (("sample", *(f"{a}:{layer}" for a in axes[info["kind"]])), (n, *info["shape"]))
    if store.has_inputs:
        want["inputs/pixels"] = (("sample", "channel", "height", "width"), (n, 3, *store.attrs["preprocessing"]["img_size"]))
    if store.gram_info:
        m = store.chunk_size
        for layer in store.layers:
            want[f"grams/{layer}"] = (("chunk", "pair"), (chunks, m * (m - 1) // 2))
    for layer in store.attention_layers:
        info = store.attention_info(layer)
        heads, (gh, gw) = int(info["num_heads"]), info["grid"]
        for stat in ("distance", "prefix_mass", "entropy"):
            want[f"attn/{layer}/{stat}"] = (("sample", "head"), (n, heads))
        want[f"attn/{layer}/aligned"] = (("chunk", "head", "dy", "dx"), (chunks, heads, 2 * gh - 1, 2 * gw - 1))
        tokens = int(info["num_prefix_tokens"]) + gh * gw
        want[f"attn/{layer}/maps"] = (("kept_sample", "head", "query", "key"), (2, heads, tokens, tokens))
        if f"attn/{layer}/query_map" in store.extra_arrays:  # attention as segmentation (global layers)
            want[f"attn/{layer}/query_map"] = (("sample", "head", "patch"), (n, heads, gh * gw))
    return want


def test_every_group_opens_in_xarray_with_the_documented_names(stores):
    for store in stores:
        want = _expected(store)
        seen = {}
        for group in _groups(store.path):
            ds = xr.open_zarr(store.path, group=group or None, consolidated=False)
            for name, var in ds.data_vars.items():
                seen[f"{group}/{name}" if group else name] = (var.dims, var.shape)
        for name, (dims, shape) in want.items():
            assert seen.get(name) == (dims, shape), (name, seen.get(name), (dims, shape))
        # arrays the table above does not list by hand still open, each axis named and sized
        for name, (dims, shape) in seen.items():
            assert len(dims) == len(shape) and all(isinstance(d, str) and d for d in dims), name
        assert {"progress/chunk_digest", "quality/fp16_error"} <= set(seen)
        assert seen["quality/fp16_error"][0] == ("chunk", "layer")


def test_xarray_reads_the_values_repsim_reads(stores):
    """Names on the right axes: a tokens layer, a map layer, the inputs and an attention statistic read through
    xarray equal repsim's reader (sizes alone would not tell height from width on a square map)."""
    vit, cnn = stores
    acts = xr.open_zarr(vit.path, group="acts", consolidated=False)
    np.testing.assert_array_equal(acts["blocks.0"].values, vit.read("blocks.0"))
    layer = next(ly for ly in cnn.layers if cnn.layer_info(ly)["kind"] == "map")
    maps = xr.open_zarr(cnn.path, group="acts", consolidated=False)[layer]
    np.testing.assert_array_equal(maps.transpose("sample", f"channel:{layer}", f"height:{layer}",
                                                 f"width:{layer}").values, cnn.read(layer))
    pixels = xr.open_zarr(vit.path, group="inputs", consolidated=False)["pixels"]
    np.testing.assert_array_equal(pixels.isel(sample=slice(0, 3)).values, vit.read_inputs(0, 3))
    attn_layer = vit.attention_layers[0]
    dist = xr.open_zarr(vit.path, group=f"attn/{attn_layer}", consolidated=False)["distance"]
    np.testing.assert_array_equal(dist.values, vit.read_attention(attn_layer, "distance"))


def test_stores_without_dimension_names_still_read(stores, tmp_path):
    """A store written before the names existed (names removed from every zarr.json): repsim reads, verifies and
    compares it as before, with the same numbers."""
    import shutil

    vit = stores[0]
    old = tmp_path / "old.zarr"
    shutil.copytree(vit.path, old)
    stripped = 0
    for meta in pathlib.Path(old).rglob("zarr.json"):
        d = json.loads(meta.read_text())
        if d.pop("dimension_names", None) is not None:
            meta.write_text(json.dumps(d))
            stripped += 1
    assert stripped > 20
    with pytest.raises(KeyError, match="dimension_names"):  # what xarray says: the names really are gone
        xr.open_zarr(str(old), group="acts", consolidated=False)
    res = run_cli("verify", str(old), "--quiet")
    assert res.exit_code == 0, res.output
    res_old = run_cli("cka", str(old), "--out", str(tmp_path / "old.json"), "--quiet")
    res_new = run_cli("cka", vit.path, "--out", str(tmp_path / "new.json"), "--quiet")
    assert res_old.exit_code == 0 and res_new.exit_code == 0, res_old.output + res_new.output
    assert json.loads((tmp_path / "old.json").read_text())["values"] == \
        json.loads((tmp_path / "new.json").read_text())["values"]
