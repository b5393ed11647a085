"""stages.download: fetch, verify and write the four files, all or none; no internet."""

from __future__ import annotations

import functools
import gzip
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from torchvision.datasets import MNIST

from helpers import assert_one_line_error, md5, run_stage
from stages import download
from stages.common import StageError

NAMES = list(download.FILES)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file in FOLDER with its bytes and mtime."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def closed_port() -> int:
    """A local port nobody listens on, so connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def out(tmp_path) -> Path:
    """Where download writes; its parent starts empty so leftovers are easy to see."""
    return tmp_path / "out" / "raw"


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_mirror(mirror, monkeypatch):
    """The mirror folder served over HTTP on a free local port; yields the URL prefix."""
    monkeypatch.setenv("no_proxy", "*")
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(QuietHandler, directory=str(mirror.path)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


# --- good paths ---------------------------------------------------------------

def test_download_writes_the_four_decompressed_files(mirror, out):
    download.download(out, [str(mirror.path)])
    assert sorted(p.name for p in out.iterdir()) == sorted(NAMES)  # no .gz left behind
    for name in NAMES:
        assert (out / name).read_bytes() == mirror.content[name]
    assert [p.name for p in out.parent.iterdir()] == ["raw"]  # no temp folder beside it


def test_download_over_http(http_mirror, mirror, out):
    download.download(out, [http_mirror])
    for name in NAMES:
        assert (out / name).read_bytes() == mirror.content[name]


def test_http_404_names_the_missing_url(http_mirror, mirror, out):
    mirror.gz("t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(StageError) as err:
        download.download(out, [http_mirror])
    msg = str(err.value)
    assert msg.startswith("t10k-labels-idx1-ubyte.gz: ")
    assert f"{http_mirror}t10k-labels-idx1-ubyte.gz does not exist (HTTP 404)" in msg
    assert not out.exists()


def test_download_replaces_an_old_out_dir(mirror, out):
    out.mkdir(parents=True)
    (out / "stale").write_text("from an older run")
    download.download(out, [str(mirror.path)])
    assert sorted(p.name for p in out.iterdir()) == sorted(NAMES)


def test_falls_back_to_the_next_source(mirror, out, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    download.download(out, [str(empty), str(mirror.path)])
    for name in NAMES:
        assert (out / name).read_bytes() == mirror.content[name]


# --- damaged or missing files ---------------------------------------------------

def one_byte_changed(mirror, name):
    data = bytearray(mirror.content[name])
    data[-1] ^= 0xFF
    mirror.replace(name, gzip.compress(bytes(data)))
    return f"md5 of the decompressed file is {md5(bytes(data))}, expected " \
           f"{download.FILES[name]}, so it is corrupt or not the original"


def truncated_gzip(mirror, name):
    gz = mirror.gz(name).read_bytes()
    mirror.replace(name, gz[: len(gz) // 2])
    return "truncated or corrupt gzip"


def bad_crc(mirror, name):
    gz = bytearray(mirror.gz(name).read_bytes())
    gz[-8] ^= 0xFF  # the gzip trailer: CRC32, then the size
    mirror.replace(name, bytes(gz))
    return "truncated or corrupt gzip"


def not_gzip(mirror, name):
    mirror.replace(name, mirror.content[name])  # the decompressed bytes, named .gz
    return "truncated or corrupt gzip"


def missing(mirror, name):
    mirror.gz(name).unlink()
    return f"{mirror.gz(name)} does not exist"


@pytest.mark.parametrize("damage, name", [
    (one_byte_changed, "train-labels-idx1-ubyte"),
    (one_byte_changed, "t10k-images-idx3-ubyte"),
    (truncated_gzip, "train-images-idx3-ubyte"),
    (bad_crc, "t10k-labels-idx1-ubyte"),
    (not_gzip, "train-labels-idx1-ubyte"),
    (missing, "t10k-images-idx3-ubyte"),
], ids=lambda v: getattr(v, "__name__", v))
def test_bad_file_fails_naming_it_and_writes_nothing(mirror, out, damage, name):
    problem = damage(mirror, name)
    with pytest.raises(StageError) as err:
        download.download(out, [str(mirror.path)])
    msg = str(err.value)
    assert msg.startswith(f"{name}.gz: {mirror.path}")
    assert problem in msg
    assert msg.endswith(download.FIX)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no staging folder or .gz left beside it


def test_failed_download_leaves_an_existing_good_out_dir_untouched(mirror, out):
    download.download(out, [str(mirror.path)])
    before = snapshot(out)
    truncated_gzip(mirror, "t10k-labels-idx1-ubyte")  # the last file: the others succeed
    with pytest.raises(StageError, match=r"^t10k-labels-idx1-ubyte\.gz: "):
        download.download(out, [str(mirror.path)])
    assert snapshot(out) == before
    assert [p.name for p in out.parent.iterdir()] == ["raw"]


def test_no_mirror_and_no_network_fails_fast(out, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/"
    with pytest.raises(StageError) as err:
        download.download(out, [url])
    msg = str(err.value)
    assert msg.startswith(f"train-images-idx3-ubyte.gz: {url}train-images-idx3-ubyte.gz: ")
    assert "refused" in msg.lower()
    assert msg.endswith(download.FIX)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_every_source_failing_lists_each_problem(out, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/"
    nowhere = tmp_path / "nowhere"
    with pytest.raises(StageError) as err:
        download.download(out, [str(nowhere), url])
    msg = str(err.value)
    assert f"{nowhere / 'train-images-idx3-ubyte.gz'} does not exist; {url}" in msg


# --- sources_from_env -----------------------------------------------------------

@pytest.mark.parametrize("value", ["https://example.org/mnist/", "file:///srv/mnist"])
def test_sources_from_env_url_prefix(value):
    assert download.sources_from_env({"MNIST_MIRROR": value}) == [value]


def test_sources_from_env_folder(tmp_path):
    assert download.sources_from_env({"MNIST_MIRROR": str(tmp_path)}) == [str(tmp_path)]
    assert download.sources_from_env({"MNIST_MIRROR": f"  {tmp_path}\n"}) == [str(tmp_path)]


@pytest.mark.parametrize("environ", [{}, {"MNIST_MIRROR": ""}, {"MNIST_MIRROR": "  "}])
def test_sources_from_env_unset_uses_torchvision_mirrors(environ):
    sources = download.sources_from_env(environ)
    assert sources == list(MNIST.mirrors)
    assert sources and all(s.startswith(("http://", "https://")) for s in sources)


@pytest.mark.parametrize("kind", ["file", "nonexistent"])
def test_sources_from_env_rejects_a_non_folder(tmp_path, kind):
    path = tmp_path / "mnist.tar"
    if kind == "file":
        path.write_bytes(b"not a folder")
    with pytest.raises(StageError) as err:
        download.sources_from_env({"MNIST_MIRROR": str(path)})
    assert str(err.value) == f"MNIST_MIRROR={path} is not a folder or a URL; {download.FIX}"


# --- as a command ---------------------------------------------------------------

def test_command_fails_with_one_error_line(tmp_path):
    """python -m stages.download: exit 1, one 'error:' line, no traceback, nothing written.

    (The md5 table cannot be patched in a subprocess, so only a failure that does not
    depend on it is run this way; the MNIST_MIRROR checks are tested in-process above.)
    """
    mirror_dir = tmp_path / "mirror"
    mirror_dir.mkdir()  # exists, but holds none of the files
    proc = run_stage("stages.download", "data/raw", cwd=tmp_path,
                     env={"MNIST_MIRROR": str(mirror_dir)})
    line = assert_one_line_error(proc)
    assert line == (f"error: train-images-idx3-ubyte.gz: "
                    f"{mirror_dir / 'train-images-idx3-ubyte.gz'} does not exist; {download.FIX}")
    assert list(tmp_path.glob("data/*")) == []  # no out dir, no staging folder
