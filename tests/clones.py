"""Git origins, clones and DVC commands in subprocesses, for the sharing tests.

A bare git repository stands for the git server and each clone for a machine; the
project in them is the real train stage, as dvc.yaml defines it, on tiny generated data
for one short epoch. Where a test shares through another DVC remote than `make setup`'s
folder, it passes `add_remote(clone, env)`, which configures a clone before its setup.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from helpers import REPO, write_prepared

VENV = Path(sys.prefix)
TOOLS = ["Makefile", "requirements.txt", "requirements.lock", "tools/__init__.py",
         "tools/share.py"]
SWEEP = {"a": ("lr-0.05", "train.lr=0.05"), "b": ("lr-0.4", "train.lr=0.4")}
METRICS = "metrics/train/metrics.json"
UP_TO_DATE = "Data and pipelines are up to date."

AddRemote = Callable[[Path, dict], None]


def make_env(root: Path) -> dict[str, str]:
    """The venv first on PATH, a git identity, and DVC kept off the user's config."""
    env = {k: v for k, v in os.environ.items()  # and no make above: `make test` runs this
           if not k.startswith(("DVC_", "GIT_", "XDG_"))
           and k not in ("MNIST_MIRROR", "MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    env.update(PATH=f"{VENV / 'bin'}{os.pathsep}{env['PATH']}",
               XDG_CACHE_HOME=str(root / "xdg-cache"),
               DVC_GLOBAL_CONFIG_DIR=str(root / "dvc-global"),
               DVC_SYSTEM_CONFIG_DIR=str(root / "dvc-system"),
               DVC_SITE_CACHE_DIR=str(root / "dvc-site"),
               DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1",
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@localhost",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@localhost")
    return env


def sh(*cmd: str, cwd: Path, env: dict[str, str], check: bool = True
       ) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def make(target: str, clone: Path, env: dict[str, str], *variables: str, check: bool = True
         ) -> subprocess.CompletedProcess:
    """`make TARGET VARIABLES` with this venv. -o: never install into it, whatever its
    stamp says, and skip setup's offline plots page, which sharing does not need."""
    digest = hashlib.sha256((clone / "requirements.lock").read_bytes()).hexdigest()[:16]
    return sh("make", target, f"VENV={VENV}", *variables, "-o",
              f"{VENV}/.installed-{digest}", "-o", ".dvc/plots_offline.html", cwd=clone,
              env=env, check=check)


def share(command: str, clone: Path, env: dict[str, str], *args: str
          ) -> subprocess.CompletedProcess:
    return sh(sys.executable, "-m", "tools.share", command, *args, cwd=clone, env=env,
              check=False)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a failed `make push|pull` or tools.share command, among
    DVC's own output."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def flip_bytes(path: Path) -> bytes:
    """Invert 16 bytes in the middle of PATH, keeping its size and its mode (DVC's
    read-only 0444 in a remote folder, as bit rot would keep it); return the new
    content."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    mode = path.stat().st_mode
    path.chmod(0o644)
    path.write_bytes(data)
    path.chmod(mode)
    return bytes(data)


def init_repo(root: Path, env: dict[str, str]) -> None:
    """A git repo with the Makefile and tools.share, and DVC initialised."""
    sh("git", "init", "-q", "-b", "main", str(root), cwd=root.parent, env=env)
    for name in TOOLS:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    sh("dvc", "init", "-q", cwd=root, env=env)


def write_project(root: Path) -> None:
    """stages/, dvc.yaml's train stage and metrics, a one-epoch params.yaml, tiny data."""
    shutil.copytree(REPO / "stages", root / "stages",
                    ignore=shutil.ignore_patterns("__pycache__"))
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    pipeline = {"stages": {"train": pipeline["stages"]["train"]}, "metrics": [METRICS]}
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update(epochs=1, batch_size=32)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_prepared(root / "data" / "prepared", n_train=64, n_test=32)


def make_origin(tmp_path: Path, env: dict[str, str], add_remote: AddRemote | None = None
                ) -> Path:
    """A bare git origin holding the project; the DVC remote holds its data."""
    origin, seed = tmp_path / "origin.git", tmp_path / "seed"
    sh("git", "init", "-q", "--bare", "-b", "main", str(origin), cwd=tmp_path, env=env)
    init_repo(seed, env)
    write_project(seed)
    sh("dvc", "add", "-q", "data/prepared", cwd=seed, env=env)
    if add_remote:
        add_remote(seed, env)
    make("setup", seed, env)
    sh("dvc", "push", "-q", cwd=seed, env=env)
    sh("git", "add", "-A", cwd=seed, env=env)
    sh("git", "commit", "-qm", "tiny project", cwd=seed, env=env)
    sh("git", "push", "-q", str(origin), "main", cwd=seed, env=env)
    return origin


def git_clone(origin: Path, path: Path, env: dict[str, str],
              add_remote: AddRemote | None = None) -> Path:
    sh("git", "clone", "-q", str(origin), str(path), cwd=path.parent, env=env)
    if add_remote:
        add_remote(path, env)
    return path


def clone(origin: Path, path: Path, env: dict[str, str],
          add_remote: AddRemote | None = None) -> Path:
    git_clone(origin, path, env, add_remote)
    make("setup", path, env)
    return path


def experiments(show_json: str) -> dict[str, dict]:
    """`dvc exp show --json`: each experiment's METRICS, by name."""
    found = {}
    for baseline in json.loads(show_json):
        for group in baseline.get("experiments") or []:
            for exp in group["revs"]:
                found[exp["name"]] = exp["data"]["metrics"][METRICS]["data"]
    return found


def share_a_sweep(tmp_path: Path, env: dict[str, str], add_remote: AddRemote | None = None
                  ) -> None:
    """docs/sharing.md's sweep split over machines, asserting each step: two clones run
    one experiment each and `make exp-push` it, a third `make exp-pull`s both, applies
    the best and commits it, and a fresh clone of that gets the model with `make pull`
    alone, up to date."""
    origin = make_origin(tmp_path, env, add_remote)

    # A and B, two machines: each pulls the data, runs its part of the sweep and pushes it
    machines = {key: clone(origin, tmp_path / key, env, add_remote) for key in SWEEP}
    for path in machines.values():
        sh("dvc", "pull", "-q", "data/prepared.dvc", cwd=path, env=env)
    runs = {key: subprocess.Popen(["dvc", "exp", "run", "-n", name, "-S", override],
                                  cwd=machines[key], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
            for key, (name, override) in SWEEP.items()}
    outputs = {key: run.communicate(timeout=240)[0] for key, run in runs.items()}
    made = {}
    for key, run in runs.items():
        assert run.returncode == 0, outputs[key]
        path, name = machines[key], SWEEP[key][0]
        make("exp-push", path, env, f"EXP={name}")
        made[name] = {"model": (path / "models" / "model.pt").read_bytes(),
                      "metrics": json.loads((path / METRICS).read_text())}
    assert made["lr-0.05"]["model"] != made["lr-0.4"]["model"]

    # C: every experiment with its metrics; the best one's model from the DVC remote
    c = clone(origin, tmp_path / "c", env, add_remote)
    make("exp-pull", c, env)
    shown = experiments(sh("dvc", "exp", "show", "--json", cwd=c, env=env).stdout)
    assert shown == {name: run["metrics"] for name, run in made.items()}
    best = min(shown, key=lambda name: shown[name]["test"]["loss"])
    sh("dvc", "exp", "apply", best, cwd=c, env=env)
    sh("dvc", "pull", cwd=c, env=env)
    assert (c / "models" / "model.pt").read_bytes() == made[best]["model"]
    sh("git", "add", "-A", cwd=c, env=env)
    sh("git", "commit", "-qm", f"the best of the sweep: {best}", cwd=c, env=env)
    sh("git", "push", "-q", "origin", "main", cwd=c, env=env)

    # D, a teammate: the committed model with `make pull` alone (setup included);
    # repro runs nothing
    d = git_clone(origin, tmp_path / "d", env, add_remote)
    make("pull", d, env)
    assert (d / "models" / "model.pt").read_bytes() == made[best]["model"]
    assert UP_TO_DATE in sh("dvc", "status", cwd=d, env=env).stdout
    repro = sh("dvc", "repro", cwd=d, env=env).stdout
    assert "Running stage" not in repro and UP_TO_DATE in repro
