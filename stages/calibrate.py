"""Calibrate: fit the digit check (stages/ood.py) for the trained model, and measure it.

Reads:  MODEL (models/model.pt); DATA/train.pt to fit the check and set its threshold;
        DATA/test.pt only to measure it; images that stages/synthetic.py and
        stages/photos.py make.
Writes: OOD (models/ood.json), the check that predict and serve read; METRICS
        (metrics/ood.json): the share of MNIST test digits, typed and pen-drawn digits,
        photos of test digits under each degradation, and of each kind of non-digit
        (drawn or photographed) that it flags, what its first network alone and three
        simpler scores flag at the same threshold share, and how many of the test
        digits the model reads right;
        PASSED_PNG (plots/ood_passed.png): the measured non-digits that it takes for
        digits, as the model saw them.
Params: calibrate.* (params.yaml), runtime.

The fit uses FITTED MNIST training digits (PHOTOS of them also photographed), typed
digits and non-digits from `seed`; the threshold is the score that a share FALSE_FLAGS
of HELD_OUT other training digits exceeds. Measuring uses the test split and images
from `seed + 1`.

Image files are read (stages/sheet.py, most of the stage's time) and the check's
networks fitted in one process for each core the stage may use, up to 4. What a file
gives depends on it alone, and each network starts here from the seed's draws in turn,
so the outputs are the same bytes with any number of processes.
"""

from __future__ import annotations

import argparse
import io
import math
import multiprocessing
import os
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from stages.common import StageError, run_cli, write_json
from stages.data import load_split
from stages.figures import digit_grid
from stages.ood import N_INK, N_LOGITS, DigitCheck, features, file_md5, fit, logits_of, rounded
from stages.params import CalibrateParams, load_params
from stages.runtime import apply as apply_runtime
from stages.predict import load_model, normalise, read_digit, to_mnist
from stages.photos import (DEGRADATIONS, NON_DIGITS, STYLES, lamp_photo, non_digit_photos,
                           photograph, some_degradations)
from stages.synthetic import KINDS, drawn, make, pen_strokes, typed_digits

PAGE_SCALE, PAGE_PEN, PAGE_SIDE = 10, 16, 280  # the page's canvas: stages/page/page.js
METRICS = Path("metrics/ood.json")


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


BATCH = 256  # files handed to the processes at a time, so that few are held at once
WORKERS = 4  # processes at most: each holds about 340 MB (torch's libraries), and beyond
             # 4 the stage's own process, which makes the photos, keeps them waiting


def digit_or_none(data: bytes) -> np.ndarray | None:
    """The 28×28 digit in image file DATA, or None where predict would refuse it."""
    try:
        return read_digit(data)
    except StageError:
        return None


def mapped(function, items: Iterable, pool: Executor | None) -> Iterator:
    """FUNCTION of each of ITEMS, in order: in POOL's processes, BATCH at a time, or here.
    Each result depends on its item alone, so it is the same either way."""
    if pool is None:
        yield from map(function, items)
        return
    items = iter(items)
    while batch := list(islice(items, BATCH)):
        yield from pool.map(function, batch, chunksize=8)


def read_files(files: Iterable[bytes], pool: Executor | None = None
               ) -> tuple[torch.Tensor, list[int], int]:
    """Image FILES read as predict reads a file (in POOL's processes, if given): uint8
    digits (N, 28, 28) of those read, their indices in FILES, and how many files there
    were in all (the others were refused: blank, or no ink worth the name)."""
    digits, read, total = [], [], 0
    for i, digit in enumerate(mapped(digit_or_none, files, pool)):
        total += 1
        if digit is not None:
            digits.append(torch.from_numpy(digit))
            read.append(i)
    return (torch.stack(digits) if digits else torch.zeros(0, 28, 28, dtype=torch.uint8)), read, total


def _framed_one(digit: np.ndarray) -> np.ndarray:
    return to_mnist(digit.astype(np.float64))


def framed(images: torch.Tensor, pool: Executor | None = None) -> torch.Tensor:
    """MNIST digits (N, 28, 28) framed again as predict frames an image file's digit (in
    POOL's processes, if given)."""
    return torch.stack([torch.from_numpy(d) for d in mapped(_framed_one, images.numpy(), pool)])


@contextmanager
def worker_pool(processes: int | None = None) -> Iterator[ProcessPoolExecutor]:
    """PROCESSES that read images and fit the check's networks for a Reader: by default
    one for each core this process may use, up to WORKERS. They start afresh (spawn),
    with this process's environment, which apply_runtime() has pinned. One that dies (the
    kernel kills the largest process when memory runs out) ends the work in one line."""
    processes = processes or min(WORKERS, len(os.sched_getaffinity(0)))
    with ProcessPoolExecutor(max_workers=processes,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            yield pool
        except BrokenProcessPool:
            which = f"one of the {processes} processes" if processes > 1 else "the process"
            fewer = (", or use fewer cores (taskset -c 0 dvc repro calibrate runs one)"
                     if processes > 1 else "")
            raise StageError(f"{which} reading images or fitting the digit check died before "
                             "it was done (killed, perhaps for want of memory: each holds "
                             f"about 340 MB); free memory{fewer}") from None


@dataclass
class Group:
    """Images of one kind as the check sees them: features of those that were read, how
    many in all, for digits the labels of those read, and the uint8 28×28 digits that
    preprocessing made of them."""

    feats: torch.Tensor
    total: int
    labels: torch.Tensor | None = None
    digits: torch.Tensor | None = None

    @property
    def refused(self) -> int:
        return self.total - len(self.feats)

    @property
    def correct(self) -> int:
        """Digits read as their label (a refused one is not)."""
        if not len(self.feats):
            return 0
        return int((logits_of(self.feats).argmax(dim=1) == self.labels).sum())


class Reader:
    """Features of digits for one loaded model; image files are read, and the check's
    networks fitted, in POOL's processes if given (the features are computed here)."""

    def __init__(self, model: torch.nn.Module, mean: float, std: float,
                 pool: Executor | None = None):
        self.model, self.mean, self.std, self.pool = model, mean, std, pool

    def digits(self, digits: torch.Tensor, labels: torch.Tensor | None = None,
               total: int | None = None) -> Group:
        x = normalise(digits, self.mean, self.std)
        feats = features(self.model, x, digits) if len(digits) else torch.zeros(0, 0)
        return Group(feats, len(digits) if total is None else total, labels, digits)

    def files(self, files: Iterable[bytes], labels: torch.Tensor | None = None) -> Group:
        """Image FILES (their bytes), read as predict reads them; LABELS: of each file."""
        digits, read, total = read_files(files, self.pool)
        return self.digits(digits, None if labels is None else labels[read], total)

    def images(self, images: list[Image.Image], labels: torch.Tensor | None = None) -> Group:
        """IMAGES saved as PNG files and read back as predict reads a file."""
        return self.files(map(png, images), labels)


def photo_set(images: torch.Tensor, seed: int, degradations: frozenset[str],
              style: str | None = None) -> Iterator[bytes]:
    """Photos of MNIST digits IMAGES (N, 28, 28), each from its own seed, written in
    STYLE: one digit with other degradations, or in another style, lies on the same
    sheet at the same place."""
    for i, digit in enumerate(images.numpy()):
        yield photograph(digit / 255, [seed, i], degradations, style)


def fitting_photos(images: torch.Tensor, seed: int) -> Iterator[bytes]:
    """Photos of IMAGES to fit on, each with some degradations (about half of them);
    half of them written in one of the STYLES (a pen, pencil, a note on a desk, a
    blackboard)."""
    rng = np.random.default_rng([seed, len(DEGRADATIONS)])
    styles = np.random.default_rng([seed, len(DEGRADATIONS), len(STYLES)])
    for i, digit in enumerate(images.numpy()):
        pick = int(styles.integers(2 * len(STYLES)))
        style = list(STYLES)[pick] if pick < len(STYLES) else None
        yield photograph(digit / 255, [seed, i], some_degradations(rng), style)


def check_sizes(p: CalibrateParams, n_train: int, n_test: int | None) -> None:
    """Refuse, in one line, params that ask for more digits than the split holds (N_TRAIN
    training digits, N_TEST test digits, if known)."""
    if p.fitted + p.held_out > n_train:
        raise StageError(f"params.yaml: calibrate.fitted + calibrate.held_out = "
                         f"{p.fitted + p.held_out:,} is more than the {n_train:,} training "
                         "digits; lower them")
    for name in ("drawn", "photo_sets"):
        if n_test is not None and getattr(p, name) > n_test:
            raise StageError(f"params.yaml: calibrate.{name} = {getattr(p, name):,} is more "
                             f"than the {n_test:,} test digits it picks from; lower it")


@dataclass
class Calibration:
    check: DigitCheck
    fitted: Group            # the training digits it was fitted on
    fitted_labels: torch.Tensor
    held_out: Group          # and those that set its threshold


def calibrate(reader: Reader, train: tuple[torch.Tensor, torch.Tensor], p: CalibrateParams,
              model_md5: str) -> Calibration:
    """The check, fitted on training digits (as they are, and photographed), typed
    digits, non-digits and photos of non-digits from p.seed, with its threshold set on
    the held-out training digits."""
    images, labels = train
    check_sizes(p, len(images), None)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(p.seed))
    fit_order, held_order = order[:p.fitted], order[p.fitted:p.fitted + p.held_out]
    fitted = reader.digits(framed(images[fit_order], reader.pool))
    held_out = reader.digits(framed(images[held_order], reader.pool))
    typed = reader.images(typed_digits(p.typed, p.seed)[0])
    photos = reader.files(fitting_photos(images[fit_order[:p.photos]], p.seed))
    others = [reader.images(make(kind, p.per_kind, p.seed)).feats for kind in KINDS]
    others += [reader.files(non_digit_photos(kind, p.photo_others, p.seed)).feats
               for kind in NON_DIGITS]
    others = torch.cat([feats for feats in others if len(feats)])  # solid fills: all blank
    digits = torch.cat([fitted.feats, typed.feats, photos.feats])
    check = rounded(fit(digits, others, hidden=p.hidden, fits=p.fits,
                        steps=p.steps, lr=p.lr, weight_decay=p.weight_decay, seed=p.seed,
                        model_md5=model_md5, pool=reader.pool))
    threshold = torch.quantile(check.scores(held_out.feats), 1 - p.false_flags,
                               interpolation="higher").item()
    return Calibration(replace(check, threshold=threshold), fitted, labels[fit_order], held_out)


# --- simpler scores, for comparison: higher is less like a digit --------------------

def max_softmax(feats: torch.Tensor, _) -> torch.Tensor:
    """Hendrycks & Gimpel (2017): minus the largest probability."""
    return -logits_of(feats).softmax(dim=1).max(dim=1).values


def energy(feats: torch.Tensor, _) -> torch.Tensor:
    """Liu et al. (2020): minus the log-sum-exp of the logits."""
    return -logits_of(feats).logsumexp(dim=1)


@dataclass(frozen=True)
class Gaussians:
    """Class means of the last block's channel means, and their shared covariance's
    inverse (Lee et al., 2018)."""

    channels: int  # the last block's: the logits' inputs
    means: torch.Tensor
    precision: torch.Tensor

    def last_block(self, feats: torch.Tensor) -> torch.Tensor:
        return feats[:, -N_INK - N_LOGITS - self.channels:-N_INK - N_LOGITS].double()

    @classmethod
    def fit(cls, channels: int, feats: torch.Tensor, labels: torch.Tensor) -> Gaussians:
        f = cls(channels, torch.zeros(0), torch.zeros(0)).last_block(feats)
        means = torch.stack([f[labels == c].mean(dim=0) for c in range(N_LOGITS)])
        centred = f - means[labels]
        return cls(channels, means, torch.linalg.inv(centred.T @ centred / len(f)))


def mahalanobis(feats: torch.Tensor, gaussians: Gaussians) -> torch.Tensor:
    """Lee et al. (2018): the distance to the nearest class mean."""
    diff = gaussians.last_block(feats)[:, None, :] - gaussians.means[None]
    return torch.einsum("ncd,de,nce->nc", diff, gaussians.precision, diff).min(dim=1).values


BASELINES = {"max_softmax": max_softmax, "energy": energy, "mahalanobis": mahalanobis}


def one_network(check: DigitCheck, hidden: int) -> DigitCheck:
    """The first of the networks (of HIDDEN units each) whose mean is CHECK: the check
    that calibrate.fits: 1 fits. Its scores are that network's own divided by the
    number of fits and shifted, which a threshold set on them absorbs."""
    return replace(check, hidden=check.hidden[:hidden], hidden_bias=check.hidden_bias[:hidden],
                   out=check.out[:hidden], threshold=math.inf)


def percent(count: int, total: int) -> float:
    return round(100 * count / total, 2) if total else 0.0


PHOTO_SETS = {"clean": frozenset(), **{d: frozenset([d]) for d in DEGRADATIONS},
              "all": frozenset(DEGRADATIONS)}


def evenly(n: int, total: int) -> torch.Tensor:
    """N indices (at most TOTAL) spread evenly over range(TOTAL)."""
    return torch.linspace(0, total - 1, min(n, total)).long()


@dataclass(frozen=True)
class Passed:
    """A measured non-digit that the check takes for a digit."""

    kind: str
    score: float
    digit: np.ndarray  # the uint8 28×28 that the model saw
    answer: int        # the model's digit for it


def measure(calibration: Calibration, reader: Reader, test: tuple[torch.Tensor, torch.Tensor],
            p: CalibrateParams) -> tuple[dict, list[Passed]]:
    """What the check and the simpler scores flag, each at the threshold that flags a
    share p.false_flags of the held-out training digits, on images it was not fitted on:
    the test split (as it is, drawn with the page's pen, and photographed under each
    degradation), and typed digits, non-digits and photos of them from p.seed + 1; and
    how many of the test digits the model reads right. Also the non-digits it passes,
    by kind, the most digit-like first."""
    seed = p.seed + 1
    images, labels = test
    picked = evenly(p.drawn, len(images))
    pen = [drawn(pen_strokes(d), PAGE_SCALE, PAGE_PEN, PAGE_SIDE) for d in images[picked].numpy()]
    digits = {"mnist_test": reader.digits(framed(images, reader.pool), labels),
              "typed": reader.images(typed_digits(p.typed, seed)[0]),
              "drawn": reader.images(pen, labels[picked])}
    picked = evenly(p.photo_sets, len(images))
    photos = {name: reader.files(photo_set(images[picked], seed, degradations), labels[picked])
              for name, degradations in PHOTO_SETS.items()}
    photos |= {name: reader.files(photo_set(images[picked], seed, frozenset(), name),
                                  labels[picked]) for name in STYLES}
    photos["lamp"] = reader.files((lamp_photo(digit / 255, [seed, i])
                                   for i, digit in enumerate(images[picked].numpy())),
                                  labels[picked])
    others = {kind: reader.images(make(kind, p.per_kind, seed)) for kind in KINDS}
    others |= {f"photo_{kind}": reader.files(non_digit_photos(kind, p.photo_others, seed))
               for kind in NON_DIGITS}
    check, held_out = calibration.check, calibration.held_out
    gaussians = Gaussians.fit(reader.model.features[-1].in_channels, calibration.fitted.feats,
                              calibration.fitted_labels)
    scorers = {"check": check.scores, "one_network": one_network(check, p.hidden).scores,
               **{name: (lambda f, s=score: s(f, gaussians)) for name, score in BASELINES.items()}}
    thresholds = {name: torch.quantile(score(held_out.feats).double(), 1 - p.false_flags,
                                       interpolation="higher").item()
                  for name, score in scorers.items() if name != "check"}
    thresholds["check"] = check.threshold

    def rates(group: Group) -> dict:
        flagged = {name: int((score(group.feats) > thresholds[name]).sum()) if len(group.feats) else 0
                   for name, score in scorers.items()}
        accuracy = {} if group.labels is None else {"accuracy": percent(group.correct, group.total)}
        return {"images": group.total, **accuracy, "refused": percent(group.refused, group.total),
                "flagged": percent(flagged["check"], group.total),
                "detected": percent(group.refused + flagged["check"], group.total),
                "one_network": percent(group.refused + flagged["one_network"], group.total),
                "simpler": {name: percent(group.refused + flagged[name], group.total)
                            for name in BASELINES}}

    non_digits = {kind: rates(group) for kind, group in others.items()}
    everything = Group(torch.cat([g.feats for g in others.values() if len(g.feats)]),
                       sum(g.total for g in others.values()))
    non_digits["all"] = rates(everything)
    metrics = {"false_flags_target": round(100 * p.false_flags, 2),
               "held_out_flagged": rates(held_out)["flagged"],
               "digits": {name: rates(group) for name, group in digits.items()},
               "photos": {name: rates(group) for name, group in photos.items()},
               "non_digits": non_digits}
    return metrics, passed_by(check, others)


def passed_by(check: DigitCheck, groups: dict[str, Group]) -> list[Passed]:
    """The images of GROUPS (by kind) that CHECK takes for digits, by kind, then by
    score, the most digit-like first."""
    passed = []
    for kind, group in sorted(groups.items()):
        if not len(group.feats):
            continue
        scores = check.scores(group.feats)
        answers = logits_of(group.feats).argmax(dim=1)
        passed += sorted((Passed(kind, float(scores[i]), group.digits[i].numpy(), int(answers[i]))
                          for i in (scores <= check.threshold).nonzero().flatten().tolist()),
                         key=lambda one: one.score)
    return passed


def passed_caption(shown: int, passed: int, images: int) -> str:
    """What the figure of passed non-digits says of itself."""
    if passed == 0:
        return f"the digit check flags or refuses all {images:,} measured non-digits"
    return (f"measured non-digits that the digit check takes for digits (kind: the model's "
            f"answer): {shown} of {passed}, of {images:,} measured")


def draw_passed(path: Path, passed: list[Passed], images: int, max_passed: int) -> str:
    """A grid of up to MAX_PASSED of the PASSED non-digits (of IMAGES measured), each
    titled with its kind and the model's answer; returns its caption."""
    shown = passed[:max_passed]
    caption = passed_caption(len(shown), len(passed), images)
    digit_grid(path, [one.digit for one in shown],
               [f"{one.kind.replace('_', ' ')}: {one.answer}" for one in shown], caption,
               cell=(1.3, 1.5), fontsize=7)
    return caption


# --- the table in docs/use.md ----------------------------------------------------

ROWS = {"mnist_test": "MNIST test digits", "typed": "digits typed in Pillow's font",
        "drawn": "MNIST test digits drawn with the page's pen"}
PHOTO_ROWS = {"clean": "photographed: a clean sheet, nothing else",
              **{name: f"photographed: {what}" for name, what in DEGRADATIONS.items()},
              "all": "photographed: **all of these together**",
              **{name: f"photographed: {what}" for name, what in STYLES.items()},
              "lamp": "another generator, never fitted on: a 600×600 sheet under a desk lamp "
                      "(up to 70 grey levels), noise σ 6, blur 1.2 px, JPEG 80"}
KIND_NAMES = {f"photo_{kind}": f"photo of {what}" for kind, what in NON_DIGITS.items()}


def table(metrics: dict) -> str:
    """metrics/ood.json as a markdown table: one row per kind of image."""
    lines = ["| images | n | refused (blank) | flagged | refused or flagged | the same with: "
             "one network | max softmax | energy | Mahalanobis |",
             "|---|---|---|---|---|---|---|---|---|"]

    def row(name: str, r: dict, bold: bool = False) -> str:
        cells = [f"{r['refused']:.2f} %", f"{r['flagged']:.2f} %", f"{r['detected']:.2f} %",
                 f"{r['one_network']:.2f} %", *(f"{r['simpler'][b]:.2f} %" for b in BASELINES)]
        if bold:
            cells = [f"**{c}**" for c in cells]
        return f"| {name} | {r['images']:,} | " + " | ".join(cells) + " |"

    for key, name in ROWS.items():
        lines.append(row(name, metrics["digits"][key], bold=key == "mnist_test"))
    kinds = metrics["non_digits"]
    for kind in sorted(set(kinds) - {"all"}):
        lines.append(row(KIND_NAMES.get(kind, kind), kinds[kind]))
    lines.append(row("all non-digits", kinds["all"], bold=True))
    return "\n".join(lines)


def photo_table(metrics: dict) -> str:
    """metrics/ood.json's digits as a markdown table: how many the model reads right and
    how many the check flags, as they are, drawn, and photographed under each
    degradation."""
    lines = ["| digits | n | read right | refused (blank) | flagged | refused or flagged |",
             "|---|---|---|---|---|---|"]
    rows = [(ROWS[key], metrics["digits"][key]) for key in ("mnist_test", "drawn")]
    rows += [(name, metrics["photos"][key]) for key, name in PHOTO_ROWS.items()
             if key in metrics["photos"]]
    for name, r in rows:
        lines.append(f"| {name} | {r['images']:,} | {r['accuracy']:.2f} % | {r['refused']:.2f} % "
                     f"| {r['flagged']:.2f} % | {r['detected']:.2f} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--ood", type=Path, default=Path("models/ood.json"))
    parser.add_argument("--metrics", type=Path, default=METRICS)
    parser.add_argument("--passed-png", type=Path, default=Path("plots/ood_passed.png"))
    args = parser.parse_args()
    params = load_params()
    apply_runtime(params.runtime)
    p = params.calibrate
    model, mean, std = load_model(args.model)
    train = load_split(args.data / "train.pt")
    test = load_split(args.data / "test.pt")
    check_sizes(p, len(train[0]), len(test[0]))
    with worker_pool() as pool:
        reader = Reader(model, mean, std, pool)
        calibration = calibrate(reader, train, p, file_md5(args.model))
        metrics, passed = measure(calibration, reader, test, p)
    # the figure first: it is the likeliest to fail, and the check goes last
    caption = draw_passed(args.passed_png, passed, metrics["non_digits"]["all"]["images"],
                          p.max_passed)
    write_json(args.metrics, metrics)
    write_json(args.ood, calibration.check.to_json())
    test, others = metrics["digits"]["mnist_test"], metrics["non_digits"]["all"]
    photos = metrics["photos"]["all"]
    print(f"digit check: flags {test['flagged']:.2f} % of MNIST test digits and "
          f"{photos['flagged']:.2f} % of photos of them (read right: {photos['accuracy']:.2f} %); "
          f"of {others['images']:,} non-digits, {others['detected']:.2f} % refused or flagged; "
          f"wrote {args.ood} and {args.metrics}; {args.passed_png}: {caption}")


if __name__ == "__main__":
    run_cli(main)
