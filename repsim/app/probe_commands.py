"""``repsim probe`` and ``repsim localise``: trained read-outs (:mod:`probes`) of stored activations."""

from __future__ import annotations

import os

import click

from repsim.app.options import TRUST_CODE_OPTION, TRUST_PICKLE_OPTION, split_layers, trusted
from repsim.errors import UsageError


@click.command()
@click.argument("stores", nargs=-1, required=True, type=click.Path())
@click.option("--method", type=click.Choice(["logreg", "ridge", "knn"]), default="logreg", show_default=True,
              help="logreg: multinomial logistic regression, L-BFGS, L2 strength chosen on a validation split "
                   "(Kornblith et al. 2019); ridge: closed form on one-hot targets (fast screening); knn: "
                   "weighted k-NN (DINO).")
@click.option("--features", default="mean", show_default=True,
              help="cls | mean | gap | concat-last-K (e.g. concat-last-4): how a layer becomes one vector per image.")
@click.option("--split", type=float, default=0.2, show_default=True,
              help="Test fraction (seeded, stratified); ignored with --test-store.")
@click.option("--test-store", type=click.Path(), default=None,
              help="Evaluate on this store's images instead (same model and layers; no shared ids).")
@click.option("--layers", "layer_list", multiple=True, help="Layers to probe (comma-separated ok; default all).")
@click.option("--k", type=int, default=20, show_default=True, help="Neighbours for --method knn.")
@click.option("--temperature", type=float, default=0.07, show_default=True, help="k-NN vote temperature.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="JSON per layer: test top-1, mean per-class accuracy, chosen strength, convergence; best_layer; "
                   "the protocol. With several stores: <stem>_<i>.json.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Accuracy vs depth; several stores share one axis.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--max-iter", type=int, default=1000, show_default=True,
              help="logreg: L-BFGS iterations per strength. A fit that stops before its objective is certified "
                   "near the optimum is marked NO (conv) and named in a WARNING line; raise this then.")
def probe(stores, method, features, split, test_store, layer_list, k, temperature, seed, device, out, plot_path,
          quiet, max_iter) -> None:
    """Linear (or k-NN) transfer accuracy of every layer, from stored activations and the stores' labels.

    \b
    Examples:
      repsim probe vit_b16.zarr --split 0.2 --out vit_probe.json --plot vit_probe.png
      repsim probe vit_b16_train.zarr --test-store vit_b16_test.zarr --method logreg --features cls
      repsim probe resnet50.zarr --method knn --k 20
      repsim probe vit.zarr resnet.zarr --plot both.png        # several models on one axis
    """
    import probes
    from repsim.store.reader import open_store

    if test_store is not None and len(stores) > 1:
        raise UsageError("--test-store applies to one store; probe the others separately")
    test = open_store(test_store) if test_store else None
    if test is not None:
        test.require_complete()
    results = []
    for path in stores:
        s = open_store(path)
        s.require_complete()  # unfinished or damaged: one line, before any number
        common = dict(layers=split_layers(layer_list), features=features, split=split, test_store=test, seed=seed,
                      device=device, progress=not quiet)
        if method == "knn":
            result = probes.knn_probe(s, k=k, temperature=temperature, **common)
        else:
            result = probes.linear_probe(s, method=method, **({"max_iter": max_iter} if method == "logreg" else {}),
                                         **common)
        results.append(result)
        click.echo(result.summary())
        if out is not None:
            target = out if len(stores) == 1 else "{0}_{2}{1}".format(*os.path.splitext(out), len(results) - 1)
            result.to_json(target)
            click.echo(f"wrote {target}")
    if plot_path is not None:
        results[0].plot(plot_path, others=results[1:])
        click.echo(f"wrote {plot_path}")


@click.command(short_help="Spatial localisation per layer: token-vs-input-patch CKA, position probe, objects.")
@click.argument("store", type=click.Path())
@click.option("--layers", "layer_list", multiple=True, help="Token / map layers (comma-separated ok; default all).")
@click.option("--images", type=int, default=512, show_default=True,
              help="Images for the token-vs-patch CKA (memory grows with images squared).")
@click.option("--no-cka", is_flag=True, help="Only the position probe (no saved inputs needed).")
@click.option("--method", type=click.Choice(["ridge", "logreg"]), default="ridge", show_default=True,
              help="Position-probe classifier.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="JSON: per layer score, own/other CKA, "
              "argmax fraction, position-probe accuracy and chance.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Localisation score and position-probe accuracy against depth.")
@click.option("--objects", is_flag=True,
              help="Also the object-foreground probe (stores of the shapes data set): per layer the IoU of the "
                   "predicted foreground tokens with the ground-truth mask. Writes <stem>_objects.json/.png.")
@click.option("--pointing", "pointing", multiple=True, type=click.Choice(["ig", "gradcam"]),
              help="Also the pointing game of captum attributions on the model itself (shapes stores; the model "
                   "is rebuilt from the store): Integrated Gradients and/or Grad-CAM. Writes <stem>_pointing.json.")
@click.option("--pointing-images", type=int, default=32, show_default=True, help="Images for --pointing.")
@TRUST_CODE_OPTION
@TRUST_PICKLE_OPTION
@click.option("--class-tokens", is_flag=True,
              help="Also class accuracy from the centre token vs the CLS token vs the token mean, per layer "
                   "(Raghu et al. Fig. 11). Writes <stem>_class_tokens.json/.png.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def localise(store, layer_list, images, no_cka, method, seed, device, out, plot_path, objects, pointing,
             pointing_images, class_tokens, quiet) -> None:
    """Spatial localisation per layer (Raghu et al. 2021, Sec. 7): token-vs-input-patch CKA and a position probe.

    \b
    Examples:
      repsim extract --model vit_b16 --data ~/imagenet/val --n 2000 --save-inputs --out vit.zarr
      repsim localise vit.zarr --out vit_loc.json --plot vit_loc.png

    \b
    score = mean over token positions p of CKA(token p, its own input patch) minus the mean CKA with the
    other patches (0: no localisation); argmax = share of positions whose own patch is the most similar;
    position probe = accuracy of a linear classifier predicting each token's grid position (chance 1/P).
    """
    import probes
    from repsim.store.reader import open_store

    s = open_store(store)
    s.require_complete()  # every mode: an unfinished or damaged store gives other numbers after the resume
    if pointing:
        from hooks.models.registry import check_rebuild_allowed

        with trusted():
            check_rebuild_allowed(s.attrs)  # before any number is printed
    result = probes.localise(s, split_layers(layer_list), images=images, cka=not no_cka, method=method,
                             seed=seed, device=device, progress=not quiet)
    click.echo(result.summary())
    if out is not None:
        result.to_json(out)
        click.echo(f"wrote {out}")
    if plot_path is not None:
        result.plot(plot_path)
        click.echo(f"wrote {plot_path}")

    def sibling(path: str | None, suffix: str) -> str | None:
        return None if path is None else "{0}_{2}{1}".format(*os.path.splitext(path), suffix)

    if objects:
        obj = probes.object_localisation(s, split_layers(layer_list), method=method, seed=seed, device=device,
                                         progress=not quiet)
        click.echo(obj.summary())
        for path, write in ((sibling(out, "objects"), obj.to_json), (sibling(plot_path, "objects"), obj.plot)):
            if path is not None:
                write(path)
                click.echo(f"wrote {path}")
    if class_tokens:
        ctp = probes.token_class_probe(s, split_layers(layer_list), method=method, seed=seed, device=device)
        click.echo(f"{'layer':<28} " + " ".join(f"{m + ' %':>9}" for m in ctp.accuracy) + f"   (chance {ctp.chance:.1%})")
        for i, layer in enumerate(ctp.layers):
            cells = ["        -" if v[i] is None else f"{100 * v[i]:9.1f}" for v in ctp.accuracy.values()]
            click.echo(f"{layer:<28} " + " ".join(cells))
        for path, write in ((sibling(out, "class_tokens"), ctp.to_json),
                            (sibling(plot_path, "class_tokens"), ctp.plot)):
            if path is not None:
                write(path)
                click.echo(f"wrote {path}")
    if pointing:
        from hooks.gradients.attribution import store_pointing_game
        from repsim.results import write_json_atomic

        with trusted():
            games = {m: store_pointing_game(s, m, n=pointing_images, device="cpu" if device == "auto" else device)
                     for m in pointing}
        for m, g in games.items():
            click.echo(f"pointing game {m}: {g['accuracy'] * 100:.1f}% of {g['n']} images "
                       f"(argmax of the attribution on the object; tolerance {g['tolerance']} px)")
        path = sibling(out, "pointing")
        if path is not None:
            write_json_atomic(path, {"kind": "repsim.pointing_game", "store": s.path, "model": s.model_name,
                                     "games": {m: {k: v for k, v in g.items() if k != "points"}
                                               for m, g in games.items()}})
            click.echo(f"wrote {path}")
