"""stages.params: params.yaml is checked as a whole, with one clear line per problem."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import REPO, assert_one_line_error, run_stage
from stages.common import StageError
from stages.params import Params, TrainParams, load_params, parse_params

PARAMS_YAML = REPO / "params.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    """The repo's params.yaml as loaded; tests change deep copies of it."""
    with PARAMS_YAML.open() as f:
        return yaml.safe_load(f)


def test_repo_params_load(raw):
    params = load_params(PARAMS_YAML)
    assert isinstance(params, Params)
    for section in ("train", "evaluate", "runtime", "calibrate"):
        assert set(raw[section]) == {f.name for f in dataclasses.fields(getattr(params, section))}
        for key, value in raw[section].items():
            assert getattr(getattr(params, section), key) == value, f"{section}.{key}"
    assert isinstance(params.train.lr, float) and isinstance(params.train.epochs, int)


def test_float_params_given_as_integers_become_floats(raw):
    changed = copy.deepcopy(raw)
    changed["train"]["lr"] = 1
    lr = parse_params(changed).train.lr
    assert lr == 1.0 and type(lr) is float


BAD_TRAIN = [
    ("lr", 0, "is out of range; allowed: a number > 0"),
    ("lr", -0.1, "is out of range; allowed: a number > 0"),
    ("lr", "fast", "is not a number"),
    ("epochs", 0, "is out of range; allowed: an integer >= 1"),
    ("epochs", 2.0, "is not an integer"),
    ("dropout", 1.0, "is out of range; allowed: a number in [0, 1)"),
    ("batch_size", 12.5, "is not an integer"),
    ("batch_size", True, "is not an integer"),
    ("momentum", 1.0, "is out of range; allowed: a number in [0, 1)"),
    ("rotation", -1, "is out of range; allowed: degrees in [0, 180]"),
    ("gamma", 0, "is out of range; allowed: a number in (0, 1]"),
    ("schedule", "cosine", "is out of range; allowed: onecycle or step"),
    ("warmup", 1.0, "is out of range; allowed: a number in (0, 1)"),
    ("start_div", 0.5, "is out of range; allowed: a number >= 1"),
    ("device", "tpu", "is out of range; allowed: auto or cpu or cuda"),
    ("nesterov", "yes", "is not true or false"),
    ("compile", "fast", "is out of range; allowed: auto or on or off"),
    ("compile", 1, "is not a string"),
    ("label_smoothing", 1.0, "is out of range; allowed: a number in [0, 1)"),
    ("ema", -0.5, "is out of range; allowed: a number in [0, 1)"),
    ("translate", 5, "is out of range; allowed: pixels in [0, 4]"),
    ("cuda_graph", "yes", "is out of range; allowed: auto or on or off"),
    ("seed", 2**64, "is out of range; allowed: an integer in [0, 2**64)"),
    ("seed", -1, "is out of range; allowed: an integer in [0, 2**64)"),
    ("scale", 0.6, "is out of range; allowed: a share in [0, 0.5]"),
    ("val_size", -1, "is out of range; allowed: an integer >= 0"),
    ("val_size", 0.5, "is not an integer"),
    ("val_seed", 2**64, "is out of range; allowed: an integer in [0, 2**64)"),
    ("interpolation", "bicubic", "is out of range; allowed: nearest or bilinear"),
    ("bn_recompute", "yes", "is not true or false"),
    ("clean_epochs", -1, "is out of range; allowed: an integer >= 0"),
    ("clean_epochs", 1.5, "is not an integer"),
    ("anneal", "cosine", "is out of range; allowed: cos or linear"),
    ("norm_decay", 0, "is not true or false"),
    ("swa_epochs", -2, "is out of range; allowed: an integer >= 0"),
    ("elastic", -0.5, "is out of range; allowed: pixels in [0, 4]"),
    ("elastic", 5, "is out of range; allowed: pixels in [0, 4]"),
]
BAD_CALIBRATE = [
    ("fits", 0, "is out of range; allowed: an integer >= 1 (networks fitted, whose scores are "
                "averaged)"),
    ("fits", 2.0, "is not an integer"),
    ("max_passed", -1, "is out of range; allowed: an integer >= 0"),
]


@pytest.mark.parametrize("section, key, value, problem",
                         [("train", *case) for case in BAD_TRAIN]
                         + [("calibrate", *case) for case in BAD_CALIBRATE])
def test_bad_value(raw, section, key, value, problem):
    bad = copy.deepcopy(raw)
    bad[section][key] = value
    with pytest.raises(StageError) as err:
        parse_params(bad)
    assert str(err.value).startswith(f"params.yaml: {section}.{key} = {value!r} {problem}")


@pytest.mark.parametrize("changes, message", [
    ({"nesterov": True, "momentum": 0.0},
     "train.nesterov is true but train.momentum is 0; Nesterov momentum needs momentum > 0"),
    ({"cuda_graph": "on", "compile": "on"}, "train.cuda_graph and train.compile are both on"),
    ({"cuda_graph": "on", "ema": 0.99}, "train.cuda_graph is on but train.ema is 0.99"),
    ({"cuda_graph": "on", "device": "cpu"}, "train.cuda_graph is on but train.device is cpu"),
    ({"epochs": 3, "clean_epochs": 3},
     "train.clean_epochs 3 must be below train.epochs 3; at least the first epoch is augmented"),
    ({"epochs": 3, "swa_epochs": 4}, "train.swa_epochs 4 is more than train.epochs 3"),
    ({"swa_epochs": 2, "ema": 0.99}, "train.swa_epochs and train.ema both average the weights"),
    ({"cuda_graph": "on", "clean_epochs": 2},
     "train.cuda_graph is on but train.clean_epochs is 2; the graphs hold the augmented step"),
])
def test_combinations_that_cannot_run_are_one_line_errors(raw, changes, message):
    bad = copy.deepcopy(raw)
    bad["train"].update(changes)
    with pytest.raises(StageError, match=re.escape(f"params.yaml: {message}")):
        parse_params(bad)


@pytest.mark.parametrize("line, message", [
    ("  momentum: 0", "error: params.yaml: train.nesterov is true but train.momentum is 0"),
    ("  seed: 18446744073709551616",
     "error: params.yaml: train.seed = 18446744073709551616 is out of range"),
])
def test_the_train_stage_refuses_them_before_any_work(tmp_path, line, message):
    """What once ended in torch's ValueError or an overflow traceback."""
    key = line.split(":")[0]
    text, n = re.subn(rf"(?m)^{key}:.*$", line, PARAMS_YAML.read_text(), count=1)  # train's
    assert n == 1
    (tmp_path / "params.yaml").write_text(text)
    proc = run_stage("stages.train", "--data", "x", "--models", "y", "--live", "z", cwd=tmp_path)
    assert assert_one_line_error(proc).startswith(message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize("value", [2**64 - 1, 2**64, -1])
def test_bad_calibrate_seed(raw, value):
    """calibrate also seeds with seed + 1, which torch refuses from 2**64 on."""
    bad = copy.deepcopy(raw)
    bad["calibrate"]["seed"] = value
    with pytest.raises(StageError) as err:
        parse_params(bad)
    assert str(err.value) == (f"params.yaml: calibrate.seed = {value!r} is out of range; "
                              "allowed: an integer in [0, 2**64 - 1): the measurement also "
                              "uses seed + 1")



def test_more_photos_of_training_digits_than_digits_fitted_is_one_line(raw):
    """The photos are of the digits fitted: more of them was once cut to calibrate.fitted
    without a word."""
    bad = copy.deepcopy(raw)
    bad["calibrate"].update(fitted=2000, photos=2001)
    with pytest.raises(StageError, match=re.escape(
            "params.yaml: calibrate.photos 2001 is more than calibrate.fitted 2000; the "
            "photos are of the training digits fitted: lower photos or raise fitted")):
        parse_params(bad)
    bad["calibrate"]["photos"] = 2000
    assert parse_params(bad).calibrate.photos == 2000

def test_the_calibrate_stage_refuses_a_seed_it_cannot_add_one_to(raw, tmp_path):
    """What once ended in an "Overflow when unpacking long long" traceback."""
    bad = copy.deepcopy(raw)
    bad["calibrate"]["seed"] = 2**64 - 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
    proc = run_stage("stages.calibrate", "--model", "m.pt", "--data", "d", "--ood", "o.json",
                     "--metrics", "m.json", cwd=tmp_path)
    assert assert_one_line_error(proc).startswith(
        "error: params.yaml: calibrate.seed = 18446744073709551615 is out of range")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.slow
def test_the_largest_calibrate_seed_is_accepted_by_the_fit_and_the_measurement(
        raw, mnist, mnist_model):
    """seed and seed + 1, as the stage uses them, with few images of each kind."""
    from stages.calibrate import Reader, calibrate, measure
    from stages.predict import load_model

    big = copy.deepcopy(raw)
    big["calibrate"].update(seed=2**64 - 2, fitted=500, held_out=100, typed=10, per_kind=5,
                            drawn=5, steps=5, photos=10, photo_sets=5, photo_others=5)
    p = parse_params(big).calibrate
    reader = Reader(*load_model(mnist_model))
    calibration = calibrate(reader, mnist["train"], p, "0" * 32)
    images, labels = mnist["test"]
    metrics, _ = measure(calibration, reader, (images[:100], labels[:100]), p)
    assert metrics["digits"]["typed"]["images"] == 10


def test_the_largest_seed_is_accepted_by_torch(raw):
    from stages.state import new_state

    big = copy.deepcopy(raw)
    big["train"]["seed"] = 2**64 - 1
    p = parse_params(big).train
    assert new_state(dataclasses.replace(p, epochs=1), torch.device("cpu"), 10).epoch == 0


def test_dvc_yaml_makes_train_depend_on_every_train_param_and_no_evaluate_param():
    """A train param missing from dvc.yaml would not rerun the stage when it changes; an
    evaluate param listed there would retrain for a change that only evaluate sees."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    declared = set(stages["train"]["params"])
    assert declared == {f"train.{f.name}" for f in dataclasses.fields(TrainParams)} | {"runtime"}
    for name in ("preprocess", "train", "evaluate"):
        assert "runtime" in stages[name]["params"], name


@pytest.mark.parametrize("text, expected", [
    ("on", "on"), ("off", "off"), ("'on'", "on"), ("auto", "auto"), ("true", "on"),
    ("false", "off"), ("yes", "on"), ("no", "off")])
def test_switches_take_on_and_off_unquoted(raw, tmp_path, text, expected):
    """YAML 1.1 reads a bare on/off/yes/no as a boolean: the user means the word."""
    yaml_text = re.sub(r"(?m)^(  (compile|channels_last|fast_dropout):).*$", rf"\1 {text}",
                       PARAMS_YAML.read_text())
    (tmp_path / "params.yaml").write_text(yaml_text)
    p = load_params(tmp_path / "params.yaml").train
    assert (p.compile, p.channels_last, p.fast_dropout) == (expected,) * 3


@pytest.mark.parametrize("value", ["on", "off", "true"])
def test_switches_set_with_dvc_exp_run_set_param(tmp_path, value):
    """`dvc exp run -S train.compile=on` rewrites params.yaml with DVC's own code."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_YAML.read_text())
    apply_overrides(path, [f"train.compile={value}"])
    assert load_params(path).train.compile == {"true": "on"}.get(value, value)


def test_bad_evaluate_value(raw):
    bad = copy.deepcopy(raw)
    bad["evaluate"]["batch_size"] = 0
    with pytest.raises(StageError, match=r"^params\.yaml: evaluate\.batch_size = 0 is out of"):
        parse_params(bad)


def edit(raw, change) -> dict:
    changed = copy.deepcopy(raw)
    change(changed)
    return changed


@pytest.mark.parametrize("change, message", [
    (lambda r: r["train"].update(dropuot=r["train"].pop("dropout")),
     "params.yaml: unknown key train.dropuot; did you mean train.dropout? allowed: train.epochs, "),
    (lambda r: r["train"].pop("lr"),
     "params.yaml: train.lr is missing; add it (a number > 0)"),
    (lambda r: r["evaluate"].pop("max_errors"),
     "params.yaml: evaluate.max_errors is missing; add it (an integer >= 0"),
    (lambda r: r.update(optimiser={"lr": 0.1}),
     "params.yaml: unknown key optimiser; allowed: train, evaluate, runtime"),
    (lambda r: r.pop("evaluate"),
     "params.yaml: section evaluate is missing; add it"),
    (lambda r: r.update(train=[0.01, 0.9]),
     "params.yaml: train must be a mapping of keys to values, got [0.01, 0.9]"),
    (lambda r: r.update(evaluate=None),
     "params.yaml: evaluate must be a mapping of keys to values, got None"),
], ids=["misspelt key", "missing key", "missing evaluate key", "unknown section",
        "missing section", "section not a mapping", "empty section"])
def test_bad_structure(raw, change, message):
    with pytest.raises(StageError) as err:
        parse_params(edit(raw, change))
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("value", [None, [], "train: {}", 3])
def test_file_not_a_mapping(value):
    with pytest.raises(StageError, match=r"^params\.yaml: the file must be a mapping with the "
                                         r"sections train, evaluate, runtime, calibrate$"):
        parse_params(value)


def test_load_params_missing_file(tmp_path):
    path = tmp_path / "params.yaml"
    with pytest.raises(StageError, match=r"not found; run from the repository root$") as err:
        load_params(path)
    assert str(err.value).startswith(f"{path}: ")


def test_load_params_invalid_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 0.1\n  epochs: [1\n")
    with pytest.raises(StageError) as err:
        load_params(path)
    assert str(err.value).startswith(f"{path}: not valid YAML at line ")
    assert str(err.value).endswith("; fix the syntax")


# --- fingerprint ----------------------------------------------------------------

def test_fingerprint_ignores_resume_but_not_lr():
    p = load_params(PARAMS_YAML).train
    resumed = dataclasses.replace(p, resume=not p.resume)
    assert resumed.fingerprint() == p.fingerprint()
    assert dataclasses.replace(p, lr=p.lr * 2).fingerprint() != p.fingerprint()
    assert dataclasses.replace(p, seed=p.seed + 1).fingerprint() != p.fingerprint()
    candidates = {"interpolation": "bilinear", "bn_recompute": True, "clean_epochs": 1,
                  "anneal": "linear", "norm_decay": False, "swa_epochs": 2, "elastic": 1.0}
    for key, value in candidates.items():  # a state saved with another recipe is not resumed
        assert dataclasses.replace(p, **{key: value}).fingerprint() != p.fingerprint(), key
    assert isinstance(p, TrainParams) and p.fingerprint() == load_params(PARAMS_YAML).train.fingerprint()


# --- a stage fails on bad params before doing any work ---------------------------

def test_train_command_rejects_a_bad_lr(tmp_path):
    text, n = re.subn(r"(?m)^(  lr:).*$", r"\1 -1", PARAMS_YAML.read_text(), count=1)  # train.lr
    assert n == 1
    (tmp_path / "params.yaml").write_text(text)
    proc = run_stage("stages.train", "--data", "x", "--models", "y", "--live", "z", cwd=tmp_path)
    line = assert_one_line_error(proc)
    assert line == "error: params.yaml: train.lr = -1 is out of range; allowed: a number > 0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


# --- the runtime section, applied at the start of each stage -----------------------

def test_runtime_env_pins_the_instruction_set_and_threads():
    from stages.runtime import pin

    environ = {"ATEN_CPU_CAPABILITY": "avx512", "PATH": "/bin"}
    pin("avx2", 2, environ)
    assert environ == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                       "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
                       "PATH": "/bin"}
    pin("native", 1, environ)
    assert environ == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/bin"}


def python_in(folder, code: str, **env) -> list[str]:
    """CODE's printed words, run by a new Python in FOLDER with the repository importable."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO), **env},
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


STAGES = ["stages." + path.stem for path in sorted((REPO / "stages").glob("*.py"))
          if path.stem != "__init__"]


def test_importing_any_stage_module_leaves_the_process_as_it_was(tmp_path):
    """A server or notebook that imports stages.predict from another folder, beside a
    params.yaml with other settings, keeps its own threads and kernels."""
    text = re.sub(r"(?m)^(  threads:).*$", r"\1 2", PARAMS_YAML.read_text())
    (tmp_path / "params.yaml").write_text(text)
    code = (f"import os, torch\nbefore = dict(os.environ)\n"
            f"for name in {STAGES!r}: __import__(name)\n"
            "print(os.environ == before, torch.get_num_threads(), "
            "torch.backends.cpu.get_cpu_capability())")
    # importing torchvision.datasets sets TORCHINDUCTOR_CACHE_DIR where it is unset (torch's
    # own doing, not a stage's): set, as it is once any test has imported torchvision
    same, threads, capability = python_in(tmp_path, code, OMP_NUM_THREADS="1",
                                          ATEN_CPU_CAPABILITY="default",
                                          TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    assert (same, threads, capability) == ("True", "1", "DEFAULT")


@pytest.mark.parametrize("cpu_isa, threads, capability", [("avx2", 1, "AVX2"),
                                                          ("native", 2, None)])
def test_apply_pins_the_runtime_after_the_stage_modules_are_imported(tmp_path, cpu_isa,
                                                                     threads, capability):
    """Each stage applies the runtime first thing in main(), after its imports: torch
    picks its kernels at its first computation, so that is early enough."""
    code = ("import torch\n"
            f"for name in {STAGES!r}: __import__(name)\n"
            "from stages.params import RuntimeParams\nfrom stages.runtime import apply\n"
            f"apply(RuntimeParams(cpu_isa={cpu_isa!r}, threads={threads}, deterministic=True))\n"
            "torch.ones(8).sum()\n"
            "print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), "
            "torch.are_deterministic_algorithms_enabled())")
    found, n, deterministic = python_in(tmp_path, code, ATEN_CPU_CAPABILITY="default")
    assert int(n) == threads and deterministic == "True"
    if capability and "avx2" in Path("/proc/cpuinfo").read_text():
        assert found == capability
    if capability is None:  # native: the user's ATEN_CPU_CAPABILITY=default is not kept
        assert found != "DEFAULT"


def test_avx2_puts_mkl_on_the_branch_that_intel_and_amd_share(tmp_path):
    """MKL's AVX2 branch runs only on Intel processors; on AMD's, MKL picks its own, and
    the digit check's fit (MKL's matrix products) came out otherwise. Its COMPATIBLE
    branch is the same on both: MKL says which branch each call ran on."""
    code = ("import torch\nfrom stages.params import RuntimeParams\n"
            "from stages.runtime import apply\n"
            "apply(RuntimeParams('avx2', 1, True))\ntorch.ones(64, 8) @ torch.ones(8, 64)")
    words = python_in(tmp_path, code, MKL_VERBOSE="1")
    assert [w for w in words if w.startswith("CNR:")] == ["CNR:COMPATIBLE"]


@pytest.mark.skipif("avx512f" not in Path("/proc/cpuinfo").read_text(),
                    reason="needs an AVX-512 CPU, where a late cap would show")
def test_apply_refuses_a_cap_that_comes_after_torch_computed(tmp_path):
    code = ("import torch\ntorch.ones(8).sum(); torch.backends.cpu.get_cpu_capability()\n"
            "from stages.params import RuntimeParams\nfrom stages.runtime import apply\n"
            "from stages.common import StageError\n"
            "try:\n    apply(RuntimeParams('avx2', 1, True))\nexcept StageError as err:\n"
            "    print('refused')")
    assert python_in(tmp_path, code) == ["refused"]


def test_bad_runtime_values_are_one_line_errors(raw):
    bad = copy.deepcopy(raw)
    bad["runtime"]["cpu_isa"] = "avx512"
    with pytest.raises(StageError, match=r"^params\.yaml: runtime\.cpu_isa = 'avx512' is out "
                                         r"of range; allowed: avx2 or native$"):
        parse_params(bad)
    bad["runtime"].update(cpu_isa="avx2", threads=0)
    with pytest.raises(StageError, match=r"runtime\.threads = 0 is out of range"):
        parse_params(bad)


@pytest.mark.parametrize("changes, message", [
    ({"fitted": 50000, "held_out": 10001}, "calibrate.fitted + calibrate.held_out = 60,001 is "
                                           "more than the 60,000 training digits; lower them"),
    ({"photo_sets": 10001}, "calibrate.photo_sets = 10,001 is more than the 10,000 test "
                            "digits it picks from; lower it"),
    ({"drawn": 10001}, "calibrate.drawn = 10,001 is more than the 10,000 test digits"),
])
def test_the_calibrate_stage_refuses_more_digits_than_a_split_holds(raw, changes, message):
    """Once, photo_sets and drawn above 10,000 were cut to the test split without a word."""
    from stages.calibrate import check_sizes

    check_sizes(parse_params(raw).calibrate, 60_000, 10_000)  # the committed params pass
    bad = copy.deepcopy(raw)
    bad["calibrate"].update(changes)
    with pytest.raises(StageError, match=re.escape(f"params.yaml: {message}")):
        check_sizes(parse_params(bad).calibrate, 60_000, 10_000)
