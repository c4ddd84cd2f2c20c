"""The HTML report in a real browser: headless Chromium loads report.html with no console error, no request other
than file:/data:, and every image decoded; a screenshot is saved. A deliberately broken page proves the checks fail.

Chromium is driven over the DevTools protocol with a small standard-library WebSocket client (no extra package).
Install the browser with ``apt-get install -y chromium`` (Debian); ``PEFTLAB_SKIP_BROWSER=1`` skips these tests,
``PEFTLAB_CHROMIUM=/path`` picks the binary, ``PEFTLAB_SCREENSHOT_DIR=DIR`` keeps a copy of the screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from test_report import write_synthetic_results

from peftlab.lab.report import write_report

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--remote-debugging-port=0", "--window-size=1280,900"]
TIMEOUT = 60.0


def find_chromium() -> str:
    """The Chromium binary, or a test failure that says how to install it (skip only when asked to)."""
    if os.environ.get("PEFTLAB_SKIP_BROWSER") == "1":
        pytest.skip("PEFTLAB_SKIP_BROWSER=1")
    candidates = [os.environ.get("PEFTLAB_CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome", "chrome"]
    for name in candidates:
        if name and (path := shutil.which(name)):
            return path
    pytest.fail("headless Chromium not found: install it with `apt-get install -y chromium` (Debian/Ubuntu), set "
                "PEFTLAB_CHROMIUM=/path/to/chromium, or set PEFTLAB_SKIP_BROWSER=1 to skip the browser tests")


class WebSocket:
    """A minimal RFC 6455 client: text frames out (masked), text/binary/continuation frames in, ping answered."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
                          f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                          f"Sec-WebSocket-Version: 13\r\n\r\n".encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv_some()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"WebSocket handshake refused: {head[:200]!r}")

    def _recv_some(self) -> bytes:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the browser closed the DevTools connection")
        return chunk

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self.buffer += self._recv_some()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n, mask = len(payload), os.urandom(4)
        header = bytes([0x80 | opcode])
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        # XOR with the repeated 4-byte mask, done on one big integer instead of byte by byte
        key = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big") if n else b""
        self.sock.sendall(header + mask + masked)

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def recv(self) -> str:
        message = b""
        while True:
            first, second = self._read(2)
            opcode, n = first & 0x0F, second & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if second & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise ConnectionError("the browser closed the DevTools connection")
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            message += payload
            if first & 0x80 and opcode != 0xA:
                return message.decode()

    def close(self) -> None:
        self.sock.close()


@dataclass
class PageCheck:
    """What the browser saw: console/JS/log errors, every <img> state, every requested URL."""

    errors: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def broken_images(self) -> list[dict]:
        return [i for i in self.images if not i["complete"] or i["naturalWidth"] == 0]


class DevTools:
    """Commands and events over one page's DevTools WebSocket."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws, self.next_id, self.events = ws, 0, []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, event: str) -> None:
        while not any(e.get("method") == event for e in self.events):
            self.events.append(json.loads(self.ws.recv()))


def _event_errors(events: list[dict]) -> list[str]:
    errors = []
    for event in events:
        params = event.get("params", {})
        if event.get("method") == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in
                                                  params.get("args", [])))
        elif event.get("method") == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            errors.append("exception: " + details.get("exception", {}).get("description", details.get("text", "")))
        elif event.get("method") == "Log.entryAdded" and params["entry"].get("level") == "error":
            errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
    return errors


def _start(binary: str, profile: Path) -> tuple[subprocess.Popen, int]:
    """Start Chromium; it writes its DevTools port to <profile>/DevToolsActivePort once it listens."""
    log = (profile.parent / "chromium.log").open("w")
    proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"], stdout=log, stderr=log)
    port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if port_file.exists() and (lines := port_file.read_text().split()):
            return proc, int(lines[0])
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"Chromium did not start; its log: {(profile.parent / 'chromium.log').read_text()[-2000:]}")


def inspect_page(binary: str, page: Path, screenshot: Path, work: Path) -> PageCheck:
    """Load ``page`` in headless Chromium, collect errors, image states and requests, save a full-page PNG."""
    proc, port = _start(binary, work / "profile")
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:  # the initial about:blank tab appears shortly after the port opens
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=TIMEOUT) as response:
                targets = [t for t in json.load(response) if t.get("type") == "page"]
            if targets or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        ws = WebSocket(targets[0]["webSocketDebuggerUrl"], TIMEOUT)
        tools = DevTools(ws)
        for domain in ("Page", "Runtime", "Log", "Network"):
            tools.call(f"{domain}.enable")
        tools.call("Page.navigate", url=page.resolve().as_uri())
        tools.wait_for("Page.loadEventFired")
        images = tools.call("Runtime.evaluate", returnByValue=True, expression=(
            "Array.from(document.images).map(i => ({src: i.src.slice(0, 40), complete: i.complete, "
            "naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight}))"))["result"]["value"]
        size = tools.call("Page.getLayoutMetrics")["cssContentSize"]
        shot = tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 16000),
                                "scale": 1})
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        requests = [e["params"]["request"]["url"] for e in tools.events
                    if e.get("method") == "Network.requestWillBeSent"]
        ws.close()
        return PageCheck(_event_errors(tools.events), images, requests)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _keep_screenshot(path: Path, name: str) -> None:
    if folder := os.environ.get("PEFTLAB_SCREENSHOT_DIR"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(folder) / name)


def test_report_renders_in_headless_chromium(tmp_path):
    binary = find_chromium()
    root = write_synthetic_results(tmp_path / "results")
    _, page = write_report(root)
    screenshot = tmp_path / "report.png"
    check = inspect_page(binary, page, screenshot, tmp_path)
    assert check.errors == []
    assert len(check.images) == page.read_text().count("<img ") == 10
    assert check.broken_images() == []
    assert all(i["naturalWidth"] > 100 and i["naturalHeight"] > 100 for i in check.images)
    assert check.requests and all(url.startswith(("file:", "data:")) for url in check.requests), check.requests
    assert screenshot.read_bytes().startswith(b"\x89PNG") and screenshot.stat().st_size > 10_000
    _keep_screenshot(screenshot, "report.png")


def test_the_browser_check_catches_a_broken_page(tmp_path):
    """A console.error, an uncaught exception, a missing image and an external request are all reported."""
    binary = find_chromium()
    broken = tmp_path / "broken.html"
    broken.write_text('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>broken</title>'
                      '<link rel="stylesheet" href="http://127.0.0.1:9/missing.css"></head><body>'
                      '<img src="missing.png" alt="missing"><script>console.error("deliberate error");</script>'
                      '<script>throw new Error("deliberate exception");</script></body></html>')
    check = inspect_page(binary, broken, tmp_path / "broken.png", tmp_path)
    text = "\n".join(check.errors)
    assert "deliberate error" in text and "deliberate exception" in text and "missing.png" in text, text
    assert [i["src"] for i in check.broken_images()] == [(tmp_path / "missing.png").as_uri()[:40]]
    assert any(url.startswith("http://127.0.0.1:9/") for url in check.requests)
    _keep_screenshot(tmp_path / "broken.png", "broken.png")
