"""params.yaml, parsed and validated in one place.

Every stage that takes hyperparameters calls `load_params()`. It checks the whole
file before any work starts: unknown or missing keys, wrong types and values out
of range each give one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stages.common import StageError
from stages.runtime import CPU_ISAS

DEVICES = ("auto", "cpu", "cuda")
SWITCHES = ("auto", "on", "off")
SCHEDULES = ("onecycle", "step")
INTERPOLATIONS = ("nearest", "bilinear")
ANNEALS = ("cos", "linear")


def _rule(check, allowed: str):
    return field(metadata={"check": check, "allowed": allowed})


def _positive(v):
    return v > 0


def _switch():
    """An auto/on/off speed option. YAML 1.1 reads a bare on/off as true/false, so
    parsing turns booleans back into the words the user typed."""
    return field(metadata={"check": lambda v: v in SWITCHES, "allowed": " or ".join(SWITCHES),
                           "switch": True})


@dataclass(frozen=True)
class TrainParams:
    epochs: int = _rule(lambda v: v >= 1, "an integer >= 1")
    batch_size: int = _rule(_positive, "an integer >= 1")
    lr: float = _rule(_positive, "a number > 0")
    momentum: float = _rule(lambda v: 0 <= v < 1, "a number in [0, 1)")
    nesterov: bool = _rule(None, "true or false")
    weight_decay: float = _rule(lambda v: v >= 0, "a number >= 0")
    norm_decay: bool = _rule(None, "true or false: false exempts BatchNorm's weights and biases "
                             "and the last 1x1 convolution from weight decay")
    dropout: float = _rule(lambda v: 0 <= v < 1, "a number in [0, 1)")
    label_smoothing: float = _rule(lambda v: 0 <= v < 1, "a number in [0, 1); 0 turns it off")
    ema: float = _rule(lambda v: 0 <= v < 1, "a number in [0, 1): the weights' moving-average "
                       "decay per step; 0 turns it off")
    swa_epochs: int = _rule(lambda v: v >= 0, "an integer >= 0: the last epochs whose end-of-"
                            "epoch weights are averaged; 0 turns it off")
    bn_recompute: bool = _rule(None, "true or false: recompute BatchNorm's statistics on "
                               "un-augmented training images after the last epoch")
    rotation: float = _rule(lambda v: 0 <= v <= 180, "degrees in [0, 180]; 0 turns rotation off")
    translate: float = _rule(lambda v: 0 <= v <= 4, "pixels in [0, 4]; 0 turns shifting off")
    scale: float = _rule(lambda v: 0 <= v <= 0.5, "a share in [0, 0.5]: each digit zoomed by a "
                         "factor uniform in 1 ± scale; 0 turns zooming off")
    elastic: float = _rule(lambda v: 0 <= v <= 4, "pixels in [0, 4]: each image's largest "
                           "elastic displacement; 0 turns it off")
    interpolation: str = _rule(lambda v: v in INTERPOLATIONS, " or ".join(INTERPOLATIONS))
    clean_epochs: int = _rule(lambda v: v >= 0, "an integer >= 0: the last epochs, trained "
                              "without augmentation; 0 augments every epoch")
    schedule: str = _rule(lambda v: v in SCHEDULES, " or ".join(SCHEDULES))
    warmup: float = _rule(lambda v: 0 < v < 1, "a number in (0, 1) (onecycle: share of steps "
                          "rising to lr)")
    start_div: float = _rule(lambda v: v >= 1, "a number >= 1 (onecycle: starts at lr/start_div)")
    final_div: float = _rule(lambda v: v >= 1, "a number >= 1 (onecycle: ends at "
                             "lr/start_div/final_div)")
    anneal: str = _rule(lambda v: v in ANNEALS, " or ".join(ANNEALS)
                        + " (onecycle: the shape of the rise and of the way down)")
    step_size: int = _rule(_positive, "an integer >= 1 (step: epochs between lr drops)")
    gamma: float = _rule(lambda v: 0 < v <= 1, "a number in (0, 1] (step: lr factor at each drop)")
    seed: int = _rule(lambda v: 0 <= v < 2**64, "an integer in [0, 2**64)")
    val_size: int = _rule(lambda v: v >= 0, "an integer >= 0: training images held out for "
                          "validation (then best.pt is the best validation epoch); 0 holds "
                          "out none")
    val_seed: int = _rule(lambda v: 0 <= v < 2**64, "an integer in [0, 2**64): which images "
                          "val_size holds out, the same for every train.seed")
    device: str = _rule(lambda v: v in DEVICES, " or ".join(DEVICES))
    resume: bool = _rule(None, "true or false")
    channels_last: str = _switch()
    compile: str = _switch()
    fast_dropout: str = _switch()
    cuda_graph: str = _switch()

    def check(self) -> None:
        """The rules that tie several keys together; one line per broken rule."""
        if self.nesterov and self.momentum == 0:
            raise StageError("params.yaml: train.nesterov is true but train.momentum is 0; "
                             "Nesterov momentum needs momentum > 0: set one of them")
        if self.cuda_graph == "on" and self.compile == "on":
            raise StageError("params.yaml: train.cuda_graph and train.compile are both on; "
                             "torch.compile's CUDA graphs cannot run inside the training "
                             "step's graph: set one of them to auto or off")
        if self.cuda_graph == "on" and self.ema > 0:
            raise StageError("params.yaml: train.cuda_graph is on but train.ema is "
                             f"{self.ema:g}; the moving average runs only eagerly: set "
                             "train.cuda_graph to auto or train.ema to 0")
        if self.clean_epochs >= self.epochs:
            raise StageError(f"params.yaml: train.clean_epochs {self.clean_epochs} must be "
                             f"below train.epochs {self.epochs}; at least the first epoch "
                             "is augmented")
        if self.swa_epochs > self.epochs:
            raise StageError(f"params.yaml: train.swa_epochs {self.swa_epochs} is more than "
                             f"train.epochs {self.epochs}: set it to at most {self.epochs}")
        if self.swa_epochs > 0 and self.ema > 0:
            raise StageError("params.yaml: train.swa_epochs and train.ema both average the "
                             "weights: set one of them to 0")
        if self.cuda_graph == "on" and self.clean_epochs > 0:
            raise StageError("params.yaml: train.cuda_graph is on but train.clean_epochs is "
                             f"{self.clean_epochs}; the graphs hold the augmented step: set "
                             "train.cuda_graph to auto or train.clean_epochs to 0")
        if self.cuda_graph == "on" and self.device == "cpu":
            raise StageError("params.yaml: train.cuda_graph is on but train.device is cpu; "
                             "CUDA graphs need CUDA: set train.cuda_graph to auto or off")

    def fingerprint(self) -> str:
        """Hash of the params that shape the result; `resume` is not one of them."""
        d = dataclasses.asdict(self)
        d.pop("resume")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = _rule(_positive, "an integer >= 1")
    max_errors: int = _rule(lambda v: v >= 0, "an integer >= 0 (misclassified digits drawn)")


@dataclass(frozen=True)
class RuntimeParams:
    """Applied by stages.runtime.apply at the start of each stage; validated here."""

    cpu_isa: str = _rule(lambda v: v in CPU_ISAS, " or ".join(CPU_ISAS))
    threads: int = _rule(lambda v: v >= 1, "an integer >= 1")
    deterministic: bool = _rule(None, "true or false")


@dataclass(frozen=True)
class CalibrateParams:
    """The digit check (stages/calibrate.py): what it is fitted on, and how."""

    false_flags: float = _rule(lambda v: 0 < v < 0.5, "a number in (0, 0.5): the share of "
                               "held-out MNIST training digits flagged")
    fitted: int = _rule(_positive, "an integer >= 1 (training digits fitted)")
    held_out: int = _rule(_positive, "an integer >= 1 (other training digits, which set the "
                          "threshold)")
    typed: int = _rule(_positive, "an integer >= 1 (typed digits fitted, and measured)")
    per_kind: int = _rule(_positive, "an integer >= 1 (non-digits of each kind fitted, and "
                          "measured)")
    drawn: int = _rule(_positive, "an integer >= 1 (test digits drawn with a pen, measured)")
    photos: int = _rule(_positive, "an integer >= 1 (photos of training digits fitted)")
    photo_sets: int = _rule(_positive, "an integer >= 1 (photos of test digits measured, "
                            "for each degradation)")
    photo_others: int = _rule(_positive, "an integer >= 1 (photos of each kind of non-digit "
                              "fitted, and measured)")
    hidden: int = _rule(_positive, "an integer >= 1")
    fits: int = _rule(_positive, "an integer >= 1 (networks fitted, whose scores are "
                      "averaged)")
    steps: int = _rule(_positive, "an integer >= 1")
    lr: float = _rule(_positive, "a number > 0")
    weight_decay: float = _rule(lambda v: v >= 0, "a number >= 0")
    seed: int = _rule(lambda v: 0 <= v < 2**64 - 1, "an integer in [0, 2**64 - 1): the "
                      "measurement also uses seed + 1")
    max_passed: int = _rule(lambda v: v >= 0, "an integer >= 0 (non-digits that the check "
                            "passes, drawn)")

    def check(self) -> None:
        """The rule that ties two keys together; the sizes of the data are checked by
        the stage, which reads it (stages/calibrate.py: check_sizes)."""
        if self.photos > self.fitted:
            raise StageError(f"params.yaml: calibrate.photos {self.photos} is more than "
                             f"calibrate.fitted {self.fitted}; the photos are of the training "
                             "digits fitted: lower photos or raise fitted")


@dataclass(frozen=True)
class Params:
    train: TrainParams
    evaluate: EvaluateParams
    runtime: RuntimeParams
    calibrate: CalibrateParams


def _type_ok(value, typ) -> bool:
    if typ is bool:
        return isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typ is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    return isinstance(value, typ)


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _unknown(key: str, known: list[str]) -> StageError:
    near = difflib.get_close_matches(key.split(".")[-1], [k.split(".")[-1] for k in known], n=1)
    hint = f"did you mean {key.rsplit('.', 1)[0]}.{near[0]}? " if near and "." in key else ""
    return StageError(f"params.yaml: unknown key {key}; {hint}allowed: {', '.join(known)}")


def _section(cls, name: str, raw) -> object:
    if not isinstance(raw, dict):
        raise StageError(f"params.yaml: {name} must be a mapping of keys to values, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise _unknown(f"{name}.{key}", [f"{name}.{k}" for k in fields])
    values = {}
    for key, f in fields.items():
        full = f"{name}.{key}"
        if key not in raw:
            raise StageError(f"params.yaml: {full} is missing; add it ({f.metadata['allowed']})")
        value, typ = raw[key], {"int": int, "float": float, "bool": bool, "str": str}[f.type]
        if f.metadata.get("switch") and isinstance(value, bool):
            value = "on" if value else "off"
        if not _type_ok(value, typ):
            raise StageError(f"params.yaml: {full} = {value!r} is not {_TYPE_WORDS[typ]}; "
                             f"allowed: {f.metadata['allowed']}")
        check = f.metadata["check"]
        if check is not None and not check(value):
            raise StageError(f"params.yaml: {full} = {value!r} is out of range; "
                             f"allowed: {f.metadata['allowed']}")
        values[key] = float(value) if typ is float else value  # finite, so no overflow
    return cls(**values)


def parse_params(raw) -> Params:
    """Validate a params mapping (as loaded from YAML) and return typed params."""
    if not isinstance(raw, dict):
        raise StageError("params.yaml: the file must be a mapping with the sections "
                         + ", ".join(f.name for f in dataclasses.fields(Params)))
    sections = {f.name: f for f in dataclasses.fields(Params)}
    for name in raw:
        if name not in sections:
            raise _unknown(str(name), list(sections))
    for name in sections:
        if name not in raw:
            raise StageError(f"params.yaml: section {name} is missing; add it")
    params = Params(**{name: _section(globals()[f.type], name, raw[name])
                       for name, f in sections.items()})
    params.train.check()
    params.calibrate.check()
    return params


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-3 as a float, as YAML 1.2 (and `dvc exp run -S`) do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def read_yaml(path: str | Path):
    """A YAML file read with _Loader; any problem is one line naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise StageError(f"{path}: not found; run from the repository root") from None
    except (OSError, UnicodeDecodeError) as err:
        raise StageError(f"{path}: cannot be read ({err}); fix or restore the file") from None
    return read_yaml_text(text, str(path))


def read_yaml_text(text: str, source: str):
    """YAML TEXT read with _Loader, as every params file is; SOURCE names it in errors."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise StageError(f"{source}: not valid YAML{where}; fix the syntax") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    return parse_params(read_yaml(path))
