"""A package index on 127.0.0.1 that serves this machine's local wheels of some projects and sends every
other project to an upstream index (an HTTP redirect), for a `docker build --network host` that must not
download gigabytes the disk already holds.

The local wheels are the ones the host's own pip is configured to find offline: its find-links dirs and
its file:// indexes (`pip config list`). A project with local wheels is served from them alone: pip,
given two indexes with the same version, may pick either, so the local copy must be the only one.

    index = WheelIndex(re.compile(r"^(torch|nvidia-.*)$"))
    with index.serving() as url:
        docker build --network host --build-arg TORCH_INDEX_URL=<url> ...

From a shell, for torch and its CUDA wheels (until Ctrl-C):  python tests/wheel_index.py [PORT]
"""

from __future__ import annotations

import html
import re
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from packaging.utils import canonicalize_name

UPSTREAM = "https://pypi.org/simple"
HREF = re.compile(r'href="([^"#]+\.whl)[^"]*"')


def pip_local_sources() -> tuple[list[Path], list[Path]]:
    """(find-links dirs, file:// index roots) from the host pip's configuration."""
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                          check=False, timeout=60)
    links: list[Path] = []
    indexes: list[Path] = []
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        for item in value.strip("'\"").split():
            path = Path(urllib.parse.urlparse(item).path) if item.startswith("file:") else Path(item)
            if key.endswith("find-links") and path.is_dir():
                links.append(path)
            elif key.endswith("index-url") and item.startswith("file:") and path.is_dir():
                indexes.append(path)
    return links, indexes


def local_wheels(wanted: re.Pattern) -> dict[str, dict[str, Path]]:
    """project -> {wheel file name: path} for the projects whose canonical name `wanted` matches."""
    found: dict[str, dict[str, Path]] = {}
    links, indexes = pip_local_sources()
    for folder in links:
        for wheel in folder.glob("*.whl"):
            project = canonicalize_name(wheel.name.split("-")[0])
            if wanted.match(project):
                found.setdefault(project, {})[wheel.name] = wheel
    for root in indexes:
        for page in root.glob("*/index.html"):
            project = canonicalize_name(page.parent.name)
            if not wanted.match(project):
                continue
            for href in HREF.findall(page.read_text(errors="replace")):
                wheel = (page.parent / urllib.parse.unquote(href)).resolve()
                if wheel.is_file():
                    found.setdefault(project, {})[wheel.name] = wheel
    return found


class WheelIndex:
    """The index, served from a thread of this process (`serving()`)."""

    def __init__(self, wanted: re.Pattern, upstream: str = UPSTREAM, port: int = 0):
        self.projects = local_wheels(wanted)
        self.files = {name: path for wheels in self.projects.values() for name, path in wheels.items()}
        self.served: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler(upstream))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/simple/"

    @contextmanager
    def serving(self) -> Iterator[str]:
        """The index's URL while the block runs."""
        self._thread.start()
        try:
            yield self.url
        finally:
            self._server.shutdown()
            self._server.server_close()

    def _handler(self, upstream: str):
        index = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
                parts = [p for p in path.split("/") if p]
                if len(parts) == 2 and parts[0] == "simple":
                    self._project_page(canonicalize_name(parts[1]))
                elif len(parts) == 2 and parts[0] == "files" and parts[1] in index.files:
                    self._wheel(index.files[parts[1]])
                else:
                    self.send_error(404)

            def _project_page(self, project: str):
                if project not in index.projects:
                    self.send_response(302)
                    self.send_header("Location", f"{upstream}/{project}/")
                    self.end_headers()
                    return
                links = "".join(f'<a href="../../files/{html.escape(name)}">{html.escape(name)}</a>\n'
                                for name in sorted(index.projects[project]))
                body = f"<!DOCTYPE html><html><body>\n{links}</body></html>\n".encode()
                self._send(body, "text/html")

            def _wheel(self, path: Path):
                index.served.append(path.name)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(path.stat().st_size))
                self.end_headers()
                with path.open("rb") as fh:
                    while chunk := fh.read(1 << 20):
                        self.wfile.write(chunk)

            def _send(self, body: bytes, kind: str):
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        return Handler


if __name__ == "__main__":
    from test_docker import BASE_IMAGE_PACKAGES

    index = WheelIndex(BASE_IMAGE_PACKAGES, port=int(sys.argv[1]) if len(sys.argv) > 1 else 8000)
    with index.serving() as url:
        wheels = sum(map(len, index.projects.values()))
        print(f"{url}: {wheels} local wheels of {len(index.projects)} projects; the rest from {UPSTREAM}",
              flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
