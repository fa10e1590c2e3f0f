"""Sharded extraction: independent processes write disjoint chunk ranges of one store."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import VIT_TINY_FLOAT32_ARGS, assert_one_line_error, run_cli
from repsim import open_store
from repsim.store.locks import WriterLock, shard_lock_name
from repsim.store.verify import verify_store

ARGS = VIT_TINY_FLOAT32_ARGS  # the options of the session's unsharded store: the sharded runs must equal it


def _cli_process(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "repsim.app.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_concurrent_shards_equal_an_unsharded_run(tmp_path, vit_tiny_float32_store):
    whole = vit_tiny_float32_store
    sharded = str(tmp_path / "sharded.zarr")
    # three processes started together: one creates the store, the others wait and reopen it
    procs = [_cli_process("extract", *ARGS, "--out", sharded, "--shard", f"{k}/3") for k in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert sum("store complete" in out for out, _ in outs) >= 1
    a, b = open_store(whole), open_store(sharded)
    assert b.complete and verify_store(b).ok
    assert a.ids == b.ids and a.layers == b.layers
    for layer in a.layers:
        np.testing.assert_array_equal(a.read(layer), b.read(layer))


@pytest.mark.slow
def test_shard_subset_then_rest(tmp_path):
    out = str(tmp_path / "s.zarr")
    res = run_cli("extract", *ARGS, "--out", out, "--shard", "1/2")
    assert res.exit_code == 0 and "chunks 2..4 written; 3/5 chunks done" in res.output
    s = open_store(out)
    assert not s.complete and list(s.chunks_done()) == [False, False, True, True, True]
    assert open_store(out).shard_records() == {2: [None, s.shard_records()[2][1]]}
    rec = s.shard_records()[2][1]
    assert (rec["shard"], rec["of"], rec["chunks"], rec["rows"]) == (1, 2, [2, 5], [16, 40])
    assert "shards     1 of 2 recorded finished: 1 (" in run_cli("info", out).output
    res = run_cli("extract", *ARGS, "--out", out, "--shard", "0/2")
    assert res.exit_code == 0 and "store complete" in res.output
    done = open_store(out)
    assert done.complete and [r["rows"] for r in done.shard_records()[2]] == [[0, 16], [16, 40]]
    assert verify_store(done).ok


@pytest.mark.slow
def test_shard_record_checked_by_verify(tmp_path):
    """A shard recorded finished whose chunk flag is missing (lost rows) is a verify problem."""
    import zarr

    out = str(tmp_path / "v.zarr")
    for k in range(2):
        assert run_cli("extract", *ARGS, "--out", out, "--shard", f"{k}/2").exit_code == 0
    assert verify_store(open_store(out)).ok
    zarr.open_group(out, mode="r+")["progress/chunk_done"][3] = 0
    problems = verify_store(open_store(out)).problems
    assert any("shard 1/2 is recorded finished but chunk 3 is not flagged written" in p for p in problems), problems


@pytest.mark.slow
def test_bad_shards_and_overlapping_writers_refused(tmp_path):
    out = str(tmp_path / "b.zarr")
    assert_one_line_error(run_cli("extract", *ARGS, "--out", out, "--shard", "2/2"), "0 <= k < n")
    assert_one_line_error(run_cli("extract", *ARGS, "--out", out, "--shard", "x"), "k/n")
    assert_one_line_error(run_cli("extract", *ARGS, "--out", out, "--shard", "0/9"), "more shards")
    assert run_cli("extract", *ARGS, "--out", out, "--shard", "0/2").exit_code == 0
    held = WriterLock(out, shard_lock_name((1, 2)))  # a live writer of shard 1/2 (this process)
    held.acquire()
    try:
        # another split, or an unsharded writer, overlaps a live shard writer: refused
        # (the plan line is printed first; the refusal is the one error line)
        for args, pattern in ((["--shard", "1/4"], "another writer"), ([], "another writer"),
                              (["--shard", "1/2"], "being written")):
            res = run_cli("extract", *ARGS, "--out", out, *args)
            errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
            assert res.exit_code == 2 and len(errors) == 1 and pattern in errors[0], res.output
    finally:
        held.release()
    assert run_cli("extract", *ARGS, "--out", out).exit_code == 0
    assert open_store(out).complete
