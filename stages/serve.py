"""Serve: a local page to draw a digit, or drop an image, and see what the model thinks.

Reads:  MODEL (models/model.pt) and its digit check (models/ood.json), once, at start;
        the page's files (stages/page/).
Serves: GET / the page; POST /predict an image file's bytes, answered with JSON: the
        digit, the ten probabilities, whether it looks like a digit, and the 28×28
        digit the model saw; or {"error": ...} with a 4xx status, or 503 when busy.
Params: none.

    python -m stages.serve [--host 127.0.0.1] [--port 8000] [--model ...] [--ood ...]
                           [--deadline 60]

A thin shell over stages.predict: each body goes through read_digit, predict_digits
and prediction, the functions the command line uses, so the page and
`python -m stages.predict` give the same answer and the same errors for the same file.
uvicorn serves it, with h11's parser; this module adds the page's limits: at most
MAX_BODIES bodies held at once (503 with Retry-After beyond), a whole-request deadline,
the Content-Length rules, and one request per connection. It listens on loopback
unless --host says otherwise (docs/use.md says what that means).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import re
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from functools import partial
from http import HTTPStatus
from pathlib import Path

import torch
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from stages.common import StageError, run_cli
from stages.predict import (Predictor, load_predictor, model_arguments, prediction,
                            predict_digits, read_digit)

MAX_BODY = 5 * 1024 * 1024  # bytes: the largest image file accepted
DECIMAL = re.compile(r"[0-9]+")  # ASCII digits only: int() also takes "-1", "+5", "5_0"
DRAIN_LIMIT = 64 * 1024 * 1024  # a larger body is not read at all: the connection closes
MAX_BODIES = 4  # request bodies held at once (received, or waiting for the model)
RETRY_AFTER = 1  # seconds, in the 503 beyond MAX_BODIES
DEADLINE = 60.0  # seconds a client has to send its whole request: headers and body
BACKLOG = 2048  # connections the kernel queues before the server accepts them
MAX_HEAD = 16 * 1024  # bytes: the longest request line and headers (h11's default)
HEAD_END = re.compile(rb"\r?\n\r?\n")
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
LOG_CONFIG = {  # uvicorn's warnings and one access line per request, all on stderr
    "version": 1, "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain",
                            "stream": "ext://sys.stderr"}},
    "loggers": {"uvicorn.error": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
                "uvicorn.access": {"handlers": ["stderr"], "level": "INFO", "propagate": False}},
}
log = logging.getLogger("uvicorn.error")


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
    if not values:  # a body may follow all the same (chunked): read and drop it, as
        # closing with it unread would reset the connection and may lose the answer
        raise BadLength(HTTPStatus.LENGTH_REQUIRED,
                        "send the image file as the body, with its Content-Length",
                        drain=DRAIN_LIMIT)
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


def refusal(fields: list[tuple[bytes, bytes]]) -> BadLength | None:
    """The refusal of a POST /predict by its header fields (name, value), as
    content_length() rules; a Transfer-Encoding counts as no Content-Length."""
    lengths = [value.decode("latin-1") for name, value in fields
               if name.lower() == b"content-length"]
    if any(name.lower() == b"transfer-encoding" for name, _ in fields):
        lengths = []
    try:
        content_length(lengths)
    except BadLength as err:
        return err
    return None


def head_refusal(head: bytes) -> BadLength | None:
    """The refusal of a POST /predict by its raw head, the request line and headers:
    read before h11, which would merge duplicated lengths and refuse bad ones in its
    own words. The app checks h11's headers again (a target spelled otherwise)."""
    request, *lines = head.split(b"\n")
    method, _, target = request.partition(b" ")
    if method != b"POST" or target.partition(b" ")[0].partition(b"?")[0] != b"/predict":
        return None
    return refusal([tuple(line.rstrip(b"\r").split(b":", 1)) for line in lines if b":" in line])


def headers(content_type: str, length: int, *extra: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    pairs = [("Content-Type", content_type), ("Content-Length", str(length)),
             *SECURITY_HEADERS.items(), *extra, ("Connection", "close")]
    return [(name.encode(), value.encode()) for name, value in pairs]


def json_bytes(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def raw_response(status: int, doc: dict) -> bytes:
    """A whole JSON response, for answers given before h11 has parsed the request."""
    body = json_bytes(doc)
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    lines += [name + b": " + value for name, value in headers("application/json", len(body))]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def request_line(head: bytes) -> str:
    """The first line of a request's HEAD (which may end its lines in a bare LF) as one
    printable line for the log: control characters, backslashes and quotes as \\xNN, cut
    to 80 characters."""
    line = head.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
    return "".join(c if c.isprintable() and c not in '\\"' else f"\\x{ord(c):02x}"
                   for c in line)[:80]


class PageProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with the page's limits: the Content-Length rules
    applied to the raw head, a deadline for the whole request, one request per
    connection, and one log line for a client cut at the deadline or gone early."""

    def __init__(self, *args, deadline: float = DEADLINE, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = deadline
        self.head: bytearray | None = bytearray()  # until the request's head is whole
        self.drain_left = 0  # bytes of a refused body to read and drop
        self.timer: asyncio.TimerHandle | None = None
        self.cut_off = False
        self.answered = False  # from the head alone, and logged

    def connection_made(self, transport) -> None:  # noqa: ANN001 - asyncio's signature
        super().connection_made(transport)
        self.timer = self.loop.call_later(self.deadline, self.cut)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.cycle is not None and not self.cycle.response_started and not self.cut_off:
            log.warning("%s - the client left before its answer", self.who())
        super().connection_lost(exc)

    def who(self) -> str:
        return "%s:%d" % self.client if self.client else "a client"

    def cut(self) -> None:
        if self.cycle is not None and not self.cycle.more_body:
            return  # the request is in: its answer is on the way
        self.cut_off = True
        if not self.answered:  # a refused body that did not all come: already logged
            log.warning("%s - request not received within %g s: connection cut", self.who(),
                        self.deadline)
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.drain_left:  # the rest of a refused body, read and dropped
            self.drain_left -= len(data)
            if self.drain_left <= 0:
                self.transport.close()
            return
        if self.head is None:
            super().data_received(data)
            return
        self.head += data
        end = HEAD_END.search(self.head)
        if end is None and len(self.head) <= MAX_HEAD:
            return
        head, self.head = bytes(self.head), None
        refused = head_refusal(head[:end.start()]) if end else None
        if refused is None:
            super().data_received(head)
            return
        # answered from the headers, before a byte of the body is read
        self.access_logger.info('%s - "%s" %d', self.who(), request_line(head), refused.status)
        self.answered = True
        self.transport.write(raw_response(refused.status, {"error": str(refused)}))
        self.drain_left = refused.drain - (len(head) - end.end())
        if self.drain_left <= 0:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:  # h11 refused the request
        self.transport.write(raw_response(HTTPStatus.BAD_REQUEST,
                                          {"error": "not a valid HTTP request"}))
        self.transport.close()


class PageApp:
    """The ASGI app: the page's files, and POST /predict through stages.predict's
    functions, one model run at a time, with at most BODIES request bodies held."""

    def __init__(self, predictor: Predictor, bodies: int = MAX_BODIES):
        self.predictor = predictor
        self.bodies = bodies
        self.holding = 0
        self.model = ThreadPoolExecutor(1, "model")  # one image at a time

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - ASGI's signature
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if method == "POST" and path == "/predict":
            await self.predict(scope["headers"], receive, send)
        elif method == "POST":
            await self.send_json(send, HTTPStatus.NOT_FOUND,
                                 {"error": f"nothing to post to at {path}"})
        elif method in ("GET", "HEAD") and path in ASSETS:
            name, content_type = ASSETS[path]
            body = (PAGE / name).read_bytes()
            await send({"type": "http.response.start", "status": HTTPStatus.OK,
                        "headers": headers(content_type, len(body))})
            await send({"type": "http.response.body", "body": body})
        elif method in ("GET", "HEAD"):
            await self.send_json(send, HTTPStatus.NOT_FOUND, {"error": f"nothing at {path}"})
        else:
            await self.send_json(send, HTTPStatus.METHOD_NOT_ALLOWED,
                                 {"error": f"{method} is not served: GET the page, POST /predict"},
                                 ("Allow", "GET, HEAD, POST"))

    @staticmethod
    async def send_json(send, status: int, doc: dict, *extra: tuple[str, str],  # noqa: ANN001
                        more: bool = False) -> None:
        body = json_bytes(doc)
        await send({"type": "http.response.start", "status": status,
                    "headers": headers("application/json", len(body), *extra)})
        await send({"type": "http.response.body", "body": body, "more_body": more})

    async def predict(self, fields: list[tuple[bytes, bytes]], receive,  # noqa: ANN001
                      send) -> None:
        refused = refusal(fields)
        if refused is not None:
            await self.send_json(send, refused.status, {"error": str(refused)})
            return
        if self.holding >= self.bodies:  # answered at once; the body is read and dropped
            await self.send_json(send, HTTPStatus.SERVICE_UNAVAILABLE,
                                 {"error": f"busy: {self.bodies} images are being read; "
                                           f"try again in {RETRY_AFTER} s"},
                                 ("Retry-After", str(RETRY_AFTER)), more=True)
            try:
                while (await receive()).get("more_body"):
                    pass
            except asyncio.CancelledError:  # the server stops: its answer is already out
                pass
            await send({"type": "http.response.body", "body": b""})
            return
        self.holding += 1
        try:
            chunks = []
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # logged by the protocol
                chunks.append(message["body"])
                if not message.get("more_body"):
                    break
            body = b"".join(chunks)
            del chunks
            status, doc = await asyncio.get_running_loop().run_in_executor(
                self.model, answer, body, self.predictor)
        except asyncio.CancelledError:  # the server stops, and does not wait any longer
            status, doc = HTTPStatus.SERVICE_UNAVAILABLE, {"error": "the server is stopping"}
        finally:
            self.holding -= 1
        await self.send_json(send, status, doc)


class PageServer:
    """The page's app under uvicorn, listening from construction on (OSError if it
    cannot); serve_forever() serves until shutdown()."""

    def __init__(self, host: str, port: int, predictor: Predictor, bodies: int = MAX_BODIES,
                 deadline: float = DEADLINE):
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
            self.socket.listen(BACKLOG)
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()
        config = uvicorn.Config(PageApp(predictor, bodies),
                                http=partial(PageProtocol, deadline=deadline),
                                lifespan="off", backlog=BACKLOG, proxy_headers=False,
                                server_header=False, h11_max_incomplete_event_size=MAX_HEAD,
                                timeout_graceful_shutdown=5, log_config=LOG_CONFIG)
        self.server = uvicorn.Server(config)
        self.stopped = threading.Event()

    def serve_forever(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.stopped.set()

    def shutdown(self) -> None:
        self.server.should_exit = True
        self.stopped.wait()

    def server_close(self) -> None:
        self.socket.close()

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
    parser.add_argument("--deadline", type=float, default=DEADLINE,
                        help="seconds a client has to send its whole request, headers and "
                             f"body (default {DEADLINE:g})")
    model_arguments(parser)
    args = parser.parse_args()
    if not 0 <= args.port <= 65535:
        raise StageError(f"--port {args.port}: give a port from 1 to 65535, or 0 for any free "
                         "one")
    if not 0 < args.deadline < 1e6:
        raise StageError(f"--deadline {args.deadline:g}: give seconds, above 0 and "
                         "below 1,000,000")
    predictor = load_predictor(args.model, args.ood)  # a bad checkpoint stops us here
    try:
        server = PageServer(args.host, args.port, predictor, deadline=args.deadline)
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
