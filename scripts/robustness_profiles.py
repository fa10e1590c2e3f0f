"""Robustness profiles under random patch drop (Naseer et al. 2021): the numbers of issue #15's note.

    python scripts/robustness_profiles.py --work /tmp/rob              # bundled ref_vit, ref_vit_gap, ref_resnet
    python scripts/robustness_profiles.py --work /tmp/rob --real       # CIFAR-10 ResNet-20 / -56 (../shared/realdata)

For each model: one clean store and one store per patch-drop level (0.2, 0.4, 0.6, 0.8 by default) of the same
images (``repsim extract --perturb patch-drop:F --perturb-patch PX``), then :func:`repsim.robustness_profiles`
(top-1 accuracy per level with Wilson intervals, per layer debiased CKA between clean and perturbed activations
with half-sample intervals, the first layer below CKA 0.5). Bundled models: 512 held-out shapes images (seed 0,
as the demo) at 64 px with an 8 px patch grid (the ViTs' token size; 64 patches). Real models: the first
``--n`` images of the seeded order of the JPEG CIFAR-10 test copy at 32 px, 4 px patches (64 patches).
Stores are reused when they exist (extraction resumes or is skipped); the JSON, the figure and the printed
summary go to ``--work``.
"""

from __future__ import annotations

import argparse
import pathlib

from hooks.extract.loop import extract
from hooks.models.registry import load_model
from repsim import robustness_profiles
from repsim.data.sources import open_dataset
from repsim.data.perturbations import Perturbation

ROOT = pathlib.Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "realdata"
FACTORY = ROOT / "tests" / "realdata" / "cifar_resnet.py"
CIFAR_NORM = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=1.0)


def models(real: bool):
    """[(label, loaded model)], the image source's spec and size, and the patch size in pixels."""
    if real:
        ckpts = REAL / "cifar10-resnets"
        if not (ckpts / "resnet56-4bfd9763.th").exists():
            raise SystemExit(f"--real needs {ckpts} (../shared/realdata)")
        out = [(name, load_model(f"py:{FACTORY}:{name}", weights=str(ckpts / f"{name}-{tag}.th"), img_size=32,
                                 **CIFAR_NORM))
               for name, tag in (("resnet20", "12fca82f"), ("resnet56", "4bfd9763"))]
        return out, str(REAL / "cifar10_test_from_jpeg.npz"), 32, 4
    return [(name, load_model(name)) for name in ("ref_vit", "ref_vit_gap", "ref_resnet")], "shapes", 64, 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="folder for the stores, r.json and r.png")
    ap.add_argument("--real", action="store_true", help="the real CIFAR-10 ResNets instead of the bundled models")
    ap.add_argument("--n", type=int, default=None, help="images (default 512 bundled, 1000 real)")
    ap.add_argument("--levels", default="0.2,0.4,0.6,0.8", help="patch-drop fractions")
    ap.add_argument("--patch", type=int, default=None, help="patch grid in pixels (default 8 bundled, 4 real)")
    ap.add_argument("--resamples", type=int, default=200)
    args = ap.parse_args()
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    loaded, data, size, patch = models(args.real)
    patch = args.patch or patch
    n = args.n or (1000 if args.real else 512)
    source = open_dataset(data, n=n, seed=0, image_size=size)
    stores = []
    for name, model in loaded:
        stores.append(extract(model, source, str(work / f"{name}.zarr"), batch_size=64, progress=True))
        for level in (float(v) for v in args.levels.split(",")):
            p = Perturbation.parse(f"patch-drop:{level}", patch_px=patch)
            stores.append(extract(model, source, str(work / f"{name}_pd{level:g}_p{patch}.zarr"), batch_size=64,
                                  perturbation=p, progress=True))
    result = robustness_profiles(stores, resamples=args.resamples, progress=True)
    tag = "real" if args.real else "bundled"
    result.to_json(work / f"robustness_{tag}.json")
    result.plot(work / f"robustness_{tag}.png")
    lines = result.summary_lines()
    (work / f"robustness_{tag}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {work}/robustness_{tag}.json, .png, .txt")


if __name__ == "__main__":
    main()
