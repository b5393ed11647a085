"""The GPU check's results file and its table, from runs on the CPU: a smoke run of the
whole check on tiny data, the parts it hands to subprocesses, and the README's table."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import test_cuda
from benchmarks.gpu_check import (Budget, benchmark, benchmark_result, cuda_tests,
                                  environment, failed_parts, gpu_summary, gpu_table,
                                  junit_counts, last_message, main, measure_training,
                                  run_check, write_idx_files)
from helpers import REPO, write_prepared, write_raw_dir
from stages.common import StageError
from stages.params import load_params

CPU = torch.device("cpu")
NO_CUDA = {"status": "skipped", "reason": "needs CUDA; this run is on the cpu"}
RUN_KEYS = {"status", "seconds", "settings", "runner", "epochs", "wall_s", "setup_s",
            "first_epoch_s", "later_epoch_mean_s", "epoch_s", "test_acc", "final_test_acc"}


@pytest.fixture
def params():
    """The repo's train params, shortened: 2 epochs of 2 batches."""
    return dataclasses.replace(load_params(REPO / "params.yaml").train, epochs=2, batch_size=64)


@pytest.fixture
def prepared(tmp_path):
    return write_prepared(tmp_path / "prepared", n_train=128, n_test=64)


@pytest.mark.slow
def test_a_cpu_smoke_run_measures_training_and_skips_the_cuda_parts(tmp_path, params, prepared):
    out = tmp_path / "gpu.json"
    runtime = load_params(REPO / "params.yaml").runtime
    results = run_check(params, runtime, prepared, CPU, Budget(300), out, commit="abc1234")
    assert json.loads(out.read_text()) == results  # the file holds what was returned
    assert set(results) == {"schema", "commit", "started", "budget_s", "elapsed_s",
                            "environment", "params", "runtime", "data", "cuda_tests", "train",
                            "stage", "benchmark"}
    assert results["schema"] == 3 and results["params"]["epochs"] == 2
    assert results["commit"] == "abc1234" and results["runtime"]["deterministic"] is True
    assert results["environment"]["device"] == "cpu" and results["environment"]["gpu"] is None
    assert results["environment"]["torch"] == torch.__version__
    assert results["environment"]["torch_locked"] == "2.14.1"  # requirements.lock's
    assert results["cuda_tests"] == NO_CUDA and results["benchmark"] == NO_CUDA
    assert list(results["train"]) == ["default", "eager", "compiled"]
    runners = {"default": "eager", "eager": "eager", "compiled": "torch.compile"}
    for name, run in results["train"].items():
        assert set(run) == RUN_KEYS, name
        assert run["status"] == "ok" and run["epochs"] == 2 and run["runner"] == runners[name]
        assert len(run["epoch_s"]) == 2 and all(s > 0 for s in run["epoch_s"])
        assert run["wall_s"] >= sum(run["epoch_s"]) + run["setup_s"] - 0.02
        assert run["first_epoch_s"] == pytest.approx(run["epoch_s"][0], abs=0.01)
        assert run["later_epoch_mean_s"] == pytest.approx(run["epoch_s"][1], abs=0.001)
        assert len(run["test_acc"]) == 2 and run["final_test_acc"] == run["test_acc"][-1]
        assert all(isinstance(a, float) and 0 <= a <= 100 for a in run["test_acc"])
    assert results["train"]["eager"]["settings"]["cuda_graph"] == "off"
    # on the CPU the default trains eagerly too, from the same seed: the same run
    runs = results["train"]
    assert runs["default"]["test_acc"] == runs["eager"]["test_acc"]
    stage = results["stage"]
    assert stage["status"] == "ok" and len(stage["wall_s"]) == 2
    assert stage["bit_identical"] is True and stage["differing"] == []
    assert stage["files"] >= 5  # model.pt, best.pt, state.pt, summary.txt, DVCLive's files
    assert stage["final_test_acc"] == runs["default"]["final_test_acc"]
    assert failed_parts(results) == []
    table = gpu_table(results)
    assert table.startswith("no GPU (cpu), torch ")
    assert "commit abc1234" in table.splitlines()[0]
    acc = f"{runs['eager']['final_test_acc']:.2f}"
    assert f"| final test accuracy (%) | {acc} | {acc} |" in table


def test_a_spent_budget_stops_training_between_epochs_and_skips_later_parts(params, prepared):
    from benchmarks.gpu_check import load_data

    run = measure_training(params, *load_data(prepared, CPU), CPU, Budget(0))
    assert run["status"] == "partial" and run["epochs"] == 1 and len(run["epoch_s"]) == 1
    assert run["reason"] == "time budget spent after epoch 1 of 2"
    results = run_check(params, load_params(REPO / "params.yaml").runtime, prepared, CPU,
                        Budget(0))
    for part in (results["train"]["default"], results["stage"]):
        assert part == {"status": "skipped", "reason": "time budget spent (0 s)"}
    assert results["cuda_tests"] == NO_CUDA  # the first reason stands


def test_the_check_without_a_gpu_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(StageError, match="torch sees no CUDA GPU; run the GPU check on a "
                                         "machine with one, or add --cpu-smoke"):
        main([])


@pytest.mark.slow
def test_the_check_imports_without_dvc_dvclive_or_torchinfo():
    """The GPU machine has none of them: blocked, the check still imports."""
    code = ("import sys\n"
            "for name in ('dvc', 'dvclive', 'torchinfo'):\n"
            "    sys.modules[name] = None\n"
            "import benchmarks.gpu_check, stages.evaluate, test_cuda\n"
            "print('imported')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "imported\n", proc.stderr


def cases(test) -> int:
    """How many tests pytest collects from one test function: one per parametrized case."""
    n = 1
    for mark in getattr(test, "pytestmark", []):
        if mark.name == "parametrize":
            n *= len(mark.args[1])
    return n


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would run the CUDA tests")
def test_the_cuda_tests_subprocess_reports_every_test_skipped_here(monkeypatch):
    """The exact pytest command the check runs, here: every CUDA test is collected and
    skipped with conftest's reason (and pyproject's timeout option, without the
    pytest-timeout plugin, is no error)."""
    monkeypatch.chdir(REPO)
    result = cuda_tests(timeout_s=120)
    n_tests = sum(cases(test) for name, test in vars(test_cuda).items()
                  if name.startswith("test_"))
    assert n_tests >= 5
    assert result == {"status": "skipped", "exit_code": 0, "passed": 0, "failed": 0,
                      "errors": 0, "skipped": n_tests, "failures": [], "measured": {},
                      "skip_reasons": ["needs a CUDA GPU; torch sees none here"]}


def test_junit_counts_reads_passes_failures_errors_and_skips():
    xml = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
    <testcase classname="tests.test_cuda" name="test_a" time="1.0"/>
    <testcase classname="tests.test_cuda" name="test_b" time="1.0">
      <failure message="AssertionError: assert 1.0 == 2.0&#10;more">trace</failure></testcase>
    <testcase classname="tests.test_cuda" name="test_c" time="1.0">
      <error message="setup: &quot;RuntimeError: CUDA error&quot;">trace</error></testcase>
    <testcase classname="tests.test_cuda" name="test_d" time="0.0">
      <skipped type="pytest.skip" message="no reason">x</skipped></testcase>
    </testsuite></testsuites>"""
    assert junit_counts(xml) == {
        "passed": 1, "failed": 1, "errors": 1, "skipped": 1,
        "failures": [{"test": "test_b", "message": "AssertionError: assert 1.0 == 2.0"},
                     {"test": "test_c", "message": 'setup: "RuntimeError: CUDA error"'}],
        "skip_reasons": ["no reason"], "measured": {}}


def test_idx_files_rebuilt_from_prepared_data_are_the_raw_files(tmp_path):
    """The benchmark's torchvision baseline reads IDX files; the check rebuilds them from
    data/prepared, byte for byte, so that only the prepared data need reach the GPU."""
    from stages.preprocess import preprocess

    arrays = write_raw_dir(tmp_path / "raw")
    preprocess(tmp_path / "raw", tmp_path / "prepared")
    write_idx_files(tmp_path / "prepared", tmp_path / "rebuilt")
    assert sorted(p.name for p in (tmp_path / "rebuilt").iterdir()) == sorted(arrays)
    for name in arrays:
        assert (tmp_path / "rebuilt" / name).read_bytes() == (tmp_path / "raw" / name).read_bytes()


@pytest.mark.slow
def test_the_benchmark_runs_in_a_subprocess_on_idx_files_rebuilt_from_prepared(prepared,
                                                                               monkeypatch):
    """benchmarks.train_speed as the check runs it, on tiny data: one batch, one round."""
    monkeypatch.chdir(REPO)
    result = benchmark(prepared, timeout_s=240, batches=1, repeat=1)
    assert result["status"] == "ok", result
    assert result["a_over_b"] == pytest.approx(
        result["project_img_s"] / result["baseline_img_s"], rel=1e-2)
    assert result["paired_vs_baseline"] > 0 and result["torch"] == torch.__version__


def test_last_message_finds_the_error_behind_progress_bars():
    bars = "epoch 1/3:  50%|#####     | 1/2 [00:01<00:01]\repoch 1/3: 100%|##########| 2/2\r"
    assert last_message(bars + "error: --batches must be >= 0\n") == "error: --batches must be >= 0"
    traceback = ("Traceback (most recent call last):\n  File x\n"
                 "ModuleNotFoundError: No module named 'torchvision'\n")
    assert last_message(bars + traceback) == "ModuleNotFoundError: No module named 'torchvision'"
    assert last_message("") == "no output"


def test_benchmark_result_reads_the_closing_json_line():
    stdout = ("device NVIDIA H100, torch 2.11.0, 60000 training images per measurement\n"
              "(a) project     1.00     60000\n"
              '{"project_img_s": 60000.0, "baseline_img_s": 8000.0, "ceiling_img_s": 70000.0, '
              '"paired_vs_baseline": 7.4, "paired_vs_ceiling": 0.86, "device": "NVIDIA H100", '
              '"torch": "2.11.0"}\n')
    result = benchmark_result(stdout)
    assert result["a_over_b"] == 7.5 and result["paired_vs_baseline"] == 7.4
    with pytest.raises(ValueError, match="no JSON line"):
        benchmark_result("(a) project 1.00\n")


def test_junit_counts_reads_what_the_tests_measured():
    xml = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
    <testcase classname="tests.test_cuda" name="test_a" time="1.0"><properties>
      <property name="loss_rel_diff" value="0.00146" /></properties></testcase>
    <testcase classname="tests.test_cuda" name="test_b" time="1.0"/>
    </testsuite></testsuites>"""
    assert junit_counts(xml)["measured"] == {"test_a": {"loss_rel_diff": "0.00146"}}


def gpu_results() -> dict:
    """What a check on a GPU records (made-up numbers)."""
    def run(runner, wall, first, mean, acc):
        return {"status": "ok", "runner": runner, "epochs": 15, "wall_s": wall,
                "setup_s": 0.2, "first_epoch_s": first, "later_epoch_mean_s": mean,
                "epoch_s": [first] + [mean] * 14, "test_acc": [98.0] * 14 + [acc],
                "final_test_acc": acc, "seconds": wall + 2}
    return {
        "schema": 3, "commit": "abc1234", "started": "2026-12-01T10:00:00+00:00",
        "budget_s": 480, "elapsed_s": 301.0,
        "environment": {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3",
                        "torch": "2.14.1+cu130", "torch_locked": "2.14.1",
                        "torch_matches_lock": True, "cuda": "13.0", "cudnn": 91000,
                        "python": "3.12.3"},
        "params": {"epochs": 15, "compile": "auto", "cuda_graph": "auto"},
        "cuda_tests": {"status": "ok", "passed": 9, "failed": 0, "errors": 0, "skipped": 0,
                       "failures": [], "skip_reasons": [], "exit_code": 0, "seconds": 80.0,
                       "measured": {}},
        "train": {"default": run("CUDA graphs", 5.5, 0.6, 0.33, 99.52),
                  "eager": run("eager", 40.0, 3.1, 2.6, 99.38),
                  "compiled": run("torch.compile", 75.25, 52.04, 1.5831, 99.41)},
        "stage": {"status": "ok", "wall_s": [11.02, 10.61], "files": 9, "bit_identical": True,
                  "differing": [], "final_test_acc": 99.52, "stubbed": True},
        "benchmark": {"status": "ok", "project_img_s": 60000.0, "baseline_img_s": 8000.0,
                      "a_over_b": 7.5, "paired_vs_baseline": 7.4, "seconds": 90.0},
    }


def test_gpu_table_of_a_gpu_run():
    assert gpu_table(gpu_results()) == "\n".join([
        "NVIDIA H100 80GB HBM3, torch 2.14.1+cu130, CUDA 13.0, measured 2026-12-01 at "
        "commit abc1234; CUDA tests: 9 passed, 0 failed, 0 skipped.",
        "",
        "| | params.yaml as committed | eager (`cuda_graph` off) | `compile` on |",
        "|---|---:|---:|---:|",
        "| training steps run by | CUDA graphs | eager | torch.compile |",
        "| wall time, 15 epochs, in process (s) | 5.5 | 40.0 | 75.2 |",
        "| epoch 1 (s) | 0.6 | 3.1 | 52.0 |",
        "| epochs 2–15, mean (s) | 0.33 | 2.60 | 1.58 |",
        "| final test accuracy (%) | 99.52 | 99.38 | 99.41 |",
        "| `python -m stages.train`, whole process, two runs (s) | 11.0, 10.6 | — | — |",
        "| the two runs' files bit-identical | yes | — | — |",
        "| speed against the DataLoader pipeline, (a)/(b): best of rounds; paired median "
        "| 7.50×; 7.40× | — | — |",
    ])


def test_gpu_table_marks_failed_and_cut_short_parts():
    results = gpu_results()
    results["cuda_tests"].update(status="failed", passed=3, failed=1, errors=1)
    results["train"]["eager"] = {"status": "error", "error": "RuntimeError: CUDA error"}
    results["train"]["default"].update(status="partial", epochs=9)
    results["stage"].update(status="failed", bit_identical=False, differing=["models/model.pt"])
    results["benchmark"] = {"status": "skipped", "reason": "time budget spent (480 s)"}
    lines = gpu_table(results).splitlines()
    assert lines[0].endswith("CUDA tests: 3 passed, 2 failed, 0 skipped.")
    assert lines[2] == ("| | params.yaml as committed (9 epochs, budget spent) "
                        "| eager (`cuda_graph` off) (error) | `compile` on |")
    assert lines[5] == "| wall time, 15 epochs, in process (s) | 5.5 | — | 75.2 |"
    assert lines[-1] == "| the two runs' files bit-identical | no: models/model.pt | — | — |"
    assert failed_parts(results) == ["cuda_tests", "stage", "train default", "train eager"]


def test_gpu_table_of_the_first_schema():
    """The committed file from before the CUDA-graph runner (schema 1)."""
    results = json.loads((REPO / "benchmarks/results-gpu.json").read_text())
    if results.get("schema") != 1:
        pytest.skip("benchmarks/results-gpu.json has been re-measured since")
    lines = gpu_table(results).splitlines()
    assert lines[0].startswith("NVIDIA H200, torch 2.11.0+cu130, CUDA 13.0, measured "
                               "2026-11-29 at commit not recorded, before the CUDA-graph "
                               "runner, which has not run on a GPU yet; CUDA tests: 4 passed, "
                               "1 failed, 0 skipped.")
    assert lines[2] == ("| | `compile` auto (then on for CUDA) | `compile` off (eager) |")
    assert lines[4] == "| training steps run by | torch.compile | eager |"
    assert lines[5] == "| wall time, 15 epochs, in process (s) | 64.3 | 38.2 |"
    assert lines[-1].endswith("| 7.64×; 7.09× | — |")


def test_gpu_summary_is_one_sentence_of_the_runs():
    assert gpu_summary(gpu_results()) == (
        "NVIDIA H100 80GB HBM3 (torch 2.14.1+cu130), measured 2026-12-01 at commit abc1234: "
        "15 epochs in process took CUDA graphs 5.5 s (99.52 %), eager 40.0 s (99.38 %), "
        "torch.compile 75.2 s (99.41 %); the train stage as a whole process 11.0 s, two runs "
        "bit-identical; CUDA tests: 9 passed, 0 failed, 0 skipped. Details: "
        "[docs/performance.md](docs/performance.md#measured).")
    # a failed CUDA test is in README's sentence, not only in the table of docs/performance.md
    results = gpu_results()
    results["cuda_tests"].update(status="failed", passed=8, failed=1)
    assert "; CUDA tests: 8 passed, 1 failed, 0 skipped. Details: " in gpu_summary(results)


def test_the_summary_of_a_check_from_before_the_cuda_graph_runner_says_so():
    results = gpu_results()
    del results["environment"]["torch_locked"], results["environment"]["torch_matches_lock"]
    results.update(schema=1, commit="9ab5c47 (HEAD when the check started)")
    assert gpu_summary(results).startswith(
        "NVIDIA H100 80GB HBM3 (torch 2.14.1+cu130), measured 2026-12-01 at commit 9ab5c47 "
        "(HEAD when the check started), before the CUDA-graph runner, which has not run on "
        "a GPU yet: 15 epochs in process took ")


@pytest.mark.parametrize("pinned, matches", [(torch.__version__.split("+")[0], True),
                                             ("0.0.1", False), (None, None)])
def test_the_check_records_the_torch_that_requirements_lock_pins(tmp_path, pinned, matches):
    lock = tmp_path / "requirements.lock"
    if pinned:
        lock.write_text(f"tqdm==4.67.1 \\\n    --hash=sha256:00\ntorch=={pinned} \\\n"
                        "    --hash=sha256:00\ntorchinfo==1.8.0 \\\n")
    env = environment(CPU, lock)
    assert (env["torch"], env["torch_locked"], env["torch_matches_lock"]) == (
        torch.__version__, pinned, matches)


def test_a_torch_other_than_the_locked_one_is_flagged_in_the_table_and_the_summary():
    results = gpu_results()
    results["environment"].update(torch="2.11.0+cu130", torch_matches_lock=False)
    flag = "torch 2.11.0+cu130 (requirements.lock pins 2.14.1: a mismatch)"
    assert flag in gpu_table(results).splitlines()[0] and flag in gpu_summary(results)
