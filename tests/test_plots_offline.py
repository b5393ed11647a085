"""`dvc plots show` with the offline template: the charts render in a real browser
that cannot reach the network.

The browser test renders the repository's own `plots:` section over small generated
files with DVC, configured as `make setup` configures a clone, and loads the page in
headless Chromium with every host name unresolvable.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from helpers import CHROMIUM, REPO, needs_chromium
from stages.common import StageError
from tools.plots_template import page, vega_bundle

CONFUSION = [(a, a if a % 4 else (a + 3) % 10) for a in range(10)] * 3  # (actual, predicted)


def dvc(*args: str, cwd: Path) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def plots_repo(root: Path) -> Path:
    """A DVC project with the repository's `plots:` section over small generated files."""
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    root.mkdir()
    (root / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False))
    for split in ("train", "test"):
        for metric, values in (("acc", [91.5, 97.0, 98.2, 98.9]), ("loss", [0.4, 0.1, 0.06, 0.04])):
            path = root / "metrics/train/plots/metrics" / split / f"{metric}.tsv"
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = "".join(f"{i}\t{v}\n" for i, v in enumerate(values))
            path.write_text(f"step\t{metric}\n{rows}")
    (root / "plots").mkdir()
    (root / "plots/confusion.csv").write_text(
        "actual,predicted\n" + "".join(f"{a},{p}\n" for a, p in CONFUSION))
    Image.new("RGB", (40, 20), "white").save(root / "plots/errors.png")
    return root


def browser_dom(page_path: Path, profile: Path) -> str:
    """The page's DOM after its scripts ran in headless Chromium, with no network."""
    command = [CHROMIUM, "--headless", "--disable-gpu", f"--user-data-dir={profile}",
               "--host-resolver-rules=MAP * ~NOTFOUND",  # nothing online resolves
               "--virtual-time-budget=10000", "--dump-dom", page_path.as_uri()]
    if os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium's sandbox refuses to run as root
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def charts(dom: str) -> dict[str, str]:
    """Each vega-embed container's DOM, by its id."""
    starts = list(re.finditer(r'<div id="([^"]+)" class="vega-embed[^"]*"', dom))
    ends = [m.start() for m in starts[1:]] + [len(dom)]
    return {m.group(1): dom[m.start():end] for m, end in zip(starts, ends)}


@pytest.mark.slow
@needs_chromium
def test_dvc_plots_render_offline_in_a_browser(tmp_path):
    repo = plots_repo(tmp_path / "repo")
    dvc("init", "--no-scm", "-q", cwd=repo)
    (repo / ".dvc/plots_offline.html").write_text(page(vega_bundle()))
    dvc("config", "--local", "plots.html_template", "plots_offline.html", cwd=repo)  # as setup
    dvc("plots", "show", "-o", "out", cwd=repo)

    html = (repo / "out/index.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc\s*=\s*[\"']?(https?:)?//", html)
    found = charts(browser_dom(repo / "out/index.html", tmp_path / "profile"))
    assert set(found) == {"Accuracy____", "Loss", "Confusion_matrix"}
    for name, chart in found.items():
        assert re.search(r'<svg[^>]*class="marks"', chart), f"{name}: not rendered"
    for name in ("Accuracy____", "Loss"):  # a line per split, through its points
        lines = re.findall(r'aria-roledescription="line mark" d="M[^"]*L', found[name])
        assert len(lines) >= 2, name
    cells = set(re.findall(r'aria-label="actual: (\d); predicted: (\d); xy_count: 3"',
                           found["Confusion_matrix"]))
    assert cells == {(str(a), str(p)) for a, p in CONFUSION}


def test_template_inlines_the_bundle_and_keeps_dvcs_placeholder():
    html = page("window.vegaEmbed = function () {};")
    assert html.count("{plot_divs}") == 1 and "{scripts}" not in html  # no CDN tags
    head = html[:html.index("</head>")]
    assert "<script>\nwindow.vegaEmbed = function () {};\n</script>" in head


@pytest.mark.parametrize("bundle", ["x = '</script>';", "x = '{plot_divs}';", "x = '{scripts}';"])
def test_bundle_that_would_break_the_page_is_refused(bundle):
    with pytest.raises(StageError, match="cannot be inlined"):
        page(bundle)
