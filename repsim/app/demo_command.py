"""``repsim demo``: every analysis on the bundled reference models (:func:`repsim.app.demo.run_demo`)."""

from __future__ import annotations

import click


@click.command()
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Folder for the report, figures, JSON results and activation stores (created; reused stores "
                   "are resumed, not recomputed).")
@click.option("--n", type=int, default=512, show_default=True, help="Held-out shapes images per model.")
@click.option("--localise-images", "--localize-images", "localise_images", type=int, default=256, show_default=True,
              help="Images for the token-vs-patch CKA (memory grows with its square).")
@click.option("--models", "model_list", default=",".join(("ref_vit", "ref_vit_gap", "ref_resnet")), show_default=True,
              help="Comma-separated subset of the bundled reference models.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ... or auto.")
@click.option("--quiet", is_flag=True, help="No progress bars: a line per phase and per finished step instead (as in "
              "a log).")
def demo(out, n, localise_images, model_list, device, quiet) -> None:
    """Run every analysis on the bundled reference models and write OUT/report.md.

    \b
    The bundled models (see `repsim models`): ref_vit (ViT, class token), ref_vit_gap (the same ViT
    classifying from the mean of its tokens) and ref_resnet (a small ResNet), all trained on repsim's own
    shapes data set. The demo extracts them on held-out shapes images and writes, under OUT:
      report.md       every figure with two sentences on what it shows, written from the measured numbers
      figures/        CKA maps (within and across models), attention distances, localisation, probes,
                      robustness to patch drop, attention as segmentation
      json/           every result with its provenance;  summary.json: the numbers the report quotes
      stores/         the activation stores: e.g. `repsim info OUT/stores/ref_vit-n512.zarr`, and the
                      patch-drop stores of the robustness section (*-patch-drop0.25-p8.zarr, ...)
    No network and no GPU needed; about 80 s on an idle 2-core machine, 6-10 minutes on a busy one (README:
    measured phase times).
    """
    from repsim.app.demo import run_demo

    models = [m.strip() for m in model_list.split(",") if m.strip()]
    result = run_demo(out, n=n, localise_images=localise_images, device=device, progress=not quiet,
                      log=click.echo, models=models)
    click.echo(f"report: {result.report}  ({len(result.figures)} figures, {result.seconds:.0f} s)")
