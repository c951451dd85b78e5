"""A loopback static server for a `facemark web` folder with the cross-origin isolation headers that
WebAssembly threads need (docs/WEB.md), plus the headless Chromium runs of the tests and the bench.

POST /report stores the JSON body (index.html?report=/report sends its result there): the bench reads its
timings that way, because Chromium's --virtual-time-budget (which --dump-dom needs to wait for the page) also
virtualises the page's clock.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import shutil
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

from facemark.web.build import ISOLATION_HEADERS

LOOPBACK = "127.0.0.1"
REPORT_PATH = "/report"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# --virtual-time-budget: Chromium's clock runs ahead while the page is idle, and --dump-dom prints the page once
# that budget is spent or the page is done loading and idle: 120 s of virtual time covers the model's download
# and compilation, which take real time the budget does not count.
VIRTUAL_TIME_BUDGET_MS = 120_000
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu")


class _Handler(SimpleHTTPRequestHandler):
    reports: queue.Queue

    def end_headers(self) -> None:
        for name, value in ISOLATION_HEADERS.items():
            self.send_header(name, value)
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path != REPORT_PATH:
            self.send_error(404)
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            self.reports.put(json.loads(body))
        except ValueError:
            self.send_error(400)
            return
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args) -> None:  # quiet: tests and the bench print their own lines
        pass


@dataclass
class Served:
    url: str  # http://127.0.0.1:PORT/
    reports: queue.Queue = field(repr=False)


@contextmanager
def serve_folder(folder: str | os.PathLike) -> Iterator[Served]:
    """Serve `folder` on 127.0.0.1 (a free port) with the COOP/COEP headers, in a background thread."""
    reports: queue.Queue = queue.Queue()
    handler = functools.partial(type("Handler", (_Handler,), {"reports": reports}), directory=str(folder))
    server = ThreadingHTTPServer((LOOPBACK, 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="facemark-web-server", daemon=True)
    thread.start()
    try:
        yield Served(f"http://{LOOPBACK}:{server.server_address[1]}/", reports)
    finally:
        server.shutdown()
        server.server_close()


def find_chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def chromium_command(chromium: str, url: str, *extra: str) -> list[str]:
    """The documented command line: headless Chromium printing the page once its result is written."""
    return [chromium, *CHROMIUM_FLAGS, f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}", *extra, "--dump-dom", url]


def dump_dom(chromium: str, url: str, timeout_s: float = 180.0, extra: Sequence[str] = ()) -> str:
    """The page's DOM after the documented headless run."""
    done = subprocess.run(chromium_command(chromium, url, *extra), capture_output=True, text=True, timeout=timeout_s,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout


def run_until_report(chromium: str, url: str, reports: queue.Queue, timeout_s: float = 300.0) -> dict:
    """Open `url` (which POSTs to /report when done) in headless Chromium on real time; its report."""
    process = subprocess.Popen([chromium, *CHROMIUM_FLAGS, "--remote-debugging-port=0", url],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return reports.get(timeout=timeout_s)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
