"""A real store damaged in every way (issue 16): no reading command prints a number from it or a traceback.

One small store (random-init ViT-Tiny at 32 px, 24 shapes images, chunks of 8 rows, saved inputs, attention
statistics) is extracted once per module; each case damages a fresh copy and runs every reading command on
it. Every command ends with one ``error:`` line and exit 2 (``verify``: exit 1, naming the array and chunk),
and nothing that looks like a measurement (a decimal number) is printed. Also here: code and pickles named by
a store or a weights file never run without the flag that names the risk (a payload only writes a marker file),
and file-system faults (injected by monkeypatching, never in production code) end in one line.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import re
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from repsim.app.cli import cli

MODEL = ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--img-size", "32", "--offline"]
DATA = ["--data", "shapes", "--n", "24", "--batch-size", "8", "--chunk-size", "8"]
LAYERS = ["--layers", "patch_embed,blocks.0,blocks.11"]
DAMAGED = "acts/blocks.0"


def invoke(*args: str):
    """Run the CLI in-process; an escaping exception (a traceback) fails the test through the assertions."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def lines_of(result) -> list[str]:
    return [ln for ln in result.output.strip().splitlines() if ln.strip()]


def assert_refused(result, store: str | None = None, *, code: int = 2, pattern: str | None = None) -> str:
    """One ``error:`` line, exit ``code``, no traceback, no decimal number (paths removed first)."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = lines_of(result)
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    text = lines[0].replace(store, "STORE") if store else lines[0]
    assert not re.search(r"\d\.\d", text), f"a number in: {text}"
    if pattern is not None:
        assert pattern.lower() in lines[0].lower(), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def healthy(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("damage") / "s.zarr")
    res = invoke("extract", *MODEL, *DATA, *LAYERS, "--save-inputs", "--attention", "--quiet", "--out", out)
    assert res.exit_code == 0, res.output
    return out


def _chunk(array_dir: str, i: int) -> str:
    path = os.path.join(array_dir, "c", str(i))
    while os.path.isdir(path):
        path = os.path.join(path, "0")
    return path


def _flip(path: str) -> None:
    b = bytearray(pathlib.Path(path).read_bytes())
    b[len(b) // 2] ^= 0x10
    pathlib.Path(path).write_bytes(bytes(b))


def _root_attrs(store: str, **changes) -> None:
    meta_path = os.path.join(store, "zarr.json")
    meta = json.loads(pathlib.Path(meta_path).read_text())
    meta["attributes"]["repsim"].update(changes)
    pathlib.Path(meta_path).write_text(json.dumps(meta))


def _damage(kind: str, s: str) -> None:
    a = os.path.join(s, DAMAGED)
    if kind == "chunk_deleted":
        os.remove(_chunk(a, 1))
    elif kind == "chunk_truncated":
        f = _chunk(a, 1)
        pathlib.Path(f).write_bytes(pathlib.Path(f).read_bytes()[:-37])
    elif kind == "chunk_bitflip":
        _flip(_chunk(a, 1))
    elif kind == "chunk_swapped":
        f0, f1 = _chunk(a, 0), _chunk(a, 1)
        b0, b1 = pathlib.Path(f0).read_bytes(), pathlib.Path(f1).read_bytes()
        pathlib.Path(f0).write_bytes(b1)
        pathlib.Path(f1).write_bytes(b0)
    elif kind == "meta_broken":
        pathlib.Path(a, "zarr.json").write_text('{"zarr_format": 3, "shape": [24')
    elif kind == "meta_deleted":
        os.remove(os.path.join(a, "zarr.json"))
    elif kind == "array_truncated":
        meta = json.loads(pathlib.Path(a, "zarr.json").read_text())
        meta["shape"][0] = 12
        pathlib.Path(a, "zarr.json").write_text(json.dumps(meta))
    elif kind == "killed_initialising":  # killed after the group was marked, before the arrays were all laid out
        _root_attrs(s, initialising=True, complete=False)
        shutil.rmtree(a)
    elif kind == "incomplete":  # killed mid-extraction: chunk 2 neither written nor flagged
        _root_attrs(s, complete=False)
        os.remove(_chunk(os.path.join(s, "progress/chunk_done"), 2))
        os.remove(_chunk(a, 2))
    elif kind == "flags_meta_deleted":
        os.remove(os.path.join(s, "progress/chunk_done/zarr.json"))
    elif kind == "flag_lost_but_marked_complete":
        os.remove(_chunk(os.path.join(s, "progress/chunk_done"), 1))
    elif kind == "root_meta_broken":
        pathlib.Path(s, "zarr.json").write_text("{not json")
    elif kind == "inputs_chunk_deleted":
        os.remove(_chunk(os.path.join(s, "inputs/pixels"), 1))
    elif kind == "attention_chunk_bitflip":
        _flip(_chunk(os.path.join(s, "attn/blocks.0.attn/distance"), 1))
    elif kind == "labels_deleted":
        os.remove(_chunk(os.path.join(s, "samples/labels"), 0))
    else:
        raise AssertionError(kind)


# kind -> (what verify must name, commands that read the damaged data and must refuse, does `info` refuse)
CASES = {
    "chunk_deleted": (f"{DAMAGED}: chunk 1", "cka compare probe localise", False),
    "chunk_truncated": (f"{DAMAGED}: chunk 1", "cka compare probe localise", False),
    "chunk_bitflip": (f"{DAMAGED}: chunk 1", "cka compare probe localise", False),
    # two intact chunks exchanged: each passes its own CRC32C, the writer's content digest does not
    "chunk_swapped": (f"{DAMAGED}: chunk 0 (rows 0..7) does not hold what was written", "cka compare probe localise",
                      False),
    "meta_broken": (f"{DAMAGED}: its metadata", "cka compare probe localise attention", True),
    "meta_deleted": (f"{DAMAGED}: its metadata", "cka compare probe localise attention", True),
    "array_truncated": (f"{DAMAGED}: the array has 12 rows", "cka compare probe localise attention", False),
    "killed_initialising": ("killed while being created", "cka compare probe localise attention", True),
    "incomplete": ("never completed", "cka compare probe localise attention", False),
    "flags_meta_deleted": ("progress/chunk_done: its metadata", "cka compare probe localise attention", True),
    "flag_lost_but_marked_complete": ("marked complete but 1 of its 3", "cka compare probe localise attention", False),
    "root_meta_broken": ("zarr.json", "cka compare probe localise attention", True),
    "inputs_chunk_deleted": ("inputs/pixels: chunk 1", "localise", False),
    "attention_chunk_bitflip": ("attn/blocks.0.attn/distance: chunk 1", "attention", False),
}
COMMANDS = {
    "cka": ["cka", "{s}", "--quiet"],
    "compare": ["compare", "{s}", "--quiet"],
    "probe": ["probe", "{s}", "--quiet", "--method", "ridge"],
    "localise": ["localise", "{s}", "--quiet", "--images", "16"],
    "attention": ["attention", "{s}"],
}


@pytest.mark.parametrize("kind", list(CASES))
def test_damaged_store(healthy, tmp_path, kind):
    s = str(tmp_path / f"{kind}.zarr")
    shutil.copytree(healthy, s)
    _damage(kind, s)
    names, readers, info_refuses = CASES[kind]
    res = invoke("verify", s, "--quiet")
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and "ok (" not in res.output
    assert names in res.output, res.output
    for command in readers.split():
        res = invoke(*[a.format(s=s) for a in COMMANDS[command]])
        line = assert_refused(res, s)
        assert ("verify" in line or "rerun the same `repsim extract`" in line
                or "not a repsim store" in line), (command, line)
    res = invoke("info", s)
    if info_refuses:
        assert_refused(res, s)
    else:  # metadata only: no chunk is read, the state line says what is unfinished
        assert res.exit_code == 0, res.output
        if kind == "incomplete":
            assert "INCOMPLETE" in res.output


def test_healthy_store_reads(healthy):
    res = invoke("verify", healthy, "--quiet")
    assert res.exit_code == 0 and "ok (" in res.output, res.output
    for command in COMMANDS.values():
        res = invoke(*[a.format(s=healthy) for a in command])
        assert res.exit_code == 0, (command, res.output)


def test_verify_names_every_damaged_array_and_chunk(healthy, tmp_path):
    s = str(tmp_path / "many.zarr")
    shutil.copytree(healthy, s)
    os.remove(_chunk(os.path.join(s, "acts/blocks.0"), 0))
    _flip(_chunk(os.path.join(s, "acts/blocks.11"), 2))
    os.remove(os.path.join(s, "acts/patch_embed/zarr.json"))
    os.remove(_chunk(os.path.join(s, "samples/ids"), 0))
    res = invoke("verify", s, "--quiet")
    assert res.exit_code == 1
    for expected in ("acts/blocks.0: chunk 0 (rows 0..7) is missing", "acts/blocks.11: chunk 2 (rows 16..23) does not "
                     "decode", "acts/patch_embed: its metadata", "samples/ids: chunk 0 (rows 0..23) is missing"):
        assert expected in res.output, res.output
    assert "4 problem(s)" in res.output


def test_python_api_refuses_damage(healthy, tmp_path):
    import probes
    from repsim.errors import UsageError
    from repsim.store.reader import open_store

    s = str(tmp_path / "api.zarr")
    shutil.copytree(healthy, s)
    _damage("chunk_deleted", s)
    store = open_store(s)
    with pytest.raises(UsageError, match=r"acts/blocks.0 chunk 1 \(rows 8..15\) reads as NaN"):
        store.read("blocks.0", 4, 12)
    assert np.isfinite(store.read("blocks.0", 0, 8)).all()  # the intact chunk still reads
    with pytest.raises(UsageError, match="verify"):
        next(iter(store.iter_batches(["blocks.0"], 24)))
    _damage("incomplete", s)
    with pytest.raises(UsageError, match="incomplete"):
        probes.localise(open_store(s), cka=False)


# -- point 3: code from someone else's files ----------------------------------------------------------------
PAYLOAD = '''
import pathlib
pathlib.Path({marker!r}).write_text("ran")
import torch.nn as nn


def make(pretrained=False, img_size=32):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
'''


def _crafted_store(healthy: str, tmp_path, marker: pathlib.Path, *, record_hash: bool = True) -> tuple[str, str]:
    """A copy of the store whose provenance names a py: file inside the store itself."""
    s = str(tmp_path / "crafted.zarr")
    shutil.copytree(healthy, s)
    code = pathlib.Path(s, "model.py")
    code.write_text(PAYLOAD.format(marker=str(marker)))
    digest = hashlib.sha256(code.read_bytes()).hexdigest()
    meta = json.loads(pathlib.Path(s, "zarr.json").read_text())
    model = meta["attributes"]["repsim"]["model"]
    model.update(name=f"py:{code}:make", source="py", source_id=f"{code}:make",
                 weights={"kind": "factory", "factory": f"{code}:make", "sha256": digest if record_hash else ""})
    if record_hash:
        model["code_sha256"] = digest
    pathlib.Path(s, "zarr.json").write_text(json.dumps(meta))
    return s, str(code)


def test_store_code_needs_trust_code(healthy, tmp_path):
    from hooks.models.registry import reload_model
    from repsim.errors import UsageError
    from repsim.store.reader import open_store

    marker = tmp_path / "MARKER"
    s, _ = _crafted_store(healthy, tmp_path, marker)
    assert_refused(invoke("localise", s, "--no-cka", "--pointing", "ig", "--quiet"), s, pattern="--trust-code")
    assert not marker.exists()
    with pytest.raises(UsageError, match="--trust-code"):
        reload_model(open_store(s).attrs)
    assert not marker.exists()


def test_store_code_hash_checked_before_import(healthy, tmp_path):
    from hooks.models.registry import reload_model
    from repsim.errors import UsageError
    from repsim.store.reader import open_store

    marker = tmp_path / "MARKER"
    s, code = _crafted_store(healthy, tmp_path, marker)
    attrs = open_store(s).attrs
    with open(code, "a") as f:
        f.write("\n# changed after the extraction\n")
    with pytest.raises(UsageError, match="changed since the extraction"):
        reload_model(attrs, trust_code=True)
    assert not marker.exists()
    res = invoke("localise", s, "--no-cka", "--pointing", "ig", "--trust-code", "--quiet")
    assert res.exit_code == 2 and "changed since the extraction" in res.output and "Traceback" not in res.output
    assert not marker.exists()
    # a store that records no hash of its code is refused even with the flag
    (tmp_path / "nohash").mkdir()
    s2, _ = _crafted_store(healthy, tmp_path / "nohash", marker, record_hash=False)
    with pytest.raises(UsageError, match="no sha256"):
        reload_model(open_store(s2).attrs, trust_code=True)
    assert not marker.exists()


class _Payload:
    marker = ""

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "ran"))


def test_pickle_payload_needs_trust_pickle(tmp_path):
    from hooks.models.weights import load_state_dict_file, trust_pickle
    from repsim.errors import UsageError

    marker = tmp_path / "MARKER"
    payload = _Payload()
    payload.marker = str(marker)
    net = torch.nn.Linear(2, 2)
    for zipped in (False, True):
        path = str(tmp_path / f"evil_{zipped}.pth")
        torch.save({"state_dict": net.state_dict(), "extra": payload}, path, _use_new_zipfile_serialization=zipped)
        with pytest.raises(UsageError, match="--trust-pickle"):
            load_state_dict_file(path)
        assert not marker.exists()
    res = invoke("extract", "--model", "timm:vit_tiny_patch16_224", "--weights", str(tmp_path / "evil_False.pth"),
                 "--img-size", "32", "--offline", "--data", "shapes", "--n", "8", "--out", str(tmp_path / "w.zarr"))
    assert_refused(res, pattern="--trust-pickle")
    assert not marker.exists()
    with trust_pickle():  # the flag does what it names
        sd, _ = load_state_dict_file(str(tmp_path / "evil_False.pth"))
    assert marker.exists() and set(sd) == {"weight", "bias"}


# -- point 4: faults outside repsim's own checks -----------------------------------------------------------
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_disk_full_or_file_too_large_mid_extraction_then_resume(tmp_path, monkeypatch, code):
    from repsim.store.writer import StoreWriter

    out = str(tmp_path / "f.zarr")
    real = StoreWriter.write_chunk

    def failing(self, chunk_index, *a, **k):
        if chunk_index == 1:
            raise OSError(code, os.strerror(code), os.path.join(out, "acts/x/c/1/0/0"))
        return real(self, chunk_index, *a, **k)

    monkeypatch.setattr(StoreWriter, "write_chunk", failing)
    res = invoke("extract", *MODEL, *DATA, *LAYERS, "--quiet", "--out", out)
    # extract's plan line comes first; then exactly one error line, nothing after it
    errors = [ln for ln in lines_of(res) if ln.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and lines_of(res)[-1] == errors[0], res.output
    assert os.strerror(code) in errors[0] and "Traceback" not in res.output
    monkeypatch.setattr(StoreWriter, "write_chunk", real)
    res = invoke("extract", *MODEL, *DATA, *LAYERS, "--quiet", "--out", out)
    assert res.exit_code == 0 and "resuming" in res.output, res.output
    assert invoke("verify", out, "--quiet").exit_code == 0


def test_read_only_file_system(healthy, monkeypatch):
    from repsim.store.locks import WriterLock

    def refuse(self, wait=0.0):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), self.path)

    monkeypatch.setattr(WriterLock, "acquire", refuse)
    res = invoke("extract", *MODEL, *DATA, *LAYERS, "--save-inputs", "--attention", "--quiet", "--out", healthy)
    assert_refused(res, healthy, pattern="read-only")


def test_out_in_missing_folder_and_plot_extension(healthy, tmp_path):
    out = str(tmp_path / "missing" / "deeper" / "s.zarr")
    res = invoke("extract", *MODEL, *DATA, "--quiet", "--out", out)
    assert res.exit_code in (0, 2) and "Traceback" not in res.output  # created, or refused in one line
    if res.exit_code == 2:
        assert_refused(res, out)
    for command in COMMANDS.values():
        args = [a.format(s=healthy) for a in command]
        assert_refused(invoke(*args, "--plot", str(tmp_path / "x.xyz")), healthy, pattern="cannot write .xyz")
    res = invoke("probe", healthy, "--quiet", "--method", "ridge", "--out", str(tmp_path / "nope" / "p.json"))
    assert res.exit_code in (0, 2) and "Traceback" not in res.output


FORWARD = '''
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, fail):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 4, 3, padding=1)
        self.fail = fail

    def forward(self, x):
        if self.fail:
            raise ValueError("boom in the user's forward")
        with torch.no_grad():
            y = self.conv(x)
        return self.head(y.detach()).mean((2, 3))


def failing(pretrained=False):
    return Net(True)


def detached(pretrained=False):
    return Net(False)
'''


def test_user_forward_error_and_erf_without_gradient(tmp_path):
    code = tmp_path / "user_net.py"
    code.write_text(FORWARD)
    common = ["--random-init", "--img-size", "16", "--data", "shapes", "--n", "8", "--quiet"]
    res = invoke("extract", "--model", f"py:{code}:failing", *common, "--out", str(tmp_path / "a.zarr"))
    assert_refused(res, pattern="boom in the user's forward")
    out = str(tmp_path / "b.zarr")
    res = invoke("extract", "--model", f"py:{code}:detached", *common, "--layers", "conv", "--out", out)
    assert res.exit_code == 0, res.output
    assert_refused(invoke("attention", out, "--erf"), out, pattern="--trust-code")  # a py: store runs code
    assert_refused(invoke("attention", out, "--erf", "--trust-code"), out, pattern="gradient")


def test_overwrite_takes_the_writer_lock(healthy, tmp_path):
    from repsim.store.locks import WriterLock

    s = str(tmp_path / "busy.zarr")
    shutil.copytree(healthy, s)
    lock = WriterLock(s)
    lock.acquire()  # a live writer (this process) is writing the store
    try:
        res = invoke("extract", *MODEL, *DATA, "--layers", "blocks.0", "--overwrite", "--quiet", "--out", s)
        assert_refused(res, s, pattern="being written")
    finally:
        lock.release()
    assert invoke("verify", s, "--quiet").exit_code == 0  # nothing of it was deleted


def test_save_inputs_beyond_float16_is_refused(tmp_path):
    res = invoke("extract", *MODEL, "--std", "1e-6,1e-6,1e-6", "--data", "shapes", "--n", "8", "--save-inputs",
                 "--layers", "patch_embed", "--quiet", "--out", str(tmp_path / "i.zarr"))
    lines = lines_of(res)
    assert res.exit_code == 2 and len(lines) == 1 and "float16" in lines[0] and "inf" in lines[0], res.output
    assert not (tmp_path / "i.zarr").exists()
