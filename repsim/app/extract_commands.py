"""``repsim models``, ``repsim layers`` and ``repsim extract``: which models there are, their modules,
and running one over images into an activation store (:mod:`hooks.extract.loop`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from repsim.app.options import (dask_client, floats3, load_model_from_options, model_options, parse_shard,
                                split_layers)
from repsim.errors import UsageError

if TYPE_CHECKING:
    from repsim.data.perturbations import Perturbation


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON.")
def models(as_json: bool) -> None:
    """List the short model names, what they map to, and whether weights are available offline.

    Besides these names, --model accepts timm:<any timm id>, hf:<hub id or local directory>,
    torchvision:<name> and py:<file.py>:<factory> (a function returning your own nn.Module).
    """
    from hooks.models.registry import list_models

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

    from hooks.capture.activations import probe_output_shapes
    from hooks.capture.layers import default_layers

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


@dataclass(frozen=True)
class ExtractOptions:
    """The options of ``repsim extract`` as click parsed them; the field names are the command's parameter
    names (``--model`` is ``model_name``, ``--layers`` ``layer_patterns``, ``--perturb`` ``perturb_spec``,
    ``--grid`` / ``--prefix-tokens`` / ``--patch-size`` ``geom_*``)."""

    # what runs on which images, written where
    model_name: str
    data: str
    out: str
    n: int | None
    seed: int
    # building the model (the shared model options, see repsim.app.options.model_options)
    weights: str | None
    random_init: bool
    offline: bool
    img_size: int | None
    mean: str | None
    std: str | None
    interpolation: str | None
    crop_pct: float | None
    # what is stored
    layer_patterns: tuple[str, ...]
    pool: str
    spatial_pool: int | None
    dtype: str
    batch_size: int
    chunk_size: int | None
    save_inputs: bool
    grams: bool
    no_acts: bool
    attention: bool
    attn_keep: int
    strict: bool
    # token geometry of a py: ViT repsim cannot read
    geom_grid: str | None
    geom_prefix: int | None
    geom_patch: int | None
    # input perturbation (for `repsim robustness`)
    perturb_spec: str | None
    perturb_patch: int | None
    perturb_seed: int | None
    # how and where it runs
    device: str
    overwrite: bool
    force: bool
    shard: str | None
    workers: int | None
    scheduler: str | None
    gpus_per_task: int
    quiet: bool

    def perturbation(self) -> Perturbation | None:
        """The parsed --perturb KIND:LEVEL (None without it); --perturb-patch / --perturb-seed alone are refused."""
        from repsim.data.perturbations import Perturbation

        if self.perturb_spec is None:
            if (self.perturb_patch, self.perturb_seed) != (None, None):
                raise UsageError(f"{'--perturb-patch' if self.perturb_patch is not None else '--perturb-seed'} "
                                 "needs --perturb KIND:LEVEL")
            return None
        return Perturbation.parse(self.perturb_spec, patch_px=self.perturb_patch, seed=self.perturb_seed or 0)

    def plan_kwargs(self, perturbation: Perturbation | None) -> dict[str, Any]:
        """The :func:`hooks.extract.loop.plan_extraction` keywords of what is stored, the same for a run here and for
        every Dask shard (each shard adds its own ``shard``)."""
        return dict(layers=split_layers(self.layer_patterns), pool=self.pool, spatial_pool=self.spatial_pool,
                    dtype=self.dtype, batch_size=self.batch_size, chunk_size=self.chunk_size,
                    save_inputs=self.save_inputs, attention=self.attention, attn_keep=self.attn_keep,
                    strict=self.strict, grams=self.grams, acts=not self.no_acts, perturbation=perturbation)


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
def extract(**params: Any) -> None:
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
    opts = ExtractOptions(**params)
    if opts.n is not None and opts.n < 1:
        raise UsageError(f"--n must be >= 1, got {opts.n}")
    perturbation = opts.perturbation()
    if opts.workers is not None or opts.scheduler is not None:
        _extract_on_dask(opts, perturbation)
    else:
        _extract_here(opts, perturbation)


def _extract_on_dask(opts: ExtractOptions, perturbation: Perturbation | None) -> None:
    """--workers N / --scheduler ADDRESS: one shard per Dask worker (:mod:`hooks.extract.distributed`)."""
    from hooks.extract.distributed import ExtractionSpec, extract_distributed
    from repsim.formatting import human_bytes

    if opts.shard is not None or opts.overwrite:
        raise UsageError("--workers / --scheduler choose the shards themselves: drop --shard / --overwrite")
    if (opts.geom_grid, opts.geom_prefix, opts.geom_patch) != (None, None, None):
        raise UsageError("--grid/--prefix-tokens/--patch-size do not reach --workers / --scheduler: declare "
                         "`repsim_geometry` on the model instead (see hooks/models/geometry.py)")
    if opts.weights and opts.random_init:
        raise UsageError("--weights and --random-init exclude each other")
    spec = ExtractionSpec(
        model=opts.model_name, data=opts.data, out=opts.out, n=opts.n, seed=opts.seed,
        load=dict(weights=os.path.abspath(opts.weights) if opts.weights else None, random_init=opts.random_init,
                  offline=True if opts.offline else None,
                  img_size=opts.img_size, mean=floats3(opts.mean, "mean"), std=floats3(opts.std, "std"),
                  interpolation=opts.interpolation, crop_pct=opts.crop_pct),
        plan=opts.plan_kwargs(perturbation),
    )
    with dask_client(opts.workers, opts.scheduler) as client:
        store = extract_distributed(client, spec, gpus_per_task=opts.gpus_per_task, device=opts.device,
                                    progress=not opts.quiet)
    click.echo(f"wrote {store.path}: {store.n} samples x {len(store.layers)} layers, "
               f"{human_bytes(store.nbytes_on_disk())} on disk")


def _extract_here(opts: ExtractOptions, perturbation: Perturbation | None) -> None:
    """One process (or one --shard K/N of the store): plan, check the disk, run, report."""
    from hooks.extract.loop import plan_extraction, run_extraction
    from repsim.formatting import human_bytes
    from hooks.models.geometry import apply_geometry, parse_grid  # a py: ViT's declared / flagged token geometry
    from repsim.data.sources import open_dataset

    loaded = load_model_from_options(opts.model_name, opts.weights, opts.random_init, opts.img_size, opts.mean,
                                     opts.std, opts.interpolation, opts.crop_pct, opts.offline)
    apply_geometry(loaded, parse_grid(opts.geom_grid), opts.geom_prefix, opts.geom_patch)
    source = open_dataset(opts.data, n=opts.n, seed=opts.seed, image_size=loaded.preprocessing.img_size[0])
    plan = plan_extraction(loaded, source, opts.out, overwrite=opts.overwrite, shard=parse_shard(opts.shard),
                           progress=not opts.quiet, **opts.plan_kwargs(perturbation))
    if plan.already_complete:
        click.echo(f"{opts.out} is already complete ({plan.n} samples, {len(plan.taps)} layers); nothing to do")
        return
    promoted = plan.attrs["extraction"]["float32_layers"]
    kept = ("Grams only" if not plan.acts else opts.dtype + (" + Grams" if plan.grams else ""))
    click.echo(
        f"{loaded.info.name}: {len(plan.taps)} layers, {plan.n} images, {human_bytes(plan.bytes_per_image)}/image "
        f"({kept}), up to {human_bytes(plan.total_bytes)} in all; {human_bytes(plan.free_bytes())} free"
        + ("; resuming" if plan.resume else "")
        + (f"; perturbed by {perturbation.label}" if perturbation is not None else "")
    )
    if promoted:
        click.echo(f"stored as float32 (float16 would lose more than 1e-4 of their variation): {', '.join(promoted)}")
    plan.check_disk(force=opts.force)
    store = run_extraction(plan, device=opts.device, progress=not opts.quiet)
    if plan.shard is not None:
        chunks = plan.shard_chunks()
        done = store.chunks_done()
        click.echo(f"shard {plan.shard[0]}/{plan.shard[1]}: chunks {chunks.start}..{chunks.stop - 1} written; "
                   + ("store complete" if store.complete else f"{int(done.sum())}/{len(done)} chunks done in all"))
    click.echo(f"wrote {store.path}: {store.n} samples x {len(store.layers)} layers, "
               f"{human_bytes(store.nbytes_on_disk())} on disk" + ("" if store.complete else " (incomplete)"))
