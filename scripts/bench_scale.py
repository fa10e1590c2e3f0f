"""Benchmark: Dask scale-out of minibatch CKA (1 vs 2 workers), and the per-image costs behind the README's
"Scaling" estimate.

    python scripts/bench_scale.py            # about 3 minutes on 2 CPU cores
    python scripts/bench_scale.py --quick

Measured in one run (the machine is shared and noisy; ratios, not absolute times, are the result):

1. ``cka_matrix`` on two stores (12 + 12 layers) with the minibatch plan run locally, on a LocalCluster of 1
   worker and of 2 workers (1 thread each): wall times and the 1 → 2 worker speed-up.
2. Per-image costs for the estimate: CPU forward time of ViT-B/16 and ResNet-50 at 224 px, activation
   bytes per image with the default layer presets (float16, ``--pool none``), and this machine's
   write rate for activation chunks (CRC32C, no compression), the Gram tier's bytes per
   image and the Gram products' cost per image.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from hooks.extract.loop import extract, plan_extraction
from hooks.models.registry import load_model
from repsim import cka_matrix
from repsim.data.sources import open_dataset


def _stores(tmp: str, n: int) -> tuple:
    out = []
    for name in ("timm:vit_tiny_patch16_224", "timm:resnet18"):
        model = load_model(name, random_init=True, img_size=64)
        source = open_dataset("shapes", n=n, seed=0, image_size=64)
        out.append(extract(model, source, os.path.join(tmp, name.split(":")[1] + ".zarr"), batch_size=32))
    return tuple(out)


def _cka_times(a, b, batch: int) -> dict[str, float]:
    from dask.distributed import Client, LocalCluster

    kw = dict(batch_size=batch, tokens="flatten", progress=False, device="cpu")
    t0 = time.perf_counter()
    ref = cka_matrix(a, b, **kw).values
    times = {"local": time.perf_counter() - t0}
    for workers in (1, 2):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=":0", silence_logs=50) as cluster, Client(cluster) as client:
            cka_matrix(a, b, client=client, **dict(kw, batch_size=batch))  # warm the workers (imports)
            t0 = time.perf_counter()
            got = cka_matrix(a, b, client=client, **kw).values
            times[f"{workers}_workers"] = time.perf_counter() - t0
        assert np.abs(got - ref).max() < 1e-10
    return times


def _per_image(name: str, images: int) -> dict[str, float]:
    model = load_model(name, random_init=True)
    source = open_dataset("shapes", n=images, seed=0, image_size=224)
    with tempfile.TemporaryDirectory() as tmp:
        plan = plan_extraction(model, source, os.path.join(tmp, "p.zarr"), batch_size=images)
        grams = plan_extraction(model, source, os.path.join(tmp, "g.zarr"), batch_size=images, chunk_size=256 // images
                                * images, grams=True, acts=False)
    features = sum(int(np.prod(t.shape)) for t in plan.taps)
    x = torch.stack([model.preprocessing.transform()(source.load(i)) for i in range(images)])
    with torch.inference_mode():
        model.module(x[:2])
        t0 = time.perf_counter()
        model.module(x)
    return {"cpu_forward_s_per_image": (time.perf_counter() - t0) / images,
            "bytes_per_image": plan.bytes_per_image, "layers": len(plan.taps),
            "gram_bytes_per_image": grams.bytes_per_image, "features_all_layers": features,
            # one m = 256 Gram costs 2·m·f flops per image and layer
            "gram_flop_per_image": 2 * 256 * features}


def _gram_flops() -> float:
    """Measured float32 Gram throughput (FLOP/s) of :func:`repsim.measures.gram.unbiased_gram` on a ViT-B/16 token layer."""
    from repsim.devices import tf32_off
    from repsim.measures.gram import unbiased_gram

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((256, 197 * 768)).astype(np.float16))
    with tf32_off():
        unbiased_gram(x)
        t0 = time.perf_counter()
        for _ in range(3):
            unbiased_gram(x)
    return 3 * 2 * 256 * 256 * 197 * 768 / (time.perf_counter() - t0)


def _write_rate() -> float:
    import zarr

    from repsim.store.format import _compressor

    a = np.random.default_rng(0).standard_normal((64, 197, 768)).astype(np.float16)
    with tempfile.TemporaryDirectory() as tmp:
        arr = zarr.open_group(tmp, mode="w").create_array("a", shape=(256, 197, 768), chunks=(64, 197, 768),
                                                          dtype="float16", compressors=_compressor())
        t0 = time.perf_counter()
        for i in range(4):
            arr[i * 64:(i + 1) * 64] = a
        return 4 * a.nbytes / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024, help="images in the CKA stores")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--images", type=int, default=8, help="images for the per-image forward cost")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.n, args.images = 256, 4
    with tempfile.TemporaryDirectory() as tmp:
        a, b = _stores(tmp, args.n)
        times = _cka_times(a, b, args.batch)
    result = {
        "cka": {"n": args.n, "batch": args.batch, "layers": [len(a.layers), len(b.layers)],
                "seconds": {k: round(v, 3) for k, v in times.items()},
                "speedup_1_to_2_workers": round(times["1_workers"] / times["2_workers"], 2)},
        "per_image": {name: _per_image(name, args.images) for name in ("vit_b16", "resnet50")},
        "write_MB_per_s": round(_write_rate() / 2**20, 1),
        "gram_GFLOP_per_s": round(_gram_flops() / 1e9, 1),
        "cpu_cores": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    rate = result["write_MB_per_s"] * 2**20
    flops = result["gram_GFLOP_per_s"] * 1e9
    print("\nEstimate inputs for 50,000 images (see README, Scaling):")
    for name, r in result["per_image"].items():
        total = r["bytes_per_image"] * 50_000
        print(f"  {name:9s} {r['layers']:3d} layers, {r['bytes_per_image'] / 2**20:6.2f} MB/image -> "
              f"{total / 2**30:7.1f} GB; one writer core: {total / rate / 3600:5.2f} h; "
              f"CPU forward here: {r['cpu_forward_s_per_image'] * 50_000 / 3600:5.2f} h")
        print(f"  {'':9s} --grams --no-acts: {r['gram_bytes_per_image'] / 2**10:6.1f} KB/image -> "
              f"{r['gram_bytes_per_image'] * 50_000 / 2**30:6.2f} GB ({r['bytes_per_image'] / r['gram_bytes_per_image']:.0f}x "
              f"smaller); Gram products here: {r['gram_flop_per_image'] / flops:5.3f} s/image")


if __name__ == "__main__":
    main()
