"""`repsim verify` failure paths, a newer store format, and the `--overwrite` guard (issue 18).

One small real store (random-init ViT-Tiny at 32 px, 16 shapes images in chunks of 8, attention statistics) is
extracted once per module; every case damages its own copy by hand (sample table, fingerprint, attention arrays)
and checks that verify names exactly that damage with exit code 1, while the healthy copy verifies with exit 0.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import zarr

from conftest import assert_one_line_error, run_cli
from repsim.store.format import FORMAT_VERSION, fingerprint_ids
from repsim.store.reader import open_store

ATTN = "attn/blocks.0.attn"


@pytest.fixture(scope="module")
def healthy(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("verify") / "s.zarr")
    res = run_cli("extract", "--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "32", "--offline",
                  "--data", "shapes", "--n", "16", "--batch-size", "8", "--chunk-size", "8", "--layers", "blocks.0",
                  "--attention", "--quiet", "--out", out)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture()
def copy(healthy, tmp_path) -> str:
    s = str(tmp_path / "c.zarr")
    shutil.copytree(healthy, s)
    return s


def _root(store: str, **changes) -> None:
    """Change the root ``repsim`` attributes in zarr.json (``dataset`` is merged one level deep)."""
    path = pathlib.Path(store, "zarr.json")
    meta = json.loads(path.read_text())
    attrs = meta["attributes"]["repsim"]
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(attrs.get(key), dict):
            attrs[key].update(value)
        else:
            attrs[key] = value
    path.write_text(json.dumps(meta))


def _problems(store: str) -> list[str]:
    """verify's output lines; asserts exit code 1, one ``problem:`` line per finding and the count line."""
    res = run_cli("verify", store, "--quiet")
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    problems = [ln.removeprefix("problem: ") for ln in lines if ln.startswith("problem: ")]
    assert lines[-1] == f"{store}: {len(problems)} problem(s)" and len(lines) == len(problems) + 1, res.output
    return problems


def test_the_healthy_store_verifies(healthy):
    res = run_cli("verify", healthy, "--quiet")
    assert res.exit_code == 0 and res.output.startswith(f"{healthy}: ok ("), res.output


def test_wrong_fingerprint_is_named(copy):
    _root(copy, dataset={"fingerprint": "0" * 64})
    assert _problems(copy) == ["sample fingerprint does not match samples/ids (ids changed or damaged "
                               "after extraction)"]


def test_changed_sample_ids_are_named(copy):
    ids = zarr.open_array(os.path.join(copy, "samples/ids"), mode="r+")
    ids[3] = "shapes/v1/seed=0/size=32/999999"  # one id rewritten, with a valid chunk checksum
    assert _problems(copy) == ["sample fingerprint does not match samples/ids (ids changed or damaged "
                               "after extraction)"]


def test_duplicate_ids_are_named_even_with_a_matching_fingerprint(copy):
    ids = zarr.open_array(os.path.join(copy, "samples/ids"), mode="r+")
    new = [str(s) for s in ids[:]]
    new[5] = new[2]
    new[9] = new[2]
    ids[:] = np.asarray(new, dtype=ids.dtype)
    _root(copy, dataset={"fingerprint": fingerprint_ids(new)})  # consistent hash: only the duplicates are wrong
    assert _problems(copy) == ["samples/ids holds 2 duplicated ids"]


def test_attention_array_metadata_deleted(copy):
    os.remove(os.path.join(copy, ATTN, "entropy", "zarr.json"))
    (problem,) = _problems(copy)
    assert problem.startswith(f"{ATTN}/entropy: its metadata ({ATTN}/entropy/zarr.json) is missing or damaged")


def test_attention_array_truncated(copy):
    meta_path = pathlib.Path(copy, ATTN, "distance", "zarr.json")
    meta = json.loads(meta_path.read_text())
    meta["shape"][0] = 8
    meta_path.write_text(json.dumps(meta))
    assert _problems(copy) == [f"{ATTN}/distance: the array has 8 rows where the store needs 16 (truncated or "
                               "resized)"]


def test_attention_values_replaced_by_nan_and_a_chunk_lost(copy):
    arr = zarr.open_array(os.path.join(copy, ATTN, "prefix_mass"), mode="r+")
    block = arr[8:16]
    block[2, 1] = np.nan  # re-encoded by zarr: the chunk's own CRC32C is valid, its content is not
    arr[8:16] = block
    chunk = pathlib.Path(copy, ATTN, "aligned", "c", "1")
    while chunk.is_dir():
        chunk = chunk / "0"
    chunk.unlink()  # the aligned-map sums of sample chunk 1
    problems = _problems(copy)
    assert problems == [  # in the order the store declares its arrays
        f"{ATTN}/prefix_mass: chunk 1 (rows 8..15) does not hold what was written there (content digest differs: "
        "chunks exchanged or rewritten)",
        f"{ATTN}/prefix_mass: chunk 1 (rows 8..15) holds 1 NaN/Inf values",
        f"{ATTN}/aligned: chunk 1 (rows 1..1) is missing on disk",
    ], problems


@pytest.mark.parametrize("loss", ["chunk", "metadata"])
def test_lost_content_digests_are_named(copy, loss):
    """Without progress/chunk_digest two intact chunks could be exchanged unnoticed: its loss is damage."""
    digest = pathlib.Path(copy, "progress", "chunk_digest")
    if loss == "chunk":
        for f in [f for f in (digest / "c").rglob("*") if f.is_file()]:
            f.unlink()
        assert _problems(copy) == [f"progress/chunk_digest: chunk {c} (rows {c}..{c}) is missing on disk"
                                   for c in range(2)]
    else:
        (digest / "zarr.json").unlink()
        (problem,) = _problems(copy)
        assert problem.startswith("progress/chunk_digest: its metadata (progress/chunk_digest/zarr.json) is "
                                  "missing or damaged")
        for args in (("probe", copy, "--method", "ridge", "--quiet"), ("cka", copy, "--quiet")):
            assert_one_line_error(run_cli(*args), "progress/chunk_digest")


def test_a_folder_that_is_not_a_store(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    (problem,) = _problems(str(folder))
    assert problem.startswith("zarr.json (the root metadata) is damaged or not a repsim store's")


# -- a store written by a newer repsim -------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["info", "verify", "cka", "probe", "attention"])
def test_newer_store_format_is_refused_in_one_line(copy, command):
    _root(copy, format_version=FORMAT_VERSION + 1)
    res = run_cli(command, copy, *(["--quiet"] if command in ("verify", "cka", "probe") else []))
    assert_one_line_error(res, f"has store format {FORMAT_VERSION + 1}, newer than this repsim understands "
                               f"({FORMAT_VERSION}): upgrade repsim")
    from repsim.errors import UsageError

    with pytest.raises(UsageError, match=f"store format {FORMAT_VERSION + 1}, newer than this repsim"):
        open_store(copy)


# -- --overwrite never deletes what is not a store ---------------------------------------------------------------
def _tree(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("content", ["files", "zarr_group"])
def test_overwrite_refuses_a_folder_that_is_not_a_store(tmp_path, content):
    folder = tmp_path / "results"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("my results")
    (folder / "sub" / "data.npy").write_bytes(b"\x93NUMPY precious")
    if content == "zarr_group":  # a Zarr group of someone else's: no repsim attributes
        (folder / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    before = _tree(folder)
    res = run_cli("extract", "--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "32",
                  "--data", "shapes", "--n", "8", "--batch-size", "8", "--layers", "blocks.0", "--overwrite",
                  "--quiet", "--out", str(folder))
    assert_one_line_error(res, f"{folder} exists and is not a repsim store: refusing to delete it")
    assert _tree(folder) == before  # intact, byte for byte
    file_out = tmp_path / "a_file.zarr"
    file_out.write_bytes(b"not a folder")
    res = run_cli("extract", "--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "32",
                  "--data", "shapes", "--n", "8", "--batch-size", "8", "--layers", "blocks.0", "--overwrite",
                  "--quiet", "--out", str(file_out))
    assert_one_line_error(res, "is a file, not a store")
    assert file_out.read_bytes() == b"not a folder"


def test_overwrite_replaces_a_store(copy):
    res = run_cli("extract", "--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "32",
                  "--data", "shapes", "--n", "8", "--batch-size", "8", "--layers", "blocks.11", "--overwrite",
                  "--quiet", "--out", copy)
    assert res.exit_code == 0, res.output
    s = open_store(copy)
    assert s.layers == ["blocks.11"] and s.n == 8 and not os.path.exists(os.path.join(copy, "attn"))
