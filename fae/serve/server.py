"""The HTTP side of `fae serve`: the standard library's ThreadingHTTPServer, one small page (page.html, package data)
and a JSON API. Handlers only read and queue; the one worker in fae.serve.jobs samples.

    GET  /                               the page
    GET  /api/config                     what the page offers (condition kind, class names, samplers, limits)
    POST /api/jobs                       a request (JSON) -> 202 {"id", ...}, or 400 {"error": one line}
    GET  /api/jobs/<id>                  its state: queued (with "ahead") | running (done/total) | done | error
    GET  /api/jobs/<id>/grid.png         the labelled grid
    GET  /api/jobs/<id>/images/<i>.png   image i, as `fae sample` names it in images/
    GET  /api/jobs/<id>/settings.json    the settings, with the `fae sample` command that writes the same images
"""
from __future__ import annotations

import ipaddress
import json
import re
import socket
import sys
import traceback
from functools import cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from fae.config import ConfigError
from fae.serve.jobs import Job, SampleService

MAX_BODY = 64 * 1024     # a request is a few numbers and a prompt
JOB_FILE = re.compile(r"^/api/jobs/([0-9a-f]{12})(?:/(grid\.png|settings\.json|images/(\d{6})\.png))?$")


@cache
def page() -> bytes:
    return resources.files("fae.serve").joinpath("page.html").read_bytes()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServeHandler(BaseHTTPRequestHandler):
    server: SampleServer
    server_version = "fae-serve"

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    # ------------------------------------------------------------------------------------------------ replies
    def _send(self, status: int, body: bytes, content_type: str, filename: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if filename:
            self.send_header("Content-Disposition", f'inline; filename="{filename}"')
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _guarded(self, route: Any) -> None:
        """Every failure is one line of JSON for the page, never a traceback; the server keeps serving."""
        try:
            if not self._host_allowed():
                self._error(HTTPStatus.FORBIDDEN, "unexpected Host header (fae serve answers its own address only)")
                return
            route()
        except ConfigError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error ({type(exc).__name__}); the server log "
                        "has the details")

    def _host_allowed(self) -> bool:
        """On a loopback address, only requests addressed to it by name or number (a web page that rebinds its own
        domain name to 127.0.0.1 sends its own Host, and is refused)."""
        if not is_loopback(str(self.server.server_address[0])):
            return True
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        return is_loopback(host)

    # ------------------------------------------------------------------------------------------------ routes
    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_POST(self) -> None:
        self._guarded(self._post)

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, page(), "text/html; charset=utf-8")
            return
        if path == "/api/config":
            self._json(HTTPStatus.OK, self.server.service.config())
            return
        match = JOB_FILE.match(path)
        job = self.server.service.job(match.group(1)) if match else None
        if job is None:
            self._error(HTTPStatus.NOT_FOUND, f"no such page or job: {path} (finished jobs are kept for a while only)")
            return
        self._job_file(job, match.group(2), match.group(3))  # type: ignore[union-attr]  # job is None without a match

    def _job_file(self, job: Job, name: str | None, index: str | None) -> None:
        if name is None:
            self._json(HTTPStatus.OK, self.server.service.describe(job))
        elif job.status != "done":
            self._error(HTTPStatus.CONFLICT, f"job {job.id} is {job.status}")
        elif name == "grid.png":
            self._send(HTTPStatus.OK, job.grid or b"", "image/png", "grid.png")
        elif name == "settings.json":
            self._send(HTTPStatus.OK, json.dumps(job.settings, indent=2).encode(), "application/json", "settings.json")
        elif index is not None and int(index) < len(job.images):
            self._send(HTTPStatus.OK, job.images[int(index)], "image/png", f"{index}.png")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"job {job.id} has {len(job.images)} images")

    def _post(self) -> None:
        if self.path.split("?", 1)[0] != "/api/jobs":
            self._error(HTTPStatus.NOT_FOUND, f"nothing to post to at {self.path}")
            return
        # JSON only: a cross-site form cannot send it without the browser asking first (CORS), and it is not allowed
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the request as application/json")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the request is larger than {MAX_BODY} bytes")
            return
        try:
            payload = json.loads(self.rfile.read(length) or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise ConfigError("the request is not valid JSON") from None
        job = self.server.service.submit(payload)
        self._json(HTTPStatus.ACCEPTED, self.server.service.describe(job))


class SampleServer(ThreadingHTTPServer):
    """Threads answer requests (the page polls while a job runs); the service's single worker samples."""

    daemon_threads = True

    def __init__(self, service: SampleService, host: str = "127.0.0.1", port: int = 0, verbose: bool = False) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), ServeHandler)
        self.service, self.verbose = service, verbose

    @property
    def url(self) -> str:
        host, port = str(self.server_address[0]), self.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"
