"""Benchmark: the model-zoo job (every pair among N models) on Gram stores vs activation stores.

    python scripts/bench_zoo.py                 # 6 models (the bundled three, trained and random-init), 1024 images

Builds N Gram-only stores (``extract --grams --no-acts``, default layer presets), computes all N(N-1)/2
layer × layer CKA maps from them, and compares with the same job on activation stores: one pair is extracted
and compared from activations to measure the per-pair time, and the activation stores' size is what
``extract`` would write for each model (its plan's bytes per image × n). Printed: store sizes, time per map,
the whole zoo's time on each tier, and the max |difference| of the measured pair's map between the tiers
(float32 Grams of Gram-only stores vs float16 activations: float16 rounding, ~1e-4).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import time

import numpy as np

from hooks.extract.loop import extract, plan_extraction
from hooks.models.registry import load_model
from repsim import cka_matrix
from repsim.data.sources import open_dataset


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    names = ["ref_vit", "ref_vit_gap", "ref_resnet"]
    models = {name: load_model(name) for name in names}
    models |= {f"{name}(random)": load_model(name, random_init=True) for name in names}
    src = open_dataset("shapes", n=args.n, seed=0, image_size=64)
    bs = args.batch_size
    tmp = tempfile.mkdtemp(prefix="bench_zoo_")
    try:
        stores, extract_s, act_bytes = {}, {}, {}
        for i, (name, m) in enumerate(models.items()):
            t0 = time.perf_counter()
            stores[name] = extract(m, src, os.path.join(tmp, f"g{i}.zarr"), batch_size=32, chunk_size=bs, grams=True,
                                   acts=False)
            extract_s[name] = time.perf_counter() - t0
            act_bytes[name] = plan_extraction(m, src, os.path.join(tmp, f"plan{i}.zarr"), batch_size=32).total_bytes
        pairs = list(itertools.combinations(stores, 2))
        t0 = time.perf_counter()
        maps = {pair: cka_matrix(stores[pair[0]], stores[pair[1]], batch_size=bs, progress=False) for pair in pairs}
        zoo_gram_s = time.perf_counter() - t0
        assert all(r.source == "grams" for r in maps.values())
        # one pair from activations, for the per-pair cost on that tier
        a_name, b_name = pairs[0]
        sa = extract(models[a_name], src, os.path.join(tmp, "a.zarr"), batch_size=32, chunk_size=bs)
        sb = extract(models[b_name], src, os.path.join(tmp, "b.zarr"), batch_size=32, chunk_size=bs)
        t0 = time.perf_counter()
        act_map = cka_matrix(sa, sb, batch_size=bs, progress=False)
        pair_act_s = time.perf_counter() - t0
        gram_bytes = {name: _du(s.path) for name, s in stores.items()}
        result = {
            "models": len(models), "pairs": len(pairs), "n": args.n, "gram_batch": bs,
            "gram_store_mb": {k: round(v / 2**20, 2) for k, v in gram_bytes.items()},
            "activation_store_mb (float16, uncompressed)": {k: round(v / 2**20, 1) for k, v in act_bytes.items()},
            "storage_ratio_activations_over_grams": round(sum(act_bytes.values()) / sum(gram_bytes.values()), 1),
            "extract_grams_only_s": {k: round(v, 1) for k, v in extract_s.items()},
            "zoo_all_pairs_from_grams_s": round(zoo_gram_s, 2),
            "per_pair_from_grams_s": round(zoo_gram_s / len(pairs), 3),
            "per_pair_from_activations_s": round(pair_act_s, 2),
            "zoo_all_pairs_from_activations_s (per-pair x pairs)": round(pair_act_s * len(pairs), 1),
            "speedup_grams_over_activations": round(pair_act_s * len(pairs) / zoo_gram_s, 1),
            "max_abs_diff_grams_vs_activations (measured pair)": float(np.abs(maps[pairs[0]].values
                                                                              - act_map.values).max()),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
