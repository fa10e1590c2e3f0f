"""Train the bundled reference models (``ref_vit``, ``ref_vit_gap``, ``ref_resnet``) on the ``shapes`` data set.

    python scripts/train_reference_models.py                       # all three, into hooks/models/reference_weights/
    python scripts/train_reference_models.py --models ref_resnet --out /tmp/w --steps 20   # a quick try

Recipe (the same for every model; see :data:`RECIPES` for the per-model step count and learning rate):

- data: ``steps x batch`` *distinct* training images, ``shapes`` seed :data:`hooks.models.reference_models.TRAIN_SEED`
  indices 0.., rendered once at the model's input size; one pass, so no image is seen twice and nothing
  can be memorised. Augmentation: random horizontal and vertical flips (every shape class is closed under
  flips). Inputs are normalised with the model's mean / std.
- optimiser: AdamW (beta 0.9, 0.999; weight decay 0.05 on weights, none on biases, norms, embeddings),
  linear warm-up over the first 10% of steps, then cosine decay to 0; cross-entropy with label smoothing 0.1;
  batch 128; float32 on the CPU.
- evaluation: top-1 accuracy on ``--n-eval`` held-out images (``shapes`` seed 0, indices 0..n-1: the data
  ``repsim demo`` and the notebooks use), computed with the *float16-rounded* weights that ship.
- reproducibility: the model's initialisation, the data order and the flips come from ``--seed``; with the
  same torch build and thread count the weights are bitwise identical (``torch.use_deterministic_algorithms``).

Each model writes ``<out>/<name>.safetensors`` (float16 state dict) and ``<out>/<name>.json``, its model card:
architecture, recipe, held-out accuracy, the training-loss curve, wall time, and the sha256 of the weights
file, which :func:`hooks.models.registry.load_model` checks on every load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hooks.models.reference_models import REFERENCE_MODELS, TRAIN_SEED, WEIGHTS_DIR, build_reference  # noqa: E402
from hooks.models.weights import sha256_file  # noqa: E402
from repsim.data.shapes import GENERATOR_VERSION, SHAPE_CLASSES, render_shape_sample  # noqa: E402

#: per model: optimisation steps and peak learning rate (chosen so each trains in < 10 min on 2 CPU cores)
RECIPES: dict[str, dict[str, float]] = {
    "ref_vit": {"steps": 600, "lr": 1e-3},
    "ref_vit_gap": {"steps": 600, "lr": 1e-3},
    "ref_resnet": {"steps": 1000, "lr": 4e-3},
}
BATCH = 128
WEIGHT_DECAY = 0.05
WARMUP = 0.1
LABEL_SMOOTHING = 0.1
EVAL_SEED = 0


def render(seed: int, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` shapes images of ``seed`` (indices 0..n-1) as uint8 (n, 3, size, size) and int64 labels (n,)."""
    x = np.empty((n, 3, size, size), np.uint8)
    y = np.empty(n, np.int64)
    for i in range(n):
        img, _, label = render_shape_sample(seed, i, size)
        x[i] = img.transpose(2, 0, 1)
        y[i] = label
    return x, y


def normalise(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (B, 3, H, W) → float32 ``(x / 255 - mean) / std``."""
    t = torch.from_numpy(x).float().div_(255.0)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (t - m) / s


def param_groups(model: torch.nn.Module) -> list[dict]:
    """Weight decay on matrices and kernels only (not on biases, norms, position embeddings or tokens)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in ("pos_embed", "cls_token") else decay).append(p)
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over WARMUP * steps, then cosine decay to 0."""
    warm = max(1, int(WARMUP * steps))
    if step < warm:
        return peak * (step + 1) / warm
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, mean, std) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), 256):
        logits = model(normalise(x[i:i + 256], mean, std))
        correct += int((logits.argmax(1).numpy() == y[i:i + 256]).sum())
    return correct / len(x)


def train_one(name: str, out: str, steps: int, lr: float, seed: int, n_eval: int,
              eval_data: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict:
    ref = REFERENCE_MODELS[name]
    t0 = time.time()
    torch.manual_seed(seed)
    model = build_reference(name)
    x_train, y_train = render(TRAIN_SEED, steps * BATCH, ref.img_size)
    t_render = time.time() - t0
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x_train))
    opt = torch.optim.AdamW(param_groups(model), lr=lr, betas=(0.9, 0.999))
    curve = []
    model.train()
    running = 0.0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        idx = order[step * BATCH:(step + 1) * BATCH]
        xb = x_train[idx]
        flip_h, flip_v = rng.random(len(idx)) < 0.5, rng.random(len(idx)) < 0.5
        xb[flip_h] = xb[flip_h][..., ::-1]
        xb[flip_v] = xb[flip_v][..., ::-1, :]
        loss = F.cross_entropy(model(normalise(xb, ref.mean, ref.std)), torch.from_numpy(y_train[idx]),
                               label_smoothing=LABEL_SMOOTHING)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += float(loss.detach())
        if (step + 1) % 25 == 0 or step + 1 == steps:
            k = (step % 25) + 1
            curve.append([step + 1, round(running / k, 4)])
            print(f"  {name} step {step + 1}/{steps} loss {running / k:.3f} ({time.time() - t0:.0f} s)", flush=True)
            running = 0.0
    t_train = time.time() - t0

    # Ship float16; evaluate what ships (rounded back to float32 for the forward).
    # float16 for the floats; integer buffers (BatchNorm's num_batches_tracked) stay as they are
    state = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v).contiguous()
             for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    if ref.img_size not in eval_data:
        eval_data[ref.img_size] = render(EVAL_SEED, n_eval, ref.img_size)
    acc = accuracy(model, *eval_data[ref.img_size], ref.mean, ref.std)

    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    wfile = os.path.join(out, f"{name}.safetensors")
    tmp = wfile + ".tmp"
    save_file(state, tmp, metadata={"repsim_reference_model": name})
    os.replace(tmp, wfile)
    card = {
        "name": name,
        "description": ref.description,
        "architecture": {"timm_arch": ref.timm_arch, "img_size": ref.img_size,
                         "kwargs": {k: f"{v.__module__}.{v.__qualname__}" if isinstance(v, type) else v
                                    for k, v in ref.kwargs.items()},
                         "parameters": int(sum(p.numel() for p in model.parameters()))},
        "preprocessing": {"img_size": ref.img_size, "mean": list(ref.mean), "std": list(ref.std),
                          "resize": "none: shapes images are rendered at img_size"},
        "classes": list(SHAPE_CLASSES),
        "training": {
            "data": f"shapes v{GENERATOR_VERSION} seed {TRAIN_SEED}, indices 0..{steps * BATCH - 1} "
                    f"({steps * BATCH} distinct images, one pass), random h/v flips",
            "optimizer": "AdamW", "peak_lr": lr, "betas": [0.9, 0.999], "weight_decay": WEIGHT_DECAY,
            "schedule": f"linear warm-up {int(WARMUP * 100)}% then cosine to 0", "steps": steps, "batch": BATCH,
            "label_smoothing": LABEL_SMOOTHING, "seed": seed, "dtype": "float32",
            "loss_curve": curve,
        },
        "evaluation": {"data": f"shapes v{GENERATOR_VERSION} seed {EVAL_SEED}, indices 0..{n_eval - 1} (held out)",
                       "top1_accuracy": round(acc, 4), "chance": round(1 / len(SHAPE_CLASSES), 4),
                       "weights": "float16 as shipped"},
        "weights": {"file": os.path.basename(wfile), "dtype": "float16", "bytes": os.path.getsize(wfile),
                    "sha256": sha256_file(wfile)},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "python": platform.python_version(), "machine": platform.machine()},
        "wall_time_s": {"render": round(t_render, 1), "total": round(time.time() - t0, 1),
                        "train": round(t_train - t_render, 1)},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    cfile = os.path.join(out, f"{name}.json")
    with open(cfile + ".tmp", "w", encoding="utf-8") as f:
        json.dump(card, f, indent=1)
        f.write("\n")
    os.replace(cfile + ".tmp", cfile)
    print(f"{name}: held-out accuracy {acc:.3f} (chance {1 / len(SHAPE_CLASSES):.3f}), "
          f"{card['weights']['bytes'] / 1e6:.2f} MB, {card['wall_time_s']['total']:.0f} s → {wfile}", flush=True)
    return card


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(REFERENCE_MODELS), choices=list(REFERENCE_MODELS))
    p.add_argument("--out", default=WEIGHTS_DIR, help="output folder (default: the package's bundled weights)")
    p.add_argument("--steps", type=int, default=None, help="override every model's step count (quick tries)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-eval", type=int, default=2000, help="held-out images for the accuracy (default 2000)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    eval_data: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for name in args.models:
        recipe = RECIPES[name]
        train_one(name, args.out, int(args.steps or recipe["steps"]), float(recipe["lr"]), args.seed, args.n_eval,
                  eval_data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
