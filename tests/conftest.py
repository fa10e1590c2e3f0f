"""Shared test helpers (import them with ``from conftest import ...``)."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner, Result

from repsim.app.cli import cli


def run_cli(*args: str) -> Result:
    """Invoke the ``repsim`` CLI in-process; exceptions other than exit codes propagate."""
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def assert_one_line_error(result: Result, pattern: str) -> None:
    """Exit code 2, exactly one non-empty line ``error: ...`` containing ``pattern``, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:") and pattern.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in result.output


class Killed(BaseException):
    """Raised by :func:`run_killed_after_chunks` in place of a kill (a BaseException, as a signal would be: no
    ``except Exception`` in the library may swallow it)."""


def run_killed_after_chunks(plan, chunks: int, **kwargs):
    """Run ``hooks.extract.loop.run_extraction(plan)`` and 'kill' it once ``chunks`` chunks are on disk.

    Fault injection lives here, not in the library: ``StoreWriter.write_chunk`` is wrapped so that the write
    after the ``chunks``-th raises :class:`Killed` (nothing of that chunk is written; the background writer
    drains its queue and re-raises in the main thread). Asserts that the run was interrupted and that exactly
    ``chunks`` chunks were completed.
    """
    import pytest

    from hooks.extract.loop import run_extraction
    from repsim.store.reader import ActivationStore
    from repsim.store.writer import StoreWriter

    real = StoreWriter.write_chunk
    written = []

    def write_chunk(self, index, *args, **kw):
        if len(written) >= chunks:
            raise Killed(f"killed before writing chunk {index}")
        real(self, index, *args, **kw)
        written.append(index)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StoreWriter, "write_chunk", write_chunk)
        with pytest.raises(Killed):
            run_extraction(plan, progress=False, **kwargs)
    assert len(written) == chunks, f"the extraction finished after {len(written)} chunks, before the kill"
    return ActivationStore(plan.out)


def assert_drawn_png(path, min_px: int = 200, min_colours: int = 20) -> None:
    """The saved figure is a real, non-blank image (at least ``min_px`` square, more than 2% of pixels not near
    white, at least ``min_colours`` colours): not just a non-empty file."""
    import matplotlib.image

    img = matplotlib.image.imread(str(path))
    assert img.ndim == 3 and img.shape[0] >= min_px and img.shape[1] >= min_px, img.shape
    rgb = img[..., :3]
    assert (rgb < 0.95).any(-1).mean() > 0.02, "figure is (almost) blank"
    assert len(np.unique((rgb.reshape(-1, 3) * 255).round().astype(int), axis=0)) >= min_colours
