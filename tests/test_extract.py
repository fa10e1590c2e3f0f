"""The extraction loop and the store: contents equal direct computation, resume is bit-identical, errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr

from conftest import kept_unchanged, run_killed_after_chunks
from hooks.extract.loop import extract, plan_extraction, run_extraction
from hooks.models.registry import load_model
from repsim import open_store
from repsim.data.sources import open_dataset
from repsim.errors import UsageError
from repsim.store.locks import WriterLock
from repsim.store.verify import verify_store

VIT = "timm:vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return load_model(VIT, random_init=True, img_size=32)


@pytest.fixture(scope="module")
def shapes():
    return open_dataset("shapes", n=40, seed=3, image_size=32)


def _direct_blocks(model, source, idx):
    """Residual stream of every block for samples ``idx``, computed without hooks."""
    transform = model.preprocessing.transform()
    x = torch.stack([transform(source.load(i)) for i in idx])
    m = model.module
    with torch.no_grad():
        h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        out = []
        for blk in m.blocks:
            h = blk(h)
            out.append(h.numpy())
    return out, x.numpy()


def test_store_contents_equal_direct_forward(tmp_path, vit, shapes):
    store = extract(vit, shapes, str(tmp_path / "v.zarr"), batch_size=8, dtype="float32", save_inputs=True)
    assert store.complete and store.n == 40
    assert store.layers[0] == "patch_embed" and "blocks.0" in store.layers
    direct, x = _direct_blocks(vit, shapes, [0, 17, 39])
    for i, ref in enumerate(direct):
        got = store.read(f"blocks.{i}")[[0, 17, 39]]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(store.read_inputs()[[0, 17, 39]], x, atol=2e-3)  # inputs are float16
    info = store.layer_info("blocks.0")
    assert info["kind"] == "tokens" and info["num_prefix_tokens"] == 1 and info["grid"] == [2, 2]
    assert store.ids == shapes.ids and store.fingerprint == shapes.fingerprint
    np.testing.assert_array_equal(store.labels, shapes.labels)
    a = store.attrs
    assert a["model"]["weights"] == {"kind": "random", "seed": 0, "init": "branches-on", "init_changes": {}}
    assert a["preprocessing"]["img_size"] in ([32, 32], (32, 32))
    assert a["libraries"]["torch"] == torch.__version__
    assert verify_store(store).ok


def test_float16_default_and_iter_batches(tmp_path, vit, shapes):
    store = extract(vit, shapes, str(tmp_path / "h.zarr"), layers=["blocks.*"], batch_size=16)
    assert store.layers == [f"blocks.{i}" for i in range(12)]
    assert store.read("blocks.3").dtype == np.float16
    direct, _ = _direct_blocks(vit, shapes, range(40))
    np.testing.assert_allclose(store.read("blocks.3").astype(np.float32), direct[3], rtol=2e-3, atol=2e-3)
    seen = 0
    for rows, block in store.iter_batches(["blocks.0", "blocks.11"], 15):
        assert block["blocks.0"].shape[0] == rows.stop - rows.start
        seen += rows.stop - rows.start
    assert seen == 40


def test_pool_and_resnet(tmp_path, shapes):
    torch.manual_seed(0)
    model = load_model("timm:resnet18", random_init=True, img_size=32)
    store = extract(model, shapes, str(tmp_path / "r.zarr"), pool="gap", batch_size=8, dtype="float32")
    assert "layer1.0" in store.layers and "layer4.1" in store.layers
    for layer in store.layers:
        assert store.layer_info(layer)["kind"] == "vector"
    # the logits layer equals the model output
    transform = model.preprocessing.transform()
    x = torch.stack([transform(shapes.load(i)) for i in range(4)])
    with torch.no_grad():
        logits = model.module(x).numpy()
    np.testing.assert_allclose(store.read(store.layers[-1], 0, 4), logits, rtol=1e-4, atol=1e-4)


def test_resume_after_interruption_is_bit_identical(tmp_path, vit, shapes):
    full = extract(vit, shapes, str(tmp_path / "full.zarr"), batch_size=8, chunk_size=8)
    plan = plan_extraction(vit, shapes, str(tmp_path / "part.zarr"), batch_size=8, chunk_size=8)
    part = run_killed_after_chunks(plan, 2)
    assert not part.complete and part.chunks_done().sum() == 2
    report = verify_store(part)
    assert not report.ok and any("never completed" in p for p in report.problems)
    plan = plan_extraction(vit, shapes, str(tmp_path / "part.zarr"), batch_size=8, chunk_size=8)
    assert plan.resume and not plan.already_complete
    resumed = run_extraction(plan, progress=False)
    assert resumed.complete
    for layer in full.layers:
        np.testing.assert_array_equal(resumed.read(layer), full.read(layer))
    again = plan_extraction(vit, shapes, str(tmp_path / "part.zarr"), batch_size=8, chunk_size=8)
    assert again.already_complete


@pytest.mark.slow
def test_kill_and_resume_cli(tmp_path):
    """SIGKILL a real extraction mid-run; the same command finishes it with bit-identical arrays."""
    args = [sys.executable, "-m", "repsim.app.cli", "extract", "--model", VIT, "--random-init", "--img-size", "32",
            "--data", "shapes", "--n", "96", "--batch-size", "8", "--chunk-size", "8", "--quiet"]
    ref = tmp_path / "ref.zarr"
    subprocess.run(args + ["--out", str(ref)], check=True, capture_output=True)
    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen(args + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    flags = out / "progress" / "chunk_done" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and not (flags.exists() and len(os.listdir(flags)) >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not open_store(str(out)).complete, "the run finished before it could be killed"
    res = subprocess.run(args + ["--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    a, b = open_store(str(ref)), open_store(str(out))
    assert b.complete
    for layer in a.layers:
        np.testing.assert_array_equal(a.read(layer), b.read(layer))


def test_other_configuration_refused_then_overwrite(tmp_path, vit, shapes):
    out = str(tmp_path / "c.zarr")
    extract(vit, shapes, out, batch_size=8, layers=["blocks.0"])
    with pytest.raises(UsageError, match="another configuration"):
        plan_extraction(vit, shapes, out, batch_size=8, layers=["blocks.1"])
    other = open_dataset("shapes", n=40, seed=4, image_size=32)
    with pytest.raises(UsageError, match="different samples"):
        plan_extraction(vit, other, out, batch_size=8, layers=["blocks.0"])
    store = extract(vit, shapes, out, batch_size=8, layers=["blocks.1"], overwrite=True)
    assert store.layers == ["blocks.1"]


def test_second_writer_refused(tmp_path, vit, shapes):
    out = str(tmp_path / "l.zarr")
    plan = plan_extraction(vit, shapes, out, batch_size=8, chunk_size=8)
    run_killed_after_chunks(plan, 1)
    lock = WriterLock(out)
    lock.acquire()  # another live writer (this process)
    try:
        with pytest.raises(UsageError, match="being written by"):
            run_extraction(plan_extraction(vit, shapes, out, batch_size=8, chunk_size=8), progress=False)
    finally:
        lock.release()


def test_stale_lock_of_dead_process_is_taken_over(tmp_path, vit, shapes):
    out = str(tmp_path / "s.zarr")
    plan = plan_extraction(vit, shapes, out, batch_size=8, chunk_size=8)
    run_killed_after_chunks(plan, 1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import json
    import socket

    with open(os.path.join(out, ".repsim-writer.lock"), "w") as f:
        json.dump({"pid": dead.pid, "host": socket.gethostname()}, f)
    store = run_extraction(plan_extraction(vit, shapes, out, batch_size=8, chunk_size=8), progress=False)
    assert store.complete


def test_float16_overflow_is_stored_as_float32(tmp_path, shapes):
    """A layer beyond float16's range on the planning images is stored as float32, exactly; one that only
    overflows after planning is refused with one line naming it."""
    torch.manual_seed(0)
    model = load_model(VIT, random_init=True, img_size=32)
    with torch.no_grad():
        model.module.blocks[2].mlp.fc2.bias.fill_(1e5)
    store = extract(model, shapes, str(tmp_path / "o.zarr"), batch_size=8, layers=["blocks.1", "blocks.2"])
    assert store.layer_info("blocks.2")["dtype"] == "float32" and store.layer_info("blocks.1")["dtype"] == "float16"
    assert store.attrs["extraction"]["float32_layers"] == ["blocks.2"]
    x = store.read("blocks.2").astype(np.float64)
    assert np.isfinite(x).all() and np.abs(x).max() > 9e4

    class LateOverflow(torch.nn.Module):  # finite on the planning images (ids 0-7), overflows later
        def __init__(self):
            super().__init__()
            self.calls = 0
            self.lin = torch.nn.Linear(3, 4)
            self.out = torch.nn.Identity()

        def forward(self, x):
            self.calls += 1
            return self.out(self.lin(x.mean(dim=(2, 3))) * (1.0 if self.calls == 1 else 1e6))

    late = load_model(VIT, random_init=True, img_size=32)
    late.module = LateOverflow()
    late.info.family = "other"
    with pytest.raises(UsageError, match=r"'out'.*float16's range"):
        extract(late, shapes, str(tmp_path / "late.zarr"), batch_size=8, layers=["out"])


def _offset_model(offset: float, scale: float = 1.0):
    """A 'model' whose features are offset + scale·(varying signal): float16 keeps ~11 bits of offset + signal."""

    class Offset(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.feat = torch.nn.Identity()

        def forward(self, x):
            z = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # (B, 48) varies with the image
            return self.feat(offset + scale * z)

    m = load_model(VIT, random_init=True, img_size=32)
    m.module = Offset()
    m.info.family = "other"
    return m


@pytest.fixture(scope="module")
def offset_free_float32_store(tmp_path_factory, shapes):
    """The features of ``_offset_model(0.0)`` on ``shapes``, stored as float32. Read only."""
    ref = extract(_offset_model(0.0), shapes, str(tmp_path_factory.mktemp("offset") / "ref.zarr"), batch_size=8,
                  layers=["feat"], dtype="float32")
    with kept_unchanged(ref.path):
        yield ref


@pytest.mark.parametrize("offset,scale", [(1e4, 1.0), (0.0, 1e-9)])
def test_float16_loss_of_variation_is_stored_losslessly(tmp_path, shapes, offset_free_float32_store, offset, scale):
    """Issue #12.4: a large offset (massive activations) or tiny values (underflow) would destroy the layer in
    float16 (CKA of the layer with itself + offset was NaN or 0): it is stored as float32, and CKA with the
    offset-free layer is 1."""
    from repsim import cka_matrix

    ref = offset_free_float32_store
    store = extract(_offset_model(offset, scale), shapes, str(tmp_path / "o.zarr"), batch_size=8,
                    layers=["feat"])
    assert store.layer_info("feat")["dtype"] == "float32"
    assert store.layer_info("feat")["fp16_error"] == "inf" or store.layer_info("feat")["fp16_error"] > 1e-2
    r = cka_matrix(store, ref, progress=False, device="cpu", batch_size=8)
    assert abs(float(r.values[0, 0]) - 1.0) < 1e-6


def test_float16_error_is_measured_per_chunk(tmp_path, shapes):
    """Well-scaled layers stay float16 with η near the rounding level; each chunk's η is recorded."""
    store = extract(_offset_model(0.0), shapes, str(tmp_path / "q.zarr"), batch_size=8, chunk_size=8,
                    layers=["feat"])
    assert store.layer_info("feat")["dtype"] == "float16"
    errs = store.fp16_errors()
    assert 0 < errs["feat"] < 1e-6
    q = np.asarray(zarr.open_group(store.path, mode="r")["quality/fp16_error"][:])
    assert q.shape == (5, 1) and (q > 0).all()


def test_verify_finds_corruption(tmp_path, vit, shapes):
    out = str(tmp_path / "v.zarr")
    store = extract(vit, shapes, out, batch_size=8, chunk_size=8, layers=["blocks.0"], dtype="float32")
    arr = zarr.open_array(os.path.join(out, "acts", "blocks.0"), mode="r+")
    arr[3, 0, 0] = np.nan
    chunk_file = os.path.join(out, "acts", "blocks.0", "c", "2", "0", "0")
    with open(chunk_file, "wb") as f:
        f.write(b"garbage")
    report = verify_store(open_store(out))
    assert not report.ok
    assert any("NaN" in p and "chunk 0" in p for p in report.problems)
    assert any("chunk 2" in p and "decode" in p for p in report.problems)
    assert store.n == 40


def test_corrupt_images_skipped_and_recorded(tmp_path, vit):
    from PIL import Image

    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "bad.jpg").write_bytes(b"not a jpeg at all")
    source = open_dataset(str(root))
    with pytest.warns(UserWarning, match="bad.jpg"):
        store = extract(vit, source, str(tmp_path / "f.zarr"), batch_size=4, layers=["blocks.0"])
    assert store.n == 6 and "bad.jpg" not in store.ids
    assert [s["id"] for s in store.attrs["dataset"]["skipped"]] == ["bad.jpg"]
    with pytest.raises(UsageError, match="bad.jpg"):
        extract(vit, source, str(tmp_path / "g.zarr"), batch_size=4, layers=["blocks.0"], strict=True)


def test_disk_check(tmp_path, vit, shapes):
    plan = plan_extraction(vit, shapes, str(tmp_path / "d.zarr"), batch_size=8)
    assert plan.bytes_per_image == sum(int(np.prod(t.shape)) * 2 for t in plan.taps)
    plan.bytes_per_image = 10**15  # pretend each image needs a petabyte
    with pytest.raises(UsageError, match="free"):
        plan.check_disk()
    plan.check_disk(force=True)


def test_disk_estimate_counts_the_grams(tmp_path, vit, shapes):
    """--grams: each layer adds one packed float32 Gram (the m(m-1)/2 strict upper triangle) per chunk of m
    rows, spread over the chunk's images; with --no-acts that is all the store keeps per image."""
    m = 16
    both = plan_extraction(vit, shapes, str(tmp_path / "g.zarr"), batch_size=8, chunk_size=m, grams=True)
    only = plan_extraction(vit, shapes, str(tmp_path / "h.zarr"), batch_size=8, chunk_size=m, grams=True,
                           acts=False)
    gram_bytes = len(only.taps) * (m * (m - 1) // 2) * 4 // m
    assert only.bytes_per_image == gram_bytes
    assert both.bytes_per_image == gram_bytes + sum(int(np.prod(t.shape)) * 2 for t in both.taps)


def test_fp16_damage_after_planning_is_warned_and_fails_verify(tmp_path, shapes):
    """Images after the planning ones acquire a large offset: float16 keeps the layer (planning saw no harm), the
    per-chunk measurement catches the loss, the run warns, and verify fails naming the layer."""
    m = _offset_model(0.0)
    inner = m.module

    class LateOffset(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0
            self.feat = torch.nn.Identity()

        def forward(self, x):
            self.calls += 1
            z = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
            return self.feat(z + (0.0 if self.calls == 1 else 3e3))

    m.module = LateOffset()
    del inner
    out = str(tmp_path / "late.zarr")
    with pytest.warns(UserWarning, match="float16 storage lost"):
        store = extract(m, shapes, out, batch_size=8, chunk_size=8, layers=["feat"])
    assert store.layer_info("feat")["dtype"] == "float16" and store.fp16_errors()["feat"] > 1e-4
    report = verify_store(store)
    assert any(p.startswith("feat: float16 storage lost") for p in report.problems), report.problems


def test_info_shows_fp16_error_and_verify_finds_cut_arrays(tmp_path, shapes):
    from conftest import run_cli

    out = str(tmp_path / "d.zarr")
    store = extract(_offset_model(0.0), shapes, out, batch_size=8, chunk_size=8, layers=["feat"])
    assert verify_store(store).ok
    info = run_cli("info", out)
    assert info.exit_code == 0 and "fp16 err" in info.output
    arr = zarr.open_array(os.path.join(out, "acts", "feat"), mode="r+")
    arr.resize((20, *arr.shape[1:]))  # cut to half its rows
    report = verify_store(open_store(out))
    assert any("has 20 rows" in p for p in report.problems), report.problems
