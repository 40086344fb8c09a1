"""Open a page in headless Chromium and report what a reader would see (tests only).

Talks Chrome DevTools Protocol over a websocket (`websocket-client`): load the page,
collect console errors and uncaught exceptions, evaluate a script, take a screenshot.
`python -m tests.browser PAGE.html OUT.png` writes a screenshot (used for the README)."""
from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0"]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Page:
    """One tab over CDP; `events` keeps every notification received."""

    def __init__(self, ws_url: str):
        import websocket
        self.ws = websocket.create_connection(ws_url, suppress_origin=True, timeout=60)
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            msg = json.loads(self.ws.recv())
            self.events.append(msg)
            if msg.get("method") == method:
                return msg

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors seen so far."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") == "error":
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif e.get("method") == "Runtime.exceptionThrown":
                out.append(p["exceptionDetails"].get("text", "exception"))
            elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"{p['entry'].get('url', '')}: {p['entry']['text']}")
        return out


def open_page(url: str, width: int = 1280, height: int = 900):
    """Context manager: (Page, cleanup) for `url` in a fresh headless Chromium."""
    import contextlib

    @contextlib.contextmanager
    def session():
        browser = chromium_path()
        if browser is None:
            raise RuntimeError("no chromium on PATH (apt-get install chromium)")
        profile = tempfile.mkdtemp(prefix="harness-chromium-")
        proc = subprocess.Popen([browser, *FLAGS, f"--user-data-dir={profile}",
                                 f"--window-size={width},{height}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port = _devtools_port(Path(profile), proc)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
                target = next(t for t in json.load(r) if t["type"] == "page")
            page = Page(target["webSocketDebuggerUrl"])
            for domain in ("Page", "Runtime", "Log"):
                page.call(f"{domain}.enable")
            page.call("Page.navigate", url=url)
            page.wait_for("Page.loadEventFired")
            yield page
            page.ws.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            shutil.rmtree(profile, ignore_errors=True)
    return session()


def _devtools_port(profile: Path, proc) -> int:
    """Chromium writes the port it chose into DevToolsActivePort in its profile folder."""
    marker = profile / "DevToolsActivePort"
    while not (marker.is_file() and marker.read_text().strip()):
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with status {proc.returncode}")
        time.sleep(0.1)
    return int(marker.read_text().splitlines()[0])


def screenshot(page: Page, path: str | os.PathLike, full_page: bool = True) -> None:
    params = {"format": "png"}
    if full_page:
        params["captureBeyondViewport"] = True
        metrics = page.call("Page.getLayoutMetrics")["cssContentSize"]
        params["clip"] = {"x": 0, "y": 0, "width": metrics["width"],
                          "height": metrics["height"], "scale": 1}
    data = page.call("Page.captureScreenshot", **params)["data"]
    Path(path).write_bytes(base64.b64decode(data))


def evaluate(page: Page, expression: str):
    result = page.call("Runtime.evaluate", expression=expression, returnByValue=True,
                       awaitPromise=True)
    if "exceptionDetails" in result:
        raise RuntimeError(result["exceptionDetails"].get("text"))
    return result["result"].get("value")


if __name__ == "__main__":
    import sys
    html, out = Path(sys.argv[1]).resolve(), sys.argv[2]
    with open_page(html.as_uri()) as page:
        screenshot(page, out, full_page="--viewport" not in sys.argv)
    print(f"wrote {out}")
