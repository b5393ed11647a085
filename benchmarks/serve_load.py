"""The page's server under load: uploads held open, requests all at once, a slow client.

Run from the repository root after `dvc repro` (it needs models/model.pt and
models/ood.json; `--ood none` serves without the digit check):

    python -m benchmarks.serve_load [--model models/model.pt] [--ood models/ood.json]
                                    [--deadline SECONDS] [--repo PATH]

It starts `python -m stages.serve --port 0` (in --repo, default this checkout; with
--deadline if given, else the server's own deadline) and, over raw sockets to
127.0.0.1 only:
1. HOLDERS clients each send a 5 MB upload one byte short and keep the connection
   open: the server process's memory (VmRSS in /proc) idle and at its peak, and how
   many of them were answered at once;
2. AT_ONCE clients connect and post a digit at the same moment: how many got each
   status, and how many were reset or timed out; and the listen backlog (`ss`);
3. one client sends a header line every TRICKLE seconds: when the server cut it, or
   that it had not after --trickle-for seconds.
It prints the numbers; it asserts nothing.
"""

from __future__ import annotations

import argparse
import http.client
import io
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from PIL import Image, ImageDraw

from stages.common import StageError, run_cli

REPO = Path(__file__).resolve().parents[1]
HOLDERS = 60
AT_ONCE = 80
UPLOAD = 5 * 1024 * 1024  # bytes: the server's MAX_BODY
TRICKLE = 5.0  # seconds between the slow client's header lines


def rss_mb(pid: int) -> float:
    """The resident memory of process PID, in MB, as /proc says."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def upload_head(length: int) -> bytes:
    """The head of a POST /predict of a PNG of LENGTH bytes."""
    return (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def digit_png() -> bytes:
    """A hand-drawn-looking 7, dark on white, 140×140."""
    image = Image.new("L", (140, 140), 255)
    ImageDraw.Draw(image).line([(35, 30), (105, 30), (60, 115)], fill=0, width=12)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def status_of(sock: socket.socket) -> int:
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.read()
    return response.status


def hold_uploads(port: int, pid: int) -> None:
    socks = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(HOLDERS)]
    idle = rss_mb(pid)

    def hold(sock: socket.socket) -> None:
        try:
            sock.sendall(upload_head(UPLOAD) + bytes(UPLOAD - 1))
        except OSError:
            pass

    senders = [threading.Thread(target=hold, args=(s,), daemon=True) for s in socks]
    for sender in senders:
        sender.start()
    peak = idle
    for sender in senders:
        sender.join(timeout=60)
        peak = max(peak, rss_mb(pid))
    for _ in range(30):
        time.sleep(0.1)
        peak = max(peak, rss_mb(pid))
    answered, _, _ = select.select(socks, [], [], 5)
    statuses = [status_of(s) for s in answered]
    for sock in socks:
        sock.close()
    print(f"{HOLDERS} uploads of 5 MB held one byte short: server memory idle {idle:.0f} MB, "
          f"peak {peak:.0f} MB (+{peak - idle:.0f} MB); answered at once: {len(answered)} "
          f"({', '.join(f'{statuses.count(s)}× {s}' for s in sorted(set(statuses)))})")


def all_at_once(port: int) -> None:
    body = digit_png()
    start = threading.Barrier(AT_ONCE)
    outcomes: list[int | str] = []

    def client() -> None:
        start.wait(timeout=30)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                sock.sendall(upload_head(len(body)) + body)
                outcomes.append(status_of(sock))
        except OSError as err:
            outcomes.append(type(err).__name__)

    clients = [threading.Thread(target=client, daemon=True) for _ in range(AT_ONCE)]
    began = time.perf_counter()
    for c in clients:
        c.start()
    for c in clients:
        c.join(timeout=120)
    took = time.perf_counter() - began
    listing = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                             text=True).stdout.split()
    counts = ", ".join(f"{outcomes.count(o)}× {o}" for o in sorted(set(outcomes), key=str))
    print(f"{AT_ONCE} requests at once: {counts} in {took:.1f} s; "
          f"listen backlog {listing[2] if listing else '?'}")


def trickle(port: int, give_up: float) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(upload_head(1000)[:-2])
        began = time.monotonic()
        while time.monotonic() - began < give_up:
            ready, _, _ = select.select([sock], [], [], TRICKLE)
            try:
                if ready and not sock.recv(4096):
                    break
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
        else:
            print(f"a client sending a header line every {TRICKLE:g} s: not cut after "
                  f"{give_up:g} s")
            return
    print(f"a client sending a header line every {TRICKLE:g} s: cut after "
          f"{time.monotonic() - began:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/model.pt")
    parser.add_argument("--ood", default="models/ood.json")
    parser.add_argument("--deadline", help="the server's --deadline (default: its own)")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose server runs")
    parser.add_argument("--trickle-for", type=float, default=150,
                        help="seconds the slow client keeps trickling at most")
    args = parser.parse_args()
    command = [sys.executable, "-m", "stages.serve", "--port", "0", "--model",
               str(Path(args.model).resolve()), "--ood",
               args.ood if args.ood == "none" else str(Path(args.ood).resolve())]
    command += ["--deadline", args.deadline] if args.deadline else []
    proc = subprocess.Popen(command, cwd=args.repo, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith("serving the page at "):
            raise StageError(f"the server did not start: {line.strip() or 'no output'}")
        port = int(line.split()[4].rstrip("/").rsplit(":", 1)[1])
        status_of_digit = None
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(upload_head(len(digit_png())) + digit_png())
            status_of_digit = status_of(sock)
        print(f"server {args.repo}: a digit answered {status_of_digit}")
        hold_uploads(port, proc.pid)
        time.sleep(1)
        all_at_once(port)
        trickle(port, args.trickle_for)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    run_cli(main)
