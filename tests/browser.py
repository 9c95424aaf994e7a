"""A real headless Chromium driven over the DevTools protocol (loopback only, no browser download).

Debian's `chromium` package; every network feature that would reach out is switched off.
"""
import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time

import websocket

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--disable-default-apps", "--disable-extensions", "--no-default-browser-check",
          "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]


class Page(object):
    """One tab: navigate, evaluate, screenshot; console errors, exceptions and CSP reports kept."""

    def __init__(self, ws_url):
        self._ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self._id = 0
        self.problems = []
        for domain in ("Page", "Runtime", "Log"):
            self.send(domain + ".enable")

    def send(self, method, **params):
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        return self._wait(lambda m: m.get("id") == self._id)

    def _wait(self, match, timeout_s=30):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = json.loads(self._ws.recv())
            self._note(message)
            if match(message):
                if "error" in message:
                    raise RuntimeError("DevTools: %s" % message["error"])
                return message
        raise TimeoutError("no DevTools answer in %ss" % timeout_s)

    def _note(self, message):
        method = message.get("method")
        params = message.get("params", {})
        if method == "Runtime.exceptionThrown":
            self.problems.append("exception: %s" % params.get("exceptionDetails", {}).get("text"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.problems.append("console: %s" % [a.get("value") for a in params.get("args", [])])
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            self.problems.append("log: %s" % params["entry"].get("text"))

    def navigate(self, url, headers=None):
        """Load url and wait for its load event; returns milliseconds from start to load end."""
        if headers:
            self.send("Network.enable")
            self.send("Network.setExtraHTTPHeaders", headers=headers)
        self.send("Page.navigate", url=url)
        self._wait(lambda m: m.get("method") == "Page.loadEventFired", 60)
        return self.evaluate("(function(){var n=performance.getEntriesByType('navigation')[0];"
                             "return n ? n.loadEventEnd : -1;})()")

    def evaluate(self, expression):
        answer = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        result = answer["result"]
        if "exceptionDetails" in result:
            raise RuntimeError("page-side error: %s" % result["exceptionDetails"].get("text"))
        return result["result"].get("value")

    def screenshot(self, path, width=1400, height=900):
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        data = self.send("Page.captureScreenshot", format="png")["result"]["data"]
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(data))
        return path

    def settle(self, seconds=0.3):
        """Read the events that arrive meanwhile (late console errors, CSP reports)."""
        deadline = time.monotonic() + seconds
        self._ws.settimeout(0.05)
        try:
            while time.monotonic() < deadline:
                try:
                    self._note(json.loads(self._ws.recv()))
                except websocket.WebSocketTimeoutException:
                    pass
        finally:
            self._ws.settimeout(30)

    def close(self):
        self._ws.close()


class Browser(object):
    def __init__(self):
        if not CHROMIUM:
            raise RuntimeError("chromium is not installed (scripts/install-deps)")
        self._profile = tempfile.mkdtemp(prefix="hc-chromium-")
        self._proc = subprocess.Popen([CHROMIUM] + _FLAGS + ["--user-data-dir=" + self._profile, "about:blank"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, universal_newlines=True)
        self.ws_url = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.ws_url is None:
            line = self._proc.stderr.readline()
            if not line and self._proc.poll() is not None:
                break
            found = re.search(r"DevTools listening on (ws://127\.0\.0\.1:\d+/\S+)", line)
            if found:
                self.ws_url = found.group(1)
        if self.ws_url is None:
            self.close()
            raise RuntimeError("chromium did not start")
        self.port = int(re.search(r":(\d+)/", self.ws_url).group(1))

    def new_page(self):
        browser = websocket.create_connection(self.ws_url, timeout=30, suppress_origin=True)
        try:
            browser.send(json.dumps({"id": 1, "method": "Target.createTarget", "params": {"url": "about:blank"}}))
            while True:
                message = json.loads(browser.recv())
                if message.get("id") == 1:
                    break
        finally:
            browser.close()
        target = message["result"]["targetId"]
        return Page("ws://127.0.0.1:%d/devtools/page/%s" % (self.port, target))

    def close(self):
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)


def artifact_path(name):
    """Where a test keeps what it saw (build/test-artifacts, or HC_SCREENSHOT_DIR)."""
    folder = os.environ.get("HC_SCREENSHOT_DIR") or os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "build", "test-artifacts")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)
