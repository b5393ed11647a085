"""Sharing through DVC remotes: `make setup`'s default remote, a sweep split over clones,
and tools.share's one-line errors.

Everything lives in temp folders: a bare git repository stands for the git server, the
folder that `make setup` picks under XDG_CACHE_HOME for the shared DVC remote, and each
clone for a machine (tests/clones.py). The sweep runs the project's own train stage, as
dvc.yaml defines it, on tiny generated data for one short epoch.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml

from clones import error_line, flip_bytes, init_repo, make, make_env, sh, share, share_a_sweep
from helpers import assert_one_line_error, md5

pytestmark = pytest.mark.slow


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return make_env(tmp_path)


def default_remote(env: dict[str, str]) -> Path:
    """Where `make setup` puts the shared remote."""
    return Path(env["XDG_CACHE_HOME"]) / "mnist-cnn-dvc" / "remote"


# --- a sweep split over two clones ------------------------------------------------------

def test_a_sweep_split_over_two_clones_is_shared_through_the_remotes(tmp_path, env):
    share_a_sweep(tmp_path, env)


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


def set_remote(repo: Path, url: Path | str, env: dict[str, str], verify: bool = True
               ) -> None:
    sh("dvc", "remote", "add", "--local", "-d", "-f", "shared", str(url), cwd=repo, env=env)
    if verify:
        sh("dvc", "remote", "modify", "--local", "shared", "verify", "true", cwd=repo, env=env)


def test_setup_adds_the_shared_default_remote_and_keeps_a_chosen_one(repo, tmp_path, env):
    make("setup", repo, env)
    assert default_remote(env).is_dir()
    assert sh("dvc", "remote", "default", cwd=repo, env=env).stdout.strip() == "shared"
    url = sh("dvc", "config", "--local", "remote.shared.url", cwd=repo, env=env).stdout
    assert url.strip() == str(default_remote(env))
    verify = sh("dvc", "config", "--local", "remote.shared.verify", cwd=repo, env=env).stdout
    assert verify.strip() == "true"
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


# --- the remote DVC will use: -r NAME after `--` -----------------------------------------

def cached_files(repo: Path) -> list[Path]:
    return [p for p in (repo / ".dvc" / "cache").rglob("*") if p.is_file()]


def two_remotes(repo: Path, tmp_path: Path, env: dict[str, str], other_verifies: bool,
                pushed: tuple[str, ...]) -> None:
    """The default remote 'shared' verifies and is empty; 'other' holds PUSHED (stages);
    the clone's cache and outputs are gone."""
    for name in ("remote", "other"):
        (tmp_path / name).mkdir()
    set_remote(repo, tmp_path / "remote", env)
    sh("dvc", "remote", "add", "--local", "other", str(tmp_path / "other"), cwd=repo, env=env)
    if other_verifies:
        sh("dvc", "remote", "modify", "--local", "other", "verify", "true", cwd=repo, env=env)
    sh("dvc", "push", "-q", "-r", "other", *pushed, cwd=repo, env=env)
    shutil.rmtree(repo / ".dvc" / "cache")
    for name in ("one.txt", "two.txt"):
        (repo / name).unlink()


@pytest.mark.parametrize("choice", [["-r", "other"], ["-rother"], ["--remote=other"],
                                    ["--remote", "other"]],
                         ids=["-r NAME", "-rNAME", "--remote=NAME", "--remote NAME"])
def test_pull_checks_the_remote_named_after_the_double_dash(repo, tmp_path, env, choice):
    """Not the default remote, which verifies: nothing comes from 'other', which does not."""
    two_remotes(repo, tmp_path, env, other_verifies=False, pushed=("one", "two"))
    refused = ("error: DVC remote 'other' does not verify downloads, so a damaged object "
               "there would pass as good: run `dvc remote modify --local other verify true` "
               "(docs/sharing.md)")
    assert assert_one_line_error(share("pull", repo, env, "--", *choice, "one")) == refused
    assert assert_one_line_error(share("exp-pull", repo, env, "--", *choice, "origin")
                                 ) == refused
    assert not (repo / "one.txt").exists() and not cached_files(repo)


def test_pull_from_another_remote_is_checked_for_what_it_lacks(repo, tmp_path, env):
    two_remotes(repo, tmp_path, env, other_verifies=True, pushed=("one",))
    line = assert_one_line_error(share("pull", repo, env, "--", "-r", "other"))
    assert line == ("error: DVC remote 'other' lacks two.txt (never pushed): "
                    "run `dvc repro` instead")
    assert not (repo / "one.txt").exists() and not cached_files(repo)
    for args in (["no-such-option", "--bogus"], ["-r", "no-such-remote"]):
        line = assert_one_line_error(share("pull", repo, env, "--", *args))
        assert line == {"--bogus": "error: `dvc pull no-such-option --bogus`: unrecognized "
                                   "arguments: --bogus (`dvc pull --help` lists what it "
                                   "takes)",
                        "no-such-remote": "error: there is no DVC remote 'no-such-remote' "
                                          "(`dvc remote list` names them)"}[args[-1]]
    # --allow-missing: what the remote has, and the rest left to `dvc repro`
    assert share("pull", repo, env, "--", "-r", "other", "--allow-missing").returncode == 0
    assert (repo / "one.txt").read_text() == "one\n" and not (repo / "two.txt").exists()


# --- every pull verifies what it downloads ------------------------------------------------

def test_pull_and_exp_pull_refuse_a_remote_that_does_not_verify(repo, tmp_path, env):
    (tmp_path / "remote").mkdir()
    set_remote(repo, tmp_path / "remote", env, verify=False)
    for command, args in (("pull", ()), ("exp-pull", ("origin",))):
        line = assert_one_line_error(share(command, repo, env, *args))
        assert line == ("error: DVC remote 'shared' does not verify downloads, so a damaged "
                        "object there would pass as good: run `dvc remote modify --local "
                        "shared verify true` (docs/sharing.md)")


def test_s3_is_checked_alike_and_a_kind_without_verify_says_so_at_the_pull(capsys):
    from tools.share import ShareError, check_remote

    with pytest.raises(ShareError, match="^DVC remote 'shared' does not verify downloads"):
        check_remote("shared", {"url": "s3://bucket/mnist-cnn-dvc"}, write=False)
    check_remote("shared", {"url": "s3://bucket/mnist-cnn-dvc", "verify": True}, write=False)
    assert capsys.readouterr().err == ""
    check_remote("shared", {"url": "hdfs://host/mnist-cnn-dvc"}, write=False)
    assert capsys.readouterr().err == (
        "warning: DVC remote 'shared' cannot verify downloads: DVC has no `verify` setting "
        "for hdfs:// remotes, so a damaged object there would pass as good\n")


COPY_STAGE = {"stages": {"copy": {"cmd": "cp word.txt out.txt", "deps": ["word.txt"],
                                  "outs": ["out.txt"]}}}


def test_a_damaged_object_in_a_folder_remote_is_not_delivered_by_pull_or_exp_pull(
        tmp_path, env):
    """The commit's out.txt holds "one", experiment e1's "two"; both objects rot on the
    remote (bytes flipped, size and read-only mode kept)."""
    origin, remote, a = tmp_path / "origin.git", tmp_path / "remote", tmp_path / "a"
    sh("git", "init", "-q", "--bare", "-b", "main", str(origin), cwd=tmp_path, env=env)
    init_repo(a, env)
    (a / "dvc.yaml").write_text(yaml.safe_dump(COPY_STAGE))
    (a / "word.txt").write_text("one\n" * 8)
    remote.mkdir()
    set_remote(a, remote, env)
    sh("dvc", "repro", "-q", cwd=a, env=env)
    sh("git", "add", "-A", cwd=a, env=env)
    sh("git", "commit", "-qm", "one", cwd=a, env=env)
    sh("git", "push", "-q", str(origin), "main", cwd=a, env=env)
    sh("git", "remote", "add", "origin", str(origin), cwd=a, env=env)
    assert share("push", a, env).returncode == 0
    (a / "word.txt").write_text("two\n" * 8)
    sh("dvc", "exp", "run", "-q", "-n", "e1", cwd=a, env=env)
    assert share("exp-push", a, env, "origin", "e1").returncode == 0
    damaged = {}
    for word in ("one", "two"):
        oid = md5(f"{word}\n".encode() * 8)
        damaged[word] = flip_bytes(remote / "files" / "md5" / oid[:2] / oid[2:])

    # what plain DVC does without `verify`: the damaged copy arrives as if it were good
    plain = tmp_path / "plain"
    sh("git", "clone", "-q", str(origin), str(plain), cwd=tmp_path, env=env)
    set_remote(plain, remote, env, verify=False)
    sh("dvc", "exp", "pull", "origin", cwd=plain, env=env)
    sh("dvc", "exp", "apply", "e1", cwd=plain, env=env)
    assert (plain / "out.txt").read_bytes() == damaged["two"]

    b = tmp_path / "b"
    sh("git", "clone", "-q", str(origin), str(b), cwd=tmp_path, env=env)
    set_remote(b, remote, env)
    for command, args, lost in (("pull", (), "out.txt"), ("exp-pull", ("origin",), "e1:out.txt")):
        line = error_line(share(command, b, env, *args))
        assert line.startswith(f"error: DVC remote 'shared': {lost} not pulled (see above)"), line
    assert not (b / "out.txt").exists()
    assert not [p for p in (b / ".dvc" / "cache").rglob("*") if p.is_file()]  # none kept
