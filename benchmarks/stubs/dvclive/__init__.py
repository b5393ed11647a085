"""A stand-in for DVCLive, for the GPU check's runs of the train stage on a machine
without it: the train stage's calls, with every logged value written to one JSON file
so that two runs can still be compared byte for byte."""

from __future__ import annotations

import json
from pathlib import Path


class Live:
    def __init__(self, dir: str, **_options):
        self.dir = Path(dir)
        self.step = 0
        self.summary: dict = {}
        self.logged: list[list] = []

    def log_metric(self, name: str, value: float) -> None:
        self.logged.append([self.step, name, value])

    def next_step(self) -> None:
        self.step += 1

    def __enter__(self) -> "Live":
        return self

    def __exit__(self, *exc) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "logged.json").write_text(
            json.dumps({"metrics": self.logged, "summary": self.summary}, sort_keys=True))
