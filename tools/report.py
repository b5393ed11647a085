"""A Markdown report of what a change did to the model: HEAD's committed run against BASE's.

    python -m tools.report --base REV [--head REV] [--out report.md]   # make report BASE=REV

Reads only what each commit holds, through git and DVC's own commands: `dvc params diff`
and `dvc metrics diff`, DVCLive's per-epoch history, plots/confusion.csv (one row per test
image), and `dvc status` in a checkout of HEAD. It needs no training, no data and no DVC
remote. Writes OUT and its figures in a folder beside it (report.md, report/*.png). A
revision that lacks an output gets one line saying so, and the rest is still written.
A change in test accuracy is set against the seed-to-seed spread that metrics/seeds.json
measured. SIGTERM or SIGINT (a cancelled CI job) removes the temporary checkout and the
half-written figures before the process dies of the signal.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import statistics
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd
import yaml

from experiments.seeds import study_recipe
from stages.common import StageError, atomic_dir, run_cli, write_text
from stages.figures import plt, save_png
from stages.history import metric_path, read_metric
from stages.plot import CURVES
from tools.docs import DASH, LIVE_DIR, git_text, is_shallow

CONFUSION = "plots/confusion.csv"  # evaluate's: actual, predicted, one row per test image
SEEDS = "metrics/seeds.json"  # experiments.seeds': each seed's final test accuracy
# the metrics that are test accuracy at the final epoch, as `dvc metrics diff` names them
TEST_ACCURACY = (("metrics/eval.json", "accuracy"), ("metrics/train/metrics.json", "test.acc"))
DIGITS = range(10)
PRECISION = 5    # decimals, as `dvc metrics diff` rounds
FOLDED = 12      # a file with more changed values than this is folded in <details>
STYLES = {"base": "--", "head": "-"}
SPLITS = {"train": "C0", "test": "C1"}  # the curves compared, and their colours


@dataclass(frozen=True)
class Revision:
    """One side of the comparison: its role, the name it was given, its commit."""

    role: str     # "base" or "head"
    name: str     # as given: HEAD, origin/main, HEAD^{/^step-4:}
    commit: str
    subject: str

    @property
    def label(self) -> str:
        return f"{self.role} {self.commit[:7]}"


def resolve(root: Path, role: str, name: str) -> Revision:
    """NAME's commit in ROOT; a name git does not know is a one-line error."""
    commit = git_text(root, "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}")
    if commit is None:
        hint = ("; this shallow clone lacks history: `git fetch --unshallow`"
                if is_shallow(root) else "")
        raise StageError(f"{role} revision {name!r} is not a commit in this repository{hint}")
    commit = commit.strip()
    return Revision(role, name, commit, git_text(root, "log", "-1", "--format=%s", commit).strip())


def read_at(root: Path, rev: Revision, paths: list[str]) -> tuple[dict[str, str], list[str]]:
    """The text of each of PATHS as REV committed it, and the paths it lacks."""
    found = {path: git_text(root, "show", f"{rev.commit}:{path}") for path in paths}
    return ({path: text for path, text in found.items() if text is not None},
            [path for path, text in found.items() if text is None])


def has_file(root: Path, rev: Revision, path: str) -> bool:
    """Whether REV's commit holds PATH."""
    return git_text(root, "cat-file", "-e", f"{rev.commit}:{path}") is not None


def missing_line(rev: Revision, paths: list[str], consequence: str) -> str:
    return f"{rev.label} has no {', '.join(f'`{p}`' for p in paths)}: {consequence}."


def dvc_json(root: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    """`dvc ARGS --json` in ROOT, parsed; DVC's error as one line."""
    try:
        done = subprocess.run(["dvc", *args, "--json"], cwd=root, env=env,
                              capture_output=True, text=True)
    except FileNotFoundError:
        raise StageError("dvc is not on PATH: activate the virtualenv, or run `make "
                         "report`") from None
    if done.returncode != 0:
        error = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise StageError(f"`dvc {' '.join(args)}` failed: {error.removeprefix('ERROR: ')}")
    return json.loads(done.stdout or "{}")


# --- params and metrics: DVC's diffs as tables ------------------------------------

def cell(value) -> str:
    """One value as `dvc metrics diff` shows it: floats to PRECISION decimals."""
    if value is None:
        return DASH
    if isinstance(value, float):
        value = round(value, PRECISION)
    return str(value).replace("|", "\\|")


def diff_markdown(root: Path, diff: dict, base: Revision, head: Revision, what: str
                  ) -> list[str]:
    """`dvc params diff --json` or `dvc metrics diff --json` (path → key → old, new, diff)
    as one table per file, and one line per file that a revision's commit lacks (a file
    whose changed keys are all new is there all the same)."""
    if not diff:
        return [f"No {what} changed."]
    lines, notes = [], []
    for path, values in sorted(diff.items(), key=lambda item: (len(item[1]) > FOLDED, item[0])):
        for rev in (base, head):
            if not has_file(root, rev, path):
                notes.append(missing_line(rev, [path], f"its {what} show as {DASH}"))
        rows = [f"| {what[:-1]} | {base.label} | {head.label} | change |", "|---|---|---|---|"]
        rows += [f"| `{key}` | {cell(v.get('old'))} | {cell(v.get('new'))} | "
                 f"{cell(v.get('diff'))} |" for key, v in sorted(values.items())]
        table = "\n".join(rows)
        if len(values) > FOLDED:
            table = (f"<details><summary><code>{path}</code>: {len(values)} changed {what}"
                     f"</summary>\n\n{table}\n\n</details>")
        else:
            table = f"`{path}`:\n\n{table}"
        lines.append(table)
    return notes + lines


# --- test accuracy against the seed-to-seed spread: metrics/seeds.json -------------

def seed_spread(text: str) -> tuple[float, int]:
    """The standard deviation (n − 1) of the seeds' final test accuracy in seeds.json's
    TEXT, and how many seeds."""
    try:
        finals = [float(seed["final"]) for seed in json.loads(text)["seeds"].values()]
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise StageError(f"{SEEDS} is unreadable ({type(err).__name__}: {err})") from None
    if len(finals) < 2:
        raise StageError(f"{SEEDS} holds {len(finals)} seed, too few for a spread")
    return statistics.stdev(finals), len(finals)


def foreign_recipe(rev: Revision, texts: dict[str, str]) -> list[str]:
    """How the recipe that REV's seeds.json measured differs from REV's own params.yaml
    (experiments.seeds.study_recipe), from TEXTS, the two files as REV holds them; empty
    when it is REV's recipe, or when either file cannot be read as such (seed_spread()
    reports an unreadable seeds.json)."""
    try:
        return study_recipe(texts[SEEDS], texts.get("params.yaml", ""), rev.label)
    except StageError:
        return []


def minus(text: str) -> str:
    return text.replace("-", "−")


def against_spread(change: float, sd: float) -> str:
    """CHANGE (points of test accuracy) in seed-to-seed SDs: "−0.01, within one
    seed-to-seed SD (0.03)", "+0.12, 4.0 seed-to-seed SDs (0.03)"."""
    words = minus(f"{change:+.2f}")
    if abs(change) <= sd:
        return f"{words}, within one seed-to-seed SD ({sd:.2f})"
    return f"{words}, {abs(change) / sd:.1f} seed-to-seed SDs ({sd:.2f})"


def test_accuracy_changes(diff: dict) -> dict[float, list[str]]:
    """The changes in test accuracy that `dvc metrics diff --json` shows, rounded to the
    accuracy's 0.01 (one test image), each with the metrics that changed by it."""
    changes: dict[float, list[str]] = {}
    for path, key in TEST_ACCURACY:
        change = (diff.get(path) or {}).get(key, {}).get("diff")
        if isinstance(change, (int, float)):
            changes.setdefault(round(change, 2), []).append(f"`{path}` `{key}`")
    return changes


def noise_markdown(root: Path, base: Revision, head: Revision, diff: dict) -> list[str]:
    """A line per change in test accuracy, set against the spread of the final test
    accuracy over the seeds of metrics/seeds.json at HEAD, else at BASE."""
    changes = test_accuracy_changes(diff)
    if not changes:
        return []
    studies = [(rev, texts) for rev in (head, base)
               if SEEDS in (texts := read_at(root, rev, [SEEDS, "params.yaml"])[0])]
    if not studies:
        return [f"Test accuracy ({', '.join(keys)}), head − base: {minus(f'{change:+.2f}')}; "
                f"the seed-to-seed spread is unknown: neither revision has `{SEEDS}` "
                "(`make seeds` measures it)." for change, keys in changes.items()]
    # a revision's own recipe first: a commit can carry the seed study of another one
    others = {rev.role: foreign_recipe(rev, texts) for rev, texts in studies}
    rev, texts = next(((rev, texts) for rev, texts in studies if not others[rev.role]),
                      studies[0])
    try:
        sd, n = seed_spread(texts[SEEDS])
    except StageError as err:
        return [f"{rev.label}: {err}: the seed-to-seed spread is unknown."]
    if sd == 0:
        return [f"{rev.label}: the {n} seeds of `{SEEDS}` scored alike: the seed-to-seed "
                "spread is unknown."]
    recipe = ""
    if others[rev.role]:
        shown = others[rev.role][:3] + (["…"] if len(others[rev.role]) > 3 else [])
        recipe = (f", which measured another recipe than that revision's `params.yaml` "
                  f"({', '.join(shown)})")
    source = (f"the standard deviation of the final test accuracy over the {n} seeds of "
              f"`{SEEDS}` at {rev.label}{recipe}; a difference between two single runs "
              "spreads √2 times as much")
    return [f"Test accuracy ({', '.join(keys)}), head − base: {against_spread(change, sd)}: "
            f"{source}." for change, keys in changes.items()]


# --- the curves: DVCLive's history at each revision --------------------------------

def history_paths() -> dict[str, str]:
    """DVCLive's TSVs, by column name (`test/acc`)."""
    return {f"{split}/{metric}": metric_path(LIVE_DIR, split, metric).as_posix()
            for split in SPLITS for metric in CURVES}


def read_history(texts: dict[str, str]) -> pd.DataFrame:
    """One row per epoch, a column per TSV (`train/acc`, ...), from the TSVs' TEXTS."""
    paths = history_paths()
    return pd.concat([read_metric(paths[name], name.split("/")[1], text).rename(name)
                      for name, text in texts.items()], axis=1).sort_index()


def draw_curves(histories: dict[Revision, pd.DataFrame], path: Path) -> None:
    """Error rate (100 − accuracy) and loss per epoch, train and test, of each revision
    in one figure, on log scales that keep the last epochs' small differences apart:
    dashed for the base, solid for the head."""
    fig, axes = plt.subplots(1, len(CURVES), figsize=(9, 3.4))
    for ax, metric in zip(axes, CURVES):
        for rev, history in histories.items():
            for split, color in SPLITS.items():
                values = history[f"{split}/{metric}"]
                ax.plot(history.index, 100 - values if metric == "acc" else values,
                        STYLES[rev.role], color=color, marker="o", markersize=2.5,
                        label=f"{rev.label} {split}")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("error (%) = 100 − accuracy" if metric == "acc" else CURVES[metric][1])
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def curves_summary(histories: dict[Revision, pd.DataFrame]) -> str:
    """Final and best test accuracy of each revision, in one line."""
    parts = []
    for rev, history in histories.items():
        test = history["test/acc"].dropna()
        parts.append(f"{rev.label}: final test {test.iloc[-1]:.2f} %, best {test.max():.2f} % "
                     f"(epoch {test.idxmax()})")
    return "; ".join(parts) + "."


# --- the confusion matrix and the digits: plots/confusion.csv at each revision ------

def read_confusion(text: str) -> pd.DataFrame:
    """plots/confusion.csv: a row per test image, in the test set's order."""
    try:
        frame = pd.read_csv(io.StringIO(text))
    except (ValueError, pd.errors.ParserError) as err:
        raise StageError(f"{CONFUSION} is unreadable ({err})") from None
    if list(frame.columns) != ["actual", "predicted"]:
        raise StageError(f"{CONFUSION}: columns {list(frame.columns)}, not actual, predicted")
    return frame


def confusion_matrix(frame: pd.DataFrame) -> pd.DataFrame:
    """Test images per (actual, predicted) digit, 10 × 10."""
    return (pd.crosstab(frame["actual"], frame["predicted"])
            .reindex(index=DIGITS, columns=DIGITS, fill_value=0))


def signed(n: int) -> str:
    return "" if n == 0 else f"{n:+d}".replace("-", "−")


def change_markdown(change: pd.DataFrame) -> str:
    """The change in each confusion-matrix cell, head minus base; blank where none."""
    rows = ["| actual \\ predicted | " + " | ".join(map(str, DIGITS)) + " |",
            "|---|" + "---|" * len(DIGITS)]
    rows += [f"| **{actual}** | " + " | ".join(signed(int(n)) for n in change.loc[actual]) + " |"
             for actual in DIGITS]
    return "\n".join(rows)


def errors_only(matrix: pd.DataFrame) -> pd.DataFrame:
    """MATRIX with its diagonal (the right answers) zeroed."""
    return matrix.where(matrix.index.to_numpy()[:, None] != matrix.columns.to_numpy(), 0)


def draw_confusion(matrices: dict[Revision, pd.DataFrame], path: Path) -> None:
    """Each revision's errors per (actual, predicted) digit, and their change: red where
    the head makes more of an error, blue where fewer."""
    errors = {rev: errors_only(m) for rev, m in matrices.items()}
    base, head = errors.values()
    panels = [(f"{rev.label}: errors", m, False) for rev, m in errors.items()]
    panels.append(("errors, head − base", head - base, True))
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 4.4))
    for ax, (title, m, change) in zip(axes, panels):
        top = max(1, int(m.abs().to_numpy().max()))
        ax.imshow(m.to_numpy(), cmap="RdBu_r" if change else "Reds",
                  vmin=-top if change else 0, vmax=top)
        for (i, j), n in pd.DataFrame(m.to_numpy()).stack().items():
            if n:
                ax.text(j, i, signed(int(n)) if change else str(int(n)), ha="center",
                        va="center", fontsize=7, color="white" if abs(n) > top / 2 else "black")
        ax.set_xticks(DIGITS)
        ax.set_yticks(DIGITS)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


def changed_digits(base: pd.DataFrame, head: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The test images whose answer changed: `newly wrong` (right at the base), `newly
    right`, and `still wrong, another answer`; each with columns
    digit, base, head, indexed by the image's position in the test set."""
    if not base["actual"].equals(head["actual"]):
        raise StageError(f"{CONFUSION} holds other test images at the two revisions "
                         f"({len(base)} and {len(head)} rows)")
    frame = pd.DataFrame({"digit": base["actual"], "base": base["predicted"],
                          "head": head["predicted"]})
    base_right, head_right = frame["base"] == frame["digit"], frame["head"] == frame["digit"]
    return {"newly wrong": frame[base_right & ~head_right],
            "newly right": frame[~base_right & head_right],
            "still wrong, another answer": frame[~base_right & ~head_right & (frame["base"] != frame["head"])]}


def digits_markdown(changed: dict[str, pd.DataFrame], base: Revision, head: Revision) -> list[str]:
    parts = []
    for kind, frame in changed.items():
        if frame.empty:
            parts.append(f"**{kind.capitalize()}**: none.")
            continue
        rows = [f"| test image | digit | {base.label} says | {head.label} says |",
                "|---|---|---|---|"]
        rows += [f"| {i} | {digit} | {was} | {now} |"
                 for i, digit, was, now in frame.itertuples()]
        parts.append(f"**{kind.capitalize()}** ({len(frame)}):\n\n" + "\n".join(rows))
    return parts


# --- does the head still reproduce: `dvc status` against its dvc.lock ---------------

@contextmanager
def checkout(root: Path, rev: Revision) -> Iterator[Path]:
    """A temporary worktree of REV: its committed files, whatever ROOT's working tree
    holds. DVC's per-repository site cache goes there too, and with it."""
    with tempfile.TemporaryDirectory(prefix="report-") as tmp:
        path = Path(tmp) / "checkout"
        git = ["git", "-C", str(root), "worktree"]
        try:
            subprocess.run([*git, "add", "--detach", "--quiet", str(path), rev.commit],
                           check=True, capture_output=True)
            yield path
        finally:  # on Interrupted too (main)
            subprocess.run([*git, "remove", "--force", str(path)], capture_output=True)


def cached_outputs(pipeline: dict) -> list[str]:
    """The outputs that dvc.yaml keeps in DVC's cache (not in git)."""
    paths = []
    for stage in (pipeline.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            path, options = (out, {}) if isinstance(out, str) else next(iter(out.items()))
            if (options or {}).get("cache", True):
                paths.append(path)
    return paths


def touches(path: str, outputs: list[str]) -> bool:
    """Whether PATH is, holds or lies in one of OUTPUTS."""
    return any(path == out or path.startswith(f"{out}/") or out.startswith(f"{path}/")
               for out in outputs)


def status_changes(status: dict, cached: list[str]) -> tuple[list[str], list[str]]:
    """`dvc status --json` split in two: what the committed files show to differ from
    dvc.lock (code, params, outputs in git, the command), and the cached paths that only
    DVC's cache could check."""
    changes, unchecked = [], []
    for stage, entries in status.items():
        for entry in entries:
            if isinstance(entry, str):  # "changed command", "always changed"
                changes.append(f"`{stage}`: {entry}")
                continue
            for kind, items in entry.items():
                if not isinstance(items, dict):  # not paths and their states
                    changes.append(f"`{stage}`: {kind}")
                    continue
                for path, state in items.items():
                    if isinstance(state, dict):  # a params file: key → state
                        changes += [f"`{stage}`: param `{key}` {s}" for key, s in state.items()]
                    elif state == "not in cache" or touches(path, cached):
                        unchecked.append(path)
                    else:
                        changes.append(f"`{stage}`: {kind.removeprefix('changed ')[:-1]} "
                                       f"`{path}` {state}")
    return changes, sorted(set(unchecked))


def reproduction_markdown(root: Path, head: Revision) -> list[str]:
    """Whether HEAD's dvc.lock still describes its committed code, params and outputs."""
    texts, lacking = read_at(root, head, ["dvc.yaml", "dvc.lock"])
    if lacking:
        return [missing_line(head, lacking, "nothing to check its reproduction against")]
    try:
        with checkout(root, head) as path:
            status = dvc_json(path, "status", env={
                **os.environ, "DVC_SITE_CACHE_DIR": str(path.parent / "dvc-site")})
    except StageError as err:
        return [f"At {head.label}, {err}."]
    changes, unchecked = status_changes(status, cached_outputs(yaml.safe_load(texts["dvc.yaml"])))
    if changes:
        lines = [f"**No.** `dvc status` at {head.label} finds what its `dvc.lock` does not "
                 "record; `dvc repro` would rerun these stages:\n\n"
                 + "\n".join(f"- {change}" for change in changes)]
    else:
        lines = [f"**Yes.** `dvc status` at {head.label}: `dvc.lock` matches every stage's "
                 "committed code, params and outputs in git."]
    if unchecked:
        lines += [f"Not checked here: {', '.join(f'`{p}`' for p in unchecked)}, kept in "
                  "DVC's cache, which this checkout lacks; `dvc pull`, then `dvc status`, "
                  "checks them too."]
    return lines


# --- the report -------------------------------------------------------------------

def read_outputs(root: Path, revs: tuple[Revision, ...], paths: list[str], parse,
                 consequence: str) -> tuple[dict[Revision, object], list[str]]:
    """PARSE({path: text}) of PATHS at each of REVS, and one line for each revision that
    lacks one of them, or whose copy PARSE cannot read, saying CONSEQUENCE."""
    parsed, lines = {}, []
    for rev in revs:
        texts, lacking = read_at(root, rev, paths)
        if lacking:
            lines.append(missing_line(rev, lacking, consequence))
            continue
        try:
            parsed[rev] = parse(texts)
        except StageError as err:
            lines.append(f"{rev.label}: {err}: {consequence}.")
    return parsed, lines


def curves_section(root: Path, revs: tuple[Revision, ...], figures: Path, link: str
                   ) -> list[str]:
    paths = history_paths()
    histories, lines = read_outputs(
        root, revs, list(paths.values()),
        lambda texts: read_history({name: texts[path] for name, path in paths.items()}),
        "its curves are left out")
    if histories:
        draw_curves(histories, figures / "curves.png")
        labels = " and ".join(rev.label for rev in histories)
        lines += [f"![error rate and loss per epoch, {labels}]({link}/curves.png)",
                  curves_summary(histories)]
    return lines


def confusion_section(root: Path, revs: tuple[Revision, ...], figures: Path, link: str
                      ) -> list[str]:
    consequence = "no confusion matrix and no digits to compare"
    frames, lines = read_outputs(root, revs, [CONFUSION],
                                 lambda texts: read_confusion(texts[CONFUSION]), consequence)
    if len(frames) < len(revs):
        return lines
    base, head = revs
    try:
        changed = changed_digits(frames[base], frames[head])
    except StageError as err:
        return [f"{err}: {consequence}."]
    matrices = {rev: confusion_matrix(frame) for rev, frame in frames.items()}
    draw_confusion(matrices, figures / "confusion.png")
    errors = {rev: len(frame) - int(matrices[rev].to_numpy().trace())
              for rev, frame in frames.items()}
    return [
        f"![each revision's errors per digit, and their change]({link}/confusion.png)",
        f"Test errors: {base.label} {errors[base]}, {head.label} {errors[head]}. The change "
        "in each cell, head minus base (rows: the true digit):",
        change_markdown(matrices[head] - matrices[base]),
        "Digits whose answer changed; a test image is its position in MNIST's test set, "
        f"the row of `{CONFUSION}`:",
        *digits_markdown(changed, base, head),
    ]


def build_report(root: Path, base: Revision, head: Revision, figures: Path,
                 link: str) -> str:
    """The report's Markdown; its figures go into FIGURES, linked as LINK/NAME."""
    revs = (base, head)
    metrics = dvc_json(root, "metrics", "diff", base.commit, head.commit)
    sections = [
        f"# What {head.commit[:7]} did to the model, against {base.commit[:7]}",
        "| | revision | commit |\n|---|---|---|\n" + "\n".join(
            f"| {rev.role} | `{rev.name}` | {rev.commit[:7]} {cell(rev.subject)} |"
            for rev in revs),
        "Made by `make report` (`python -m tools.report`) from the files each commit holds "
        "and DVC's own commands: no training, no data, no DVC remote.",
        "## Params (`dvc params diff`)",
        *diff_markdown(root, dvc_json(root, "params", "diff", base.commit, head.commit),
                       base, head, "params"),
        "## Metrics (`dvc metrics diff`)",
        *noise_markdown(root, base, head, metrics),
        *diff_markdown(root, metrics, base, head, "metrics"),
        "## Accuracy and loss per epoch",
        *curves_section(root, revs, figures, link),
        "## Confusion matrix and the digits that changed",
        *confusion_section(root, revs, figures, link),
        "## Does it still reproduce?",
        *reproduction_markdown(root, head),
    ]
    return "\n\n".join(sections) + "\n"


def write_report(root: Path, base: str, head: str, out: Path) -> Path:
    """Compare HEAD's committed run with BASE's; write OUT and its figures beside it, in
    OUT's name without the suffix (report.md → report/). Returns the figures' folder."""
    base_rev, head_rev = resolve(root, "base", base), resolve(root, "head", head)
    figures = out.with_suffix("")
    with atomic_dir(figures) as tmp:
        text = build_report(root, base_rev, head_rev, tmp, figures.name)
    write_text(out, text)
    return figures


# --- SIGTERM and SIGINT: clean up, then die of the signal --------------------------

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A signal, raised where the report is, so that every `finally` and context manager
    on the way out runs: the temporary worktree, its folder, the half-written figures."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_on_signals() -> None:
    """SIGTERM and SIGINT raise Interrupted; a second one while it unwinds is ignored,
    so that it cannot cut the cleanup short."""
    def interrupt(signum, frame):
        for each in SIGNALS:
            signal.signal(each, signal.SIG_IGN)
        raise Interrupted(signum)

    for each in SIGNALS:
        signal.signal(each, interrupt)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the revision to compare against")
    parser.add_argument("--head", default="HEAD", help="the revision to report on (HEAD)")
    parser.add_argument("--out", type=Path, default=Path("report.md"))
    args = parser.parse_args(argv)
    raise_on_signals()
    try:
        figures = write_report(Path.cwd(), args.base, args.head, args.out)
        print(f"wrote {args.out} and {figures}/")
    except Interrupted as stop:  # cleaned up on the way here: die of the signal
        signal.signal(stop.signum, signal.SIG_DFL)
        os.kill(os.getpid(), stop.signum)
        raise


if __name__ == "__main__":
    run_cli(main)
