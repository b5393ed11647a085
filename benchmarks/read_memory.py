"""How much memory reading one large image takes, in the command line's reader and in
the page's server.

Run from the repository root:

    python -m benchmarks.read_memory [--model models/model.pt] [--ood models/ood.json]

It writes to a temporary folder: a 300×300 PNG (a small image, for comparison), a
6000×6000 RGBA PNG with an EXIF orientation (ink on a transparent sheet), a 6000×6000
RGB PNG, a 12-megapixel phone JPEG (4000×3000, stored sideways with an EXIF
orientation) and a 7000×7000 RGBA PNG. Each of the first four is read by
stages.predict.read_digit in a fresh process with stages.predict imported; the last
is posted to `python -m stages.serve` (MODEL and its check loaded). For each it
prints the peak of the process's memory (VmHWM, Linux) over its size just before
(VmRSS). It asserts nothing.
"""

from __future__ import annotations

import argparse
import http.client
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image, ImageDraw

from benchmarks.memory import restart_peak, status
from benchmarks.photo_speed import phone_photo
from stages.common import StageError, run_cli

READ = """
import sys
from pathlib import Path
from stages.predict import read_digit
from benchmarks.memory import restart_peak, status
restart_peak()
before = status("VmRSS")
read_digit(Path(sys.argv[1]))
print((status("VmHWM") - before) // 1024)
"""


def sheet(side: int, mode: str, orientation: int | None = None) -> Image.Image:
    """A SIDE×SIDE sheet with a large 7 drawn on it, black ink; in mode RGBA the sheet
    is transparent. With ORIENTATION, the image carries it as its EXIF orientation."""
    image = Image.new(mode, (side, side), (255, 255, 255, 0) if mode == "RGBA" else "white")
    width = side // 25
    ImageDraw.Draw(image).line([(side // 4, side // 4), (3 * side // 4, side // 4),
                                (side // 2, 3 * side // 4)], fill="black", width=width)
    if orientation is not None:
        image.info["exif"] = exif_bytes(orientation)
    return image


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def read_peak(path: Path) -> int:
    """MB that read_digit(PATH) adds to the peak of a fresh process."""
    proc = subprocess.run([sys.executable, "-c", READ, str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise StageError(f"reading {path.name} failed: {proc.stderr.strip().splitlines()[-1]}")
    return int(proc.stdout)


def server_peak(path: Path, model: Path, ood: str) -> int:
    """MB that posting PATH to the page's server adds to the server's peak."""
    server = subprocess.Popen([sys.executable, "-m", "stages.serve", "--port", "0", "--model",
                               str(model), "--ood", ood], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        found = re.search(r"http://\S+", server.stdout.readline())
        if found is None:
            raise StageError("the server did not start")
        url = urlsplit(found[0])
        restart_peak(server.pid)
        before = status("VmRSS", server.pid)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
        conn.request("POST", "/predict", body=path.read_bytes())
        response = conn.getresponse()
        response.read()
        conn.close()
        if response.status != 200:
            raise StageError(f"the server answered {response.status}")
        return (status("VmHWM", server.pid) - before) // 1024
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"))
    parser.add_argument("--ood", default="models/ood.json", help="or `none`")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = {"a 300×300 PNG": folder / "small.png",
                 "a 6000×6000 RGBA PNG with an EXIF orientation": folder / "rgba.png",
                 "a 6000×6000 RGB PNG": folder / "rgb.png",
                 "a 12-megapixel phone JPEG (4000×3000, EXIF orientation 6)": folder / "phone.jpg"}
        sheet(300, "L").save(files["a 300×300 PNG"])
        rgba = sheet(6000, "RGBA", orientation=6)
        rgba.save(files["a 6000×6000 RGBA PNG with an EXIF orientation"], exif=rgba.info["exif"])
        sheet(6000, "RGB").save(files["a 6000×6000 RGB PNG"])
        phone_photo(files["a 12-megapixel phone JPEG (4000×3000, EXIF orientation 6)"], 4000)
        for name, path in files.items():
            print(f"read_digit, {name} ({path.stat().st_size / 1e3:,.0f} kB): "
                  f"peak memory {read_peak(path)} MB over the loaded process")
        posted = folder / "posted.png"
        sheet(7000, "RGBA").save(posted)
        print(f"stages.serve, a 7000×7000 RGBA PNG posted ({posted.stat().st_size / 1e3:,.0f} "
              f"kB): peak memory {server_peak(posted, args.model, args.ood)} MB over the "
              "server before the request")


if __name__ == "__main__":
    run_cli(main)
