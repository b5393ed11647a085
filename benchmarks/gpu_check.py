"""GPU check: the CUDA tests, training on CUDA as committed (CUDA graphs), eagerly and
compiled, the train stage as a whole process twice (its time, and whether the two
runs are bit-identical), and the speed benchmark, in one run that writes one JSON file
(docs/gpu.md).

Run from the repository root on a machine with a CUDA GPU (`make gpu-check`):

    python -m benchmarks.gpu_check [--out FILE] [--budget SECONDS] [--data DIR]
    python -m benchmarks.gpu_check --cpu-smoke --epochs 1   # the script itself, on the CPU

It needs torch, pytest, pyyaml, tqdm, numpy, pandas and matplotlib, not DVC: the
in-process runs call stages.train's functions directly, with params.yaml's train
section; the train stage's own process gets stand-ins (benchmarks/stubs) for DVCLive
and torchinfo where they are not installed.
The speed benchmark also needs torchvision. Each part that fails is recorded in the
JSON and the next one runs; the file is rewritten after every part, so a run cut
short keeps what it measured. Parts that would start after the time budget is spent
are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import platform
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from stages.common import StageError, load_torch, run_cli, write_json
from stages.data import DeviceData, load_split, load_stats, to_device
from stages.device import is_compiled
from stages.params import RuntimeParams, TrainParams, load_params, read_yaml
from stages.runtime import apply as apply_runtime
from stages.runners import make_runner, use_cuda_graph
from stages.train import fit, new_state

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path("benchmarks/results-gpu.json")  # beside results-cpu.json; tools.docs reads it
SCHEMA = 3  # the JSON's layout version: 2 added the runner, the stage runs and the commit;
# 3 the torch version that requirements.lock pins, beside the one the check ran with
RUNNER_SCHEMA = 2  # files of an earlier schema were measured before the CUDA-graph runner
LOCK = REPO / "requirements.lock"
BUDGET_S = 480  # the whole check: about 8 minutes, so that it fits one slot on a lent GPU
TESTS_TIMEOUT_S = 240  # the CUDA tests' share of it, compiling included
MIN_PART_S = 30  # a part that would start with less time left is skipped
CUDA_TESTS = "tests/test_cuda.py"
# the in-process training runs: params.yaml's train section with these changes
RUNS = {"default": {}, "eager": {"cuda_graph": "off", "compile": "off"},
        "compiled": {"cuda_graph": "off", "compile": "on"}}
SWITCHES = ("cuda_graph", "compile", "channels_last", "fast_dropout")
# the IDX files that torchvision's MNIST reads, for the benchmark's DataLoader baseline
IDX = {"images": (2051, "images-idx3-ubyte"), "labels": (2049, "labels-idx1-ubyte")}
IDX_PREFIX = {"train": "train", "test": "t10k"}
OK = ("ok", "skipped")  # the statuses that are not a failure


@dataclass
class Budget:
    """Seconds for the whole check, counted from its creation."""

    total_s: float
    start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.total_s - (time.perf_counter() - self.start)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class OutOfTime(Exception):
    """The budget ran out between two epochs."""


def one_line(err: BaseException) -> str:
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {text}"[:300].rstrip(": ")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that a host timer reads their end."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def locked_torch(lock: Path = LOCK) -> str | None:
    """The torch version that LOCK (requirements.lock) pins; None without the file."""
    try:
        found = re.search(r"(?m)^torch==(\S+)", lock.read_text())
    except OSError:
        return None
    return found.group(1) if found else None


def environment(device: torch.device, lock: Path = LOCK) -> dict:
    """What the check runs on: the torch it runs with beside the one LOCK pins (a local
    build suffix such as +cu130 aside), whether they match (None: no lock)."""
    locked = locked_torch(lock)
    matches = None if locked is None else torch.__version__.split("+")[0] == locked
    return {
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "torch_locked": locked,
        "torch_matches_lock": matches,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(),
    }


def run_part(name: str, fn, skip: str | None = None) -> dict:
    """FN's result dict, or {status: skipped, reason: SKIP}, or {status: error, error}."""
    if skip:
        print(f"--- {name}: skipped ({skip})", flush=True)
        return {"status": "skipped", "reason": skip}
    print(f"--- {name}", flush=True)
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - recorded, and the next part runs
        result = {"status": "error", "error": one_line(err)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(f"--- {name}: {result['status']} in {result['seconds']} s"
          + (f" ({result['error']})" if "error" in result else ""), flush=True)
    return result


# --- the CUDA tests, in a pytest subprocess --------------------------------------

def junit_counts(xml_text: str) -> dict:
    """Passed, failed, errors and skipped from pytest's JUnit XML, with the first line
    of each failure's message, and what the tests measured (their record_property
    values: the differences that their tolerances bound), by test."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, reasons, measured = [], set(), {}
    for case in ET.fromstring(xml_text).iter("testcase"):
        recorded = {prop.get("name"): prop.get("value") for prop in case.iter("property")}
        if recorded:
            measured[case.get("name")] = recorded
        outcome = next((child for child in case
                        if child.tag in ("failure", "error", "skipped")), None)
        key = {"failure": "failed", "error": "errors", "skipped": "skipped"}.get(
            getattr(outcome, "tag", None), "passed")
        counts[key] += 1
        message = "" if outcome is None else (outcome.get("message") or "").strip()
        first = message.splitlines()[0][:300] if message else ""
        if key in ("failed", "errors"):
            failures.append({"test": case.get("name"), "message": first})
        elif key == "skipped" and first:
            reasons.add(first)
    return {**counts, "failures": failures, "skip_reasons": sorted(reasons),
            "measured": measured}


def cuda_tests(timeout_s: float) -> dict:
    """Run CUDA_TESTS (pytest -m cuda) in a subprocess; count the outcomes.

    pytest-timeout's `timeout` option in pyproject.toml is only a warning where that
    plugin is missing; `-p no:timeout` makes that so everywhere (TIMEOUT_S bounds it)."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", CUDA_TESTS, "-m", "cuda", "-q", "--tb=short",
               "-p", "no:cacheprovider", "-p", "no:timeout", f"--junitxml={xml}"]
        try:
            proc = subprocess.run(cmd, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "error", "error": f"timed out after {timeout_s:.0f} s"}
        if not xml.exists():
            return {"status": "error", "error": f"pytest exited {proc.returncode} "
                    "without a report"}
        counts = junit_counts(xml.read_text())
    if counts["failed"] or counts["errors"]:
        status = "failed"
    elif counts["passed"]:
        status = "ok"
    else:
        status = "skipped" if counts["skipped"] else "error"
    return {"status": status, "exit_code": proc.returncode, **counts}


# --- training on the real data ---------------------------------------------------

def load_data(data_dir: Path, device: torch.device) -> tuple[DeviceData, DeviceData]:
    mean, std = load_stats(data_dir / "stats.json")
    return tuple(to_device(*load_split(data_dir / f"{split}.pt"), mean, std, device)
                 for split in ("train", "test"))


def measure_training(p: TrainParams, train: DeviceData, test: DeviceData,
                     device: torch.device, budget: Budget) -> dict:
    """Train P from scratch, as the train stage does: the wall time, the capture's time,
    each epoch's time (its test pass included) and test accuracy.

    The first epoch holds compiling (train.compile on), so the later epochs' mean is
    the speed of training itself. The device is synchronised at each epoch's end, so
    host timers measure its kernels' work.
    """
    synchronize(device)
    start = time.perf_counter()
    state = new_state(p, device, len(train))
    runner = make_runner(state, train, p, use_cuda_graph(p, device))
    synchronize(device)
    marks = [time.perf_counter()]

    def on_epoch(s) -> None:
        synchronize(device)
        marks.append(time.perf_counter())
        if s.epoch < p.epochs and budget.left() <= 0:
            raise OutOfTime

    stopped = False
    try:
        fit(state, train, test, p, on_epoch, runner)
    except OutOfTime:
        stopped = True
    epoch_s = [b - a for a, b in zip(marks, marks[1:])]
    later = epoch_s[1:]
    result = {
        "status": "partial" if stopped else "ok",
        "settings": {key: getattr(p, key) for key in SWITCHES},
        "runner": "torch.compile" if is_compiled(state.net) else runner.name,
        "epochs": state.epoch,
        "wall_s": round(marks[-1] - start, 2),
        "setup_s": round(marks[0] - start, 2),
        "first_epoch_s": round(epoch_s[0], 2),
        "later_epoch_mean_s": round(statistics.mean(later), 3) if later else None,
        "epoch_s": [round(s, 3) for s in epoch_s],
        "test_acc": [row["test/acc"] for row in state.history],
        "final_test_acc": state.history[-1]["test/acc"],
    }
    if stopped:
        result["reason"] = f"time budget spent after epoch {state.epoch} of {p.epochs}"
    return result


# --- the train stage as a whole process, twice ------------------------------------

def stub_path() -> str | None:
    """benchmarks/stubs, for the train stage's DVCLive and torchinfo where they are not
    installed (a bare GPU machine); None where both are."""
    missing = [name for name in ("dvclive", "torchinfo") if importlib.util.find_spec(name) is None]
    return str(Path(__file__).with_name("stubs")) if missing else None


def train_stage_twice(p: TrainParams, runtime: RuntimeParams, data_dir: Path,
                      timeout_s: float) -> dict:
    """`python -m stages.train` run twice from scratch in fresh folders, with P and
    RUNTIME as its params.yaml, each timed from outside as a whole process (start-up,
    imports, data loading, capture, training, saving); then every file the two runs
    wrote compared byte for byte."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-stage-") as tmp:
        root = Path(tmp)
        params = read_yaml(REPO / "params.yaml")  # the other stages' sections as they are
        params.update(train=dataclasses.asdict(p), runtime=dataclasses.asdict(runtime))
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        stubs = stub_path()
        paths = [str(REPO)] + ([stubs] if stubs else [])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        walls = []
        for run in ("a", "b"):
            cmd = [sys.executable, "-m", "stages.train", "--data", str(data_dir.resolve()),
                   "--models", f"{run}/models", "--live", f"{run}/live"]
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                                  timeout=timeout_s)
            walls.append(round(time.perf_counter() - start, 2))
            if proc.returncode != 0:
                return {"status": "error", "wall_s": walls,
                        "error": f"exited {proc.returncode}: {last_message(proc.stderr)}"}
        files = sorted(path.relative_to(root / "a") for path in (root / "a").rglob("*")
                       if path.is_file())
        differing = [str(f) for f in files
                     if not (root / "b" / f).is_file()
                     or (root / "a" / f).read_bytes() != (root / "b" / f).read_bytes()]
        final = load_torch(root / "a" / "models" / "model.pt", "checkpoint")["test_accuracy"]
    return {"status": "failed" if differing else "ok", "wall_s": walls, "files": len(files),
            "bit_identical": not differing, "differing": differing,
            "final_test_acc": final, "stubbed": stubs is not None}


# --- the speed benchmark, in a subprocess ----------------------------------------

def write_idx_files(data_dir: Path, raw_dir: Path) -> None:
    """The four MNIST IDX files that DATA_DIR's splits were made from, rebuilt from them
    (preprocess keeps every byte), for the benchmark's torchvision baseline."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    for split, prefix in IDX_PREFIX.items():
        images, labels = load_split(data_dir / f"{split}.pt")
        for kind, tensor in (("images", images), ("labels", labels.to(torch.uint8))):
            magic, name = IDX[kind]
            header = struct.pack(f">{1 + tensor.dim()}I", magic, *tensor.shape)
            data = tensor.contiguous().numpy().tobytes()
            (raw_dir / f"{prefix}-{name}").write_bytes(header + data)


def last_message(stderr: str) -> str:
    """The line of STDERR that says why a command failed: its `error: ...` line or a
    traceback's last line, not a progress bar's remains."""
    lines = [line.strip() for line in re.split(r"[\r\n]", stderr)]
    lines = [line for line in lines if line and "|" not in line]  # tqdm bars have a |
    return next((line for line in reversed(lines) if line.startswith("error: ")),
                lines[-1] if lines else "no output")[:300]


def benchmark_result(stdout: str) -> dict:
    """The benchmark's closing JSON line, with (a)/(b) of its best-of-rounds speeds."""
    line = next((line for line in reversed(stdout.splitlines()) if line.startswith("{")), None)
    if line is None:
        raise ValueError("the benchmark printed no JSON line")
    result = json.loads(line)
    result["a_over_b"] = round(result["project_img_s"] / result["baseline_img_s"], 3)
    return result


def benchmark(data_dir: Path, timeout_s: float, batches: int, repeat: int) -> dict:
    """benchmarks.train_speed --json on DATA_DIR, with params.yaml; its numbers."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-raw-") as raw:
        write_idx_files(data_dir, Path(raw))
        cmd = [sys.executable, "-m", "benchmarks.train_speed", "--json", "--data", str(data_dir),
               "--raw", raw, "--batches", str(batches), "--repeat", str(repeat)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "error", "error": f"timed out after {timeout_s:.0f} s"}
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], end="", file=sys.stderr, flush=True)
        return {"status": "error",
                "error": f"exited {proc.returncode}: {last_message(proc.stderr)}"}
    return {"status": "ok", **benchmark_result(proc.stdout)}


# --- the whole check -------------------------------------------------------------

def run_check(p: TrainParams, runtime: RuntimeParams, data_dir: Path, device: torch.device,
              budget: Budget, out: Path | None = None, bench_batches: int = 0,
              bench_repeat: int = 3, commit: str | None = None) -> dict:
    """Every part in turn; the results, also written to OUT after each part.

    The CUDA tests and the benchmark run only on CUDA; on the CPU (a smoke run of
    this script) they are recorded as skipped."""
    results = {"schema": SCHEMA, "commit": commit,
               "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "budget_s": budget.total_s, "environment": environment(device),
               "params": dataclasses.asdict(p), "runtime": dataclasses.asdict(runtime),
               "data": str(data_dir)}
    no_cuda = None if device.type == "cuda" else f"needs CUDA; this run is on the {device.type}"

    def save() -> None:
        results["elapsed_s"] = round(budget.elapsed(), 1)
        if out is not None:
            write_json(out, results)

    def skip(reason: str | None) -> str | None:
        if reason is None and budget.left() < MIN_PART_S:
            return f"time budget spent ({budget.total_s:.0f} s)"
        return reason

    timeout = min(TESTS_TIMEOUT_S, budget.left())
    results["cuda_tests"] = run_part("CUDA tests", lambda: cuda_tests(timeout), skip(no_cuda))
    save()

    @functools.cache
    def data() -> tuple[DeviceData, DeviceData]:  # loaded once, by the first training run
        return load_data(data_dir, device)

    # the default first: it is what `dvc repro` runs
    results["train"] = {}
    for name, changes in RUNS.items():
        results["train"][name] = run_part(
            f"training, {name}", lambda: measure_training(
                dataclasses.replace(p, **changes), *data(), device, budget), skip(None))
        save()
        if name == "default":
            results["stage"] = run_part(
                "the train stage as a process, twice",
                lambda: train_stage_twice(p, runtime, data_dir, budget.left()), skip(None))
            save()
    results["benchmark"] = run_part(
        "speed benchmark", lambda: benchmark(data_dir, budget.left(), bench_batches, bench_repeat),
        skip(no_cuda))
    save()
    return results


def failed_parts(results: dict) -> list[str]:
    parts = {"cuda_tests": results["cuda_tests"], "benchmark": results["benchmark"],
             **({"stage": results["stage"]} if "stage" in results else {}),
             **{f"train {k}": v for k, v in results["train"].items()}}
    return [name for name, part in parts.items() if part["status"] not in OK]


# --- the README's table ----------------------------------------------------------

DASH = "—"
# the runs' column headings; schema 1 (before the CUDA-graph runner) had the last two
COLUMNS = {"default": "params.yaml as committed", "eager": "eager (`cuda_graph` off)",
           "compiled": "`compile` on", "compile_auto": "`compile` auto (then on for CUDA)",
           "compile_off": "`compile` off (eager)"}


def _cell(part: dict, key: str, fmt: str) -> str:
    value = part.get(key)
    return DASH if value is None else format(value, fmt)


def _run_header(name: str, run: dict) -> str:
    label = COLUMNS.get(name, name)
    if run.get("status") == "ok":
        return label
    if run.get("status") == "partial":
        return f"{label} ({run.get('epochs')} epochs, budget spent)"
    return f"{label} ({run.get('status', 'missing')})"


def torch_text(env: dict) -> str:
    """`torch VERSION`, flagged where it is not the version requirements.lock pins."""
    text = f"torch {env.get('torch', DASH)}"
    if env.get("torch_matches_lock") is False:
        text += f" (requirements.lock pins {env['torch_locked']}: a mismatch)"
    return text


def measured(results: dict) -> str:
    """When the check ran and on which code; for a file from before the CUDA-graph
    runner, that it predates the runner."""
    text = (f"measured {str(results.get('started', DASH))[:10]} at commit "
            f"{results.get('commit') or 'not recorded'}")
    if results.get("schema", 1) < RUNNER_SCHEMA:
        text += ", before the CUDA-graph runner, which has not run on a GPU yet"
    return text


def _runner(run: dict) -> str:
    if "runner" in run:
        return run["runner"]
    if "compiled" in run:  # schema 1
        return "torch.compile" if run["compiled"] else "eager"
    return DASH


def cuda_tests_text(results: dict) -> str:
    """How the CUDA tests of a results dict went: "4 passed, 1 failed, 0 skipped", or the
    part's status where they did not run ("skipped", "not run")."""
    tests = results.get("cuda_tests", {})
    if tests.get("status") in ("ok", "failed"):
        return (f"{tests['passed']} passed, {tests['failed'] + tests['errors']} failed, "
                f"{tests['skipped']} skipped")
    return tests.get("status", "not run")


def gpu_table(results: dict) -> str:
    """A caption line and a markdown table of a gpu_check results dict (schema 1 or 2):
    one column per training run; the train stage's process times and the benchmark's
    (a)/(b) in the column of the settings they ran."""
    env = results.get("environment", {})
    caption = (f"{env.get('gpu') or 'no GPU (' + str(env.get('device')) + ')'}, "
               f"{torch_text(env)}, CUDA {env.get('cuda') or DASH}, {measured(results)}; "
               f"CUDA tests: {cuda_tests_text(results)}.")
    names = list(results.get("train", {}))
    runs = [results["train"][name] for name in names]
    bench = results.get("benchmark", {})
    if results.get("schema", 1) >= 2:
        bench_column = "default"
    else:  # schema 1 recorded train.compile as the benchmark ran it
        bench_column = "compile_auto" if bench.get("compile") == "on" else "compile_off"
    stage = results.get("stage", {})
    epochs = results.get("params", {}).get("epochs", DASH)
    later = f"epochs 2–{epochs}" if isinstance(epochs, int) and epochs > 1 else "later epochs"

    def only(name: str, text: str) -> list[str]:
        return [text if n == name else DASH for n in names]

    rows = [
        ("training steps run by", [_runner(r) for r in runs]),
        (f"wall time, {epochs} epochs, in process (s)", [_cell(r, "wall_s", ".1f") for r in runs]),
        ("epoch 1 (s)", [_cell(r, "first_epoch_s", ".1f") for r in runs]),
        (f"{later}, mean (s)", [_cell(r, "later_epoch_mean_s", ".2f") for r in runs]),
        ("final test accuracy (%)", [_cell(r, "final_test_acc", ".2f") for r in runs]),
    ]
    if stage:
        walls = ", ".join(f"{w:.1f}" for w in stage.get("wall_s", [])) or DASH
        same = DASH if "bit_identical" not in stage else (
            "yes" if stage["bit_identical"] else "no: " + ", ".join(stage["differing"]))
        rows += [("`python -m stages.train`, whole process, two runs (s)", only("default", walls)),
                 ("the two runs' files bit-identical", only("default", same))]
    if bench.get("status") == "ok":
        rows.append(("speed against the DataLoader pipeline, (a)/(b): best of rounds; "
                     "paired median", only(bench_column, f"{bench['a_over_b']:.2f}×; "
                                                         f"{bench['paired_vs_baseline']:.2f}×")))
    head = [_run_header(name, run) for name, run in zip(names, runs)]
    lines = [caption, "", f"| | {' | '.join(head)} |", "|---|" + "---:|" * len(names)]
    lines += [f"| {label} | {' | '.join(cells)} |" for label, cells in rows]
    return "\n".join(lines)


def gpu_summary(results: dict) -> str:
    """One sentence of a results dict for README: the GPU, when and at which commit,
    each training run's 15-epoch time, runner and final accuracy, and how the CUDA tests
    went."""
    env = results.get("environment", {})
    epochs = results.get("params", {}).get("epochs", DASH)
    runs = [f"{_runner(run)} {run['wall_s']:.1f} s ({run['final_test_acc']:.2f} %)"
            for run in results.get("train", {}).values() if run.get("status") == "ok"]
    stage = results.get("stage", {})
    process = (f"; the train stage as a whole process {stage['wall_s'][0]:.1f} s, two runs "
               f"{'bit-identical' if stage['bit_identical'] else 'not bit-identical'}"
               if stage.get("status") in ("ok", "failed") else "")
    return (f"{env.get('gpu') or 'no GPU'} ({torch_text(env)}), {measured(results)}: "
            f"{epochs} epochs in process took {', '.join(runs) or DASH}{process}; CUDA "
            f"tests: {cuda_tests_text(results)}. Details: "
            "[docs/performance.md](docs/performance.md#measured).")


def git_commit() -> str | None:
    """The checkout's commit, short, or None outside a git checkout."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"default: {RESULTS}")
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--budget", type=float, default=BUDGET_S,
                        help=f"seconds for the whole check (default {BUDGET_S})")
    parser.add_argument("--epochs", type=int, help="default: params.yaml's train.epochs")
    parser.add_argument("--commit", help="the project's commit, where git cannot tell")
    parser.add_argument("--bench-batches", type=int, default=0,
                        help="the benchmark's --batches (default 0: whole epochs)")
    parser.add_argument("--bench-repeat", type=int, default=3, help="the benchmark's --repeat")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run on the CPU to try the script: no CUDA tests, no benchmark")
    args = parser.parse_args(argv)
    budget = Budget(args.budget)
    if (args.epochs is not None and args.epochs < 1) or args.budget <= 0 \
            or args.bench_batches < 0 or args.bench_repeat < 1:
        raise StageError("--epochs must be >= 1, --budget > 0, --bench-batches >= 0 and "
                         "--bench-repeat >= 1")
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise StageError("torch sees no CUDA GPU; run the GPU check on a machine with one, "
                         "or add --cpu-smoke to try it on the CPU")
    params = load_params()
    apply_runtime(params.runtime)  # as the train stage does, before any torch work
    p = params.train
    if args.epochs is not None:
        p = dataclasses.replace(p, epochs=args.epochs)
    env = environment(device)
    print(f"{env['gpu'] or 'no GPU, on the ' + device.type}, {torch_text(env)}, "
          f"CUDA {env['cuda']}, Python {env['python']}; budget {args.budget:.0f} s",
          flush=True)
    results = run_check(p, params.runtime, args.data, device, budget, args.out,
                        args.bench_batches, args.bench_repeat, args.commit or git_commit())
    print(f"\n{gpu_table(results)}\n\nwritten to {args.out} in {results['elapsed_s']} s",
          flush=True)
    failed = failed_parts(results)
    if failed:
        raise StageError(f"{', '.join(failed)} did not pass; details in {args.out}")


if __name__ == "__main__":
    run_cli(main)
