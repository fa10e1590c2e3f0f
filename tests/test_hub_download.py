"""Downloading pretrained weights from the hub, offline, against a local stand-in for huggingface.co.

``FakeHub`` is a tiny HTTP server on 127.0.0.1 (a thread) that answers what ``huggingface_hub.hf_hub_download``
asks, the way the real hub does:

- ``HEAD|GET /{org}/{name}/resolve/{revision}/{file}``: a small (git) file is answered 200 with ``ETag`` = its
  git sha1, ``X-Repo-Commit`` and ``Content-Length``; a large (LFS) file with a 302 to another host
  (``localhost`` instead of ``127.0.0.1``, as the hub sends weights to its CDN), carrying ``X-Repo-Commit``,
  ``X-Linked-Etag`` = the file's sha256 and ``X-Linked-Size``;
- ``HEAD|GET /cdn/{sha256}``: the LFS bytes;
- errors with the hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``).

The client reads ``HF_ENDPOINT`` / ``HF_HOME`` once, at import, so the tests also patch the module constants.
Every request is logged, so "offline" is checked as "the server saw nothing".
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import pytest
import timm
import torch
from conftest import assert_one_line_error, run_cli

from hooks.models.registry import load_model, reload_model
from repsim import open_store
from repsim.errors import UsageError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TIMM_ID = "test_vit.r160_in1k"  # a real timm pretrained tag (371k parameters, 160 px), repo timm/test_vit.r160_in1k
TIMM_REPO = "timm/" + TIMM_ID
LFS_SUFFIXES = (".safetensors", ".bin")


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Serves ``repos[repo_id] = {filename: bytes}`` at commit :data:`COMMIT` (also reachable as ``main``)."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.blobs: dict[str, bytes] = {}
        self.log: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                self._answer(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(body=True)

            def _send(self, status: int, headers: dict[str, str], data: bytes, body: bool) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _answer(self, body: bool) -> None:
                hub.log.append((self.command, self.path))
                parts = [unquote(p) for p in self.path.split("?")[0].strip("/").split("/")]
                if len(parts) == 2 and parts[0] == "cdn" and parts[1] in hub.blobs:
                    return self._send(200, {"ETag": f'"{parts[1]}"'}, hub.blobs[parts[1]], body)
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._send(404, {}, b"not found", body)
                repo, revision, fname = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                if repo not in hub.repos:
                    return self._send(401, {"X-Error-Code": "RepoNotFound"}, b"", body)
                if revision not in ("main", COMMIT):
                    return self._send(404, {"X-Error-Code": "RevisionNotFound"}, b"", body)
                files = hub.repos[repo]
                if fname not in files:
                    return self._send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, b"", body)
                data = files[fname]
                if fname.endswith(LFS_SUFFIXES):
                    sha = hashlib.sha256(data).hexdigest()
                    hub.blobs[sha] = data
                    host, port = self.server.server_address[:2]
                    return self._send(302, {"Location": f"http://localhost:{port}/cdn/{sha}", "X-Repo-Commit": COMMIT,
                                            "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))}, b"", body)
                return self._send(200, {"ETag": f'"{_git_sha1(data)}"', "X-Repo-Commit": COMMIT}, data, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _point_hub_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, home: str) -> str:
    """Make huggingface_hub (constants read at import) and torch hub use ``endpoint`` and caches under ``home``."""
    from huggingface_hub import constants

    cache = os.path.join(home, "hub")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", home)
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("TORCH_HOME", os.path.join(home, "torch"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", home)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return cache


def _safetensors_bytes(sd: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in sd.items()})


@pytest.fixture(scope="module")
def served_timm() -> tuple[dict[str, torch.Tensor], bytes]:
    """The state dict the fake hub serves for timm/test_vit.r160_in1k (seed 7: unlike any init repsim draws)."""
    torch.manual_seed(7)
    src = timm.create_model("test_vit", pretrained=False).eval()
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    return sd, _safetensors_bytes(sd)


@pytest.fixture()
def hub(tmp_path, monkeypatch, served_timm):
    fake = FakeHub()
    fake.repos[TIMM_REPO] = {"model.safetensors": served_timm[1], "config.json": b"{}"}
    cache = _point_hub_at(monkeypatch, fake.url, str(tmp_path / "hf_home"))
    try:
        yield fake, cache
    finally:
        fake.close()


def _assert_weights(module: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    assert set(own) == set(sd)
    for k, v in sd.items():
        assert torch.equal(own[k], v), k


# -- timm --------------------------------------------------------------------------------------------------
def test_timm_download_records_revision_and_sha256_then_runs_offline(hub, served_timm, monkeypatch):
    fake, cache = hub
    sd, data = served_timm
    m = load_model("timm:" + TIMM_ID)
    _assert_weights(m.module, sd)
    w = m.info.weights
    assert w["kind"] == "hub" and w["hub_id"] == TIMM_REPO and w["tag"] == TIMM_ID
    assert w["revision"] == COMMIT and w["filename"] == "model.safetensors"
    assert w["sha256"] == hashlib.sha256(data).hexdigest()
    assert w["cache_file"].startswith(cache)
    assert os.path.realpath(w["cache_file"]).endswith(os.path.join("blobs", w["sha256"]))  # the hub's layout
    assert json.loads(json.dumps(m.info.to_dict()))["weights"] == w
    # the weights came over the "CDN" redirect, not from anywhere else
    assert ("GET", f"/cdn/{w['sha256']}") in fake.log
    assert not any("pytorch_model.bin" in p for _, p in fake.log)  # safetensors preferred, found first

    # Cached: the next loads never touch the network, whether offline is asked for or not.
    n = len(fake.log)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = load_model("timm:" + TIMM_ID)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    flagged = load_model("timm:" + TIMM_ID, offline=True)
    online = load_model("timm:" + TIMM_ID)
    assert len(fake.log) == n
    for other in (again, flagged, online):
        _assert_weights(other.module, sd)
        assert other.info.weights == w


def test_offline_with_empty_cache_is_the_one_line_error(hub, monkeypatch):
    fake, cache = hub
    res = run_cli("extract", "--model", "timm:" + TIMM_ID, "--offline", "--data", "shapes", "--n", "8",
                  "--out", os.path.join(os.path.dirname(cache), "x.zarr"))
    assert_one_line_error(res, "downloads are off")
    assert "--weights" in res.output and "--random-init" in res.output and cache in res.output
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the environment variable alone does the same
    with pytest.raises(UsageError, match="downloads are off"):
        load_model("timm:" + TIMM_ID)
    assert fake.log == []


def test_cli_extract_downloads_then_offline_store_and_reload_check(hub, served_timm, tmp_path):
    fake, cache = hub
    sd, data = served_timm
    args = ["--data", "shapes", "--n", "8", "--img-size", "32", "--layers", "blocks.0", "--batch-size", "8", "--quiet"]
    res = run_cli("extract", "--model", "timm:" + TIMM_ID, *args, "--out", str(tmp_path / "a.zarr"))
    assert res.exit_code == 0, res.output
    w = open_store(str(tmp_path / "a.zarr")).attrs["model"]["weights"]
    assert w["revision"] == COMMIT and w["sha256"] == hashlib.sha256(data).hexdigest() and w["hub_id"] == TIMM_REPO
    n = len(fake.log)
    res = run_cli("extract", "--model", "timm:" + TIMM_ID, "--offline", *args, "--out", str(tmp_path / "b.zarr"))
    assert res.exit_code == 0, res.output
    assert len(fake.log) == n
    attrs = open_store(str(tmp_path / "a.zarr")).attrs

    # reload_model rebuilds from the recorded commit and checks the sha256
    shutil.rmtree(cache)  # gone: downloaded again, at the recorded commit (not "main")
    again = reload_model(attrs)
    assert any(f"/resolve/{COMMIT}/model.safetensors" in p for _, p in fake.log[n:])
    assert not any("/resolve/main/" in p for _, p in fake.log[n:])
    assert again.info.weights["sha256"] == w["sha256"]
    forged = json.loads(json.dumps(dict(attrs)))
    forged["model"]["weights"]["sha256"] = "0" * 64
    with pytest.raises(UsageError, match="not the ones the store"):
        reload_model(forged)


def test_damaged_cache_file_is_caught_before_loading(hub, served_timm):
    load_model("timm:" + TIMM_ID)
    blob = os.path.realpath(load_model("timm:" + TIMM_ID).info.weights["cache_file"])
    with open(blob, "r+b") as f:  # flip one byte inside the tensor data
        f.seek(os.path.getsize(blob) - 3)
        b = f.read(1)
        f.seek(-1, io.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(UsageError, match="damaged"):
        load_model("timm:" + TIMM_ID)


def test_hub_errors_are_one_usage_error(hub, tmp_path, monkeypatch):
    fake, _ = hub
    fake.repos[TIMM_REPO] = {"config.json": b"{}"}  # the repo lacks the weights
    with pytest.raises(UsageError, match="has none of model.safetensors, pytorch_model.bin"):
        load_model("timm:" + TIMM_ID)
    with pytest.raises(UsageError, match="no hub repository some-org/absent"):
        load_model("hf:some-org/absent")
    with pytest.raises(UsageError, match="no revision"):
        load_model("timm:" + TIMM_ID, revision="v9")
    # A hub that cannot be reached fails at once (the client alone retries 5 times with backoff, ~25 s).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: connection refused
        _point_hub_at(monkeypatch, dead, str(tmp_path / "other_home"))
        t0 = time.monotonic()
        with pytest.raises(UsageError, match="cannot download the weights of") as err:
            load_model("timm:" + TIMM_ID)
        assert time.monotonic() - t0 < 5
    assert "\n" not in str(err.value) and "--offline" in str(err.value)


# -- transformers ------------------------------------------------------------------------------------------
def test_hf_model_download_is_one_commit_and_recorded(hub, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    fake, cache = hub
    torch.manual_seed(11)
    ref = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=64, num_labels=5)).eval()
    ref.save_pretrained(tmp_path / "src")
    pre = {"do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 2,
           "size": {"height": 32, "width": 32}}
    files = {f: (tmp_path / "src" / f).read_bytes() for f in os.listdir(tmp_path / "src")}
    files["preprocessor_config.json"] = json.dumps(pre).encode()
    fake.repos["tiny-org/tiny-vit"] = files
    m = load_model("hf:tiny-org/tiny-vit")
    w = m.info.weights
    assert w["kind"] == "hub" and w["hub_id"] == "tiny-org/tiny-vit" and w["revision"] == COMMIT
    assert w["sha256"] == hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert m.preprocessing.mean == (0.5, 0.5, 0.5)  # the downloaded preprocessor config is used
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _assert_weights(m.module.model, ref.state_dict())
    with torch.no_grad():  # (repsim runs eager attention, the reference SDPA: equal up to rounding)
        torch.testing.assert_close(m.module(x), ref(pixel_values=x).logits, rtol=1e-5, atol=1e-6)
    n = len(fake.log)
    assert load_model("hf:tiny-org/tiny-vit", offline=True).info.weights == w and len(fake.log) == n
