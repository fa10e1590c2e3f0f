"""``repsim attention``: per-head attention statistics of a store (``--segmentation``: attention maps
scored as object masks), or with ``--erf`` the effective receptive fields of a CNN."""

from __future__ import annotations

import os

import click

from repsim.app.options import TRUST_CODE_OPTION, TRUST_PICKLE_OPTION, split_layers, trusted
from repsim.errors import UsageError


@click.command()
@click.argument("store", type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write per layer x head statistics (distance px mean/std, prefix mass, entropy, offset, kind) as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Distance-vs-depth scatter to this file, plus <name>_aligned and <name>_rollout siblings.")
@click.option("--layers", "layer_list", multiple=True, help="Attention layers to report (default all; comma-separated ok).")
@click.option("--rollout-images", type=int, default=4, show_default=True, help="Images in the rollout figure.")
@click.option("--erf", is_flag=True,
              help="Effective receptive fields instead (CNNs): gradient of each map layer's centre unit w.r.t. the "
                   "input, as a radius in pixels on the attention-distance axis. Rebuilds the model from the store.")
@click.option("--erf-images", type=int, default=8, show_default=True, help="Images averaged for --erf.")
@click.option("--device", default="cpu", show_default=True, help="Device for --erf (cpu, cuda, ...).")
@click.option("--segmentation", is_flag=True,
              help="Also attention as segmentation (DINO): per head, the CLS (or mean-query) attention map thresholded "
                   "to --mass of its weight vs the object mask (Jaccard, all-foreground reference, spatial entropy); "
                   "a 'segmentation' section in --out and <plot stem>_segmentation.png.")
@click.option("--masks", "masks_dir", type=click.Path(), default=None,
              help="With --segmentation, for data other than shapes: a folder with one single-channel PNG per sample "
                   "id (image extension replaced by .png, original image size, 0 = background).")
@click.option("--mass", type=float, default=None,
              help="With --segmentation: fraction of the attention weight the thresholded map keeps (default 0.6).")
@TRUST_CODE_OPTION
@TRUST_PICKLE_OPTION
def attention(store, out, plot_path, layer_list, rollout_images, erf, erf_images, device, segmentation=False,
              masks_dir=None, mass=None) -> None:
    """Per-head attention statistics of a store extracted with --attention.

    \b
    Examples:
      repsim extract --model vit_b16 --data ~/imagenet/val --n 5000 --attention --attn-keep 8 --out vit.zarr
      repsim attention vit.zarr --out vit_attention.json --plot vit_attention.png

    \b
    For every attention layer and head: mean attention distance in pixels (patch-centre distance weighted
    by attention; prefix keys dropped and rows renormalised; mean over patch queries, then images), the
    attention mass on prefix tokens, the row entropy (nats), the centroid offset (dy, dx) of the aligned
    attention map in grid steps, and the head kind: strict_local, soft_local, offset_local, axial, global.

    \b
    CNNs have no attention; their counterpart is the effective receptive field:
      repsim attention resnet50.zarr --erf --out r50_erf.json --plot r50_erf.png
    """
    import numpy as np

    from repsim.plotting.attention import figure_paths
    from repsim.attention.report import attention_report
    from repsim.plotting.cka_map import short_layer_names
    from repsim.store.reader import open_store

    s = open_store(store)
    s.require_complete()  # unfinished or damaged: one line, before any number (--erf too)
    if (masks_dir is not None or mass is not None) and not segmentation:
        raise UsageError("--masks / --mass need --segmentation")
    if erf and segmentation:
        raise UsageError("--segmentation scores attention maps; --erf is for CNNs: use one of them")
    if erf:
        _erf(s, out, plot_path, erf_images, device)
        return
    if not s.attention_layers:
        raise UsageError(f"{store} holds no attention statistics ({s.model_name}): re-extract with --attention; "
                         "a model without attention layers (a CNN) has none: use --erf for its effective "
                         "receptive fields")
    report = attention_report(s, layers=split_layers(layer_list))
    seg = None
    if segmentation:
        from repsim.attention.segmentation import MASS, attention_segmentation

        seg = attention_segmentation(s, split_layers(layer_list), mass=MASS if mass is None else mass,
                                     masks_dir=masks_dir, progress=True)
    if out is not None:
        from repsim.results import write_json_atomic

        write_json_atomic(out, report.to_json() | ({"segmentation": seg.to_json()} if seg is not None else {}))
    if plot_path is not None:
        report.plot(plot_path, store=s, rollout_images=rollout_images)
        if seg is not None:
            seg.plot("{0}_segmentation{1}".format(*os.path.splitext(plot_path)))
    names = short_layer_names([ly.layer for ly in report.layers])
    width = max(len(x) for x in names)
    click.echo(f"{report.model}: {len(report.layers)} attention layers, n={report.n} images")
    click.echo(f"{'layer':<{width}}  distance px (min / mean / max over heads)  prefix mass  kinds")
    for name, ly in zip(names, report.layers):
        d = [h.distance_px for h in ly.heads]
        kinds: dict[str, int] = {}
        for h in ly.heads:
            kinds[h.kind] = kinds.get(h.kind, 0) + 1
        kind_text = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
        click.echo(f"{name:<{width}}  {min(d):7.1f} / {np.mean(d):7.1f} / {max(d):7.1f}"
                   f"{'':17}{np.mean([h.prefix_mass for h in ly.heads]):7.3f}      {kind_text}")
    if seg is not None:
        click.echo(seg.summary())
    if out is not None:
        click.echo(f"wrote {out}")
    if plot_path is not None:
        written = [p for p in figure_paths(plot_path).values() if os.path.exists(p)]
        if seg is not None:
            written.append("{0}_segmentation{1}".format(*os.path.splitext(plot_path)))
        click.echo("wrote " + ", ".join(written))


def _erf(s, out, plot_path, images: int, device: str) -> None:
    from hooks.gradients.erf import store_erf
    from repsim.plotting.attention import plot_erf
    from repsim.attention.report import erf_json

    try:
        with trusted():
            results = store_erf(s, images=images, device=device)
    except RuntimeError as err:
        if "does not require grad" not in str(err) and "grad_fn" not in str(err):
            raise
        raise UsageError(f"{s.model_name}: no gradient reaches the input from its map layers ({str(err).splitlines()[0]}); "
                         "the ERF needs a differentiable path") from None
    if out is not None:
        erf_json(s, results, images, out)
    if plot_path is not None:
        plot_erf([r.layer for r in results], [r.radius_px for r in results], [r.map for r in results],
                 s.model_name, plot_path, n_images=min(images, s.n))
    click.echo(f"{s.model_name}: effective receptive field over {min(images, s.n)} images: radius (px, spread "
               "about the gradient's centroid), offset (dy, dx) of the centroid from the unit's centre (px)")
    for r in results:
        click.echo(f"  {r.layer:<36} {r.radius_px:8.2f}   offset ({r.offset_px[0]:+6.2f}, {r.offset_px[1]:+6.2f})")
    for path in (out, plot_path):
        if path is not None:
            click.echo(f"wrote {path}")
