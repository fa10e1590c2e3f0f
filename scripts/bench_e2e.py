"""Benchmark: from two models to a CKA map, repsim vs pytorch-cka's one-pass comparison, in one process.

    python scripts/bench_e2e.py                 # real CIFAR-10 ResNet-20 vs ResNet-56 when ../shared/realdata exists
    python scripts/bench_e2e.py --bundled       # the bundled ref_vit vs ref_resnet on shapes (no real data needed)

The workload (issue #14): the same images in the same order for everybody (the store order), every residual
block of both networks, minibatches of 256 consecutive images, 2 CPU cores. Timed, each the best of
``--rounds`` rounds, the rounds interleaved:

- ``peer``: pytorch-cka ``compute_cka(m1, m2, loader, ...)``: decode + preprocess the images, run both models,
  hook every block, one float32 Gram per layer and batch, unbiased HSIC summed over batches; no disk;
- ``grams``: ``extract --grams --no-acts`` of both models, then ``repsim cka`` (reads the stored Grams);
- ``grams+acts``: ``extract --grams`` (activations kept for every other analysis) of both, then ``cka``;
- ``acts``: plain ``extract`` of both (float16 activations), then ``cka`` from the activations;
- re-analysis: ``cka`` alone on the stores that already exist (activations; Grams).

Printed: wall seconds, the ratio peer time / repsim time (> 1: repsim is faster), the same for the CPU seconds
of the process (all threads: less sensitive to other load on a shared machine), and the max |difference| of
each map from the peer's. pytorch-cka accumulates its HSIC terms in float32, repsim in float64 (activation
stores hold float16 activations, Gram-only stores Grams of float32 ones); the Gram path and the activation
path of repsim on the same store must agree to ~1e-7.
pytorch-cka is not a dependency: ``pip install --no-deps pytorch-cka``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import tempfile
import time

import numpy as np
import torch

from hooks.extract.loop import extract
from hooks.models.registry import load_model
from repsim import cka_matrix
from repsim.data.sources import open_dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "realdata"
FACTORY = ROOT / "tests" / "realdata" / "cifar_resnet.py"
CIFAR_NORM = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=1.0)


def workload(n: int, bundled: bool):
    """(model A, model B, layers A, layers B, image source, description)."""
    ckpts = REAL / "cifar10-resnets"
    if not bundled and (ckpts / "resnet56-4bfd9763.th").exists():
        a = load_model(f"py:{FACTORY}:resnet20", weights=str(ckpts / "resnet20-12fca82f.th"), img_size=32, **CIFAR_NORM)
        b = load_model(f"py:{FACTORY}:resnet56", weights=str(ckpts / "resnet56-4bfd9763.th"), img_size=32, **CIFAR_NORM)
        src = open_dataset(str(REAL / "cifar10_test_from_jpeg.npz"), n=n, seed=0)
        la = [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)]
        lb = [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(9)]
        return a, b, la, lb, src, f"real: CIFAR-10 ResNet-20 vs ResNet-56 (pretrained), {n} CIFAR-10 test images"
    a = load_model("ref_vit")
    b = load_model("ref_resnet")
    src = open_dataset("shapes", n=n, seed=0, image_size=64)
    la = [f"blocks.{i}" for i in range(6)]
    lb = [f"layer{i}.{j}" for i in (1, 2, 3, 4) for j in (0, 1)]
    return a, b, la, lb, src, f"bundled: ref_vit vs ref_resnet, {n} shapes images (../shared/realdata absent)"


def peer_run(cka_mod, a, b, la, lb, src, batch: int) -> np.ndarray:
    """pytorch-cka over a loader that decodes and preprocesses the images in store order."""
    tf = a.preprocessing.transform()

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(src)

        def __getitem__(self, i):
            return tf(src.load(i))

    loader = torch.utils.data.DataLoader(Images(), batch_size=batch, shuffle=False)
    out = cka_mod.compute_cka(a.module, b.module, loader, layers=la, model2_layers=lb, device="cpu", progress=False)
    return out[0].double().numpy()


def timed(fn):
    """(wall seconds, CPU seconds of this process over all threads, value)."""
    t0, c0 = time.perf_counter(), time.process_time()
    value = fn()
    return time.perf_counter() - t0, time.process_time() - c0, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=256, help="CKA minibatch (= Gram batch = chunk rows)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bundled", action="store_true", help="use the bundled models even when real data exists")
    args = ap.parse_args()
    import cka as peer_mod  # pytorch-cka

    a, b, la, lb, src, what = workload(args.n, args.bundled)
    assert a.preprocessing.to_dict() == b.preprocessing.to_dict(), "the peer feeds both models the same tensors"
    bs = args.batch_size
    # The peer preprocesses with model A's transform: the two CIFAR models share theirs, the bundled ones too.
    tmp = tempfile.mkdtemp(prefix="bench_e2e_")
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    maps: dict[str, np.ndarray] = {}

    def clear(tag: str) -> None:
        for side in "ab":
            shutil.rmtree(os.path.join(tmp, f"{tag}_{side}.zarr"), ignore_errors=True)

    def ours(tag: str, **kw) -> np.ndarray:
        pa, pb = os.path.join(tmp, f"{tag}_a.zarr"), os.path.join(tmp, f"{tag}_b.zarr")
        sa = extract(a, src, pa, layers=la, batch_size=bs, chunk_size=bs, **kw)
        sb = extract(b, src, pb, layers=lb, batch_size=bs, chunk_size=bs, **kw)
        r = cka_matrix(sa, sb, batch_size=bs, progress=False)
        return r.values

    try:
        for _ in range(args.rounds):
            for tag in ("grams", "gramsacts", "acts"):  # the previous round's stores, outside the timing
                clear(tag)
            for tag, fn in (
                ("peer", lambda: peer_run(peer_mod, a, b, la, lb, src, bs)),
                ("grams", lambda: ours("grams", grams=True, acts=False)),
                ("grams+acts", lambda: ours("gramsacts", grams=True)),
                ("acts", lambda: ours("acts")),
            ):
                t, c, v = timed(fn)
                times.setdefault(tag, []).append(t)
                cpu.setdefault(tag, []).append(c)
                maps[tag] = v
            from repsim import open_store

            acts_a, acts_b = open_store(os.path.join(tmp, "acts_a.zarr")), open_store(os.path.join(tmp, "acts_b.zarr"))
            g_a, g_b = open_store(os.path.join(tmp, "grams_a.zarr")), open_store(os.path.join(tmp, "grams_b.zarr"))
            for tag, (sa, sb) in (("reanalyse acts", (acts_a, acts_b)), ("reanalyse grams", (g_a, g_b))):
                t, c, r = timed(lambda: cka_matrix(sa, sb, batch_size=bs, progress=False))
                times.setdefault(tag, []).append(t)
                cpu.setdefault(tag, []).append(c)
                maps[tag] = r.values
        sizes = {tag: sum(os.path.getsize(os.path.join(d, f)) for p in (f"{tag}_a.zarr", f"{tag}_b.zarr")
                          for d, _, fs in os.walk(os.path.join(tmp, p)) for f in fs) / 2**20
                 for tag in ("grams", "gramsacts", "acts")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = {k: min(v) for k, v in times.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    peer = best["peer"]
    result = {
        "workload": what, "n": args.n, "batch_size": bs, "layers": [len(la), len(lb)],
        "threads": torch.get_num_threads(), "rounds": args.rounds,
        "seconds": {k: round(v, 2) for k, v in best.items()},
        "speedup_vs_peer (peer s / repsim s)": {k: round(peer / v, 2) for k, v in best.items() if k != "peer"},
        "cpu_seconds": {k: round(v, 2) for k, v in best_cpu.items()},
        "cpu_speedup_vs_peer": {k: round(best_cpu["peer"] / v, 2) for k, v in best_cpu.items() if k != "peer"},
        "load_average_1min": round(os.getloadavg()[0], 2),
        "max_abs_diff_vs_peer": {k: float(np.abs(v - maps["peer"]).max()) for k, v in maps.items() if k != "peer"},
        "max_abs_diff_grams_vs_activation_path": float(np.abs(maps["grams+acts"] - maps["reanalyse acts"]).max()),
        "store_mb (both models)": {k: round(v, 1) for k, v in sizes.items()},
        "targets": {"end-to-end with Grams >= 1.0x (moonshot 2x)": best["grams"] <= peer,
                    "re-analysis from activations >= 2x": peer / best["reanalyse acts"] >= 2,
                    "re-analysis from Grams >= 10x": peer / best["reanalyse grams"] >= 10},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
