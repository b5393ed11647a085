"""DVC push and pull, and a sweep's `dvc exp push|pull`, with checks and one-line errors.

All four go through the default DVC remote, or the one named after `--`:

    python -m tools.share push [TARGET ...]                  # make push
    python -m tools.share pull [TARGET ...]                  # make pull
    python -m tools.share exp-push GIT_REMOTE [EXPERIMENT ...]  # make exp-push EXP=...
    python -m tools.share exp-pull GIT_REMOTE [EXPERIMENT ...]  # make exp-pull

What follows `--` goes to DVC as it is (`pull -- -r other --allow-missing data/raw`;
`make pull DVC_ARGS=...`), and is first read with DVC's own parser, so that every check
below is of the remote that DVC will use: `-r NAME`, `-rNAME`, `--remote=NAME` (or
`exp push|pull`'s `--remote`), else the default. Arguments DVC would refuse are one line
here. With `--allow-missing`, a pull goes on without what the remote lacks.

DVC's own answers to these mistakes are poor: it creates a missing remote folder on push
(an unmounted share or a typo fills the local disk instead), reports a folder it cannot
write as an "unexpected error", and answers a pull of outputs the remote lacks with
"Everything is up to date." and a list of md5s. So before DVC runs:

- push: a local remote must be an existing folder that can be written;
- pull: a local remote must be an existing folder, and the remote (or the local cache)
  must hold every output asked for, or nothing is pulled and the line says to run
  `dvc repro` instead.

DVC hashes nothing it downloads unless the remote says `verify = true`; without it a
damaged object on the remote lands in the cache and the workspace as if it were good.
So every pull (`pull`, `exp-pull`) from a remote that has the setting (a folder, ssh://,
s3://, ...) is refused without it; for the few kinds that lack it (hdfs://), one line
says so and the pull goes on. `dvc exp pull` drops a damaged object silently and exits
0, so after it `exp-pull` looks for each experiment's outputs in the cache.

An ssh:// remote is not checked by DVC until it transfers: a wrong key is an
"unexpected error" with a support link, a host that does not answer hangs for DVC's
default connect timeout, 30 minutes, and the server's host key is never checked (DVC
connects with `known_hosts=None`). So before DVC runs, this logs in through DVC's own
SSH filesystem, with the remote's settings, its `timeout` where set (else 5 seconds;
DVC's own default of 30 minutes is the hang this avoids) and the host keys of
$KNOWN_HOSTS (default ~/.ssh/known_hosts): an unknown host or a changed key is refused
before any key is offered, and the remote's folder must exist there. Other remotes
(s3://, ...) are not checked.

Then DVC runs as usual and its exit status is this command's; where a pull fails, one
last line names the outputs that did not arrive.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

# `dvc status --cloud`: neither in the local cache nor in the remote
NOWHERE = "missing"
# `dvc status`: an output whose object the local cache lacks
NOT_IN_CACHE = "not in cache"
# seconds to connect and log in to an ssh:// remote before DVC runs, unless the remote
# sets its own `timeout`
SSH_TIMEOUT = 5
# the host keys an ssh:// remote's server must have: the file this names, else this
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
# the DVC command that each of this module's commands runs
DVC_COMMANDS = {"push": ["push"], "pull": ["pull"], "exp-push": ["exp", "push"],
                "exp-pull": ["exp", "pull"]}


class ShareError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""


@contextmanager
def dvc_log_kept() -> Iterator[list[str]]:
    """DVC's log messages, kept in a list instead of printed, while in the block."""
    logger, kept = logging.getLogger("dvc"), []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record.getMessage())

    handlers, logger.handlers = logger.handlers, [Keep()]
    try:
        yield kept
    finally:
        logger.handlers = handlers


def dvc_arguments(command: str, args: list[str]) -> argparse.Namespace:
    """ARGS as `dvc COMMAND ARGS` will read them, by DVC's own parser: the remote
    (`remote` for push and pull, `dvc_remote` for exp push and pull), the targets, the
    options. What DVC would refuse is one line here, before anything runs."""
    from dvc.cli import DvcParserError
    from dvc.cli.parser import get_main_parser

    dvc = " ".join(["dvc", *DVC_COMMANDS[command]])
    with dvc_log_kept() as said, redirect_stdout(StringIO()), redirect_stderr(StringIO()):
        try:
            return get_main_parser().parse_args([*DVC_COMMANDS[command], *args])
        except (DvcParserError, SystemExit):  # SystemExit: -h, which asks for help alone
            pass
    given = f"`{dvc} {' '.join(args)}`"
    if not said:
        raise ShareError(f"{given} asks only for help: run `{dvc} --help`")
    raise ShareError(f"{given}: {said[0]} (`{dvc} --help` lists what it takes)")


def remote(name: str | None) -> tuple[str, dict]:
    """Remote NAME's name and settings (`url`, `user`, `port`, ..., local paths
    absolute), as DVC resolves them; the default remote's where NAME is None."""
    from dvc.config import Config
    from dvc.exceptions import DvcException
    from dvc.fs import get_fs_config

    try:
        config = Config.from_cwd()
    except DvcException as err:  # a malformed config; not inside a DVC repository
        raise ShareError(str(err).splitlines()[0]) from None
    if name is None:
        name = config["core"].get("remote")
        if not name:
            raise ShareError("no default DVC remote: run `make setup` (docs/sharing.md)")
        if name not in config["remote"]:
            raise ShareError(f"the default DVC remote '{name}' is not defined in "
                             ".dvc/config*")
    elif name not in config["remote"]:
        raise ShareError(f"there is no DVC remote '{name}' (`dvc remote list` names them)")
    try:
        settings = get_fs_config(config, name=name)  # resolves remote://other/path
    except DvcException as err:
        raise ShareError(str(err).splitlines()[0]) from None
    return name, {**settings, "url": str(settings["url"])}


def local_folder(url: str) -> Path | None:
    """The folder a local remote's URL names; None for any other kind of remote."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(parsed.path)
    return Path(url) if parsed.scheme == "" else None


def check_folder(name: str, folder: Path) -> None:
    """FOLDER exists and is a folder."""
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ShareError(f"DVC remote '{name}': {folder} {what} "
                         "(`make setup` creates the default one; docs/sharing.md)")


def check_writable(name: str, folder: Path) -> None:
    """A file can be created in FOLDER (as root, the mode bits alone cannot tell)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
    except OSError as err:
        raise ShareError(f"DVC remote '{name}': cannot write to {folder}: "
                         f"{err.strerror}") from None
    os.close(fd)
    os.unlink(probe)


def is_ssh(url: str) -> bool:
    return urlparse(url).scheme == "ssh"


def known_hosts_file() -> Path:
    """The known_hosts file that an ssh:// remote's server key is checked against."""
    return Path(os.environ.get("KNOWN_HOSTS") or DEFAULT_KNOWN_HOSTS).expanduser()


def read_known_hosts(path: Path):
    """PATH's host keys, as asyncssh reads them (none where the file is missing)."""
    import asyncssh

    if not path.is_file():
        return asyncssh.SSHKnownHosts()
    try:
        return asyncssh.read_known_hosts(str(path))
    except (OSError, ValueError) as err:
        raise ShareError(f"cannot read the known hosts in {path}: {err}") from None


def login_timeout(settings: dict) -> int:
    """Seconds to connect and log in to an ssh:// remote of SETTINGS: its own `timeout`
    (`dvc remote modify NAME timeout 30`, for a slow server), else SSH_TIMEOUT."""
    return int(settings.get("timeout") or SSH_TIMEOUT)


def ssh_filesystem(settings: dict, known_hosts):
    """DVC's filesystem for an ssh:// remote, with login_timeout() for connecting and
    logging in, and the remote's folder on the host. It connects on first use, and checks the
    server's host key against KNOWN_HOSTS (asyncssh's SSHKnownHosts) before logging in:
    DVC itself passes `known_hosts=None`, which trusts any key."""
    from dvc.fs import get_cloud_fs

    cls, fs_config, path = get_cloud_fs(None, **settings)
    fs = cls(**{**fs_config, "timeout": login_timeout(settings)})
    fs.fs_args["known_hosts"] = known_hosts  # the keyword arguments of asyncssh.connect
    return fs, path


def untrusted_host_key(where: str, host: str, port: int, known_hosts, path: Path) -> str:
    """The one line for a server whose host key PATH does not hold: unknown, or changed."""
    address = host if port == 22 else f"[{host}]:{port}"
    trust = f"`ssh-keyscan -p {port} {host} >> {path}`"
    keys, ca_keys = known_hosts.match(host, "", None if port == 22 else port)[:2]
    if keys or ca_keys:
        return (f"{where}: the host key of {host}:{port} is not the one {path} holds for "
                f"it, so the connection may be intercepted; if the server's key changed, "
                f"check its new fingerprint, then `ssh-keygen -R '{address}' -f {path}` and "
                f"{trust}")
    return (f"{where}: {host}:{port} is not a known host in {path}: check the server's "
            f"host key fingerprint, then {trust} (docs/sharing.md)")


def check_ssh(name: str, settings: dict) -> None:
    """Log in to an ssh:// remote as DVC will, within login_timeout(), after checking its
    host key, and find its folder."""
    try:
        import asyncssh
    except ImportError:
        raise ShareError("DVC's SSH support is missing: run `make setup` "
                         "(requirements.txt installs dvc[ssh])") from None
    url = urlparse(settings["url"])
    host, port = url.hostname, int(settings.get("port") or url.port or 22)
    user = settings.get("user") or url.username
    address = f"{host}:{port}"
    login = f"{user}@{address}" if user else address
    where = f"DVC remote '{name}'"
    keyfile = settings.get("keyfile")
    if keyfile and not Path(keyfile).expanduser().is_file():
        raise ShareError(f"{where}: cannot authenticate to {login}: "
                         f"keyfile {keyfile} does not exist")
    known_path = known_hosts_file()
    known_hosts = read_known_hosts(known_path)
    fs, path = ssh_filesystem(settings, known_hosts)
    try:
        found = fs.isdir(path)
    except PermissionError:
        why = (f"the server refused keyfile {keyfile}" if keyfile else
               f"no keyfile set (`dvc remote modify --local {name} keyfile PATH`)")
        raise ShareError(f"{where}: authentication failed for {login}: {why}") from None
    except TimeoutError:
        raise ShareError(f"{where}: no answer from {address} within "
                         f"{login_timeout(settings)} s (for a slow server: `dvc remote "
                         f"modify --local {name} timeout SECONDS`)") from None
    except socket.gaierror as err:
        raise ShareError(f"{where}: cannot resolve {host}: {err.strerror}") from None
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise ShareError(f"{where}: cannot connect to {address}: {reason}") from None
    except asyncssh.HostKeyNotVerifiable:
        raise ShareError(untrusted_host_key(where, host, port, known_hosts,
                                            known_path)) from None
    except asyncssh.Error as err:
        raise ShareError(f"{where}: SSH to {login} failed: {err.reason}") from None
    if not found:
        raise ShareError(f"{where}: {path} does not exist on {host} "
                         "(create it there; docs/sharing.md)")


def can_verify(url: str) -> bool:
    """Whether DVC's config has `verify` for this kind of remote (all but a few have)."""
    from dvc.config_schema import REMOTE_SCHEMAS

    schema = REMOTE_SCHEMAS.get(urlparse(url).scheme if not local_folder(url) else "", {})
    return any(str(key) == "verify" for key in schema)


def check_verify(name: str, settings: dict) -> None:
    """A pull from the remote hash-checks each download (see the module's docstring)."""
    if not can_verify(settings["url"]):
        kind = urlparse(settings["url"]).scheme
        print(f"warning: DVC remote '{name}' cannot verify downloads: DVC has no `verify` "
              f"setting for {kind}:// remotes, so a damaged object there would pass as "
              "good", file=sys.stderr)
    elif not settings.get("verify"):
        raise ShareError(f"DVC remote '{name}' does not verify downloads, so a damaged "
                         f"object there would pass as good: run `dvc remote modify --local "
                         f"{name} verify true` (docs/sharing.md)")


def check_remote(name: str, settings: dict, write: bool) -> None:
    """The checks above that apply to this kind of remote."""
    if not write:
        check_verify(name, settings)
    folder = local_folder(settings["url"])
    if folder is not None:
        check_folder(name, folder)
        if write:
            check_writable(name, folder)
    elif is_ssh(settings["url"]):
        check_ssh(name, settings)


def scope(parsed: argparse.Namespace, cloud: bool) -> list[str]:
    """The options of a parsed `dvc push|pull` that choose which outputs it moves, as
    `dvc status` takes them (with --cloud: also which commits, and the remote); then its
    targets."""
    flags = {"with_deps": "-d", "recursive": "-R"}
    if cloud:
        flags.update(all_branches="-a", all_tags="-T", all_commits="-A")
    options = [flag for key, flag in flags.items() if getattr(parsed, key, False)]
    if cloud and parsed.remote:
        options += ["-r", parsed.remote]
    return [*options, *parsed.targets]


def outputs_nowhere(args: list[str]) -> list[str]:
    """Outputs (files, for tracked folders) that neither the cache nor the remote holds;
    ARGS: `dvc status --cloud`'s (scope())."""
    proc = subprocess.run(["dvc", "status", "--cloud", "--json", *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise ShareError(f"dvc status --cloud failed: {lines[0]}")
    status = json.loads(proc.stdout or "{}")
    return sorted(path for path, state in status.items() if state == NOWHERE)


def outputs_not_in_cache(args: list[str]) -> list[str]:
    """Outputs whose objects the local cache lacks, by `dvc status ARGS` (scope(); the
    remote is not asked); none where it fails."""
    proc = subprocess.run(["dvc", "status", "--json", *args], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        return []
    changes = [change for stage in json.loads(proc.stdout or "{}").values()
               for change in stage if isinstance(change, dict)]
    return sorted({path for change in changes
                   for path, state in change.get("changed outs", {}).items()
                   if state == NOT_IN_CACHE})


def push(args: list[str]) -> int:
    """`dvc push ARGS` after the checks of the remote it pushes to."""
    parsed = dvc_arguments("push", args)
    name, settings = remote(parsed.remote)
    check_remote(name, settings, write=True)
    return subprocess.run(["dvc", "push", *args]).returncode


def pull(args: list[str]) -> int:
    """`dvc pull ARGS` after the checks of the remote it pulls from, and only where that
    holds every output asked for (or --allow-missing says to go on without)."""
    parsed = dvc_arguments("pull", args)
    name, settings = remote(parsed.remote)
    check_remote(name, settings, write=False)
    missing = outputs_nowhere(scope(parsed, cloud=True))
    if missing and not parsed.allow_missing:
        raise ShareError(f"DVC remote '{name}' lacks {', '.join(missing)} (never pushed): "
                         "run `dvc repro` instead")
    code = subprocess.run(["dvc", "pull", *args]).returncode
    lost = outputs_not_in_cache(scope(parsed, cloud=False)) if code != 0 else []
    if lost:
        raise not_pulled(name, lost, "the transfer failed")
    return code


def not_pulled(name: str, lost: list[str], why: str) -> ShareError:
    return ShareError(f"DVC remote '{name}': {', '.join(lost)} not pulled (see above): "
                      f"{why}, or the copy there does not match its md5; nothing of it "
                      "was kept (docs/sharing.md#a-damaged-object)")


def git_remote_and_names(args: list[str]) -> list[str]:
    if not args:
        raise ShareError("name the git remote to share experiments through, and "
                         "optionally the experiments: `make exp-push EXP=NAME` "
                         "(docs/sharing.md)")
    return args


def exp_push(args: list[str]) -> int:
    """`dvc exp push GIT_REMOTE [NAME ...]`: the experiments' git refs, and their outputs
    to the DVC remote (the default, or --remote's), after push's checks."""
    parsed = dvc_arguments("exp-push", git_remote_and_names(args))
    name, settings = remote(parsed.dvc_remote)
    check_remote(name, settings, write=True)
    return subprocess.run(["dvc", "exp", "push", *args]).returncode


def exp_pull(args: list[str]) -> int:
    """`dvc exp pull GIT_REMOTE [NAME ...]` after pull's checks of the DVC remote (the
    default, or --remote's); then every pulled experiment of this commit must have its
    outputs in the cache."""
    parsed = dvc_arguments("exp-pull", git_remote_and_names(args))
    name, settings = remote(parsed.dvc_remote)
    check_remote(name, settings, write=False)
    code = subprocess.run(["dvc", "exp", "pull", *args]).returncode
    lost = experiment_outputs_not_in_cache(parsed.experiment)
    if lost:
        raise not_pulled(name, lost, "the remote lacks it, the transfer failed")
    return code


def in_cache(out) -> bool:
    """A DVC output's object is in the local cache, and for a folder each file's too."""
    from dvc_data.hashfile.tree import Tree

    cache = out.cache
    if not cache.exists(out.hash_info.value):
        return False
    obj = out.get_obj()
    return not isinstance(obj, Tree) or all(cache.exists(oid.value) for _, _, oid in obj)


def experiment_outputs_not_in_cache(names: list[str]) -> list[str]:
    """`NAME:PATH` for each cached output of this commit's experiments NAMES (all of them
    where none) whose objects the local cache lacks."""
    from dvc.repo import Repo

    lost = []
    with Repo() as repo:
        for experiments in repo.experiments.ls().values():
            for exp_name, rev in experiments:
                if names and exp_name not in names:
                    continue
                for _ in repo.brancher(revs=[rev], workspace=False):
                    lost += [f"{exp_name}:{out}" for out in repo.index.outs
                             if out.use_cache and not in_cache(out)]
    return sorted(lost)


COMMANDS = {"push": push, "pull": pull, "exp-push": exp_push, "exp-pull": exp_pull}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("targets", nargs="*", help="push, pull: stages or outputs "
                        "(default: all); exp-push, exp-pull: the git remote, then "
                        "experiments (default: all of this commit's); after `--`, DVC's "
                        "options too (-r NAME: the remote checked is NAME)")
    args = parser.parse_args()
    try:
        code = COMMANDS[args.command](args.targets)
    except ShareError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
