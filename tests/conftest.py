"""Shared test helpers (import them with ``from conftest import ...``)."""

from __future__ import annotations

import contextlib
import hashlib
import pathlib
from collections.abc import Iterator

import numpy as np
import pytest
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


# -- stores shared by the whole session (issue 18) -------------------------------------------------------------
# A store that tests in several modules only read is extracted once per session instead of once per module. A test
# that writes to a store (resume, damage, overwrite) copies it or builds its own: each shared store checks at its
# fixture's teardown (`kept_unchanged`) that no byte of it changed, so a test that writes to one fails instead of
# silently changing what later tests read.

VIT_TINY_ARGS = ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "32", "--data", "shapes",
                 "--n", "24", "--batch-size", "8", "--quiet"]
"""The `repsim extract` options of :func:`vit_tiny_store` (all but ``--out``)."""

VIT_TINY_FLOAT32_ARGS = ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "32", "--data",
                         "shapes", "--n", "40", "--batch-size", "4", "--chunk-size", "8", "--dtype", "float32",
                         "--quiet"]
"""The `repsim extract` options of :func:`vit_tiny_float32_store` (all but ``--out``)."""


def tree_digest(folder: str) -> str:
    """sha256 over every file under ``folder``: each relative path and its bytes, in sorted path order."""
    h = hashlib.sha256()
    root = pathlib.Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


@contextlib.contextmanager
def kept_unchanged(store: str) -> Iterator[None]:
    """Wrap the ``yield`` of a fixture that shares the store folder ``store`` read-only: on leaving, assert that no
    byte of it changed (a test that writes to a shared store must copy it first)."""
    digest = tree_digest(store)
    yield
    assert tree_digest(store) == digest, f"a test wrote to the shared store {store}: copy it (shutil.copytree) first"


def _read_only_store(tmp_path_factory: pytest.TempPathFactory, name: str, args: list[str]) -> Iterator[str]:
    """Extract ``repsim extract *args`` once into a fresh temporary folder, yield its path, and check at teardown
    that no test changed the store."""
    out = str(tmp_path_factory.mktemp(name) / f"{name}.zarr")
    res = run_cli("extract", *args, "--out", out)
    assert res.exit_code == 0, res.output
    assert "B/image" in res.output, res.output  # the plan line states the size per image
    with kept_unchanged(out):
        yield out


@pytest.fixture(scope="session")
def vit_tiny_store(tmp_path_factory) -> Iterator[str]:
    """Path of a store of random-init timm ViT-Tiny/16 at 32 px (2 x 2 patches + CLS) on 24 ``shapes`` images
    (seed 0): the default layer preset (15 layers), float16, one chunk. Read only."""
    yield from _read_only_store(tmp_path_factory, "vit_tiny", VIT_TINY_ARGS)


@pytest.fixture(scope="session")
def vit_tiny_float32_store(tmp_path_factory) -> Iterator[str]:
    """Path of a store of random-init timm ViT-Tiny/16 at 32 px on 40 ``shapes`` images (seed 0), float32, batches of
    4, five chunks of 8 rows: the unsharded, single-process reference of sharded and distributed extraction. Read
    only."""
    yield from _read_only_store(tmp_path_factory, "vit_tiny_float32", VIT_TINY_FLOAT32_ARGS)
