"""The generated blocks of README.md and docs/*.md, rebuilt from the files the runs wrote.

    python -m tools.docs           # rewrite every generated block
    python -m tools.docs --check   # one line per stale block, and exit 1 if there is one

A generated block sits between two HTML comments, `generated: NAME` and `end: NAME`
(see BLOCK), and GENERATORS[NAME](root) writes what goes between them. Most read the
working tree's metrics; `steps` and `step_notes` read each step of
experiments/steps.yaml from its commit: the youngest in HEAD's history whose message
starts with `step-N:` (`git rev-parse 'HEAD^{/^step-N:}'`), as `python -m
experiments.steps commit` makes them. Other branches and fetched refs do not count. Run
from the repository root.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from benchmarks import gpu_check
from experiments.seeds import SEEDS_JSON
from experiments.seeds import table as seeds_table
from experiments.search import SEARCH_JSON, newest, summary
from experiments.search import table as search_table
from experiments.steps import PARAMS_FILE, load_steps, step_rev
from stages.common import StageError, read_json, run_cli, write_text
from stages.history import metric_path, read_metric
from stages.params import read_yaml

BLOCK = re.compile(r"<!-- generated: (?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- end: (?P=name) -->",
                   re.S)
OPENING = re.compile(r"<!-- generated: ([\w-]+) -->")
EVAL_JSON = Path("metrics/eval.json")
TRAIN_JSON = Path("metrics/train/metrics.json")
LIVE_DIR = Path("metrics/train")  # the train stage's DVCLive folder
BENCHMARK_JSON = Path("benchmarks/results-cpu.json")
STEPS_YAML = Path("experiments/steps.yaml")
TEST_READS = Path("experiments/test_reads.yaml")  # the ledger of test reads
LEDGER_FIELDS = ("when", "recipe", "scored", "why", "decided", "record")
NO_GPU = ("No GPU measurements yet: run `make gpu-check` on a machine with a CUDA GPU "
          "(docs/gpu.md).")
DASH = "—"


def markdown_files(root: Path) -> list[Path]:
    """README.md and docs/*.md: the files that may hold generated blocks."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


# --- the headline: the working tree's run ----------------------------------------

def best_epoch(training: dict) -> int:
    """The epoch of the best test accuracy in a train stage's metrics.json."""
    return training["best"]["test_epoch"]


def result_markdown(evaluation: dict, training: dict) -> str:
    """One table row: final test accuracy, errors, parameters, epochs, the best epoch."""
    best = training["best"]
    return "\n".join([
        "| test accuracy | test errors | parameters | epochs | best test accuracy (epoch), "
        "selected on test |",
        "|---|---|---|---|---|",
        f"| **{evaluation['accuracy']:.2f} %** | {evaluation['errors']:,} | "
        f"{evaluation['params']:,} | {training['step']} | "
        f"{best['test_acc']:.2f} % ({best_epoch(training)}) |",
    ])


def result_block(root: Path) -> str:
    return result_markdown(read_json(root / EVAL_JSON, "evaluation metrics"),
                           read_json(root / TRAIN_JSON, "training metrics"))


def epochs_markdown(test_acc: dict[int, float], train_acc: dict[int, float]) -> str:
    """Test and train accuracy per epoch, one column per epoch."""
    epochs = sorted(test_acc)
    return "\n".join([
        "| epoch | " + " | ".join(str(e) for e in epochs) + " |",
        "|---|" + "---|" * len(epochs),
        "| test % | " + " | ".join(f"{test_acc[e]:.2f}" for e in epochs) + " |",
        "| train % | " + " | ".join(f"{train_acc[e]:.2f}" if e in train_acc else DASH
                                   for e in epochs) + " |",
    ])


def epochs_block(root: Path) -> str:
    test_acc, train_acc = (read_metric(metric_path(root / LIVE_DIR, split, "acc"), "acc")
                           for split in ("test", "train"))
    return epochs_markdown(test_acc.to_dict(), train_acc.to_dict())


# --- the steps: each read from its commit ----------------------------------------

@dataclass(frozen=True)
class StepRun:
    """What one step's commit holds: its metrics files, parsed."""

    commit: str
    evaluation: dict  # metrics/eval.json
    training: dict    # metrics/train/metrics.json


def git_text(root: Path, *args: str) -> str | None:
    """git's output, or None where git fails (no such commit or file)."""
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def is_shallow(root: Path) -> bool:
    """Whether ROOT is a shallow clone (`git clone --depth N`), which lacks history."""
    return (git_text(root, "rev-parse", "--is-shallow-repository") or "").strip() == "true"


def step_commit(name: str, root: Path) -> str:
    """The commit of step NAME: the youngest in HEAD's history named `NAME: ...`."""
    commit = git_text(root, "rev-parse", "--verify", "--quiet", step_rev(name))
    if commit is not None:
        return commit.strip()
    if is_shallow(root):
        raise StageError(f"{name}: this shallow clone lacks the step commits; fetch them with "
                         "`git fetch --unshallow`")
    raise StageError(f"{name} has no commit in HEAD's history (none whose message starts with "
                     f"'{name}:'); make the step commits with `python -m experiments.steps "
                     "commit`")


def step_run(name: str, root: Path) -> StepRun:
    """The metrics of step NAME, read from its commit (step_commit)."""
    commit = step_commit(name, root)
    files = {}
    for key, path in (("evaluation", EVAL_JSON), ("training", TRAIN_JSON)):
        text = git_text(root, "show", f"{commit}:{path.as_posix()}")
        if text is None:
            raise StageError(f"{name}: its commit {commit[:7]} has no {path}; remake the step "
                             "commits with `python -m experiments.steps commit`")
        try:
            files[key] = json.loads(text)
        except ValueError:
            raise StageError(f"{name}: {path} in commit {commit[:7]} is not JSON") from None
    return StepRun(commit, **files)


def step_runs(steps: dict, root: Path) -> dict[str, StepRun]:
    return {name: step_run(name, root) for name in steps}


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


def settings(step: dict) -> str:
    """The params a step sets, as `key=value`; train.* keys without their section."""
    return ", ".join(f"{key.removeprefix('train.')}={_value(value)}"
                     for key, value in step["params"].items())


def notebook_cell(step: dict) -> str:
    nb = step.get("notebook")
    if not nb:
        return DASH
    return f"{nb['best_train']:.2f} / {nb['best_test']:.2f} ({nb['best_test_epoch']})"


def steps_markdown(steps: dict, runs: dict[str, StepRun]) -> str:
    """One row per step: what it sets, and its run's final and best accuracy."""
    rows = ["| step | title | sets (`train.` keys) | final test % | best test % (epoch), "
            "the notebook's measure, selected on test | best train % "
            "| notebook: best train / best test (epoch) |",
            "|---|---|---|---|---|---|---|"]
    for name, step in steps.items():
        run = runs[name]
        best = run.training["best"]
        rows.append(f"| {name} | {step['title']} | {settings(step)} | "
                    f"{run.evaluation['accuracy']:.2f} | {best['test_acc']:.2f} "
                    f"({best_epoch(run.training)}) | {best['train_acc']:.2f} | "
                    f"{notebook_cell(step)} |")
    return "\n".join(rows)


def seeds_sentence(doc: dict) -> str:
    f = doc["final"]
    return (f"Over {f['n']} seeds (`metrics/seeds.json`), the final test accuracy was "
            f"{f['min']:.2f} % at least, median {f['median']:.2f} %, mean {f['mean']:.2f} %.")


def step_notes_markdown(steps: dict, runs: dict[str, StepRun], seeds: dict | None = None) -> str:
    """Per step: a heading, its params, and its Target, Results and Analysis. SEEDS, the
    seed summary of params.yaml's recipe, goes into the last step's Results: the last
    step is that recipe."""
    parts = []
    last = list(steps)[-1]
    for name, step in steps.items():
        run = runs[name]
        best = run.training["best"]
        results = (f"final test accuracy {run.evaluation['accuracy']:.2f} % "
                   f"({run.evaluation['errors']} errors); as the notebook measures it, "
                   f"selected on test, best {best['test_acc']:.2f} % at "
                   f"epoch {best_epoch(run.training)}; best train accuracy "
                   f"{best['train_acc']:.2f} %.")
        nb = step.get("notebook")
        if nb:
            results += (f" The notebook: best train {nb['best_train']:.2f} %, best test "
                        f"{nb['best_test']:.2f} % (epoch {nb['best_test_epoch']}).")
        if name == last and seeds is not None:
            results += f" {seeds_sentence(seeds)}"
        if step.get("results"):
            results += f" {step['results'].strip()}"
        sets = ", ".join(f"`{key}={_value(value)}`" for key, value in step["params"].items())
        parts.append("\n\n".join([
            f"### {name}: {step['title']}",
            f"Sets {sets}.",
            f"**Target.** {step['target'].strip()}",
            f"**Results.** {results[0].upper()}{results[1:]}",
            f"**Analysis.** {step['analysis'].strip()}",
        ]))
    return "\n\n".join(parts)


def _steps(root: Path) -> dict:
    return load_steps(root / STEPS_YAML, root / PARAMS_FILE)


def steps_block(root: Path) -> str:
    steps = _steps(root)
    return steps_markdown(steps, step_runs(steps, root))


def step_notes_block(root: Path) -> str:
    steps = _steps(root)
    return step_notes_markdown(steps, step_runs(steps, root), recipe_seeds(root))


# --- seeds, speed and the GPU: files that their commands wrote -------------------

def params_drift(ran: dict, params: dict) -> list[str]:
    """`key value (params.yaml: other)` for each param RAN holds that PARAMS sets otherwise."""
    drift = []
    for key, value in ran.items():
        section, _, leaf = key.partition(".")
        now = params.get(section, {}).get(leaf, DASH)
        if now != value:
            drift.append(f"`{key}` {_value(value)} (params.yaml: {_value(now)})")
    return drift


def seeds_markdown(doc: dict, params: dict) -> str:
    """metrics/seeds.json's table, and a line if the seeds ran other params than PARAMS."""
    text = seeds_table(doc)
    drift = params_drift(doc.get("params", {}), params)
    if drift:
        text += ("\n\nThese seeds ran with params that params.yaml has since changed: "
                 + ", ".join(drift) + ". Rerun them with `make seeds`.")
    return text


def read_seeds(root: Path) -> dict | None:
    """metrics/seeds.json, or None where no seeds have run."""
    path = root / SEEDS_JSON
    return read_json(path, "seed results") if path.exists() else None


def recipe_seeds(root: Path) -> dict | None:
    """metrics/seeds.json if its seeds ran params.yaml as it is now, else None."""
    doc = read_seeds(root)
    if doc is None or params_drift(doc.get("params", {}), read_yaml(root / PARAMS_FILE)):
        return None
    return doc


def read_search(root: Path) -> dict | None:
    """experiments/search.json, or None where no search has run."""
    path = root / SEARCH_JSON
    return read_json(path, "search results") if path.exists() else None


def search_block(root: Path) -> str:
    doc = read_search(root)
    if doc is None:
        return ("No search has run yet: `python -m experiments.search next`, then "
                "`python -m experiments.search run --next` and `python -m tools.docs`.")
    return search_table(doc)


def search_summary_block(root: Path) -> str:
    doc = read_search(root)
    if doc is None:
        return "No search has run yet: [docs/search.md](docs/search.md) says how to run one."
    name = newest(doc)
    return summary(name, doc["searches"][name]) + " The tables: [docs/search.md](docs/search.md)."


def ledger_markdown(entries, source: str = str(TEST_READS)) -> str:
    """The test-read ledger (experiments/test_reads.yaml) as a table, oldest first."""
    if not (isinstance(entries, list) and entries):
        raise StageError(f"{source}: expected a list of entries, each with "
                         f"{', '.join(LEDGER_FIELDS)}")
    rows = ["| when | recipe | scored on test | why | what it decided | where recorded |",
            "|---|---|---|---|---|---|"]
    for i, entry in enumerate(entries, 1):
        if not (isinstance(entry, dict) and set(entry) == set(LEDGER_FIELDS)
                and all(isinstance(v, str) and v.strip() for v in entry.values())):
            raise StageError(f"{source}: entry {i} needs exactly {', '.join(LEDGER_FIELDS)}, "
                             "each a line of text (quote a date)")
        rows.append("| " + " | ".join(" ".join(entry[f].split()).replace("|", "\\|")
                                      for f in LEDGER_FIELDS) + " |")
    return "\n".join(rows)


def ledger_block(root: Path) -> str:
    return ledger_markdown(read_yaml(root / TEST_READS), str(TEST_READS))


def seeds_block(root: Path) -> str:
    doc = read_seeds(root)
    if doc is None:
        return ("No seed results yet: run `make seeds` (`python -m experiments.seeds run "
                "--seeds 1-5 --jobs 2`), then `python -m tools.docs`.")
    return seeds_markdown(doc, read_yaml(root / PARAMS_FILE))


def benchmark_markdown(results: dict) -> str:
    """benchmarks/train_speed.py's JSON as a table of images per second and ratios."""
    a, b, c = (results[f"{k}_img_s"] for k in ("project", "baseline", "ceiling"))
    size = (f"\n\nEach speed is the fastest of {results['rounds']} rounds of "
            f"{results['train_images']:,} training images." if "rounds" in results else "")
    return "\n".join([
        "| device | torch | (a) project img/s | (b) DataLoader img/s | (c) ceiling img/s "
        "| (a)/(b) | (a)/(c) | median of paired (a)/(b), (a)/(c) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {results['device']} | {results['torch']} | {a:,.0f} | {b:,.0f} | {c:,.0f} | "
        f"{a / b:.2f}× | {a / c:.2f}× | {results['paired_vs_baseline']:.2f}×, "
        f"{results['paired_vs_ceiling']:.2f}× |",
    ]) + size


def benchmark_block(root: Path) -> str:
    path = root / BENCHMARK_JSON
    if not path.exists():
        return (f"No benchmark results yet: after `dvc repro preprocess`, run "
                f"`python -m benchmarks.train_speed --out {BENCHMARK_JSON}`, then "
                "`python -m tools.docs`.")
    return benchmark_markdown(read_json(path, "benchmark results"))


def gpu_results(root: Path) -> dict | None:
    """The GPU check's results file (benchmarks.gpu_check.RESULTS), or None. The first
    schema did not record the project's commit: it is taken from git then, as the
    commit HEAD's history held when the check started."""
    path = root / gpu_check.RESULTS
    if not path.exists():
        return None
    results = read_json(path, "GPU check results")
    if not results.get("commit") and results.get("started"):
        commit = git_text(root, "rev-list", "-1", "--first-parent",
                          f"--before={results['started']}", "HEAD")
        if commit:
            results["commit"] = f"{commit.strip()[:7]} (HEAD when the check started)"
    return results


def gpu_block(root: Path) -> str:
    """The GPU check's table: benchmarks.gpu_check.gpu_table of its results."""
    results = gpu_results(root)
    return NO_GPU if results is None else gpu_check.gpu_table(results)


def gpu_summary_block(root: Path) -> str:
    """One line for README: benchmarks.gpu_check.gpu_summary of its results."""
    results = gpu_results(root)
    return NO_GPU if results is None else gpu_check.gpu_summary(results)


def calibrate_block(root: Path, render: Callable[[dict], str]) -> str:
    """RENDER of metrics/ood.json, which the calibrate stage writes, or what to run."""
    from stages.calibrate import METRICS

    path = root / METRICS
    if not path.exists():
        return (f"No measurements of the digit check yet: run `dvc repro calibrate` (it writes "
                f"{METRICS}), then `python -m tools.docs`.")
    return render(read_json(path, "digit check measurements"))


def ood_block(root: Path) -> str:
    """The digit check's measurements: stages.calibrate's table of metrics/ood.json."""
    from stages.calibrate import table

    return calibrate_block(root, table)


def photos_block(root: Path) -> str:
    """Digits as they are, drawn and photographed: read right, refused and flagged."""
    from stages.calibrate import photo_table

    def render(metrics: dict) -> str:
        if "photos" not in metrics:  # written before the stage measured photos
            return ("No measurements of photos yet: `metrics/ood.json` predates them; run "
                    "`dvc repro calibrate`, then `python -m tools.docs`.")
        return photo_table(metrics)

    return calibrate_block(root, render)


# the blocks read from git's history, which a shallow clone lacks: the step commits,
# and the commit of a GPU check that did not record it
HISTORY_BLOCKS = {"steps", "step_notes", "gpu", "gpu_summary"}


GENERATORS: dict[str, Callable[[Path], str]] = {
    "result": result_block,
    "epochs": epochs_block,
    "steps": steps_block,
    "step_notes": step_notes_block,
    "seeds": seeds_block,
    "search": search_block,
    "search_summary": search_summary_block,
    "test_reads": ledger_block,
    "benchmark": benchmark_block,
    "gpu": gpu_block,
    "gpu_summary": gpu_summary_block,
    "ood": ood_block,
    "photos": photos_block,
}


# --- links and headings, as GitHub renders them ---------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str, code_text: bool = False) -> list[str]:
    """TEXT's lines outside fenced code blocks, without inline code spans (with
    CODE_TEXT, without only their backticks)."""
    lines, fence = [], None
    for line in text.splitlines():
        marker = re.match(r"\s*(```|~~~)", line)
        if marker and (fence is None or marker[1] == fence):
            fence = None if fence else marker[1]
            continue
        if fence is None:
            lines.append(line.replace("`", "") if code_text else re.sub(r"`[^`]*`", "", line))
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text lowercased, punctuation other than
    '-' and '_' dropped, each space a '-'."""
    text = LINK.sub(lambda m: m.group(0)[1:m.group(0).index("]")], heading)
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of TEXT's headings; a repeated one gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    result = set()
    for line in prose_lines(text, code_text=True):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m[1])
        result.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return result


def relative_links(text: str) -> list[str]:
    """The targets of TEXT's links and images that are not URLs (`path`, `#anchor`,
    `path#anchor`), outside code."""
    return [target for line in prose_lines(text) for target in LINK.findall(line)
            if not SCHEME.match(target)]


# --- finding and rewriting the blocks --------------------------------------------

def block_names(text: str, source: str) -> list[str]:
    """The names of TEXT's generated blocks; an unclosed or unknown one is an error."""
    names = [m["name"] for m in BLOCK.finditer(text)]
    opened = OPENING.findall(text)
    if opened != names:
        unclosed = next(n for i, n in enumerate(opened) if i >= len(names) or names[i] != n)
        raise StageError(f"{source}: generated block {unclosed} has no end marker "
                         f"(<!-- end: {unclosed} -->)")
    for name in names:
        if name not in GENERATORS:
            raise StageError(f"{source}: unknown generated block {name}; "
                             f"known: {', '.join(GENERATORS)}")
    return names


def render(text: str, blocks: dict[str, str]) -> str:
    """TEXT with each generated block's body replaced by BLOCKS[name] (if there)."""
    def body(m: re.Match) -> str:
        name = m["name"]
        if name not in blocks:
            return m.group(0)
        return f"<!-- generated: {name} -->\n\n{blocks[name].strip()}\n\n<!-- end: {name} -->"
    return BLOCK.sub(body, text)


def stale_blocks(text: str, blocks: dict[str, str]) -> list[str]:
    """The names of TEXT's blocks whose body differs from what render would write."""
    fresh = {m["name"]: m.group(0) for m in BLOCK.finditer(render(text, blocks))}
    return [m["name"] for m in BLOCK.finditer(text) if m.group(0) != fresh[m["name"]]]


def refresh(root: Path, check: bool, skip: frozenset[str] = frozenset()) -> list[str]:
    """Rewrite (or, with CHECK, only compare) every generated block under ROOT but those
    named in SKIP.

    Returns one line per stale block (check) or per rewritten file (otherwise).
    """
    if not (root / "README.md").is_file():
        raise StageError(f"{root / 'README.md'}: not found; run from the repository root")
    texts = {path: path.read_text() for path in markdown_files(root)}
    names = {path: block_names(text, str(path.relative_to(root))) for path, text in texts.items()}
    blocks = {name: GENERATORS[name](root) for name in dict.fromkeys(sum(names.values(), []))
              if name not in skip}
    lines = []
    for path, text in texts.items():
        stale = [name for name in stale_blocks(text, blocks) if name not in skip]
        if not stale:
            continue
        where = path.relative_to(root)
        if check:
            lines += [f"{where}: block {name} is stale; run `python -m tools.docs`"
                      for name in stale]
        else:
            write_text(path, render(text, blocks))
            lines.append(f"updated {where}: {', '.join(stale)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; list stale blocks and exit 1 if any")
    args = parser.parse_args(argv)
    lines = refresh(Path.cwd(), args.check)
    print("\n".join(lines) if lines else "every generated block is current")
    return 1 if args.check and lines else 0


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
