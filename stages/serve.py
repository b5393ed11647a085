"""Serve: a local page to draw a digit, or drop an image, and see what the model thinks.

Reads:  MODEL (models/model.pt) and its digit check (models/ood.json), once, at start;
        the page's files (stages/page/).
Serves: GET / the page; POST /predict an image file's bytes, answered with JSON: the
        digit, the ten probabilities, whether it looks like a digit, and the 28×28
        digit the model saw; or {"error": ...} with a 4xx status.
Params: none.

    python -m stages.serve [--host 127.0.0.1] [--port 8000] [--model ...] [--ood ...]

A thin shell over stages.predict: each body goes through read_digit, predict_digits
and prediction, the functions the command line uses, so the page and
`python -m stages.predict` give the same answer and the same errors for the same file.
It listens on loopback unless --host says otherwise (docs/use.md says what that means).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import socket
import threading
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from stages.common import StageError, run_cli
from stages.predict import (Predictor, load_predictor, model_arguments, prediction,
                            predict_digits, read_digit)

MAX_BODY = 5 * 1024 * 1024  # bytes: the largest image file accepted
DECIMAL = re.compile(r"[0-9]+")  # ASCII digits only: int() also takes "-1", "+5", "5_0"
DRAIN_LIMIT = 64 * 1024 * 1024  # a larger body is not read at all: the connection closes
PAGE = Path(__file__).with_name("page")
ASSETS = {"/": ("index.html", "text/html; charset=utf-8"),
          "/page.js": ("page.js", "text/javascript; charset=utf-8"),
          "/page.css": ("page.css", "text/css; charset=utf-8")}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def answer(body: bytes, predictor: Predictor) -> tuple[int, dict]:
    """The HTTP status and the JSON answer for one image file's bytes."""
    try:
        digit = read_digit(body)
    except StageError as err:
        return HTTPStatus.BAD_REQUEST, {"error": str(err)}
    probabilities, looks = predict_digits(predictor, torch.from_numpy(digit)[None])
    result = asdict(prediction("", probabilities[0], looks[0]))
    del result["path"]
    return HTTPStatus.OK, {**result, "probabilities": [round(p, 6) for p in probabilities[0].tolist()],
                           "seen": digit.flatten().tolist()}


class BadLength(Exception):
    """A Content-Length that the server refuses: its HTTP status, its one-line message,
    and how many bytes of the body to read and drop after the answer."""

    def __init__(self, status: int, message: str, drain: int = 0):
        super().__init__(message)
        self.status, self.drain = status, drain


def content_length(values: list[str] | None) -> int:
    """The body's length from the request's Content-Length headers: exactly one, a plain
    decimal (no sign, no hex, no underscores) of at most MAX_BODY bytes; else BadLength."""
    if not values:
        raise BadLength(HTTPStatus.LENGTH_REQUIRED,
                        "send the image file as the body, with its Content-Length")
    if len(values) > 1:
        raise BadLength(HTTPStatus.BAD_REQUEST,
                        f"{len(values)} Content-Length headers: send exactly one")
    value = values[0].strip(" \t")
    if not DECIMAL.fullmatch(value):
        raise BadLength(HTTPStatus.BAD_REQUEST, f"Content-Length {value[:40]!r} is not a "
                                                "number of bytes: send plain digits")
    digits = value.lstrip("0") or "0"
    length = int(digits) if len(digits) <= 18 else None  # None: beyond any real file
    if length is not None and length <= MAX_BODY:
        return length
    size = f"{length:,}" if length is not None else f"a {len(digits)}-digit number of"
    raise BadLength(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"file too large: {size} bytes, over the limit of {MAX_BODY:,} bytes "
                    "(5 MB)", drain=length if length and length <= DRAIN_LIMIT else 0)


class Handler(BaseHTTPRequestHandler):
    server: PageServer
    server_version = "mnist-cnn"
    timeout = 60  # seconds a client may take to send its request

    def send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, doc: dict) -> None:
        self.send(status, json.dumps(doc).encode(), "application/json")

    def drain(self, left: int) -> None:
        """Read and drop LEFT bytes of a refused body, so that the client, still sending,
        hears the answer rather than a reset connection."""
        while left > 0:
            chunk = self.rfile.read(min(1 << 20, left))
            if not chunk:
                break
            left -= len(chunk)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        asset = ASSETS.get(self.path.split("?", 1)[0])
        if asset is None:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"nothing at {self.path}"})
            return
        name, content_type = asset
        self.send(HTTPStatus.OK, (PAGE / name).read_bytes(), content_type)

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/predict":
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"nothing to post to at {self.path}"})
            return
        try:
            length = content_length(self.headers.get_all("Content-Length"))
        except BadLength as err:  # answered before a byte of the body is read
            self.close_connection = True
            self.send_json(err.status, {"error": str(err)})
            self.drain(err.drain)
            return
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            self.send_json(HTTPStatus.BAD_REQUEST, {"error": "the body ended early"})
            return
        with self.server.lock:  # one image at a time: memory stays that of one image
            status, doc = answer(body, self.server.predictor)
        self.send_json(status, doc)


class PageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, predictor: Predictor):
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.predictor = predictor
        self.lock = threading.Lock()
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    model_arguments(parser)
    args = parser.parse_args()
    predictor = load_predictor(args.model, args.ood)  # a bad checkpoint stops us here
    try:
        server = PageServer(args.host, args.port, predictor)
    except OSError as err:
        raise StageError(f"cannot listen on {args.host} port {args.port} "
                         f"({err.strerror or err}); pick another --port or --host") from None
    print(f"serving the page at {server.url} (Ctrl-C stops it)")
    if not is_loopback(args.host):
        print(f"warning: listening on {args.host}, not only this machine: anyone who can "
              "reach it can use the page (docs/use.md)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()


if __name__ == "__main__":
    run_cli(main)
