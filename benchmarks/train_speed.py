"""Training throughput: this project's loop against the usual DataLoader pipeline.

Run from the repository root after `dvc repro preprocess`:

    python -m benchmarks.train_speed [--batches N] [--json] [--out results.json]

In one process it measures training images per second for
  (a) project:  stages.train's runner (CUDA graphs on CUDA, eager elsewhere):
                device-resident data, seeded randperm batches, batched rotation and
                shift on the device, then the per-epoch test pass;
  (b) baseline: torchvision's MNIST dataset with RandomAffine (the recipe's rotation
                and shift), ToTensor and Normalize in a DataLoader, the same model and
                optimiser, then a test pass;
  (c) ceiling:  the same training step on resident batches, no augmentation, no test pass.
(a) and (b) count the test pass, as a real epoch does. All use params.yaml's train
section, with its runtime section applied first, as the train stage does.
Each round measures the three back to back; the table shows the fastest of each over
the rounds, and the last line the median over rounds of each round's ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from stages.common import StageError, run_cli, write_json
from stages.data import load_split, load_stats, to_device
from stages.device import resolve_device
from stages.params import load_params
from stages.runtime import apply as apply_runtime
from stages.runners import TEST_BATCH_SIZE, EagerRunner, make_runner, use_cuda_graph
from stages.train import new_state, score

MNIST_RAW = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def timed(fn, device: torch.device) -> float:
    """Seconds FN takes, with the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def torchvision_root(raw_dir: Path, root: Path) -> Path:
    """Lay ROOT out as torchvision's MNIST expects, linking to RAW_DIR's files."""
    (root / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
    for name in MNIST_RAW:
        link = root / "MNIST" / "raw" / name
        if not link.exists():
            os.symlink((raw_dir / name).resolve(), link)
    return root


def baseline_epoch(p, root: Path, mean: float, std: float, device: torch.device,
                   n_train: int, n_test: int, eval_batch_size: int, workers: int) -> float:
    """Seconds for one DataLoader epoch of N_TRAIN images plus a test pass of N_TEST."""
    normalise = [transforms.ToTensor(), transforms.Normalize((mean,), (std,))]
    # the recipe's rotation and shift (RandomAffine's shift is a share of the side)
    shift = (p.translate / 28, p.translate / 28) if p.translate > 0 else None
    train_set = datasets.MNIST(root, train=True, transform=transforms.Compose(
        [transforms.RandomAffine((-p.rotation, p.rotation), translate=shift, fill=0)]
        + normalise))
    test_set = datasets.MNIST(root, train=False, transform=transforms.Compose(normalise))
    loader_args = dict(num_workers=workers, pin_memory=device.type == "cuda",
                       persistent_workers=False)
    train_loader = DataLoader(Subset(train_set, range(n_train)), batch_size=p.batch_size,
                              shuffle=True, **loader_args)
    test_loader = DataLoader(Subset(test_set, range(n_test)), batch_size=eval_batch_size,
                             **loader_args)
    state = new_state(dataclasses.replace(p, compile="off", channels_last="off"), device, n_train)
    model, optimizer = state.model, state.optimizer

    def epoch() -> None:
        model.train()
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.nll_loss(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.inference_mode():
            for x, y in test_loader:
                model(x.to(device)).argmax(dim=1).eq(y.to(device)).sum().item()

    return timed(epoch, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--batches", type=int, default=0,
                        help="training batches per measurement (default: a whole epoch)")
    parser.add_argument("--workers", type=int, default=2, help="baseline DataLoader workers")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of the three measurements; the fastest of each counts")
    parser.add_argument("--json", action="store_true", help="end with one line of JSON")
    parser.add_argument("--out", type=Path, help="also write that JSON to this file")
    args = parser.parse_args()

    if args.batches < 0 or args.repeat < 1 or args.workers < 0:
        raise StageError("--batches must be >= 0, --repeat >= 1 and --workers >= 0")
    params = load_params()
    apply_runtime(params.runtime)
    p = params.train
    eval_bs = TEST_BATCH_SIZE
    device = resolve_device(p.device)
    mean, std = load_stats(args.data / "stats.json")
    images, labels = load_split(args.data / "train.pt")
    test_images, test_labels = load_split(args.data / "test.pt")
    n_train = len(labels) if not args.batches else min(len(labels), args.batches * p.batch_size)
    n_test = round(len(test_labels) * n_train / len(labels))  # the test pass, pro rata
    train_data = to_device(images[:n_train], labels[:n_train], mean, std, device)
    test_data = to_device(test_images[:n_test], test_labels[:n_test], mean, std, device)

    # warm-up sets with the measured batch shapes, the last partial batch included, so
    # that compiling and CUDA-graph recording happen before any timing
    n_warm = 2 * p.batch_size + n_train % p.batch_size
    n_warm_test = eval_bs + n_test % eval_bs
    warm = to_device(images[:n_warm], labels[:n_warm], mean, std, device)
    warm_test = to_device(test_images[:n_warm_test], test_labels[:n_warm_test], mean, std,
                          device)
    # the lr schedule must span every step the benchmark trains (onecycle refuses to step
    # past its end): two warm-up passes, then REPEAT measured epochs of N_TRAIN images
    steps = math.ceil(n_train / p.batch_size)
    warm_steps = 2 * math.ceil(n_warm / p.batch_size)
    p = dataclasses.replace(p, epochs=args.repeat + math.ceil(warm_steps / steps))
    project = new_state(p, device, n_train)
    ceiling = new_state(p, device, n_train)
    no_aug = dataclasses.replace(p, rotation=0.0, translate=0.0)
    for s, q in ((project, p), (ceiling, no_aug)):
        for _ in range(2):
            EagerRunner().train_epoch(s, warm, q)
            score(s.net, warm_test, eval_bs)
    graphed = use_cuda_graph(p, device)
    runners = {"project": make_runner(project, train_data, p, graphed),
               "ceiling": make_runner(ceiling, train_data, no_aug, graphed)}
    test_bs = runners["project"].test_batch_size

    measure = {
        "project": lambda: timed(lambda: (
            runners["project"].train_epoch(project, train_data, p),
            score(project.scored, test_data, test_bs)), device),
        "baseline": lambda: baseline_epoch(p, tv_root, mean, std, device, n_train, n_test,
                                           eval_bs, args.workers),
        "ceiling": lambda: timed(lambda: runners["ceiling"].train_epoch(ceiling, train_data,
                                                                        no_aug), device),
    }
    with tempfile.TemporaryDirectory(prefix="mnist-tv-") as tmp:
        tv_root = torchvision_root(args.raw, Path(tmp))
        rounds = [{k: fn() for k, fn in measure.items()} for _ in range(args.repeat)]
    seconds = {k: min(r[k] for r in rounds) for k in measure}
    rate = {k: n_train / s for k, s in seconds.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"cpu ({torch.get_num_threads()} threads)")
    print(f"device {name}, torch {torch.__version__}, {n_train} training images"
          f"{f' + {n_test} test' if n_test else ''} per measurement, best of {args.repeat}")
    print(f"{'pipeline':<10}{'seconds':>9}{'images/s':>10}{'vs baseline':>13}{'vs ceiling':>12}")
    for key, label in (("project", "(a) project"), ("baseline", "(b) baseline"),
                       ("ceiling", "(c) ceiling")):
        print(f"{label:<10}{seconds[key]:>9.2f}{rate[key]:>10.0f}"
              f"{rate[key] / rate['baseline']:>12.2f}x{rate[key] / rate['ceiling']:>11.2f}x")
    # each round measures the three back to back, so its ratios share the machine's
    # state; on a machine whose speed drifts, their median is steadier than best-of
    paired = {other: statistics.median(r[other] / r["project"] for r in rounds)
              for other in ("baseline", "ceiling")}
    print(f"median over rounds of (a)'s speed against: (b) {paired['baseline']:.2f}x, "
          f"(c) {paired['ceiling']:.2f}x")
    results = {"project_img_s": round(rate["project"], 1),
               "baseline_img_s": round(rate["baseline"], 1),
               "ceiling_img_s": round(rate["ceiling"], 1),
               "paired_vs_baseline": round(paired["baseline"], 3),
               "paired_vs_ceiling": round(paired["ceiling"], 3),
               "device": name, "torch": torch.__version__,
               "runner": runners["project"].name,
               "train_images": n_train, "rounds": args.repeat}
    if args.json:
        print(json.dumps(results))
    if args.out:
        write_json(args.out, results)  # atomic; tools.docs makes docs' table from it


if __name__ == "__main__":
    run_cli(main)
