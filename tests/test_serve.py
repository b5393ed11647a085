"""The page of `python -m stages.serve`, in headless Chromium, for a model trained here on
real MNIST digits: drawn test digits get the answers that stages.predict gives, a
scribble is flagged, each bad input gets its message and a 4xx status while the server
keeps serving, and the page fetches nothing from anywhere else."""

from __future__ import annotations

import base64
import http.client
import io
import json
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.serve_load import rss_mb, upload_head
from helpers import REPO, assert_one_line_error, needs_chromium, run_stage
from scripts.page_screenshot import answer, browser_page, draw, serving
from stages.calibrate import PAGE_PEN, PAGE_SCALE, PAGE_SIDE
from stages.photos import DEGRADATIONS, photograph
from stages.predict import Prediction, load_predictor, predict_files, read_digit
from stages.serve import MAX_BODIES, MAX_BODY, PageServer
from stages.synthetic import pen_strokes

pytestmark = pytest.mark.slow
N_DIGITS = 60


@pytest.fixture(scope="module")
def url(mnist_model, mnist_check, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with serving("--model", str(mnist_model), "--ood", str(mnist_check[0]), log=log) as url:
        yield url


@pytest.fixture(scope="module")
def page(url):
    with browser_page(url) as page:
        page.requested = []
        page.on("request", lambda r: page.requested.append(r))
        yield page


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@needs_chromium
def test_the_pad_is_the_one_the_digit_check_was_measured_on(page):
    pad = page.eval_on_selector("#pad", "p => [p.width, p.height, Number(p.dataset.pen)]")
    assert pad == [PAGE_SIDE, PAGE_SIDE, PAGE_PEN]


@needs_chromium
def test_drawn_test_digits_get_the_answers_of_stages_predict(page, mnist, mnist_model,
                                                           mnist_check, tmp_path):
    """Each digit is traced from its pixels, row by row, with the mouse; the page's answer
    must be stages.predict's for the drawing (the same code), and agree with
    stages.predict on the original digit for at least 95 % of them."""
    images, labels = mnist["test"]
    picked = torch.linspace(0, len(images) - 1, N_DIGITS).long().tolist()
    (tmp_path / "drawn").mkdir()
    (tmp_path / "original").mkdir()
    shown = []
    for i in picked:
        page.click("#clear")
        draw(page, pen_strokes(images[i].numpy()), PAGE_SCALE)
        shown.append(answer(page))
        # the pad as it was sent: nothing is drawn once the answer is in
        sent = page.eval_on_selector("#pad", "p => p.toDataURL('image/png')")
        (tmp_path / "drawn" / f"{i:05d}.png").write_bytes(base64.b64decode(sent.split(",")[1]))
        Image.fromarray(images[i].numpy()).save(tmp_path / "original" / f"{i:05d}.png")
    predictor = load_predictor(mnist_model, mnist_check[0])
    from_drawings = predict_files([tmp_path / "drawn"], predictor)
    from_originals = predict_files([tmp_path / "original"], predictor)
    assert all(isinstance(r, Prediction) for r in from_drawings + from_originals)
    for on_page, cli in zip(shown, from_drawings):
        assert on_page["digit"] == cli.digit and on_page["message"] is None
        assert on_page["probability"] == pytest.approx(cli.probability, abs=1e-4)
        assert on_page["flagged"] == (cli.looks_like_digit is False)
        assert sum(on_page["bars"]) == pytest.approx(1, abs=1e-4)
        # (a batch of one and one of many differ in the last bits)
        assert max(on_page["bars"]) == pytest.approx(cli.probability, abs=2e-6)
    agree = sum(a["digit"] == b.digit for a, b in zip(shown, from_originals)) / N_DIGITS
    correct = sum(a["digit"] == int(labels[i]) for a, i in zip(shown, picked)) / N_DIGITS
    print(f"page on drawn digits: agrees with stages.predict on the originals {agree:.1%}, "
          f"correct {correct:.1%}")
    assert agree >= 0.95, f"agreement {agree:.1%}"
    flagged = sum(a["flagged"] for a in shown)
    assert flagged <= N_DIGITS // 10, f"{flagged} drawn digits flagged as not digits"


def drop(page, data: bytes, name: str) -> None:
    """Drop a file NAME holding DATA on the page's pad, as a person drags one there."""
    page.evaluate("""([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const files = new DataTransfer();
        files.items.add(new File([bytes], name));
        document.getElementById("pad").dispatchEvent(
            new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true}));
    }""", [base64.b64encode(data).decode(), name])


@needs_chromium
def test_a_dropped_photo_gets_the_answer_of_stages_predict(page, mnist, mnist_model, mnist_check,
                                                          tmp_path):
    """A photo of a test digit as a phone takes it (every degradation of stages/photos.py,
    stored sideways) dropped on the pad: the page shows what stages.predict says for
    the same file, and the 28×28 digit that predict reads from it."""
    i = 3
    data = photograph(mnist["test"][0][i].numpy() / 255, [1, i], frozenset(DEGRADATIONS))
    (tmp_path / "photo.jpg").write_bytes(data)
    page.click("#clear")
    with page.expect_response(lambda r: r.url.endswith("/predict")) as response:
        drop(page, data, "photo.jpg")
    page.wait_for_selector("body[data-state=ready]", state="attached")
    shown = answer(page)
    [cli] = predict_files([tmp_path / "photo.jpg"], load_predictor(mnist_model, mnist_check[0]))
    assert shown["message"] is None and shown["digit"] == cli.digit == int(mnist["test"][1][i])
    assert shown["probability"] == pytest.approx(cli.probability, abs=1e-4)
    assert shown["flagged"] is (cli.looks_like_digit is False) is False
    assert response.value.json()["seen"] == read_digit(data).flatten().tolist()


@needs_chromium
def test_a_scribble_is_flagged_but_still_answered(page):
    page.click("#clear")
    zigzag = [[(3 + 22 * (k % 2), 3 + 1.5 * k) for k in range(16)]]  # one stroke
    draw(page, zigzag, PAGE_SCALE)
    shown = answer(page)
    assert shown["flagged"] and shown["message"] is None
    assert shown["digit"] in range(10)  # advice: the digit is still shown


@needs_chromium
def test_a_busy_servers_503_is_sent_again_after_its_retry_after(page, url, mnist):
    """While MAX_BODIES uploads are held open, a digit dropped on the page gets 503: the
    page says that the server is busy and stays busy; once the uploads are gone, the
    same digit is sent again after Retry-After and its answer is shown."""
    port = urlsplit(url).port
    holders = [socket.create_connection(("127.0.0.1", port), timeout=30)
               for _ in range(MAX_BODIES)]
    try:
        for sock in holders:
            sock.sendall(upload_head(1000) + bytes(10))
        deadline = time.monotonic() + 10
        while post(url, digit_png(mnist))[0] != 503:  # every body held
            assert time.monotonic() < deadline, "the held uploads were not counted"
        page.click("#clear")
        drop(page, digit_png(mnist), "digit.png")
        page.wait_for_selector("#message:not([hidden])")
        assert "busy" in answer(page)["message"] and "trying again" in answer(page)["message"]
        assert page.evaluate("document.body.dataset.state") == "busy"
    finally:
        for sock in holders:
            sock.close()
    page.wait_for_selector("body[data-state=ready]", state="attached", timeout=20_000)
    shown = answer(page)
    assert shown["message"] is None and shown["digit"] == int(mnist["test"][1][1])


def bomb() -> bytes:
    side = int(50_000_000 ** 0.5) + 2  # just over the pixel limit, a few kB as a 1-bit PNG
    return png(Image.new("1", (side, side), 1))


def truncated() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (120, 120), dtype=np.uint8)
    data = png(Image.fromarray(noise))
    return data[:len(data) // 2]


BAD_FILES = {
    "not an image": (b"seven, in words\n", 400, "not an image Pillow can read"),
    "empty": (b"", 400, "empty file"),
    "truncated": (truncated(), 400, "unreadable image"),
    "decompression bomb": (bomb(), 400, "over the limit of 50,000,000 pixels"),
    "too big": (bytes(MAX_BODY + 1), 413, f"over the limit of {MAX_BODY:,} bytes (5 MB)"),
}


@needs_chromium
@pytest.mark.parametrize("name", [*BAD_FILES, "blank pad"])
def test_bad_input_gets_a_message_and_the_server_goes_on(page, mnist, name):
    page.click("#clear")
    with page.expect_response(lambda r: r.url.endswith("/predict")) as response:
        if name == "blank pad":
            page.click("#predict")
            status, message = 400, "no ink: the image is blank or nearly so"
        else:
            body, status, message = BAD_FILES[name]
            page.set_input_files("#file", files=[{"name": "upload.png", "mimeType": "image/png",
                                                  "buffer": body}])
    page.wait_for_selector("body[data-state=ready]", state="attached")
    assert response.value.status == status
    shown = answer(page)
    assert shown["digit"] is None and message in shown["message"], shown
    # and it still answers
    good = Image.fromarray(255 - mnist["test"][0][0].numpy()).resize((140, 140))
    page.set_input_files("#file", files=[{"name": "seven.png", "mimeType": "image/png",
                                          "buffer": png(good)}])
    page.wait_for_selector("body[data-state=ready]", state="attached")
    assert answer(page)["message"] is None and answer(page)["digit"] in range(10)


@needs_chromium
def test_the_page_fetches_only_from_its_server(page, url):
    origin = urlsplit(url)
    others = [r.url for r in page.requested if urlsplit(r.url).netloc != origin.netloc]
    assert page.requested and others == []
    html = (REPO / "stages/page/index.html").read_text()
    assert "http:" not in html and "https:" not in html and "//" not in html.replace("<!--", "")


# --- the server without a browser ---------------------------------------------------

def post(url: str, body: bytes, chunked: bool = False) -> tuple[int, dict]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        if chunked:
            conn.request("POST", "/predict", body=iter([body]), encode_chunked=True,
                         headers={"Transfer-Encoding": "chunked"})
        else:
            conn.request("POST", "/predict", body=body)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_the_server_answers_json_for_a_digit_and_for_each_bad_body(url, mnist):
    digit = png(Image.fromarray(mnist["test"][0][1].numpy()))
    status, doc = post(url, digit)
    assert status == 200 and doc["digit"] in range(10) and len(doc["probabilities"]) == 10
    assert len(doc["seen"]) == 28 * 28 and max(doc["seen"]) == 255
    assert isinstance(doc["looks_like_digit"], bool)
    for name, (body, expected, message) in BAD_FILES.items():
        status, doc = post(url, body)
        assert (status, message in doc.get("error", "")) == (expected, True), (name, doc)
    assert post(url, digit, chunked=True)[0] == 411  # no Content-Length
    assert post(url, digit) == (200, post(url, digit)[1])


# Content-Length headers that must be refused before a byte of the body is read: the
# headers only, and no body; and the status each must get
BAD_LENGTHS = {
    "negative": (["-1"], 400),
    "plus sign": (["+5"], 400),
    "hex": (["0x10"], 400),
    "underscore": (["1_0"], 400),
    "not a number": (["five"], 400),
    "empty": ([""], 400),
    "duplicated": (["5", "7"], 400),
    "duplicated alike": (["5", "5"], 400),
    "one over the limit": ([str(MAX_BODY + 1)], 413),
    "huge": (["9" * 30], 413),
    "more digits than int() takes": (["9" * 5000], 413),
}


@pytest.fixture(scope="module")
def bare_server():
    """The page's server in this process, with no model: the answers above come before
    any prediction, and GET / shows it still serves."""
    server = PageServer("127.0.0.1", 0, predictor=None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def headers_only_post(port: int, lengths: list[str]) -> tuple[int, dict]:
    """POST /predict with these Content-Length headers, over a raw socket, sending no
    body: a server that waits for one times out here."""
    headers = "".join(f"Content-Length: {value}\r\n" for value in lengths)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


@pytest.mark.parametrize("name", BAD_LENGTHS)
def test_a_bad_content_length_is_refused_before_the_body_and_the_server_goes_on(
        bare_server, name):
    lengths, expected = BAD_LENGTHS[name]
    port = bare_server.server_address[1]
    status, doc = headers_only_post(port, lengths)
    assert status == expected and "\n" not in doc["error"], doc
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/")
    assert conn.getresponse().status == 200
    conn.close()


def test_a_body_sent_after_its_missing_length_was_refused_is_read_and_dropped(bare_server):
    """A chunked POST has no Content-Length: it is answered 411 from its head. The body
    the client goes on sending is read and dropped, and the server closes its end when
    the client does; a server that closed at once would reset the connection, and a
    client still sending could lose the answer."""
    port = bare_server.server_address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 411
        assert "with its Content-Length" in json.loads(response.read())["error"]
        time.sleep(0.2)  # the server has done what it does after its answer
        for part in (b"5\r\nhello\r\n", b"0\r\n\r\n"):
            sock.sendall(part)
            time.sleep(0.1)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""


def test_a_missing_checkpoint_stops_the_server_before_it_listens(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_stage("stages.serve", "--model", str(tmp_path / "none.pt"), "--port", str(port),
                     cwd=tmp_path, timeout=60)
    line = assert_one_line_error(proc)
    assert "none.pt: checkpoint not found" in line and proc.stdout == ""


def test_a_port_in_use_is_one_line(mnist_model, mnist_check, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run_stage("stages.serve", "--model", str(mnist_model), "--ood",
                         str(mnist_check[0]), "--port", str(port), cwd=tmp_path, timeout=60)
    line = assert_one_line_error(proc)
    assert f"cannot listen on 127.0.0.1 port {port}" in line


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_a_port_out_of_range_is_one_line(tmp_path, port):
    proc = run_stage("stages.serve", "--model", str(tmp_path / "none.pt"), "--port", port,
                     cwd=tmp_path, timeout=60)
    assert assert_one_line_error(proc).startswith(f"error: --port {port}: give a port from 1")


def test_the_server_listens_on_loopback_unless_told(mnist_model, mnist_check):
    with serving("--model", str(mnist_model), "--ood", str(mnist_check[0])) as url:
        assert urlsplit(url).hostname == "127.0.0.1"
    proc = subprocess.run([sys.executable, "-m", "stages.serve", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert "default 127.0.0.1" in proc.stdout


# --- the server under load: raw sockets on loopback, bounded in count and time -------

@contextmanager
def served(mnist_model, mnist_check, log: Path, *args: str) -> Iterator[subprocess.Popen]:
    """`python -m stages.serve --port 0 ARGS` in its own process (its stderr in LOG);
    yields the process, with its port as .port."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "stages.serve", "--port", "0", "--model",
                                 str(mnist_model), "--ood", str(mnist_check[0]), *args],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            line = proc.stdout.readline()
            assert line.startswith("serving the page at "), (line, log.read_text())
            proc.port = urlsplit(line.split()[4]).port
            yield proc
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def read_answer(sock: socket.socket) -> tuple[int, dict, dict]:
    """The status, the headers and the JSON of the response waiting on SOCK."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, dict(response.getheaders()), json.loads(response.read())


def digit_png(mnist) -> bytes:
    return png(Image.fromarray(mnist["test"][0][1].numpy()))


N_HOLDERS = 60


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads memory from /proc")
def test_uploads_held_open_cost_at_most_max_bodies_bodies(mnist_model, mnist_check, mnist,
                                                          tmp_path):
    """60 clients each send a 5 MB upload one byte short and hold it: the server holds
    at most MAX_BODIES of them (memory stays within 100 MB of idle) and answers the
    others at once with 503 and Retry-After, then still answers a digit."""
    with served(mnist_model, mnist_check, tmp_path / "server.log") as proc:
        assert post(f"http://127.0.0.1:{proc.port}/", digit_png(mnist))[0] == 200
        idle = rss_mb(proc.pid)
        socks = [socket.create_connection(("127.0.0.1", proc.port), timeout=30)
                 for _ in range(N_HOLDERS)]
        body = bytes(MAX_BODY - 1)

        def hold(sock: socket.socket) -> None:
            try:
                sock.sendall(upload_head(MAX_BODY) + body)
            except OSError:
                pass  # a cut connection: what the server answered is checked below

        senders = [threading.Thread(target=hold, args=(s,), daemon=True) for s in socks]
        for sender in senders:
            sender.start()
        peak = idle
        for sender in senders:
            sender.join(timeout=60)
            peak = max(peak, rss_mb(proc.pid))
        for _ in range(20):  # what the server has still to read from the sockets
            time.sleep(0.1)
            peak = max(peak, rss_mb(proc.pid))
        answered, _, _ = select.select(socks, [], [], 5)
        print(f"server memory: idle {idle:.0f} MB, peak {peak:.0f} MB with {N_HOLDERS} "
              f"uploads held; {len(answered)} answered at once")
        assert peak - idle <= 100, f"{peak - idle:.0f} MB above idle"
        assert len(answered) >= N_HOLDERS - MAX_BODIES
        for sock in answered:
            status, headers, doc = read_answer(sock)
            assert status == 503 and int(headers["Retry-After"]) >= 1 and "busy" in doc["error"]
        for sock in socks:
            sock.close()
        assert post(f"http://127.0.0.1:{proc.port}/", digit_png(mnist))[0] == 200


def listen_backlog(port: int) -> int | None:
    """The listening socket's backlog (ss's Send-Q column), or None without ss."""
    try:
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                             text=True, timeout=10).stdout
    except FileNotFoundError:
        return None
    return int(out.split()[2])


N_AT_ONCE = 80


def test_80_simultaneous_requests_are_each_answered_200_or_503(mnist_model, mnist_check, mnist,
                                                               tmp_path):
    """80 clients connect and post a digit at the same moment: none is reset, and each
    gets its answer or a 503 to retry; the kernel queues them (backlog >= 128)."""
    with served(mnist_model, mnist_check, tmp_path / "server.log") as proc:
        request = upload_head(len(digit_png(mnist))) + digit_png(mnist)
        start = threading.Barrier(N_AT_ONCE)
        outcomes = []

        def client() -> None:
            start.wait(timeout=30)
            try:
                with socket.create_connection(("127.0.0.1", proc.port), timeout=30) as sock:
                    sock.sendall(request)
                    outcomes.append(read_answer(sock)[0])
            except OSError as err:
                outcomes.append(type(err).__name__)

        clients = [threading.Thread(target=client, daemon=True) for _ in range(N_AT_ONCE)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(timeout=90)
        counts = {o: outcomes.count(o) for o in set(outcomes)}
        backlog = listen_backlog(proc.port)
        print(f"{N_AT_ONCE} requests at once: {counts}; listen backlog {backlog}")
        assert backlog is None or backlog >= 128, f"listen backlog {backlog}"
        assert len(outcomes) == N_AT_ONCE and set(outcomes) <= {200, 503}, counts
        assert counts.get(200, 0) >= 1


@pytest.fixture
def quick_server():
    """The page's server in this process, with no model and a 2-second deadline."""
    server = PageServer("127.0.0.1", 0, predictor=None, deadline=2)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("part", ["headers", "body"])
def test_a_trickling_client_is_cut_at_the_deadline(quick_server, part):
    """A client that sends one header line (or one body byte) every 0.3 s keeps each
    read short: the connection is cut at the whole-request deadline all the same."""
    port = quick_server.server_address[1]
    trickle = [b"X-Slow: %d\r\n" % i for i in range(40)] if part == "headers" else \
        [b"\x00"] * 40
    began = time.monotonic()  # before the server's clock starts, at its accept
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(upload_head(1000)[:-2] if part == "headers" else upload_head(1000))
        cut = None
        for piece in trickle:  # 12 s at most
            ready, _, _ = select.select([sock], [], [], 0.3)
            if ready:
                try:
                    data = sock.recv(4096)
                except ConnectionResetError:
                    data = b""
                if not data:
                    cut = time.monotonic() - began
                    break
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                cut = time.monotonic() - began
                break
    assert cut is not None and 1.9 < cut < 10, f"cut after {cut} s (deadline 2 s)"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/")
    assert conn.getresponse().status == 200


def test_refused_heads_are_logged_as_one_line_each(mnist_model, mnist_check, tmp_path):
    """A head ending its lines in a bare LF is logged as its first line alone, control
    characters escaped; a refused body that never comes is not logged again when the
    deadline cuts its connection."""
    log = tmp_path / "server.log"
    with served(mnist_model, mnist_check, log, "--deadline", "3") as proc:
        for head in (b"POST /predict?\x1b[2J HTTP/1.1\nHost: x\nContent-Length: -1\n\n",
                     upload_head(MAX_BODY + 1)):  # 413, and the body is never sent
            with socket.create_connection(("127.0.0.1", proc.port), timeout=5) as sock:
                sock.sendall(head)
                assert read_answer(sock)[0] in (400, 413)
                try:  # closed after the answer, or cut at the deadline
                    assert sock.recv(1) == b""
                except ConnectionResetError:
                    pass
    lines = log.read_text().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith('"POST /predict?\\x1b[2J HTTP/1.1" 400'), lines
    assert lines[1].endswith('"POST /predict HTTP/1.1" 413'), lines


def test_uploads_under_way_when_the_server_stops_are_answered_503(mnist_model, mnist_check,
                                                                   mnist, tmp_path):
    """Ctrl-C while bodies are still coming in, as many as are held and one more (the
    busy one): after the grace period each gets its 503, and the log has no traceback."""
    log = tmp_path / "server.log"
    body = digit_png(mnist)
    with served(mnist_model, mnist_check, log) as proc:
        held = []
        for _ in range(MAX_BODIES):
            sock = socket.create_connection(("127.0.0.1", proc.port), timeout=30)
            sock.sendall(upload_head(len(body))[:-2] + b"Expect: 100-continue\r\n\r\n")
            interim = b""
            while not interim.endswith(b"\r\n\r\n"):  # the app waits for the body
                interim += sock.recv(1)
            assert interim.startswith(b"HTTP/1.1 100 "), interim
            sock.sendall(body[:3])
            held.append(sock)
        with socket.create_connection(("127.0.0.1", proc.port), timeout=30) as busy:
            busy.sendall(upload_head(len(body)) + body[:3])
            assert read_answer(busy)[0] == 503
            proc.send_signal(signal.SIGINT)
            answers = [read_answer(sock)[::2] for sock in held]
        for sock in held:
            sock.close()
        assert proc.wait(timeout=30) == 0
    assert answers == [(503, {"error": "the server is stopping"})] * MAX_BODIES
    text = log.read_text()
    assert "Traceback" not in text and "CancelledError" not in text, text


N_LEAVERS = 10


def test_a_client_that_leaves_early_is_one_log_line(mnist_model, mnist_check, mnist, tmp_path):
    """Clients that post a digit and leave without the answer (closing, or resetting
    the connection): at most one log line each, no traceback, and the server goes on."""
    log = tmp_path / "server.log"
    with served(mnist_model, mnist_check, log) as proc:
        request = upload_head(len(digit_png(mnist))) + digit_png(mnist)
        for i in range(N_LEAVERS):
            sock = socket.create_connection(("127.0.0.1", proc.port), timeout=5)
            if i % 2:  # a reset rather than a close
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(request)
            sock.close()
        time.sleep(1)  # the server meets the closed connections
        assert post(f"http://127.0.0.1:{proc.port}/", digit_png(mnist))[0] == 200
        text = log.read_text()
    assert "Traceback" not in text and "Error" not in text, text[:2000]
    lines = [line for line in text.splitlines() if "POST /predict" not in line or " 200" not in line]
    assert len(lines) <= N_LEAVERS, "\n".join(lines)
