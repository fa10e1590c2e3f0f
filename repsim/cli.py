"""The ``repsim`` command line: thin click commands over the library API.

Each command parses its options, calls the library, and prints. Bad input raises
:class:`repsim.errors.UsageError`, which becomes one line on stderr and exit code 2 (``--debug`` shows the
traceback instead). ``hooks`` and ``probes`` are imported here, inside the commands, never by ``repsim``'s
library modules.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
import warnings
from typing import Any

import click

from repsim.errors import NewerFormatError, RepsimError, UsageError

_DEBUG = False


class _Group(click.Group):
    """Turns UsageError into ``error: ...`` + exit 2, and keeps tracebacks for --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            _check_plot_args([*getattr(ctx, "_protected_args", []), *ctx.args])
            return super().invoke(ctx)
        except UsageError as err:
            if _DEBUG:
                traceback.print_exc()
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)
        except RepsimError as err:
            # a measurement that cannot be trusted (NaN, negative self-HSIC, ...): no number, exit 1
            if _DEBUG:
                traceback.print_exc()
            click.echo(f"error: {err}", err=True)
            ctx.exit(1)
        except OSError as err:
            # the file system said no (missing folder, read-only, full disk, file-size limit): one line, exit 2
            if _DEBUG:
                traceback.print_exc()
            click.echo(f"error: {_os_error_line(err)}", err=True)
            ctx.exit(2)
        except Exception as err:  # noqa: BLE001 - only the user's own model code is turned into one line
            where = _user_code_line(err)
            if where is None:
                raise
            if _DEBUG:
                traceback.print_exc()
            click.echo(f"error: your model's code raised {type(err).__name__}: {_first(err)} (at {where}); "
                       "rerun with --debug for the traceback", err=True)
            ctx.exit(2)


def _check_plot_args(args: list[str]) -> None:
    """Refuse a --plot file whose extension matplotlib cannot write, before any work is done."""
    for i, arg in enumerate(args):
        if arg == "--plot" and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--plot="):
            path = arg.split("=", 1)[1]
        else:
            continue
        ext = os.path.splitext(path)[1].lstrip(".").lower()
        if not ext:
            continue  # matplotlib writes PNG
        from matplotlib.backend_bases import FigureCanvasBase

        supported = sorted(FigureCanvasBase.get_supported_filetypes())
        if ext not in supported:
            raise UsageError(f"--plot {path}: cannot write .{ext} figures; use one of {', '.join(supported)}")


def _first(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else "no details"


def _os_error_line(err: OSError) -> str:
    """One line for a file-system error, with what to do about the common ones."""
    import errno

    what = f"{err.strerror or _first(err)}" + (f": {err.filename}" if err.filename else "")
    hint = {
        errno.ENOSPC: "free some space and rerun the same command (a killed or failed extraction resumes)",
        errno.EFBIG: "a file exceeds the file-size limit (ulimit -f) or the file system's largest file: raise the "
                     "limit or use a smaller --chunk-size, then rerun (the extraction resumes)",
        errno.EROFS: "the file system is read-only: choose an --out on a writable one",
        errno.ENOENT: "check the path (is its parent folder there?)",
        errno.EACCES: "no permission: choose another path",
        errno.EDQUOT: "disk quota exceeded: free some space and rerun the same command",
    }.get(err.errno)
    return what + (f"; {hint}" if hint else "")


def _user_code_line(err: BaseException) -> str | None:
    """``file:line`` of the innermost frame of a ``py:`` model's own code in the traceback, or None."""
    where = None
    for frame, line in traceback.walk_tb(err.__traceback__):
        if str(frame.f_globals.get("__name__", "")).startswith("repsim_user_model_"):
            where = f"{frame.f_code.co_filename}:{line}"
    return where


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="repsim")
def cli(debug: bool) -> None:
    """repsim: how vision networks represent images, and how CNNs, ViTs and MLP-Mixers differ.

    \b
    Start here (offline, a minute or two on a CPU; bundled models trained on the shapes data set):
      repsim demo --out demo/                         # every analysis, figures + report.md

    \b
    Typical session:
      repsim models                                   # what can be extracted
      repsim extract --model vit_b16 --data ~/imagenet/val --n 5000 --out vit_b16.zarr
      repsim info vit_b16.zarr                        # provenance, layers, size, complete or not
      repsim verify vit_b16.zarr                      # every chunk decodes, no NaN/Inf
      repsim cka vit_b16.zarr resnet50.zarr --plot vit_vs_r50.png   # layer x layer CKA map
      repsim compare vit_b16.zarr resnet50.zarr --measure procrustes,rsa # other similarity measures
      repsim attention vit_b16.zarr --plot attn.png   # needs extract --attention; --erf for CNNs
      repsim probe vit_b16.zarr --plot probe.png      # linear transfer accuracy per layer
      repsim localize vit_b16.zarr --plot loc.png     # token-vs-patch CKA, position probe

    Every analysis reads the stores that `repsim extract` writes; nothing re-runs the model.
    """
    global _DEBUG
    _DEBUG = debug
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"


def _parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    k, sep, total = value.partition("/")
    if not sep or not k.strip().isdigit() or not total.strip().isdigit():
        raise UsageError(f"--shard takes K/N (e.g. 3/8), got {value!r}")
    return int(k), int(total)


def _floats3(value: str | None, what: str) -> tuple[float, float, float] | None:
    if value is None:
        return None
    try:
        parts = tuple(float(v) for v in value.replace(" ", "").split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise UsageError(f"--{what} takes three comma-separated numbers (R,G,B), got {value!r}")
    return parts  # type: ignore[return-value]


def _meta_flag(name: str):
    """A flag kept in ``ctx.meta`` (not a function argument), read where the risk is taken."""
    def store(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
        ctx.meta[name] = bool(value)
        return value
    return store


_TRUST_PICKLE_OPTION = click.option(
    "--trust-pickle", is_flag=True, expose_value=False, callback=_meta_flag("trust_pickle"),
    help="Unpickle a weights file that holds more than tensors (weights_only=False). That RUNS CODE from the "
         "file: only for files you trust. Without it such files are refused.")
_TRUST_CODE_OPTION = click.option(
    "--trust-code", is_flag=True, expose_value=False, callback=_meta_flag("trust_code"),
    help="Allow rebuilding a store's py: model, which imports and RUNS that Python file (after checking its "
         "sha256 against the store's). Without it such stores are refused.")


@contextlib.contextmanager
def _trusted():
    """What --trust-code / --trust-pickle allow, for the model loads inside this block."""
    from hooks.registry import trust_code
    from hooks.weights import trust_pickle

    meta = click.get_current_context().meta
    with trust_code(meta.get("trust_code", False)), trust_pickle(meta.get("trust_pickle", False)):
        yield


def _model_options(f):
    """Options shared by commands that build a model."""
    options = [
        _TRUST_PICKLE_OPTION,
        click.option("--weights", type=click.Path(dir_okay=False), default=None,
                     help="Local state dict (.pt/.pth/.bin/.safetensors) instead of hub weights."),
        click.option("--random-init", is_flag=True,
                     help="Build the architecture without any weights (seeded; every residual branch and the "
                          "classifier switched on, see the README's Models section)."),
        click.option("--offline", is_flag=True,
                     help="Never download: use only the local Hugging Face / torch hub caches (as HF_HUB_OFFLINE=1). "
                          "Without it, missing pretrained weights are downloaded into those caches."),
        click.option("--img-size", type=int, default=None, help="Input size in pixels (square)."),
        click.option("--mean", default=None, help="Normalisation mean, 'R,G,B' (default: the model's config)."),
        click.option("--std", default=None, help="Normalisation std, 'R,G,B' (default: the model's config)."),
        click.option("--interpolation", type=click.Choice(["bicubic", "bilinear", "nearest"]), default=None,
                     help="Resize interpolation (default: the model's config)."),
        click.option("--crop-pct", type=float, default=None,
                     help="Resize to img_size/crop_pct then centre-crop (default: the model's config)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _load_model(model: str, weights, random_init, img_size, mean, std, interpolation, crop_pct, offline=False):
    """The model of --model / MODEL with the shared options; ``--offline`` forces offline, else the environment
    (HF_HUB_OFFLINE) decides."""
    from hooks.registry import load_model

    if weights and random_init:
        raise UsageError("--weights and --random-init exclude each other")
    if weights and not os.path.isfile(weights):
        raise UsageError(f"weights file not found: {weights}")
    with _trusted():
        return load_model(
            model, weights=weights, random_init=random_init, img_size=img_size,
            mean=_floats3(mean, "mean"), std=_floats3(std, "std"), interpolation=interpolation, crop_pct=crop_pct,
            offline=True if offline else None,
        )


# ------------------------------------------------------------------------------------------------------
@cli.command()
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


@cli.command()
@click.argument("model")
@_model_options
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
    loaded = _load_model(model, weights, random_init or not weights, img_size, mean, std, interpolation, crop_pct,
                         offline)
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


@cli.command()
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
@_model_options
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
                      img_size=img_size, mean=_floats3(mean, "mean"), std=_floats3(std, "std"),
                      interpolation=interpolation, crop_pct=crop_pct),
            plan=dict(layers=_split_layers(layer_patterns),
                      pool=pool, spatial_pool=spatial_pool, dtype=dtype, batch_size=batch_size,
                      chunk_size=chunk_size, save_inputs=save_inputs, attention=attention, attn_keep=attn_keep,
                      strict=strict, grams=grams, acts=not no_acts, perturbation=perturbation),
        )
        with _dask_client(workers, scheduler) as client:
            store = extract_distributed(client, spec, gpus_per_task=gpus_per_task, device=device,
                                        progress=not quiet)
        click.echo(f"wrote {store.path}: {store.n} samples x {len(store.layers)} layers, "
                   f"{human_bytes(store.nbytes_on_disk())} on disk")
        return
    loaded = _load_model(model_name, weights, random_init, img_size, mean, std, interpolation, crop_pct, offline)
    from hooks.geometry import apply_geometry, parse_grid  # a py: ViT's declared / flagged token geometry

    apply_geometry(loaded, parse_grid(geom_grid), geom_prefix, geom_patch)
    source = open_dataset(data, n=n, seed=seed, image_size=loaded.preprocessing.img_size[0])
    patterns = _split_layers(layer_patterns)
    plan = plan_extraction(
        loaded, source, out, layers=patterns, pool=pool, spatial_pool=spatial_pool, dtype=dtype,
        batch_size=batch_size, chunk_size=chunk_size, save_inputs=save_inputs, attention=attention,
        attn_keep=attn_keep, overwrite=overwrite, shard=_parse_shard(shard),
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


@cli.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the root attributes and layer table as JSON.")
def info(store: str, as_json: bool) -> None:
    """Show a store's provenance, layers with shapes, dtype, size on disk, and whether it is complete."""
    from repsim.formatting import human_bytes  # not hooks.extract: info must not load torch (issue 13)
    from repsim.store import open_store

    s = open_store(store)
    table = [{"layer": layer, **s.layer_info(layer)} for layer in s.layers]
    done = s.chunks_done()
    if as_json:
        click.echo(json.dumps({"attrs": s.attrs, "layers": table, "chunks_done": int(done.sum()),
                               "shards": {str(k): v for k, v in s.shard_records().items()},
                               "n_chunks": len(done), "bytes_on_disk": s.nbytes_on_disk()}, indent=2, default=list))
        return
    a = s.attrs
    m, d, p = a["model"], a["dataset"], a["preprocessing"]
    w = m.get("weights", {})
    wdesc = {"file": f"file {w.get('file')} (sha256 {str(w.get('sha256'))[:12]}...)",
             "random": f"random init (seed {w.get('seed')}, {w.get('init', 'framework')})",
             "factory": f"made by {w.get('factory')} (sha256 {str(w.get('sha256'))[:12]}...)",
             "hub": f"hub {w.get('hub_id') or w.get('tag', '')}@{str(w.get('revision'))[:12]} "
                    f"(sha256 {str(w.get('sha256'))[:12]}...)",
             "bundled": f"bundled {w.get('file')} (sha256 {str(w.get('sha256'))[:12]}...)"}.get(w.get("kind"), str(w))
    state = "complete" if s.complete else f"INCOMPLETE: {int(done.sum())}/{len(done)} chunks (rerun extract to resume)"
    click.echo(f"store      {s.path}  (format {a['format_version']}, repsim {a['repsim_version']})")
    click.echo(f"state      {state}")
    click.echo(f"model      {m['name']}  [{m['source']}:{m['source_id']}]  family {m['family']}, weights: {wdesc}")
    click.echo(f"           prefix tokens {m.get('num_prefix_tokens')}, patch {m.get('patch_size')}, grid {m.get('grid')}")
    click.echo(f"data       {d['name']} {d.get('root') or ''}  n={s.n}, seed {d.get('seed')}, fingerprint {s.fingerprint[:16]}"
               + (f", {len(d.get('skipped', []))} corrupt images skipped" if d.get("skipped") else ""))
    click.echo(f"input      {p['img_size']} px, mean {p['mean']}, std {p['std']}, {p['interpolation']}, crop_pct {p['crop_pct']}")
    if a.get("perturbation"):
        pt = a["perturbation"]
        click.echo(f"perturbed  {pt['kind']}:{pt['level']:g} on the preprocessed input"
                   + (f", {pt['patch_px']} px patches" if pt.get("patch_px") else "")
                   + (f", seed {pt['seed']}" if pt.get("seed") is not None else "") + " (clean sample ids kept)")
    e = a["extraction"]
    click.echo(f"extraction pool {e['pool']}, spatial_pool {e['spatial_pool']}, {e['dtype']}, batch {e['batch_size']}, "
               f"chunk {e['chunk_size']} rows" + (", inputs saved" if e.get("save_inputs") else "")
               + (f", attention statistics ({len(s.attention_layers)} layers, maps of {e.get('attn_keep', 0)} images)"
                  if e.get("attention") else ""))
    g = s.gram_info
    if g:
        click.echo(f"grams      U-centred Grams per chunk of {g['batch_rows']} rows ({g['dtype']}, from {g['source_dtype']} "
                   f"{g['tokens']} features, {g['rows_used']} samples)"
                   + ("; activations not kept (--no-acts)" if not s.has_acts else ""))
    if e.get("float32_layers"):
        click.echo(f"precision  stored as float32 (float16 would lose > 1e-4 of their variation): "
                   f"{', '.join(e['float32_layers'])}")
    click.echo(f"disk       {human_bytes(s.nbytes_on_disk())}")
    for total, records in s.shard_records().items():
        done_k = [f"{k} ({r['host']}, rows {r['rows'][0]}..{r['rows'][1] - 1}, {r['seconds']} s)"
                  for k, r in enumerate(records) if r]
        click.echo(f"shards     {len(done_k)} of {total} recorded finished" + (": " + "; ".join(done_k) if done_k else ""))
    fp16 = s.fp16_errors()
    click.echo(f"layers     {len(s.layers)}" + ("  (fp16 err: worst float16 storage error over the chunks, as a share "
                                                 "of the layer's variation)" if fp16 else ""))
    for row in table:
        extra = ""
        if row["kind"] == "tokens":
            extra = f"prefix {row.get('num_prefix_tokens')}, grid {row.get('grid')}"
        elif row["kind"] == "map":
            extra = f"grid {row.get('grid')}"
        if row["layer"] in fp16 and row["dtype"] == "float16":
            extra += f"{', ' if extra else ''}fp16 err {fp16[row['layer']]:.1e}"
        click.echo(f"  {row['layer']:<36} {row['kind']:<7} {str(tuple(row['shape'])):<18} {row['dtype']:<8} {extra}")


@cli.command()
@click.argument("store", type=click.Path())
@click.option("--quiet", is_flag=True, help="No progress bar.")
def verify(store: str, quiet: bool) -> None:
    """Check that every chunk decodes, holds no NaN/Inf, and that the sample fingerprint is consistent.

    Exits with code 1 when a problem is found (each one is listed).
    """
    from repsim.store import open_store
    from repsim.verify import verify_store

    try:
        opened = open_store(store)
    except NewerFormatError:
        raise  # intact, only newer than this repsim: one line, exit 2 (not a problem of the store)
    except UsageError as err:
        if not os.path.isfile(os.path.join(store, "zarr.json")):
            raise
        # a folder with root metadata that does not read as a repsim store: its zarr.json is the damage
        click.echo(f"problem: zarr.json (the root metadata) is damaged or not a repsim store's ({err})", err=True)
        click.echo(f"{store}: 1 problem(s)", err=True)
        sys.exit(1)
    report = verify_store(opened, progress=not quiet)
    for problem in report.problems:
        click.echo(f"problem: {problem}", err=True)
    if not report.ok:
        click.echo(f"{store}: {len(report.problems)} problem(s)", err=True)
        sys.exit(1)
    click.echo(f"{store}: ok ({report.layers_checked} arrays, {report.chunks_checked} chunks, no NaN/Inf, fingerprint consistent)")


@contextlib.contextmanager
def _dask_client(workers: int | None, scheduler: str | None):
    """A Dask client for --workers N (local cluster, loopback) or --scheduler ADDRESS; None without either."""
    if workers is None and scheduler is None:
        yield None
        return
    if workers is not None and scheduler is not None:
        raise UsageError("--workers and --scheduler exclude each other")
    from dask.distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as err:
            raise UsageError(f"cannot reach the Dask scheduler at {scheduler}: {err}") from None
        with client:
            yield client
        return
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0", silence_logs=50) as cluster, Client(cluster) as client:
        yield client


def _split_layers(specs: tuple[str, ...]) -> list[str] | None:
    return [p.strip() for spec in specs for p in spec.split(",") if p.strip()] or None


@cli.command()
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
    from repsim.cka_engine import cka_matrix
    from repsim.cka_plot import short_layer_names
    from repsim.store import open_store

    if out is None and plot_path is None and not quiet:
        click.echo("(no --out or --plot: printing the matrix only)", err=True)
    a = open_store(store_a)
    b = open_store(store_b) if store_b is not None else None
    if (workers or scheduler) and estimator != "minibatch":
        raise UsageError(f"--workers / --scheduler run the minibatch estimator, not {estimator}")
    with _dask_client(workers, scheduler) as client:
        result = cka_matrix(
            a, b, estimator=estimator, kernel=kernel, tokens=tokens, layers_a=_split_layers(layers_a),
            layers_b=_split_layers(layers_b), batch_size=batch_size, repeats=repeats, seed=seed, device=device,
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


@cli.command()
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
@_TRUST_CODE_OPTION
@_TRUST_PICKLE_OPTION
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

    from repsim.attention_plot import figure_paths
    from repsim.attention_summary import attention_report
    from repsim.cka_plot import short_layer_names
    from repsim.store import open_store

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
    report = attention_report(s, layers=_split_layers(layer_list))
    seg = None
    if segmentation:
        from repsim.attention_segmentation import MASS, attention_segmentation

        seg = attention_segmentation(s, _split_layers(layer_list), mass=MASS if mass is None else mass,
                                     masks_dir=masks_dir, progress=True)
    if out is not None:
        from repsim.json_output import write_json_atomic

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


@cli.command()
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
    from repsim.cka_plot import short_layer_names
    from repsim.compare import check_measure, cka_equivalent, compare_matrix
    from repsim.store import open_store

    names = [m.strip() for m in measures.split(",") if m.strip()]
    if not names:
        raise UsageError(f"no measure in --measure {measures!r}")
    for name in names:
        check_measure(name, null, bootstrap)  # every measure before the first map: no half-done runs
    a = open_store(store_a)
    b = open_store(store_b) if store_b is not None else None
    for opened in (a, b):
        if opened is not None:
            opened.require_complete()  # unfinished or damaged: one line, before any number

    def target(path: str | None, name: str) -> str | None:
        if path is None or len(names) == 1:
            return path
        stem, ext = os.path.splitext(path)
        return f"{stem}_{name}{ext}"

    for name in names:
        result = compare_matrix(a, b, measure=name, tokens=tokens, layers_a=_split_layers(layers_a),
                                layers_b=_split_layers(layers_b), align=align, null=null, bootstrap=bootstrap,
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


@cli.command()
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
    from repsim.store import open_store

    if test_store is not None and len(stores) > 1:
        raise UsageError("--test-store applies to one store; probe the others separately")
    test = open_store(test_store) if test_store else None
    if test is not None:
        test.require_complete()
    results = []
    for path in stores:
        s = open_store(path)
        s.require_complete()  # unfinished or damaged: one line, before any number
        common = dict(layers=_split_layers(layer_list), features=features, split=split, test_store=test, seed=seed,
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


@cli.command()
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
@_TRUST_CODE_OPTION
@_TRUST_PICKLE_OPTION
@click.option("--class-tokens", is_flag=True,
              help="Also class accuracy from the centre token vs the CLS token vs the token mean, per layer "
                   "(Raghu et al. Fig. 11). Writes <stem>_class_tokens.json/.png.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def localize(store, layer_list, images, no_cka, method, seed, device, out, plot_path, objects, pointing,
             pointing_images, class_tokens, quiet) -> None:
    """Spatial localisation per layer (Raghu et al. 2021, Sec. 7): token-vs-input-patch CKA and a position probe.

    \b
    Examples:
      repsim extract --model vit_b16 --data ~/imagenet/val --n 2000 --save-inputs --out vit.zarr
      repsim localize vit.zarr --out vit_loc.json --plot vit_loc.png

    \b
    score = mean over token positions p of CKA(token p, its own input patch) minus the mean CKA with the
    other patches (0: no localisation); argmax = share of positions whose own patch is the most similar;
    position probe = accuracy of a linear classifier predicting each token's grid position (chance 1/P).
    """
    import probes
    from repsim.store import open_store

    s = open_store(store)
    s.require_complete()  # every mode: an unfinished or damaged store gives other numbers after the resume
    if pointing:
        from hooks.registry import check_rebuild_allowed

        with _trusted():
            check_rebuild_allowed(s.attrs)  # before any number is printed
    result = probes.localize(s, _split_layers(layer_list), images=images, cka=not no_cka, method=method,
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
        obj = probes.object_localization(s, _split_layers(layer_list), method=method, seed=seed, device=device,
                                         progress=not quiet)
        click.echo(obj.summary())
        for path, write in ((sibling(out, "objects"), obj.to_json), (sibling(plot_path, "objects"), obj.plot)):
            if path is not None:
                write(path)
                click.echo(f"wrote {path}")
    if class_tokens:
        ctp = probes.token_class_probe(s, _split_layers(layer_list), method=method, seed=seed, device=device)
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
        from hooks.attribution import store_pointing_game
        from repsim.json_output import write_json_atomic

        with _trusted():
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


@cli.command()
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

    result = robustness_profiles(list(stores), layers=_split_layers(layer_list), tokens=tokens, threshold=threshold,
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


def _erf(s, out, plot_path, images: int, device: str) -> None:
    from hooks.erf import store_erf
    from repsim.attention_plot import plot_erf
    from repsim.attention_summary import erf_json

    try:
        with _trusted():
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


@cli.command()
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Folder for the report, figures, JSON results and activation stores (created; reused stores "
                   "are resumed, not recomputed).")
@click.option("--n", type=int, default=512, show_default=True, help="Held-out shapes images per model.")
@click.option("--localize-images", type=int, default=256, show_default=True,
              help="Images for the token-vs-patch CKA (memory grows with its square).")
@click.option("--models", "model_list", default=",".join(("ref_vit", "ref_vit_gap", "ref_resnet")), show_default=True,
              help="Comma-separated subset of the bundled reference models.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ... or auto.")
@click.option("--quiet", is_flag=True, help="No progress bars: a line per phase and per finished step instead (as in "
              "a log).")
def demo(out, n, localize_images, model_list, device, quiet) -> None:
    """Run every analysis on the bundled reference models and write OUT/report.md.

    \b
    The bundled models (see `repsim models`): ref_vit (ViT, class token), ref_vit_gap (the same ViT
    classifying from the mean of its tokens) and ref_resnet (a small ResNet), all trained on repsim's own
    shapes data set. The demo extracts them on held-out shapes images and writes, under OUT:
      report.md       every figure with two sentences on what it shows, written from the measured numbers
      figures/        CKA maps (within and across models), attention distances, localisation, probes
      json/           every result with its provenance;  summary.json: the numbers the report quotes
      stores/         the activation stores: e.g. `repsim info OUT/stores/ref_vit-n512.zarr`
    No network and no GPU needed; about 6 minutes on a shared 2-core machine (README: measured phase times).
    """
    from repsim.app.demo import run_demo

    models = [m.strip() for m in model_list.split(",") if m.strip()]
    result = run_demo(out, n=n, localize_images=localize_images, device=device, progress=not quiet,
                      log=click.echo, models=models)
    click.echo(f"report: {result.report}  ({len(result.figures)} figures, {result.seconds:.0f} s)")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="repsim")


if __name__ == "__main__":
    main()
