"""``repsim models``, ``repsim layers`` and ``repsim extract``: which models there are, their modules,
and running one over images into an activation store (:mod:`hooks.extract`)."""

from __future__ import annotations

import json
import os

import click

from repsim.app.options import (dask_client, floats3, load_model_from_options, model_options, parse_shard,
                                split_layers)
from repsim.errors import UsageError


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON.")
def models(as_json: bool) -> None:
    """List the short model names, what they map to, and whether weights are available offline.

    Besides these names, --model accepts timm:<any timm id>, hf:<hub id or local directory>,
    torchvision:<name> and py:<file.py>:<factory> (a function returning your own nn.Module).
    """
    from hooks.registry import list_models

    rows = list_models()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    idw = max(len(r["id"]) for r in rows)
    click.echo(f"{'name':<{width}}  {'family':<12} {'timm / source id':<{idw}}  weights offline")
    for r in rows:
        click.echo(f"{r['name']:<{width}}  {r['family']:<12} {r['id']:<{idw}}  {'yes' if r['weights_offline'] else 'no'}")
    click.echo("\nref_* are small networks trained on the shapes data set, bundled with repsim (always offline).")
    click.echo("Also: timm:<id>  hf:<hub id or dir>  torchvision:<name>  py:<file.py>:<factory>")


@click.command()
@click.argument("model")
@model_options
@click.option("--all", "show_all", is_flag=True, help="List every module, not only those up to --depth.")
@click.option("--depth", type=int, default=3, show_default=True, help="Deepest module path level shown.")
def layers(model: str, weights, random_init, img_size, mean, std, interpolation, crop_pct, offline, show_all,
           depth) -> None:
    """List MODEL's modules with their output shapes; '*' marks the default preset.

    Use the paths (or glob patterns such as 'blocks.*') with `repsim extract --layers`. Listing needs no
    weights: the architecture is built with a seeded random initialisation (no download; a hf: model only
    needs its config.json), unless --weights FILE is given, which is then checked against it.
    """
    import torch

    from hooks.capture import probe_output_shapes
    from hooks.layers import default_layers

    # Module paths and shapes do not depend on the weights: random init avoids a download of up to a GB.
    loaded = load_model_from_options(model, weights, random_init or not weights, img_size, mean, std,
                                     interpolation, crop_pct, offline)
    preset = set(default_layers(loaded.module, loaded.info.family))
    x = torch.zeros(1, 3, *loaded.preprocessing.img_size)
    rows = probe_output_shapes(loaded.module, x)
    click.echo(f"{loaded.info.name} ({loaded.info.source_id}), input {tuple(x.shape[1:])}, "
               f"prefix tokens {loaded.info.num_prefix_tokens}, grid {loaded.info.grid}")
    click.echo(f"weights: {'from ' + weights if weights else 'none (random init: the architecture only)'}")
    for path, type_name, shape, calls in rows:
        if not show_all and path.count(".") >= depth and path not in preset:
            continue
        mark = "*" if path in preset else " "
        extra = f"  (called {calls}x)" if calls > 1 else ""
        click.echo(f"{mark} {path:<40} {type_name:<24} {shape}{extra}")


@click.command()
@click.option("--model", "model_name", required=True, help="Short name (see `repsim models`) or timm:/hf:/torchvision:/py: spec.")
@click.option("--data", required=True, help="Image folder, ImageFolder tree, .npz, 'shapes' or 'digits'.")
@click.option("--out", required=True, type=click.Path(),
              help="Store to write: a .zarr directory, or an fsspec URL (s3://..., gs://...), written to a local "
                   "staging store first and uploaded when complete.")
@click.option("--n", type=int, default=None, help="Number of samples (seeded random subset; default all, 1000 for shapes).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample subset and order.")
@click.option("--layers", "layer_patterns", multiple=True,
              help="Module paths or globs, repeatable or comma-separated (default: the family preset; see `repsim layers`).")
@click.option("--pool", type=click.Choice(["none", "mean", "cls", "gap"]), default="none", show_default=True,
              help="none keeps tokens/maps; mean|gap average patch tokens (prefix excluded) or map positions; "
                   "cls keeps the CLS token where a layer has one (others are mean-pooled).")
@click.option("--spatial-pool", type=int, default=None, help="Average-pool maps (and token grids) to K x K.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--chunk-size", type=int, default=None, help="Rows per store chunk, a multiple of --batch-size (default ~64).")
@click.option("--save-inputs", is_flag=True, help="Also store the preprocessed inputs (for localisation analyses).")
@click.option("--grams", is_flag=True,
              help="Also store each layer's U-centred Gram per chunk of 256 rows (--chunk-size): `repsim cka` "
                   "between two such stores reads only the Grams (~100x less data than token activations).")
@click.option("--no-acts", "no_acts", is_flag=True,
              help="With --grams: keep only the Grams, not the activations (enough for minibatch CKA, nothing else).")
@click.option("--attention", is_flag=True,
              help="Also capture every attention layer (fused kernels off for the capture) and store per image x "
                   "head statistics: mean distance (px), prefix mass, entropy, aligned-map sums. See `repsim attention`.")
@click.option("--attn-keep", type=int, default=0, show_default=True,
              help="With --attention: keep the full attention maps of the first N images (ViT-B/16: ~11 MB each).")
@click.option("--grid", "geom_grid", default=None, metavar="GHxGW",
              help="Token geometry of a py: ViT repsim cannot read (nn.MultiheadAttention): patch grid, e.g. 14x14. "
                   "With --prefix-tokens and --patch-size, or filling in the model's `repsim_geometry` attribute.")
@click.option("--prefix-tokens", "geom_prefix", type=int, default=None,
              help="Token geometry: CLS / register tokens before the patch tokens (see --grid).")
@click.option("--patch-size", "geom_patch", type=int, default=None, help="Token geometry: token stride in pixels (see --grid).")
@click.option("--perturb", "perturb_spec", default=None, metavar="KIND:LEVEL",
              help="Perturb every preprocessed input (after resize/crop/normalise; for `repsim robustness`): "
                   "patch-drop:F (fraction F of the --perturb-patch patches set to 0, the normalisation mean "
                   "colour), patch-shuffle:K (K x K pieces in random order), occlude-centre:F (centred "
                   "rectangle of area share F set to 0), noise:S (Gaussian noise, std S in normalised units). "
                   "Seeded per sample id; level 0 changes nothing. The store keeps the clean sample ids.")
@click.option("--perturb-patch", type=int, default=None, metavar="PX",
              help="patch-drop's patch grid in input pixels (default 16; must divide the input size): the same "
                   "pixels for a ViT and a CNN at the same input size.")
@click.option("--perturb-seed", type=int, default=None,
              help="Seed of the per-sample perturbation draws, hashed with the kind and the sample id (default 0).")
@model_options
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--overwrite", is_flag=True, help="Replace an existing store with another configuration.")
@click.option("--force", is_flag=True, help="Run even when the store may not fit on the disk.")
@click.option("--strict", is_flag=True, help="A corrupt image is fatal instead of skipped.")
@click.option("--shard", default=None, metavar="K/N",
              help="Write only the K-th of N disjoint chunk ranges (0-based), e.g. one shard per GPU box; all "
                   "shards share the store, the last to finish marks it complete.")
@click.option("--workers", type=int, default=None,
              help="Extract on a local Dask cluster of this many worker processes, one shard each.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Extract on an existing Dask cluster (tcp://host:8786): one shard per worker; --out must be a "
                   "path every worker reaches (shared file system).")
@click.option("--gpus-per-task", type=int, default=0, show_default=True,
              help="With --scheduler: each shard asks for this many of the workers' GPU resources "
                   "(start workers with --resources GPU=1).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def extract(model_name, data, out, n, seed, layer_patterns, pool, spatial_pool, dtype, batch_size, chunk_size,
            save_inputs, grams, no_acts, attention, attn_keep, weights, random_init, img_size, mean, std, interpolation, crop_pct,
            device, overwrite, force, strict, shard, workers, scheduler, gpus_per_task, quiet, offline,
            geom_grid=None, geom_prefix=None, geom_patch=None, perturb_spec=None, perturb_patch=None,
            perturb_seed=None) -> None:
    """Run MODEL over images and store per-layer activations in a Zarr store.

    \b
    Examples:
      repsim extract --model vit_b16 --data ~/imagenet/val --n 5000 --out vit_b16.zarr
      repsim extract --model resnet50 --data ~/imagenet/val --n 5000 --pool gap --out r50.zarr
      repsim extract --model timm:vit_tiny_patch16_224 --random-init --img-size 64 --data shapes --n 256 --out t.zarr
      repsim extract --model resnet50 --data ~/imagenet/val --n 5000 --grams --no-acts --out r50_grams.zarr

    Layers are stored as float16 unless that would lose more than 1e-4 of a layer's variation (measured on
    the first images, then on every chunk): such layers are stored as float32 (see `repsim info`).

    Rerunning the same command on a killed extraction resumes it (bit-identical result); another
    configuration on an existing store is refused unless --overwrite.

    \b
    Scale out: --shard K/N writes one of N disjoint parts (run one per GPU box, by hand), or
    --workers N / --scheduler ADDRESS runs one shard per Dask worker.
    """
    from hooks.extract import human_bytes, plan_extraction, run_extraction
    from repsim.data import open_dataset

    if n is not None and n < 1:
        raise UsageError(f"--n must be >= 1, got {n}")
    from repsim.perturbations import Perturbation

    if perturb_spec is None and (perturb_patch, perturb_seed) != (None, None):
        raise UsageError(f"{'--perturb-patch' if perturb_patch is not None else '--perturb-seed'} needs --perturb "
                         "KIND:LEVEL")
    perturbation = (None if perturb_spec is None
                    else Perturbation.parse(perturb_spec, patch_px=perturb_patch, seed=perturb_seed or 0))
    if workers is not None or scheduler is not None:
        if shard is not None or overwrite:
            raise UsageError("--workers / --scheduler choose the shards themselves: drop --shard / --overwrite")
        from hooks.distributed_extract import ExtractionSpec, extract_distributed

        if (geom_grid, geom_prefix, geom_patch) != (None, None, None):
            raise UsageError("--grid/--prefix-tokens/--patch-size do not reach --workers / --scheduler: declare "
                             "`repsim_geometry` on the model instead (see hooks/geometry.py)")
        if weights and random_init:
            raise UsageError("--weights and --random-init exclude each other")
        spec = ExtractionSpec(
            model=model_name, data=data, out=out, n=n, seed=seed,
            load=dict(weights=os.path.abspath(weights) if weights else None, random_init=random_init,
                      offline=True if offline else None,
                      img_size=img_size, mean=floats3(mean, "mean"), std=floats3(std, "std"),
                      interpolation=interpolation, crop_pct=crop_pct),
            plan=dict(layers=split_layers(layer_patterns),
                      pool=pool, spatial_pool=spatial_pool, dtype=dtype, batch_size=batch_size,
                      chunk_size=chunk_size, save_inputs=save_inputs, attention=attention, attn_keep=attn_keep,
                      strict=strict, grams=grams, acts=not no_acts, perturbation=perturbation),
        )
        with dask_client(workers, scheduler) as client:
            store = extract_distributed(client, spec, gpus_per_task=gpus_per_task, device=device,
                                        progress=not quiet)
        click.echo(f"wrote {store.path}: {store.n} samples x {len(store.layers)} layers, "
                   f"{human_bytes(store.nbytes_on_disk())} on disk")
        return
    loaded = load_model_from_options(model_name, weights, random_init, img_size, mean, std, interpolation,
                                     crop_pct, offline)
    from hooks.geometry import apply_geometry, parse_grid  # a py: ViT's declared / flagged token geometry

    apply_geometry(loaded, parse_grid(geom_grid), geom_prefix, geom_patch)
    source = open_dataset(data, n=n, seed=seed, image_size=loaded.preprocessing.img_size[0])
    patterns = split_layers(layer_patterns)
    plan = plan_extraction(
        loaded, source, out, layers=patterns, pool=pool, spatial_pool=spatial_pool, dtype=dtype,
        batch_size=batch_size, chunk_size=chunk_size, save_inputs=save_inputs, attention=attention,
        attn_keep=attn_keep, overwrite=overwrite, shard=parse_shard(shard),
        strict=strict, progress=not quiet, grams=grams, acts=not no_acts, perturbation=perturbation,
    )
    if plan.already_complete:
        click.echo(f"{out} is already complete ({plan.n} samples, {len(plan.taps)} layers); nothing to do")
        return
    promoted = plan.attrs["extraction"]["float32_layers"]
    kept = ("Grams only" if not plan.acts else dtype + (" + Grams" if plan.grams else ""))
    click.echo(
        f"{loaded.info.name}: {len(plan.taps)} layers, {plan.n} images, {human_bytes(plan.bytes_per_image)}/image "
        f"({kept}), up to {human_bytes(plan.total_bytes)} in all; {human_bytes(plan.free_bytes())} free"
        + ("; resuming" if plan.resume else "")
        + (f"; perturbed by {perturbation.label}" if perturbation is not None else "")
    )
    if promoted:
        click.echo(f"stored as float32 (float16 would lose more than 1e-4 of their variation): {', '.join(promoted)}")
    plan.check_disk(force=force)
    store = run_extraction(plan, device=device, progress=not quiet)
    if plan.shard is not None:
        chunks = plan.shard_chunks()
        done = store.chunks_done()
        click.echo(f"shard {plan.shard[0]}/{plan.shard[1]}: chunks {chunks.start}..{chunks.stop - 1} written; "
                   + ("store complete" if store.complete else f"{int(done.sum())}/{len(done)} chunks done in all"))
    click.echo(f"wrote {store.path}: {store.n} samples x {len(store.layers)} layers, "
               f"{human_bytes(store.nbytes_on_disk())} on disk" + ("" if store.complete else " (incomplete)"))
