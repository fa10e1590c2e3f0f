"""``repsim cka``, ``repsim compare`` and ``repsim robustness``: layer x layer similarity maps between
stores, and clean-vs-perturbed similarity per layer."""

from __future__ import annotations

import os

import click

from repsim.app.options import dask_client, split_layers
from repsim.errors import UsageError


@click.command()
@click.argument("store_a", type=click.Path())
@click.argument("store_b", type=click.Path(), required=False)
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the result (values, std, layers, estimator, n, fingerprints, ...) as JSON here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Draw the layer x layer heat map to this image file (.png, .pdf, .svg).")
@click.option("--estimator", type=click.Choice(["minibatch", "exact", "debiased"]), default="minibatch",
              show_default=True,
              help="minibatch: unbiased HSIC summed over batches (Nguyen et al. 2021); exact: biased CKA on all "
                   "samples; debiased: U-centred CKA on all samples.")
@click.option("--kernel", type=click.Choice(["linear", "rbf"]), default="linear", show_default=True,
              help="rbf only with --estimator exact|debiased.")
@click.option("--threshold", type=float, default=1.0, show_default=True,
              help="RBF bandwidth: sigma^2 = threshold^2 * median squared pairwise distance (Kornblith 2019).")
@click.option("--tokens", type=click.Choice(["flatten", "mean", "cls"]), default="flatten", show_default=True,
              help="How token / map layers become one row per image: flatten (as in the papers), mean over "
                   "patch tokens or positions, cls token.")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Minibatch size (minibatch estimator).")
@click.option("--repeats", type=int, default=1, show_default=True,
              help="Re-shuffle the batch plan R times; the JSON then holds mean and std.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the batch plan.")
@click.option("--layers-a", multiple=True, help="Layers of STORE_A to compare (repeatable or comma-separated; default all).")
@click.option("--layers-b", multiple=True, help="Layers of STORE_B (default all).")
@click.option("--align", type=click.Choice(["fingerprint", "ids"]), default="fingerprint", show_default=True,
              help="fingerprint: the stores must hold the same samples in the same order; ids: compare the "
                   "sample ids both hold (dropped counts are reported).")
@click.option("--source", type=click.Choice(["auto", "grams", "activations"]), default="auto", show_default=True,
              help="Minibatch: read stored Grams (`extract --grams`) or the activations; auto takes Grams when both "
                   "stores have them for this batch size.")
@click.option("--plan", type=click.Choice(["auto", "contiguous", "shuffled"]), default="auto", show_default=True,
              help="Minibatch batches: consecutive store rows, or seeded groups of whole chunks (a new plan per "
                   "repeat); auto = contiguous for one repeat.")
@click.option("--gram-dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
              help="Precision of the Gram products (float32 runs with TF32 off; sums are always float64).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
@click.option("--workers", type=int, default=None,
              help="Run the minibatch plan on a local Dask cluster of this many worker processes.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Run the minibatch plan on an existing Dask cluster (e.g. tcp://10.0.0.5:8786); its workers "
                   "must reach the stores by the same paths.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def cka(store_a, store_b, out, plot_path, estimator, kernel, threshold, tokens, batch_size, repeats, seed,
        layers_a, layers_b, align, gram_dtype, source, plan, device, workers, scheduler, quiet) -> None:
    """Linear CKA between every layer of STORE_A and every layer of STORE_B (or of STORE_A itself).

    \b
    Examples:
      repsim cka vit_b16.zarr resnet50.zarr --out vit_vs_resnet.json --plot vit_vs_resnet.png
      repsim cka vit_b16.zarr --plot vit_self.png          # within one model
      repsim cka a.zarr b.zarr --estimator debiased --tokens mean
      repsim cka a.zarr b.zarr --batch-size 1024 --repeats 5
      repsim cka a_grams.zarr b_grams.zarr                  # stores from `extract --grams`: reads only Grams

    Both stores must hold the same images in the same order (same sample fingerprint: extract them with
    the same --data, --n and --seed), unless --align ids. Prints the matrix; --out keeps it with its provenance.

    Minibatch batches are consecutive store rows (a uniform random sample: the store order is a seeded
    permutation) unless --repeats > 1 or --plan shuffled. When both stores were extracted with --grams (same
    samples, --batch-size equal to their Gram batch), the map is computed from the stored Grams alone.
    """
    from repsim.measures.cka_engine import cka_matrix
    from repsim.plotting.cka_map import short_layer_names
    from repsim.store.reader import open_store

    if out is None and plot_path is None and not quiet:
        click.echo("(no --out or --plot: printing the matrix only)", err=True)
    a = open_store(store_a)
    b = open_store(store_b) if store_b is not None else None
    if (workers or scheduler) and estimator != "minibatch":
        raise UsageError(f"--workers / --scheduler run the minibatch estimator, not {estimator}")
    with dask_client(workers, scheduler) as client:
        result = cka_matrix(
            a, b, estimator=estimator, kernel=kernel, tokens=tokens, layers_a=split_layers(layers_a),
            layers_b=split_layers(layers_b), batch_size=batch_size, repeats=repeats, seed=seed, device=device,
            threshold=threshold, progress=not quiet, align=align, gram_dtype=gram_dtype, client=client,
            source=source, plan=plan,
        )
    if out is not None:
        result.to_json(out)
    if plot_path is not None:
        result.plot(plot_path)
    names_a = short_layer_names(result.layers_a)
    names_b = short_layer_names(result.layers_b)
    width = max(len(x) for x in names_a)
    dropped = result.align.get("dropped_a", 0) + result.align.get("dropped_b", 0) if result.align else 0
    rows = result.batch_rows or [batch_size, batch_size]
    sizes = f"{rows[0]}" if rows[0] == rows[1] else f"{rows[0]}-{rows[1]}"
    click.echo(f"{estimator} {kernel} CKA, tokens={tokens}, n={result.n}"
               + (f", {result.n_batches} {result.plan} batches of {sizes} rows from the stored "
                  f"{'Grams' if result.source == 'grams' else 'activations'}"
                  + (f" ({result.rows_used} samples used)" if result.rows_used != result.n else "")
                  if estimator == "minibatch" else "")
               + (f", {repeats} repeats" if repeats > 1 else "")
               + (f"; aligned by id ({dropped} samples dropped)" if align == "ids" else ""))
    click.echo(" " * width + "  " + " ".join(f"{j:>5d}" for j in range(len(names_b))))
    for name, row in zip(names_a, result.values):
        click.echo(f"{name:>{width}}  " + " ".join(f"{v:5.2f}" for v in row))
    click.echo("columns: " + ", ".join(f"{j}={nm}" for j, nm in enumerate(names_b)))
    for path in (out, plot_path):
        if path is not None:
            click.echo(f"wrote {path}")
    if estimator == "minibatch" and not quiet:
        if result.batch_rows and max(result.batch_rows) > batch_size:
            click.echo(f"note: batches hold {sizes} rows, not --batch-size {batch_size}: shuffled plans group whole "
                       f"store chunks of {a.chunk_size} rows", err=True)
        if result.source == "activations":
            click.echo(_gram_tip(a, b, batch_size), err=True)


def _gram_tip(a, b, batch_size: int) -> str:
    """How much less a Gram tier would read for the same map (activation bytes / Gram bytes per batch)."""
    import numpy as np

    stores = [a] if b is None else [a, b]
    infos = [s.layer_info(layer) for s in stores for layer in s.layers]
    act = sum(int(np.prod(i["shape"])) * np.dtype(i["dtype"]).itemsize for i in infos) * batch_size
    gram = sum(len(s.layers) for s in stores) * batch_size * (batch_size - 1) // 2 * 4
    return (f"tip: extract with --grams (and --no-acts when CKA is all you need) and the next map reads the "
            f"stored Grams: about {act / gram:.0f}x less data than these activations, no Gram products")


@click.command()
@click.argument("store_a", type=click.Path())
@click.argument("store_b", type=click.Path(), required=False)
@click.option("--measure", "measures", default="procrustes", show_default=True,
              help="One or more comma-separated measures: procrustes, procrustes_1mnu, procrustes_euclid, cca, "
                   "cca_r2, svcca, pwcca, pwcca_reference, rsa, mknn, jaccard_knn, cka (minibatch, = `repsim "
                   "cka`), cka_biased, cka_debiased, cka_rbf (all samples).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="JSON result; with several measures one file each, named <stem>_<measure>.json.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Heat map; with several measures <stem>_<measure>.png. Bright = alike for every measure.")
@click.option("--tokens", type=click.Choice(["auto", "mean", "flatten", "cls"]), default="auto", show_default=True,
              help="How token / map layers become one row per image. auto: flatten for the CKA measures (as "
                   "`repsim cka` and the CKA papers), mean for all others (mean over patch tokens / positions "
                   "keeps CCA and Procrustes well-posed and the memory small).")
@click.option("--null", type=int, default=0, show_default=True,
              help="Permutation null with R shuffles of the image pairing per cell: p-values in the JSON "
                   "(all-sample measures; not the minibatch cka: use cka_debiased or cka_biased).")
@click.option("--bootstrap", type=int, default=0, show_default=True,
              help="Percentile bootstrap over images with R resamples: ci_low / ci_high in the JSON "
                   "(all-sample measures, as --null).")
@click.option("--level", type=float, default=0.95, show_default=True, help="Bootstrap interval level.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the null and the bootstrap.")
@click.option("--layers-a", multiple=True, help="Layers of STORE_A (repeatable or comma-separated; default all).")
@click.option("--layers-b", multiple=True, help="Layers of STORE_B (default all).")
@click.option("--align", type=click.Choice(["fingerprint", "ids"]), default="fingerprint", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def compare(store_a, store_b, measures, out, plot_path, tokens, null, bootstrap, level, seed, layers_a, layers_b,
            align, quiet) -> None:
    """Layer x layer maps of other similarity measures (Procrustes, CCA family, RSA, k-NN, CKA variants).

    \b
    Examples:
      repsim compare a.zarr b.zarr --measure procrustes --out proc.json --plot proc.png
      repsim compare a.zarr b.zarr --measure cka,svcca,pwcca,rsa,mknn
      repsim compare a.zarr b.zarr --measure cka_debiased --null 200 --bootstrap 200

    Each measure states its orientation (similarity or distance) and range in the output. Measures
    that need all samples at once read every layer whole; for large n prefer `repsim cka` (minibatch).

    \b
    CKA measures (the output names the `repsim cka` options that give the same map):
      cka          = repsim cka (its defaults: minibatch, batches of 256 consecutive rows, tokens
                     flatten, float32 Gram products, stored Grams when both stores have them)
      cka_biased   = repsim cka --estimator exact --tokens flatten --gram-dtype float64   (all n)
      cka_debiased = repsim cka --estimator debiased --tokens flatten --gram-dtype float64
      cka_rbf      = repsim cka --estimator exact --kernel rbf --tokens flatten --gram-dtype float64
    --null / --bootstrap resample all n images, so they take the all-sample CKA measures, not cka.
    """
    from repsim.plotting.cka_map import short_layer_names
    from repsim.measures.compare import check_measure, cka_equivalent, compare_matrix
    from repsim.store.reader import open_store

    names = [m.strip() for m in measures.split(",") if m.strip()]
    if not names:
        raise UsageError(f"no measure in --measure {measures!r}")
    for name in names:
        check_measure(name, null, bootstrap)  # every measure before the first map: no half-done runs
    a = open_store(store_a)  # compare_matrix refuses an unfinished or damaged store before any number
    b = open_store(store_b) if store_b is not None else None

    def target(path: str | None, name: str) -> str | None:
        if path is None or len(names) == 1:
            return path
        stem, ext = os.path.splitext(path)
        return f"{stem}_{name}{ext}"

    for name in names:
        result = compare_matrix(a, b, measure=name, tokens=tokens, layers_a=split_layers(layers_a),
                                layers_b=split_layers(layers_b), align=align, null=null, bootstrap=bootstrap,
                                level=level, seed=seed, progress=not quiet)
        json_path, png_path = target(out, name), target(plot_path, name)
        if json_path:
            result.to_json(json_path)
        if png_path:
            result.plot(png_path)
        names_a = short_layer_names(result.layers_a)
        width = max(len(x) for x in names_a)
        click.echo(f"{name} ({result.spec['orientation']}; range {result.spec['range']}), tokens={result.tokens}, "
                   f"n={result.n}" + (f"; {len(result.notes)} cells adjusted (see JSON notes)" if result.notes else ""))
        same_as = cka_equivalent(name, result.tokens, result.options)
        mb = result.minibatch
        if mb:
            rows = mb["batch_rows"] or [mb["batch_size"]] * 2
            click.echo(f"{name}: minibatch linear CKA (Nguyen et al. 2021), {mb['n_batches']} {mb['plan']} "
                       f"batch{'es' if mb['n_batches'] != 1 else ''} of "
                       f"{rows[0] if rows[0] == rows[1] else f'{rows[0]}-{rows[1]}'} rows from the stored "
                       f"{'Grams' if mb['source'] == 'grams' else 'activations'}; the same map as "
                       f"`repsim cka{' ' + same_as if same_as else ''}`")
        elif same_as is not None:
            click.echo(f"{name}: {result.spec['description']}, on all n={result.n} samples; the same map as "
                       f"`repsim cka {same_as}` (plain `repsim cka`, and compare's cka, is the minibatch estimator)")
        click.echo(" " * width + "  " + " ".join(f"{j:>6d}" for j in range(len(result.layers_b))))
        for row_name, row in zip(names_a, result.values):
            click.echo(f"{row_name:>{width}}  " + " ".join(f"{v:6.3f}" for v in row))
        for path in (json_path, png_path):
            if path:
                click.echo(f"wrote {path}")


@click.command()
@click.argument("stores", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the profiles (per layer CKA with intervals, accuracies, provenance) as JSON here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Draw accuracy vs level and CKA vs relative depth (one line per level) to this image file.")
@click.option("--layers", "layer_list", multiple=True,
              help="Layers to compare (repeatable or comma-separated; default every layer of the clean store that "
                   "all its perturbed stores hold).")
@click.option("--tokens", type=click.Choice(["flatten", "mean", "cls"]), default="flatten", show_default=True,
              help="How token / map layers become one row per image (as in `repsim cka`).")
@click.option("--threshold", type=float, default=0.5, show_default=True,
              help="Report the first layer whose clean/perturbed CKA falls below this.")
@click.option("--resamples", type=int, default=200, show_default=True,
              help="Half-samples of the 95% CKA interval (0: none).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the half-samples and the bootstrap.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def robustness(stores, out, plot_path, layer_list, tokens, threshold, resamples, seed, quiet) -> None:
    """Where in a network an input perturbation is absorbed: per layer, CKA between the activations of
    clean and perturbed images (the same images, row by row), and top-1 accuracy per perturbation level.

    \b
    Examples:
      repsim extract --model ref_vit --data shapes --n 512 --out vit.zarr
      repsim extract --model ref_vit --data shapes --n 512 --perturb patch-drop:0.4 --perturb-patch 8 --out vit_pd4.zarr
      repsim robustness vit.zarr vit_pd*.zarr resnet.zarr resnet_pd*.zarr --out r.json --plot r.png

    STORES are clean and perturbed stores in any order (`repsim extract --perturb KIND:LEVEL`). They are grouped
    by model (name, source and weights) and samples (fingerprint): each group needs exactly one clean store
    (no --perturb) and at least one perturbed store of the same model, preprocessing and images; several
    groups give several models on one figure.

    CKA is debiased linear CKA on all n images with a 95% half-sample interval; accuracy (when the last stored
    layer is the class logits and the images are labelled) has a Wilson interval, and the drop against the
    clean store a paired bootstrap interval.
    """
    from repsim.robustness import robustness_profiles

    result = robustness_profiles(list(stores), layers=split_layers(layer_list), tokens=tokens, threshold=threshold,
                                 resamples=resamples, seed=seed, progress=not quiet)
    if out is not None:
        result.to_json(out)
    if plot_path is not None:
        result.plot(plot_path)
    for line in result.summary_lines():
        click.echo(line)
    for path in (out, plot_path):
        if path is not None:
            click.echo(f"wrote {path}")
