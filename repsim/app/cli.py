"""The ``repsim`` command line: the ``cli`` click group, its error mapping, and ``main()``.

Each command (in the ``*_commands`` modules of this package) parses its options, calls the library, and prints.
Bad input raises :class:`repsim.errors.UsageError`, which becomes one line on stderr and exit code 2
(``--debug`` shows the traceback instead). The command modules define plain ``click.command``s and do not import
this module; it registers them, in the order of a session (``repsim --help`` lists them so).
"""

from __future__ import annotations

import traceback
import warnings
from typing import Any

import click

from repsim.app.attention_commands import attention
from repsim.app.demo_command import demo
from repsim.app.extract_commands import extract, layers, models
from repsim.app.options import check_plot_args
from repsim.app.options import hidden_alias
from repsim.app.probe_commands import localise, probe
from repsim.app.similarity_commands import cka, compare, robustness
from repsim.app.store_commands import info, verify
from repsim.errors import RepsimError, UsageError

_DEBUG = False


class _Group(click.Group):
    """Turns UsageError into ``error: ...`` + exit 2, and keeps tracebacks for --debug; lists the commands in
    the order they were added (a session's order), not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            check_plot_args([*getattr(ctx, "_protected_args", []), *ctx.args])
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
      repsim localise vit_b16.zarr --plot loc.png     # token-vs-patch CKA, position probe

    Every analysis reads the stores that `repsim extract` writes; nothing re-runs the model.
    """
    global _DEBUG
    _DEBUG = debug
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"


# The order of a session: start here, what there is, extract, check the store, then the analyses.
for _command in (demo, models, layers, extract, info, verify, cka, compare, attention, probe, localise, robustness):
    cli.add_command(_command)
# US spelling of `localise` still runs (scripts written before the code settled on UK spelling); not listed
cli.add_command(hidden_alias(localise, "localize"))


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="repsim")


if __name__ == "__main__":
    main()
