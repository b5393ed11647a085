"""DVC over SSH, against a real sshd on 127.0.0.1 (tests/ssh_server.py): the team flow,
a sweep split over clones, and four faults, each shown to lose nothing and to deliver
nothing damaged: an interrupted push, a damaged object on the remote, a wrong or
missing key, and a server that cannot be reached.

Every clone reaches the server through docs/sharing.md's recipe (`add_ssh_remote`).
HOME is a temp folder and SSH_AUTH_SOCK is unset, so no ~/.ssh key, config or agent
takes part: DVC's remote settings alone say how to log in, and HOME's
~/.ssh/known_hosts, which holds the server's host key, whom to trust.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import yaml

from clones import (AddRemote, UP_TO_DATE, clone, error_line, flip_bytes, git_clone,
                    init_repo, make, make_env, make_origin, sh, share_a_sweep)
from helpers import md5
from ssh_server import SshServer, free_port, keygen

pytestmark = [pytest.mark.slow, pytest.mark.ssh]

REMOTE = "shared"
# about 6 s here (5 of them waiting for a silent port), with room for a busy machine:
# DVC's own default would wait 30 minutes
QUICKLY = 30
BLOBS, BLOB_SIZE = 48, 1024 * 1024  # long enough a push to stop part-way
UNROUTABLE = "192.0.2.1"  # TEST-NET-1 (RFC 5737): no host has it


def ssh_env(root: Path, server: SshServer) -> dict[str, str]:
    """make_env's, with no SSH agent and a HOME that holds only ~/.ssh/known_hosts, which
    trusts SERVER's host key."""
    env = make_env(root)
    env.pop("SSH_AUTH_SOCK", None)
    env["HOME"] = str(root / "home")
    known_hosts(env).parent.mkdir(parents=True, exist_ok=True)
    known_hosts(env).write_text(server.known_hosts_line)
    return env


def known_hosts(env: dict[str, str]) -> Path:
    return Path(env["HOME"]) / ".ssh" / "known_hosts"


def modify(repo: Path, env: dict[str, str], key: str, value: object) -> None:
    sh("dvc", "remote", "modify", "--local", REMOTE, key, str(value), cwd=repo, env=env)


def ssh_settings(server: SshServer, folder: Path, verify: bool) -> dict[str, str]:
    """docs/sharing.md's SSH recipe as settings of the remote, in its order, as its
    commands give them to DVC: the test server's address, user and key."""
    settings = {"url": f"ssh://{server.host}{folder}", "user": server.user,
                "port": str(server.port), "keyfile": str(server.keyfile)}
    return {**settings, "verify": "true"} if verify else settings


def run_ssh_recipe(repo: Path, env: dict[str, str], *, server: SshServer, folder: Path,
                   verify: bool = True) -> None:
    """docs/sharing.md's SSH recipe, command by command."""
    url, *options = ssh_settings(server, folder, verify).items()
    sh("dvc", "remote", "add", "--local", "-d", "-f", REMOTE, url[1], cwd=repo, env=env)
    for key, value in options:
        modify(repo, env, key, value)


def add_ssh_remote(repo: Path, env: dict[str, str], *, server: SshServer, folder: Path,
                   verify: bool = True) -> None:
    """What run_ssh_recipe's commands write into REPO's .dvc/config.local, written by the
    same DVC config calls (`dvc remote add` and `dvc remote modify` edit the config
    through dvc.config.Config.edit, which checks it against DVC's schema) in this process,
    without five DVC start-ups; test_the_recipe_and_add_ssh_remote_write_the_same_config
    shows that they agree. ENV is unused: no subprocess runs."""
    from dvc.config import Config

    with Config(dvc_dir=str(repo / ".dvc")).edit("local") as conf:
        conf["remote"][REMOTE] = ssh_settings(server, folder, verify)
        conf["core"]["remote"] = REMOTE


def files(root: Path) -> dict[str, bytes]:
    """Every file under ROOT but .git/, by relative path."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_file() and relative.parts[0] != ".git":
            found[str(relative)] = path.read_bytes()
    return found


def outputs(repo: Path) -> dict[str, bytes]:
    """The DVC outputs in a clone of the tiny project: data/prepared and models/."""
    return {path: data for path, data in files(repo).items()
            if path.startswith(("data/prepared/", "models/"))}


def objects(store: Path) -> dict[str, Path]:
    """The files in a DVC cache or remote folder under an object's final name, by object
    id (md5, or md5.dir for a folder's listing); temporary `*.tmp` files left out."""
    return {path.parent.name + path.name: path
            for path in store.glob("files/md5/*/*") if not path.name.endswith(".tmp")}


def damaged(store: Path) -> list[str]:
    """The objects in STORE whose content does not hash to their name."""
    return sorted(oid for oid, path in objects(store).items()
                  if md5(path.read_bytes()) != oid.removesuffix(".dir"))


def cloud_status(repo: Path, env: dict[str, str]) -> dict[str, str]:
    return json.loads(sh("dvc", "status", "--cloud", "--json", cwd=repo, env=env).stdout)


def copy_clone(source: Path, path: Path) -> Path:
    return Path(shutil.copytree(source, path, symlinks=True))


def drop_outputs(repo: Path) -> None:
    """A clone that needs a pull: no outputs in the workspace or the cache."""
    for folder in ("models", "data/prepared", ".dvc/cache"):
        shutil.rmtree(repo / folder, ignore_errors=True)


def assert_make_fails_in_one_line(proc: subprocess.CompletedProcess) -> str:
    """tools.share printed one line and exited 1; make adds its own `*** ... Error 1`."""
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and lines[1].startswith("make: *** "), proc.stderr
    assert lines[1].endswith("Error 1"), proc.stderr
    return error_line(proc)


def assert_push_and_pull_refused(repo: Path, env: dict[str, str], *says: str
                                 ) -> dict[str, float]:
    """`make push`, then `make pull` once the outputs are gone: each fails in one line that
    names the remote and says SAYS, and leaves the clone as it was. Returns the seconds
    each took."""
    seconds = {}
    for command in ("push", "pull"):
        if command == "pull":
            drop_outputs(repo)
        before = files(repo)
        started = time.monotonic()
        line = assert_make_fails_in_one_line(make(command, repo, env, check=False))
        seconds[command] = time.monotonic() - started
        assert line.startswith(f"error: DVC remote '{REMOTE}': "), line
        assert all(words in line for words in says), line
        assert files(repo) == before
    return seconds


# --- the team flow ------------------------------------------------------------------------

@dataclass
class Team:
    server: SshServer
    env: dict[str, str]
    origin: Path
    remote: Path  # the remote's folder on the server
    a: Path       # the clone that trained and pushed

    def add_remote(self, folder: Path | None = None, verify: bool = True) -> AddRemote:
        return partial(add_ssh_remote, server=self.server, folder=folder or self.remote,
                       verify=verify)


@pytest.fixture(scope="module")
def team(sshd, tmp_path_factory) -> Team:
    """Clone A pulls the data, runs a short experiment, commits it and `make push`es it,
    all over SSH."""
    root = tmp_path_factory.mktemp("team")
    env = ssh_env(root, sshd)
    remote = root / "remote"
    remote.mkdir()
    team = Team(sshd, env, root / "origin.git", remote, root / "a")
    make_origin(root, env, team.add_remote())
    clone(team.origin, team.a, env, team.add_remote())
    sh("dvc", "pull", "-q", "data/prepared.dvc", cwd=team.a, env=env)
    sh("dvc", "exp", "run", "-S", "train.lr=0.1", cwd=team.a, env=env)
    sh("git", "add", "-A", cwd=team.a, env=env)
    sh("git", "commit", "-qm", "lr 0.1", cwd=team.a, env=env)
    sh("git", "push", "-q", "origin", "main", cwd=team.a, env=env)
    make("push", team.a, env)
    return team


def test_a_model_trained_in_one_clone_is_pulled_in_another_over_ssh(team, tmp_path):
    assert cloud_status(team.a, team.env) == {}  # A's push is complete
    pushed = outputs(team.a)
    assert "models/model.pt" in pushed and "data/prepared/train.pt" in pushed

    b = git_clone(team.origin, tmp_path / "b", team.env, team.add_remote())
    make("pull", b, team.env)
    assert outputs(b) == pushed
    assert UP_TO_DATE in sh("dvc", "status", cwd=b, env=team.env).stdout
    assert damaged(team.remote) == [] and damaged(b / ".dvc" / "cache") == []


def test_a_sweep_split_over_two_clones_is_shared_over_ssh(sshd, tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    share_a_sweep(tmp_path, ssh_env(tmp_path, sshd),
                  partial(add_ssh_remote, server=sshd, folder=remote))
    assert objects(remote) and damaged(remote) == []


def test_the_recipe_and_add_ssh_remote_write_the_same_config(sshd, tmp_path):
    """The other tests set their clones up with add_ssh_remote; what they test is the
    recipe."""
    env = ssh_env(tmp_path, sshd)
    init_repo(tmp_path / "new", env)
    ways = {"recipe": (run_ssh_recipe, True), "api": (add_ssh_remote, True),
            "api, no verify": (add_ssh_remote, False)}
    written = {}
    for name, (add, verify) in ways.items():  # each in its own copy of the new repo
        repo = copy_clone(tmp_path / "new", tmp_path / name)
        assert not (repo / ".dvc" / "config.local").exists()
        add(repo, env, server=sshd, folder=tmp_path / "remote", verify=verify)
        written[name] = (repo / ".dvc" / "config.local").read_text()
    assert written["api"] == written["recipe"]
    assert f"port = {sshd.port}" in written["api"] and "verify = true" in written["api"]
    assert written["api, no verify"] == written["api"].replace("    verify = true\n", "")


# --- host keys ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_template(sshd, tmp_path_factory) -> Path:
    """A repo with one small file in DVC, set up (`make setup`) with an SSH remote."""
    root = tmp_path_factory.mktemp("small")
    env = ssh_env(root, sshd)
    repo = root / "repo"
    init_repo(repo, env)
    (repo / "data.txt").write_text("data\n")
    sh("dvc", "add", "-q", "data.txt", cwd=repo, env=env)
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-qm", "data", cwd=repo, env=env)
    add_ssh_remote(repo, env, server=sshd, folder=root / "remote")
    make("setup", repo, env)
    return repo


@pytest.fixture
def small_repo(sshd, small_template, tmp_path) -> tuple[Path, dict[str, str]]:
    """A copy of small_template whose SSH remote is an empty folder of its own, and a
    HOME whose known_hosts trusts the server."""
    env = ssh_env(tmp_path, sshd)
    repo = copy_clone(small_template, tmp_path / "repo")
    (tmp_path / "remote").mkdir()
    add_ssh_remote(repo, env, server=sshd, folder=tmp_path / "remote")
    return repo, env


def test_a_trusted_host_key_passes_from_known_hosts_or_from_KNOWN_HOSTS(sshd, small_repo,
                                                                         tmp_path):
    repo, env = small_repo
    make("push", repo, env)
    assert objects(tmp_path / "remote")
    team_file = tmp_path / "team_known_hosts"  # a file of the team's, named in KNOWN_HOSTS
    known_hosts(env).rename(team_file)
    (repo / "data.txt").unlink()
    shutil.rmtree(repo / ".dvc" / "cache")
    make("pull", repo, {**env, "KNOWN_HOSTS": str(team_file)})
    assert (repo / "data.txt").read_text() == "data\n"


@pytest.mark.parametrize("case", ["unknown host", "changed key", "changed key in KNOWN_HOSTS"])
def test_an_unknown_host_or_a_changed_host_key_is_refused_before_dvc_runs(
        sshd, small_repo, tmp_path, case):
    """By make push, pull, exp-push and exp-pull alike, in one line that says how to
    trust the host; nothing is sent or changed, and no client key is offered."""
    repo, env = small_repo
    file, port = known_hosts(env), sshd.port
    if case == "unknown host":
        file.write_text(sshd.known_hosts_line.replace(f"]:{port} ", f"]:{port + 1} "))
        says = f"127.0.0.1:{port} is not a known host in {file}: check the server's host key"
    else:  # a man in the middle has another key than the one trusted
        if case.endswith("KNOWN_HOSTS"):
            file = tmp_path / "team_known_hosts"
            env = {**env, "KNOWN_HOSTS": str(file)}
        other = keygen(tmp_path / "other_host_key").with_suffix(".pub").read_text()
        file.write_text(f"[127.0.0.1]:{port} {other}")
        says = f"the host key of 127.0.0.1:{port} is not the one {file} holds for it"
    trust = f"`ssh-keyscan -p {port} 127.0.0.1 >> {file}`"
    logins = (sshd.folder / "sshd.log").read_text().count("Accepted publickey")
    for command in ("push", "pull", "exp-push", "exp-pull"):
        before = files(repo)
        line = assert_make_fails_in_one_line(make(command, repo, env, check=False))
        assert line.startswith(f"error: DVC remote '{REMOTE}': {says}"), line
        assert trust in line and files(repo) == before
    assert not any((tmp_path / "remote").iterdir())
    assert (sshd.folder / "sshd.log").read_text().count("Accepted publickey") == logins


# --- faults ---------------------------------------------------------------------------

def wait_for_objects(store: Path, count: int, process: subprocess.Popen) -> None:
    """Until COUNT objects are in STORE under their final names, while PROCESS runs."""
    deadline = time.monotonic() + 120
    while len(objects(store)) < count:
        assert process.poll() is None, "the push ended before it could be interrupted"
        assert time.monotonic() < deadline, "no object arrived"
        time.sleep(0.005)


def test_an_interrupted_push_leaves_no_partial_object_and_completes_when_run_again(
        sshd, tmp_path):
    env = ssh_env(tmp_path, sshd)
    remote, origin, repo = tmp_path / "remote", tmp_path / "origin.git", tmp_path / "repo"
    remote.mkdir()
    add_remote = partial(add_ssh_remote, server=sshd, folder=remote)
    init_repo(repo, env)
    (repo / "blobs").mkdir()
    rng = random.Random(0)
    for i in range(BLOBS):
        (repo / "blobs" / f"{i:02d}.bin").write_bytes(rng.randbytes(BLOB_SIZE))
    sh("dvc", "add", "-q", "blobs", cwd=repo, env=env)
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-qm", "blobs", cwd=repo, env=env)
    sh("git", "init", "-q", "--bare", "-b", "main", str(origin), cwd=tmp_path, env=env)
    sh("git", "push", "-q", str(origin), "main", cwd=repo, env=env)
    add_remote(repo, env)

    # the client is killed once a few objects have arrived, as a lost connection or a
    # closed laptop would stop it
    push = subprocess.Popen([sys.executable, "-m", "tools.share", "push"], cwd=repo,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for_objects(remote, 4, push)
    finally:
        os.killpg(push.pid, signal.SIGKILL)
        push.wait()
    arrived = set(objects(remote))
    assert damaged(remote) == []
    assert "new" in cloud_status(repo, env).values(), "everything arrived before the kill"
    listing = yaml.safe_load((repo / "blobs.dvc").read_text())["outs"][0]["md5"]
    assert listing.endswith(".dir") and listing not in arrived  # it goes last

    make("push", repo, env)
    assert cloud_status(repo, env) == {}
    assert damaged(remote) == []
    assert arrived < set(objects(remote)) and len(objects(remote)) == BLOBS + 1  # + .dir

    fresh = git_clone(origin, tmp_path / "fresh", env, add_remote)
    make("pull", fresh, env)
    assert files(fresh / "blobs") == files(repo / "blobs")
    assert UP_TO_DATE in sh("dvc", "status", cwd=fresh, env=env).stdout


def test_a_damaged_object_on_the_remote_is_refused_not_delivered(team, tmp_path):
    env, good = team.env, outputs(team.a)
    remote = Path(shutil.copytree(team.remote, tmp_path / "remote"))
    oid = md5(good["models/model.pt"])
    bad = flip_bytes(objects(remote)[oid])

    # without `verify`, make pull refuses to start
    c = clone(team.origin, tmp_path / "c", env, team.add_remote(remote, verify=False))
    before = files(c)
    line = assert_make_fails_in_one_line(make("pull", c, env, check=False))
    assert line.startswith(f"error: DVC remote '{REMOTE}' does not verify downloads"), line
    assert f"dvc remote modify --local {REMOTE} verify true" in line
    assert files(c) == before

    # what plain DVC does without it: the damaged copy arrives as if it were good
    plain = copy_clone(c, tmp_path / "plain")
    sh("dvc", "pull", cwd=plain, env=env)
    assert (plain / "models" / "model.pt").read_bytes() == bad
    assert UP_TO_DATE in sh("dvc", "status", cwd=plain, env=env).stdout

    # with it, DVC hashes what arrives and drops the damaged copy; everything else
    # arrives (after one epoch, best.pt is model.pt: the same object)
    modify(c, env, "verify", "true")
    line = error_line(make("pull", c, env, check=False))
    lost = sorted(path for path, data in good.items() if md5(data) == oid)
    assert "models/model.pt" in lost
    assert line.startswith(f"error: DVC remote '{REMOTE}': {', '.join(lost)} not pulled"), line
    pulled = outputs(c)
    assert sorted(set(good) - set(pulled)) == lost
    assert all(pulled[path] == good[path] for path in pulled)
    cache = c / ".dvc" / "cache"
    assert oid not in objects(cache) and damaged(cache) == []

    # the repair: delete the damaged object on the remote, push it again from A
    objects(remote)[oid].unlink()
    a = copy_clone(team.a, tmp_path / "a")
    modify(a, env, "url", f"ssh://{team.server.host}{remote}")
    make("push", a, env)
    make("pull", c, env)
    assert outputs(c) == good
    assert UP_TO_DATE in sh("dvc", "status", cwd=c, env=env).stdout


@pytest.mark.parametrize("key", ["wrong", "missing", "unset"])
def test_a_wrong_or_missing_key_fails_in_one_line_and_changes_nothing(team, tmp_path, key):
    a = copy_clone(team.a, tmp_path / "a")
    login = f"{team.server.user}@{team.server.host}:{team.server.port}"
    if key == "wrong":  # a key that authorized_keys does not hold
        keyfile = keygen(tmp_path / "other_key")
        modify(a, team.env, "keyfile", keyfile)
        says = f"authentication failed for {login}: the server refused keyfile {keyfile}"
    elif key == "missing":
        keyfile = tmp_path / "no_such_key"
        modify(a, team.env, "keyfile", keyfile)
        says = f"cannot authenticate to {login}: keyfile {keyfile} does not exist"
    else:
        sh("dvc", "remote", "modify", "--local", "--unset", REMOTE, "keyfile", cwd=a,
           env=team.env)
        says = f"authentication failed for {login}: no keyfile set"
    assert_push_and_pull_refused(a, team.env, says)


@pytest.fixture
def silent_port():
    """A port that accepts connections and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.mark.parametrize("where", ["closed port", "silent port", "unroutable host"])
def test_an_unreachable_server_fails_in_one_line_within_seconds(team, tmp_path, where,
                                                                 silent_port):
    a = copy_clone(team.a, tmp_path / "a")
    if where == "closed port":
        port = free_port()
        modify(a, team.env, "port", port)
        says = f"cannot connect to 127.0.0.1:{port}: Connection refused"
    elif where == "silent port":
        modify(a, team.env, "port", silent_port)
        says = (f"no answer from 127.0.0.1:{silent_port} within 5 s (for a slow server: "
                f"`dvc remote modify --local {REMOTE} timeout SECONDS`)")
    else:  # refused at once, or no answer, as this machine's network has it
        modify(a, team.env, "url", f"ssh://{UNROUTABLE}{team.remote}")
        says = f" {UNROUTABLE}:{team.server.port}"
    seconds = assert_push_and_pull_refused(a, team.env, says)
    assert max(seconds.values()) < QUICKLY, seconds


def test_a_remote_that_sets_its_own_timeout_is_waited_for_that_long(team, tmp_path,
                                                                    silent_port):
    """A slow server's remote sets DVC's `timeout`; the login before DVC runs honours it
    rather than its own 5 s."""
    a = copy_clone(team.a, tmp_path / "a")
    modify(a, team.env, "port", silent_port)
    modify(a, team.env, "timeout", 8)
    started = time.monotonic()
    line = assert_make_fails_in_one_line(make("push", a, team.env, check=False))
    assert time.monotonic() - started >= 8
    assert f"no answer from 127.0.0.1:{silent_port} within 8 s" in line, line


def test_push_and_pull_refuse_a_folder_missing_on_the_server(team, tmp_path):
    """As for a local remote: DVC would create it, and a typo would go unnoticed."""
    a = copy_clone(team.a, tmp_path / "a")
    folder = tmp_path / "typo" / "remote"
    modify(a, team.env, "url", f"ssh://{team.server.host}{folder}")
    assert_push_and_pull_refused(a, team.env, f"{folder} does not exist on 127.0.0.1")
    assert not folder.parent.exists()
