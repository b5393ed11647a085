"""A page template for `dvc plots show` and `dvc plots diff` that works offline.

DVC's own page loads Vega, Vega-Lite and vega-embed from a CDN. This one holds them
inline, in one script bundled by vl-convert (the package's pinned versions), and
leaves out DVC's `{scripts}` placeholder, where the CDN tags would go. DVC puts the
plots at `{plot_divs}`. `make setup` writes it and points this clone's DVC at it
(docs/use.md):

    python -m tools.plots_template .dvc/plots_offline.html
    dvc config --local plots.html_template plots_offline.html   # relative to .dvc/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import vl_convert

from stages.common import StageError, run_cli, write_text

# DVC fills these by plain text replacement, over the whole page, the bundle included
PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")
HEAD = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots</title>
<style>table { border-spacing: 15px; }</style>
<script>
"""
TAIL = """
</script>
</head>
<body>
{plot_divs}
</body>
</html>
"""


def page(bundle: str) -> str:
    """The template around BUNDLE, a script that defines window.vegaEmbed."""
    clashes = [p for p in (*PLACEHOLDERS, "</script") if p in bundle]
    if clashes:
        raise StageError(f"the Vega bundle contains {', '.join(clashes)}; it cannot be "
                         "inlined in DVC's page template")
    return HEAD + bundle + TAIL


def vega_bundle() -> str:
    """Vega, Vega-Lite and vega-embed as one script, offline (vl-convert ships them)."""
    return vl_convert.javascript_bundle("window.vegaEmbed = vegaEmbed;")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where to write the template")
    args = parser.parse_args()
    write_text(args.out, page(vega_bundle()))
    print(f"wrote {args.out}: Vega, Vega-Lite and vega-embed inline "
          f"(vl-convert {vl_convert.__version__})")


if __name__ == "__main__":
    run_cli(main)
