"""A screenshot of the page (docs/serve.png): the server started on MODEL, and an MNIST
test digit drawn on the pad stroke by stroke, with pointer events, in headless Chromium.

    python -m scripts.page_screenshot [--model models/model.pt] [--index 0] [--out docs/serve.png]

The helpers below drive the page the way tests/test_serve.py does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from stages.common import StageError, run_cli
from stages.synthetic import Stroke, pen_strokes

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                "google-chrome"))), None)
# a fresh profile, nothing fetched in the background (the page must work offline), and
# frames as fast as they come: each mouse move waits for the next frame
CHROMIUM_ARGS = ["--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-gpu-vsync", "--disable-frame-rate-limit"]
REPO = Path(__file__).resolve().parents[1]


@contextmanager
def serving(*args: str, log: Path | None = None) -> Iterator[str]:
    """`python -m stages.serve --port 0 ARGS` running; yields the address it printed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log or os.devnull, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "stages.serve", "--port", "0", *args],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            line = proc.stdout.readline()
            if not line.startswith("serving the page at "):
                proc.wait(timeout=30)
                raise StageError(f"the server did not start: {line.strip() or 'no output'} "
                                 f"(exit {proc.returncode})")
            yield line.split()[4]
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@contextmanager
def browser_page(url: str) -> Iterator:
    """A Playwright page of headless Chromium at URL, the page loaded and ready."""
    from playwright.sync_api import sync_playwright

    if CHROMIUM is None:
        raise StageError("needs Chromium (apt-get install chromium)")
    args = CHROMIUM_ARGS + (["--no-sandbox"] if os.geteuid() == 0 else [])
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page(viewport={"width": 800, "height": 640})
            page.goto(url)
            wait_ready(page)
            yield page
        finally:
            browser.close()


def wait_ready(page) -> None:
    """Until the answer shown is the one for what was last drawn or sent."""
    page.wait_for_selector("body[data-state=ready]", state="attached", timeout=30_000)


def draw(page, strokes: list[Stroke], scale: float) -> None:
    """STROKES, in digit pixels, drawn on the pad with the mouse (pointer events) at
    SCALE pad pixels to a digit pixel; then wait for the answer."""
    box = page.locator("#pad").bounding_box()
    to_page = box["width"] / page.eval_on_selector("#pad", "pad => pad.width")
    mouse = page.mouse
    for stroke in strokes:
        points = [(box["x"] + x * scale * to_page, box["y"] + y * scale * to_page)
                  for x, y in stroke]
        mouse.move(*points[0])
        mouse.down()
        for point in points[1:]:
            mouse.move(*point)
        mouse.up()
    wait_ready(page)


def answer(page) -> dict:
    """What the page shows: the digit, the probability, the flag, or the message."""
    return page.evaluate("""() => ({
        digit: document.getElementById('answer').hidden ? null
               : Number(document.getElementById('digit').textContent),
        probability: Number(document.getElementById('probability').textContent),
        flagged: !document.getElementById('flag').hidden,
        bars: [...document.querySelectorAll('#bars .bar')].map(b => Number(b.dataset.p)),
        message: document.getElementById('message').hidden ? null
                 : document.getElementById('message').textContent})""")


def main() -> None:
    from stages.data import load_split

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/model.pt")
    parser.add_argument("--ood", default="models/ood.json")
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--index", type=int, default=0, help="which test digit to draw")
    parser.add_argument("--out", type=Path, default=Path("docs/serve.png"))
    args = parser.parse_args()
    images, labels = load_split(args.data / "test.pt")
    digit = images[args.index].numpy()
    with serving("--model", args.model, "--ood", args.ood) as url, browser_page(url) as page:
        scale = page.eval_on_selector("#pad", "pad => pad.width") / digit.shape[1]
        draw(page, pen_strokes(digit), scale)
        shown = answer(page)
        page.locator("main").screenshot(path=str(args.out))
    print(f"test digit {args.index} (a {int(labels[args.index])}) drawn: the page says "
          f"{shown['digit']} (p={shown['probability']:.4f}); wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
