"""Train stage: fit the 7,776-parameter CNN, scoring it after every epoch.

Reads:  DATA_DIR/{train,test}.pt and DATA_DIR/stats.json (from preprocess); with a
        validation split (train.val_size > 0) each epoch is scored on it, and test.pt is
        not read.
Writes: MODELS_DIR/model.pt (final) and best.pt (best validation epoch, or without a
        validation split the best test epoch), checkpoints that rebuild the model;
        MODELS_DIR/state.pt (resumable state, each epoch);
        MODELS_DIR/summary.txt (torchinfo); LIVE_DIR, DVCLive's per-epoch metrics.
Params: train.*, runtime.* (applied first; see stages/runtime.py).

On CUDA the training steps replay from CUDA graphs (train.cuda_graph); elsewhere, or
if capturing fails, they run eagerly: both runners (stages/runners.py) call the same
train_step.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm import tqdm

from stages.common import StageError, load_torch, run_cli, save_torch, write_text
from stages.data import DeviceData, load_split, load_stats, split_validation, to_device
from stages.device import resolve_device, switch
from stages.model import checkpoint, count_params, predict
from stages.params import RuntimeParams, TrainParams, load_params
from stages.runners import (TEST_BATCH_SIZE, EagerRunner, GraphRunner, make_runner,
                            use_cuda_graph)
from stages.runtime import apply as apply_runtime
from stages.state import TrainState, new_state, use_compile

# DVC's tools are imported in main() only: the training functions also run where they
# are not installed (benchmarks/gpu_check.py on a bare GPU machine)
if TYPE_CHECKING:
    from dvclive import Live

METRICS = ("train/loss", "train/acc", "test/loss", "test/acc", "lr")
VAL_METRICS = ("val/loss", "val/acc")  # with a validation split (train.val_size > 0)
# the code whose changes make a saved state stale (with the params and the data)
CODE = [Path(__file__).with_name(name) for name in
        ("train.py", "state.py", "runners.py", "data.py", "model.py", "device.py", "params.py",
         "common.py", "runtime.py")]


def score(model, data: DeviceData, batch_size: int | None = TEST_BATCH_SIZE
          ) -> tuple[float, float]:
    """(mean loss, accuracy %) of MODEL on DATA, in eval mode; BATCH_SIZE None is all
    of DATA in one batch."""
    out = predict(model, data.x, batch_size or len(data))
    loss = F.nll_loss(out, data.y, reduction="sum").item() / len(data)
    return loss, 100 * (out.argmax(dim=1) == data.y).sum().item() / len(data)


def fit(state: TrainState, train_data: DeviceData, test_data: DeviceData | None,
        p: TrainParams, on_epoch=None, runner: EagerRunner | GraphRunner | None = None,
        val_data: DeviceData | None = None) -> list[dict]:
    """Train from STATE.epoch to P.epochs, calling ON_EPOCH(state) after each epoch.
    Each epoch is scored on VAL_DATA if given, and then the test set is not touched
    (TEST_DATA may be None); without VAL_DATA, on TEST_DATA, the notebook's curve.

    RUNNER runs the training steps; by default the one train.cuda_graph asks for."""
    if runner is None:
        runner = make_runner(state, train_data, p, use_cuda_graph(p, train_data.x.device))
    split, scored_on = ("val", val_data) if val_data is not None else ("test", test_data)
    state.runner = runner.name
    while state.epoch < p.epochs:
        epoch = state.epoch + 1
        lr = state.lrs[state.step]
        start = time.perf_counter()
        train_loss, train_acc = runner.train_epoch(state, train_data, p,
                                                   desc=f"epoch {epoch}/{p.epochs}")
        state.end_of_epoch(p, train_data.x)
        loss, acc = score(state.scored, scored_on, runner.test_batch_size)
        row = {"epoch": epoch, "train/loss": train_loss, "train/acc": train_acc,
               f"{split}/loss": loss, f"{split}/acc": acc, "lr": lr}
        seconds = time.perf_counter() - start
        state.epoch = epoch
        state.history.append(row)
        if on_epoch is not None:
            on_epoch(state)
        # after ON_EPOCH: once this line is out, the epoch's state is saved
        tqdm.write(f"epoch {epoch:2d}/{p.epochs}  train loss {train_loss:.4f} "
                   f"acc {train_acc:6.2f}%  {split} loss {loss:.4f} acc {acc:6.2f}%  "
                   f"lr {lr:.0e}  {seconds:5.1f}s")
    return state.history


def log_epoch(live: Live, row: dict) -> None:
    live.step = row["epoch"]
    for name in METRICS + VAL_METRICS:
        if name in row:
            live.log_metric(name, row[name])
    live.next_step()


def is_better(row: dict, best: dict | None) -> bool:
    """Whether the epoch of history ROW beats the checkpoint BEST (None: there is none
    yet). With a validation split, on validation accuracy: the test set chooses
    nothing. Without one, on test accuracy, the notebook's measure, which is then
    selected on the test set and is no estimate of accuracy on new digits. A tie keeps
    the earlier epoch."""
    if best is None:
        return True
    if "val/acc" in row:
        return row["val/acc"] > best["val_accuracy"]
    return row["test/acc"] > best["test_accuracy"]


def best_summary(history: list[dict], best: dict) -> dict:
    """DVCLive's `best`. Without a validation split, as the notebook reports them: the
    best test and train accuracy over all epochs (the test one chosen on the test set).
    With one, the best validation epoch, which best.pt holds, and the best train
    accuracy: the test set was not scored."""
    train_acc = max(row["train/acc"] for row in history)
    if "val_accuracy" in best:
        return {"val_acc": best["val_accuracy"], "val_epoch": best["epoch"],
                "train_acc": train_acc}
    top = max(history, key=lambda row: row["test/acc"])  # the first of equals
    return {"test_acc": top["test/acc"], "test_epoch": top["epoch"], "train_acc": train_acc}


def device_model(device: torch.device) -> str:
    """The GPU's name on CUDA; the device type elsewhere (the CPU's instruction set is
    pinned by the runtime section)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def fingerprint(p: TrainParams, runtime: RuntimeParams, device: torch.device, *facts) -> str:
    """What a resumable state must match: everything that changes the bytes a run
    writes. The train params, how torch computes (the runtime section, torch's version,
    the device type and GPU model), the code that trains and sets the runtime, and
    FACTS about the data (its content, normalisation). The runner is checked apart
    (resume_runner), as it is known only once capturing has been tried."""
    code = hashlib.sha256(b"".join(path.read_bytes() for path in CODE)).hexdigest()
    key = json.dumps([p.fingerprint(), dataclasses.asdict(runtime), device.type,
                      device_model(device), torch.__version__, code, *facts])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def data_digest(*tensors: torch.Tensor) -> str:
    """A hash of the tensors' shapes, types and bytes (CPU tensors)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(f"{tuple(tensor.shape)} {tensor.dtype};".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def restore(p: TrainParams, device: torch.device, n_train: int, state_path: Path,
            key: str) -> TrainState:
    """A new state, or with `train.resume` the one saved in STATE_PATH if it matches KEY."""
    state = new_state(p, device, n_train)
    if not p.resume or not state_path.exists():
        return state
    try:
        saved = load_torch(state_path, "resumable training state")
    except StageError:
        print(f"{state_path}: unreadable resumable state, ignored; starting from epoch 1")
        return state
    if not isinstance(saved, dict) or saved.get("fingerprint") != key:
        print(f"{state_path}: made with other params, code or data, ignored; "
              "starting from epoch 1")
        return state
    try:
        state.load_state_dict(saved)
    except (KeyError, RuntimeError, TypeError, ValueError):
        print(f"{state_path}: resumable state does not fit this run, ignored; "
              "starting from epoch 1")
        return new_state(p, device, n_train)
    print(f"{state_path}: resuming after epoch {state.epoch} of {p.epochs}")
    return state


def resume_runner(state: TrainState, p: TrainParams, data: DeviceData, state_path: Path
                  ) -> tuple[TrainState, EagerRunner | GraphRunner]:
    """STATE (from restore) and the runner that trains it on DATA. A resumed state whose
    epochs another runner trained (CUDA graphs, or eager after a failed capture: other
    last bits) is ignored, and training starts from epoch 1."""
    device = data.x.device
    runner = make_runner(state, data, p, use_cuda_graph(p, device))
    if state.epoch and state.runner != runner.name:
        print(f"{state_path}: its epochs ran on the {state.runner} runner and this run's is "
              f"{runner.name}, ignored; starting from epoch 1")
        state = new_state(p, device, len(data))
        runner = make_runner(state, data, p, use_cuda_graph(p, device))
    return state, runner


def main() -> None:
    from dvclive import Live
    from torchinfo import summary

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--live", type=Path, required=True)
    args = parser.parse_args()
    params = load_params()
    apply_runtime(params.runtime)
    p = params.train
    device = resolve_device(p.device)
    mean, std = load_stats(args.data / "stats.json")
    images, labels = train_split = load_split(args.data / "train.pt")
    val_data = test_data = None
    if p.val_size:  # validation only: the test set is not even read
        kept, held = split_validation(labels, p.val_size, p.val_seed)
        val_data = to_device(images[held], labels[held], mean, std, device)
        images, labels = images[kept], labels[kept]
        digest = data_digest(*train_split)
    else:
        test_split = load_split(args.data / "test.pt")
        test_data = to_device(*test_split, mean, std, device)
        digest = data_digest(*train_split, *test_split)
    train_data = to_device(images, labels, mean, std, device)
    state_path = args.models / "state.pt"
    key = fingerprint(p, params.runtime, device, digest, mean, std)
    state = restore(p, device, len(train_data), state_path, key)
    # zeros in eval mode: the summary must not touch the RNG or BatchNorm statistics
    info = summary(state.model, input_data=torch.zeros(1, 1, 28, 28, device=device),
                   mode="eval", verbose=0, col_names=("output_size", "num_params"))
    print(info)
    write_text(args.models / "summary.txt", f"{info}\n")
    n_params = count_params(state.model)
    scored = (f"{len(val_data)} validation images (the test set unused)" if val_data is not None
              else f"{len(test_data)} test images")
    print(f"device {device}, {n_params} parameters, {len(train_data)} train / {scored}, "
          f"channels_last {switch(p.channels_last, device)}, "
          f"compile {use_compile(p, device)}, "
          f"cuda_graph {use_cuda_graph(p, device)}, "
          f"fast_dropout {switch(p.fast_dropout, device, 'cpu')}, "
          f"ema {p.ema or 'off'}, {torch.get_num_threads()} CPU threads")
    state, runner = resume_runner(state, p, train_data, state_path)

    best_path = args.models / "best.pt"
    if state.best is not None:
        save_torch(best_path, state.best)

    def make_checkpoint(s: TrainState) -> dict:
        weights = s.ema.module if s.ema is not None else s.model
        row = s.history[-1]
        accuracy = ({"val_accuracy": row["val/acc"]} if "val/acc" in row
                    else {"test_accuracy": row["test/acc"]})
        return checkpoint(weights, {"dropout": p.dropout}, epoch=s.epoch, **accuracy,
                          params=dataclasses.asdict(p), normalisation={"mean": mean, "std": std})

    with Live(dir=str(args.live), dvcyaml=False, save_dvc_exp=False, report=None) as live:
        for row in state.history:  # a resumed run replays its history into a clean folder
            log_epoch(live, row)

        def on_epoch(s: TrainState) -> None:
            log_epoch(live, s.history[-1])
            if is_better(s.history[-1], s.best):
                s.best = make_checkpoint(s)
                save_torch(best_path, s.best)
            save_torch(state_path, s.state_dict(key))

        fit(state, train_data, test_data, p, on_epoch, runner, val_data)
        live.summary["params"] = n_params
        live.summary["best"] = best_summary(state.history, state.best)

    save_torch(args.models / "model.pt", make_checkpoint(state))
    best = live.summary["best"]
    if "val_acc" in best:
        print(f"final validation accuracy {state.history[-1]['val/acc']:.2f}%, best "
              f"{best['val_acc']:.2f}% (epoch {best['val_epoch']}, best.pt); test set unused")
    else:
        print(f"final test accuracy {state.history[-1]['test/acc']:.2f}%, "
              f"best test {best['test_acc']:.2f}% (epoch {best['test_epoch']})")

if __name__ == "__main__":
    run_cli(main)
