"""Sharing through DVC remotes: `make setup`'s default remote, a sweep split over clones,
and tools.share's one-line errors.

Everything lives in temp folders: a bare git repository stands for the git server, the
folder that `make setup` picks under XDG_CACHE_HOME for the shared DVC remote, and each
clone for a machine. The sweep runs the project's own train stage, as dvc.yaml defines
it, on tiny generated data for one short epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO, write_prepared

pytestmark = pytest.mark.slow

VENV = Path(sys.prefix)
TOOLS = ["Makefile", "requirements.txt", "tools/__init__.py", "tools/share.py"]
SWEEP = {"a": ("lr-0.05", "train.lr=0.05"), "b": ("lr-0.4", "train.lr=0.4")}
METRICS = "metrics/train/metrics.json"
UP_TO_DATE = "Data and pipelines are up to date."


def make_env(root: Path) -> dict[str, str]:
    """The venv first on PATH, a git identity, and DVC kept off the user's config."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DVC_", "GIT_", "XDG_")) and k != "MNIST_MIRROR"}
    env.update(PATH=f"{VENV / 'bin'}{os.pathsep}{env['PATH']}",
               XDG_CACHE_HOME=str(root / "xdg-cache"),
               DVC_GLOBAL_CONFIG_DIR=str(root / "dvc-global"),
               DVC_SYSTEM_CONFIG_DIR=str(root / "dvc-system"),
               DVC_SITE_CACHE_DIR=str(root / "dvc-site"),
               DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1",
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@localhost",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@localhost")
    return env


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return make_env(tmp_path)


def sh(*cmd: str, cwd: Path, env: dict[str, str], check: bool = True
       ) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def make(target: str, clone: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`make TARGET` with this venv. -o: never install into it, whatever its stamp says,
    and skip setup's offline plots page, which sharing does not need."""
    digest = hashlib.sha256((clone / "requirements.txt").read_bytes()).hexdigest()[:16]
    return sh("make", target, f"VENV={VENV}", "-o", f"{VENV}/.installed-{digest}",
              "-o", ".dvc/plots_offline.html", cwd=clone, env=env)


def share(command: str, clone: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return sh(sys.executable, "-m", "tools.share", command, cwd=clone, env=env, check=False)


def default_remote(env: dict[str, str]) -> Path:
    """Where `make setup` puts the shared remote."""
    return Path(env["XDG_CACHE_HOME"]) / "mnist-cnn-dvc" / "remote"


def assert_one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: "), proc.stderr
    return proc.stderr.strip()


def init_repo(root: Path, env: dict[str, str]) -> None:
    """A git repo with the Makefile and tools.share, and DVC initialised."""
    sh("git", "init", "-q", "-b", "main", str(root), cwd=root.parent, env=env)
    for name in TOOLS:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    sh("dvc", "init", "-q", cwd=root, env=env)


# --- a sweep split over two clones ------------------------------------------------------

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


def make_origin(tmp_path: Path, env: dict[str, str]) -> Path:
    """A bare git origin holding the project; the shared DVC remote holds its data."""
    origin, seed = tmp_path / "origin.git", tmp_path / "seed"
    sh("git", "init", "-q", "--bare", "-b", "main", str(origin), cwd=tmp_path, env=env)
    init_repo(seed, env)
    write_project(seed)
    sh("dvc", "add", "-q", "data/prepared", cwd=seed, env=env)
    make("setup", seed, env)
    sh("dvc", "push", "-q", cwd=seed, env=env)
    sh("git", "add", "-A", cwd=seed, env=env)
    sh("git", "commit", "-qm", "tiny project", cwd=seed, env=env)
    sh("git", "push", "-q", str(origin), "main", cwd=seed, env=env)
    return origin


def clone(origin: Path, path: Path, env: dict[str, str]) -> Path:
    sh("git", "clone", "-q", str(origin), str(path), cwd=path.parent, env=env)
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


def test_a_sweep_split_over_two_clones_is_shared_through_the_remotes(tmp_path, env):
    origin = make_origin(tmp_path, env)

    # A and B, two machines: each pulls the data, runs its part of the sweep and pushes it
    machines = {key: clone(origin, tmp_path / key, env) for key in SWEEP}
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
        sh("dvc", "exp", "push", "origin", name, cwd=path, env=env)
        made[name] = {"model": (path / "models" / "model.pt").read_bytes(),
                      "metrics": json.loads((path / METRICS).read_text())}
    assert made["lr-0.05"]["model"] != made["lr-0.4"]["model"]

    # C: every experiment with its metrics; the best one's model from the DVC remote
    c = clone(origin, tmp_path / "c", env)
    sh("dvc", "exp", "pull", "origin", cwd=c, env=env)
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
    d = tmp_path / "d"
    sh("git", "clone", "-q", str(origin), str(d), cwd=tmp_path, env=env)
    make("pull", d, env)
    assert (d / "models" / "model.pt").read_bytes() == made[best]["model"]
    assert UP_TO_DATE in sh("dvc", "status", cwd=d, env=env).stdout
    repro = sh("dvc", "repro", cwd=d, env=env).stdout
    assert "Running stage" not in repro and UP_TO_DATE in repro


# --- make setup, and tools.share's checks -----------------------------------------------

@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A repo with two stages that each write one small file, run and committed."""
    root = tmp_path_factory.mktemp("template") / "repo"
    root.parent.joinpath("empty").mkdir()
    env = make_env(root.parent / "empty")
    init_repo(root, env)
    stages = {name: {"cmd": f"echo {name} > {name}.txt", "outs": [f"{name}.txt"]}
              for name in ("one", "two")}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    sh("dvc", "repro", "-q", cwd=root, env=env)
    sh("git", "add", "-A", cwd=root, env=env)
    sh("git", "commit", "-qm", "two stages", cwd=root, env=env)
    return root


@pytest.fixture
def repo(template, tmp_path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "repo", symlinks=True))


def set_remote(repo: Path, url: Path | str, env: dict[str, str]) -> None:
    sh("dvc", "remote", "add", "--local", "-d", "-f", "shared", str(url), cwd=repo, env=env)


def test_setup_adds_the_shared_default_remote_and_keeps_a_chosen_one(repo, tmp_path, env):
    make("setup", repo, env)
    assert default_remote(env).is_dir()
    assert sh("dvc", "remote", "default", cwd=repo, env=env).stdout.strip() == "shared"
    url = sh("dvc", "config", "--local", "remote.shared.url", cwd=repo, env=env).stdout
    assert url.strip() == str(default_remote(env))
    assert share("push", repo, env).returncode == 0  # no further configuration
    assert sh("dvc", "status", "--cloud", "--json", cwd=repo, env=env).stdout.strip() == "{}"

    # the team's remote, committed in .dvc/config (docs/sharing.md): setup keeps it
    sh("dvc", "remote", "default", "--local", "--unset", cwd=repo, env=env)
    sh("dvc", "remote", "add", "-d", "team", str(tmp_path / "team"), cwd=repo, env=env)
    config = repo / ".dvc" / "config.local"
    written = config.read_bytes()
    make("setup", repo, env)
    assert config.read_bytes() == written
    assert sh("dvc", "remote", "default", cwd=repo, env=env).stdout.strip() == "team"


@pytest.mark.parametrize("where, problem", [
    ("a-file/remote", "does not exist"),
    ("/proc", "cannot write to /proc"),  # root may write anywhere else
])
def test_push_refuses_a_remote_it_cannot_write_in_one_line(repo, tmp_path, env, where,
                                                             problem):
    (tmp_path / "a-file").write_text("not a folder")
    url = tmp_path / where  # /proc stays /proc
    set_remote(repo, url, env)
    line = assert_one_line_error(share("push", repo, env))
    assert str(url) in line and problem in line
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_push_and_pull_refuse_a_missing_folder_that_dvc_push_would_create(repo, tmp_path, env):
    """An unmounted share or a typo must not quietly become a folder on the local disk."""
    folder = tmp_path / "share" / "dvc-remote"
    set_remote(repo, folder, env)
    for command in ("push", "pull"):
        line = assert_one_line_error(share(command, repo, env))
        assert f"{folder} does not exist" in line and not folder.exists()
    sh("dvc", "push", "-q", cwd=repo, env=env)  # what the check stands between
    assert folder.is_dir()


def test_pull_of_outputs_the_remote_lacks_names_them_and_pulls_nothing(repo, tmp_path, env):
    set_remote(repo, tmp_path / "remote", env)
    (tmp_path / "remote").mkdir()
    sh("dvc", "push", "-q", "one", cwd=repo, env=env)
    shutil.rmtree(repo / ".dvc" / "cache")
    for name in ("one.txt", "two.txt"):
        (repo / name).unlink()
    line = assert_one_line_error(share("pull", repo, env))
    assert line == ("error: DVC remote 'shared' lacks two.txt (never pushed): "
                    "run `dvc repro` instead")
    assert not (repo / "one.txt").exists()  # nothing pulled
    sh(sys.executable, "-m", "tools.share", "pull", "one", cwd=repo, env=env)
    assert (repo / "one.txt").read_text() == "one\n"


def test_push_and_pull_without_a_default_remote_say_to_run_setup(repo, env):
    for command in ("push", "pull"):
        line = assert_one_line_error(share(command, repo, env))
        assert line == "error: no default DVC remote: run `make setup` (docs/sharing.md)"
