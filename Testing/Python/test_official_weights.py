"""The optional official-weights download: licence gate, resume, manifest, offline install.

A local HTTP server on 127.0.0.1 (with HTTP Range support) serves checkpoints
in the official layout; nothing leaves the machine.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest
import torch

from SpineNetLib.apps import cli
from SpineNetLib.weights import official as official_weights
from SpineNetLib.weights.checkpoints import load_model, with_fast_memory_format
from SpineNetLib.models import ContextNet


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single-range ``Range: bytes=N-`` support; counts requests."""

    requests: list[tuple[str, str | None]] = []
    cut_after: int | None = None  # close the connection after this many body bytes (simulated outage)

    def log_message(self, *args):
        pass

    def do_GET(self):
        RangeHandler.requests.append((self.path, self.headers.get("Range")))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if RangeHandler.cut_after is not None:
            self.wfile.write(body[:RangeHandler.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "www"
    for rel in official_weights.OFFICIAL_FILES.values():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
    # A real checkpoint in the official layout for the context net, small stand-ins for the rest.
    torch.manual_seed(0)
    context = ContextNet()
    torch.save({"net": context.state_dict(), "epoch": 16, "loss": 0.1}, root / official_weights.OFFICIAL_FILES["context"])
    for kind, rel in official_weights.OFFICIAL_FILES.items():
        if kind != "context":
            (root / rel).write_bytes(os.urandom(300_000))
    handler = functools.partial(RangeHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RangeHandler.requests = []
    RangeHandler.cut_after = None
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", root, context
    httpd.shutdown()


def test_download_requires_the_licence(tmp_path, monkeypatch, capsys, server):
    url, _, _ = server
    monkeypatch.setenv("SPINENET_CACHE", str(tmp_path / "cache"))
    assert cli.main(["weights", "download", "--official", "--base-url", url]) == 2
    captured = capsys.readouterr()
    assert "NON-COMMERCIAL RESEARCH ONLY" in captured.out
    assert "--accept-license" in captured.err
    assert not (tmp_path / "cache").exists()


def test_download_fetches_all_files_records_hashes_and_loads(tmp_path, monkeypatch, server):
    url, root, context = server
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPINENET_CACHE", str(cache))
    # One file already present must not stop the others (the official downloader's bug).
    first = cache / "official" / official_weights.OFFICIAL_FILES["grading"]
    first.parent.mkdir(parents=True)
    first.write_bytes((root / official_weights.OFFICIAL_FILES["grading"]).read_bytes())
    assert cli.main(["weights", "download", "--official", "--accept-license", "--base-url", url]) == 0
    manifest = official_weights.read_manifest()
    for rel in official_weights.OFFICIAL_FILES.values():
        target = cache / "official" / rel
        assert target.read_bytes() == (root / rel).read_bytes()
        assert manifest["files"][rel]["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
        assert manifest["files"][rel]["size"] == target.stat().st_size
    assert not any(p.name.endswith(".part") for p in cache.rglob("*"))
    # The downloaded context checkpoint (numpy-free, official layout) loads strictly.
    model = load_model("context", cache / "official" / "context")
    x = torch.randn(1, 1, 32, 24)
    assert torch.equal(model(x), with_fast_memory_format(context.eval())(x))  # same layout: bit-equal


def test_interrupted_download_resumes_with_a_range_request(tmp_path, monkeypatch, server):
    url, root, _ = server
    monkeypatch.setenv("SPINENET_CACHE", str(tmp_path / "cache"))
    RangeHandler.cut_after = 100_000
    with pytest.raises(Exception):
        official_weights.download_official(base_url=url, timeout=5)
    first = tmp_path / "cache" / "official" / official_weights.OFFICIAL_FILES["grading"]
    part = first.with_name(first.name + ".part")
    assert not first.exists() and part.stat().st_size == 100_000
    RangeHandler.cut_after = None
    RangeHandler.requests = []
    official_weights.download_official(base_url=url, timeout=5)
    assert first.read_bytes() == (root / official_weights.OFFICIAL_FILES["grading"]).read_bytes()
    assert ("/" + official_weights.OFFICIAL_FILES["grading"], "bytes=100000-") in RangeHandler.requests


def test_install_from_an_offline_copy(tmp_path, monkeypatch, server):
    _, root, _ = server
    monkeypatch.setenv("SPINENET_CACHE", str(tmp_path / "cache"))
    assert cli.main(["weights", "install", str(root), "--accept-license"]) == 0
    assert len(official_weights.read_manifest()["files"]) == 4
    assert len(official_weights.trusted_hashes()) == 4
    assert cli.main(["weights", "install", str(tmp_path / "empty-nowhere"), "--accept-license"]) == 2


def test_a_planted_or_changed_file_is_never_recorded_as_trusted(tmp_path, monkeypatch, server):
    """Issue 12: a file sitting at a checkpoint path without a recorded hash (e.g. a planted pickle)
    or changed since it was recorded is replaced by the download, and the manifest holds the hash
    of what is on disk."""
    url, root, _ = server
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPINENET_CACHE", str(cache))
    rel = official_weights.OFFICIAL_FILES["context"]
    planted = cache / "official" / rel
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b"cos\nsystem\n(S'echo planted'\ntR.")
    official_weights.download_official(base_url=url, timeout=5)
    assert planted.read_bytes() == (root / rel).read_bytes()
    manifest = official_weights.read_manifest()
    assert manifest["files"][rel]["sha256"] == hashlib.sha256(planted.read_bytes()).hexdigest()
    assert manifest["files"][rel]["source"] == url + rel
    # changed after it was recorded: replaced again, and the recorded hash is the file's
    planted.write_bytes(b"changed")
    official_weights.download_official(base_url=url, timeout=5)
    assert planted.read_bytes() == (root / rel).read_bytes()
    assert official_weights.read_manifest()["files"][rel]["sha256"] == \
        hashlib.sha256(planted.read_bytes()).hexdigest()
    # unchanged and recorded: kept, nothing fetched
    RangeHandler.requests = []
    official_weights.download_official(base_url=url, timeout=5)
    assert RangeHandler.requests == []
