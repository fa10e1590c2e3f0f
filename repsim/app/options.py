"""Options and parsers shared by the ``repsim`` commands: the model-building options, the trust flags, the
``--plot`` extension check, and the small parsers (``R,G,B``, ``K/N``, comma-separated layer lists).

Bad values raise :class:`repsim.errors.UsageError` (one line, exit 2 through :mod:`repsim.app.cli`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import click

from repsim.errors import UsageError


def check_plot_args(args: list[str]) -> None:
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


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """``--shard K/N`` as ``(K, N)``; None without the option."""
    if value is None:
        return None
    k, sep, total = value.partition("/")
    if not sep or not k.strip().isdigit() or not total.strip().isdigit():
        raise UsageError(f"--shard takes K/N (e.g. 3/8), got {value!r}")
    return int(k), int(total)


def floats3(value: str | None, what: str) -> tuple[float, float, float] | None:
    """``--{what} R,G,B`` as three floats; None without the option."""
    if value is None:
        return None
    try:
        parts = tuple(float(v) for v in value.replace(" ", "").split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise UsageError(f"--{what} takes three comma-separated numbers (R,G,B), got {value!r}")
    return parts  # type: ignore[return-value]


def split_layers(specs: tuple[str, ...]) -> list[str] | None:
    """Repeatable, comma-separated layer options as one list; None when none was given (the default set)."""
    return [p.strip() for spec in specs for p in spec.split(",") if p.strip()] or None


def _meta_flag(name: str) -> Callable[[click.Context, click.Parameter, bool], bool]:
    """A flag kept in ``ctx.meta`` (not a function argument), read where the risk is taken."""
    def store(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
        ctx.meta[name] = bool(value)
        return value
    return store


TRUST_PICKLE_OPTION = click.option(
    "--trust-pickle", is_flag=True, expose_value=False, callback=_meta_flag("trust_pickle"),
    help="Unpickle a weights file that holds more than tensors (weights_only=False). That RUNS CODE from the "
         "file: only for files you trust. Without it such files are refused.")
TRUST_CODE_OPTION = click.option(
    "--trust-code", is_flag=True, expose_value=False, callback=_meta_flag("trust_code"),
    help="Allow rebuilding a store's py: model, which imports and RUNS that Python file (after checking its "
         "sha256 against the store's). Without it such stores are refused.")


@contextlib.contextmanager
def trusted() -> Iterator[None]:
    """What --trust-code / --trust-pickle allow, for the model loads inside this block."""
    from hooks.models.registry import trust_code
    from hooks.models.weights import trust_pickle

    meta = click.get_current_context().meta
    with trust_code(meta.get("trust_code", False)), trust_pickle(meta.get("trust_pickle", False)):
        yield


def model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by commands that build a model."""
    options = [
        TRUST_PICKLE_OPTION,
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


def load_model_from_options(model: str, weights: str | None, random_init: bool, img_size: int | None,
                            mean: str | None, std: str | None, interpolation: str | None, crop_pct: float | None,
                            offline: bool = False) -> Any:
    """The model of --model / MODEL with the shared options (a ``hooks.models.registry.LoadedModel``); ``--offline``
    forces offline, else the environment (HF_HUB_OFFLINE) decides."""
    from hooks.models.registry import load_model

    if weights and random_init:
        raise UsageError("--weights and --random-init exclude each other")
    if weights and not os.path.isfile(weights):
        raise UsageError(f"weights file not found: {weights}")
    with trusted():
        return load_model(
            model, weights=weights, random_init=random_init, img_size=img_size,
            mean=floats3(mean, "mean"), std=floats3(std, "std"), interpolation=interpolation, crop_pct=crop_pct,
            offline=True if offline else None,
        )


@contextlib.contextmanager
def dask_client(workers: int | None, scheduler: str | None) -> Iterator[Any]:
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


def hidden_alias(command: click.Command, name: str) -> click.Command:
    """``command`` under a second ``name``, left out of ``repsim --help`` (the same callback and options)."""
    import copy

    alias = copy.copy(command)
    alias.name, alias.hidden = name, True
    return alias
