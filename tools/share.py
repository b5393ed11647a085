"""`dvc push` and `dvc pull` to the default remote, with a check first and a one-line error.

    python -m tools.share push [TARGET ...]   # make push
    python -m tools.share pull [TARGET ...]   # make pull

DVC's own answers to these mistakes are poor: it creates a missing remote folder on push
(an unmounted share or a typo fills the local disk instead), reports a folder it cannot
write as an "unexpected error", and answers a pull of outputs the remote lacks with
"Everything is up to date." and a list of md5s. So before DVC runs:

- push: a local remote must be an existing folder that can be written;
- pull: a local remote must be an existing folder, and the remote (or the local cache)
  must hold every output asked for, or nothing is pulled and the line says to run
  `dvc repro` instead.

An ssh:// remote is not checked by DVC until it transfers: a wrong key is an
"unexpected error" with a support link, and a host that does not answer hangs for
DVC's default connect timeout, 30 minutes. So before DVC runs, this logs in through
DVC's own SSH filesystem, with the remote's settings and a 5-second timeout, and the
remote's folder must exist there. DVC does not verify what it downloads unless the
remote says `verify = true`, and without it a damaged object on the remote lands in the
cache and the workspace as if it were good; a pull from an ssh:// remote without it is
refused. Other remotes (s3://, ...) are not checked.

Then DVC runs as usual and its exit status is this command's; where a pull fails, one
last line names the outputs that did not arrive.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

# `dvc status --cloud`: neither in the local cache nor in the remote
NOWHERE = "missing"
# `dvc status`: an output whose object the local cache lacks
NOT_IN_CACHE = "not in cache"
# seconds to connect and log in to an ssh:// remote before DVC runs
SSH_TIMEOUT = 5


class ShareError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""


def default_remote() -> tuple[str, dict]:
    """The default remote's name and settings (`url`, `user`, `port`, ..., local paths
    absolute), as DVC resolves them."""
    from dvc.config import Config
    from dvc.exceptions import DvcException
    from dvc.fs import get_fs_config

    try:
        config = Config.from_cwd()
    except DvcException as err:  # a malformed config; not inside a DVC repository
        raise ShareError(str(err).splitlines()[0]) from None
    name = config["core"].get("remote")
    if not name:
        raise ShareError("no default DVC remote: run `make setup` (docs/sharing.md)")
    if name not in config["remote"]:
        raise ShareError(f"the default DVC remote '{name}' is not defined in .dvc/config*")
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


def ssh_filesystem(settings: dict):
    """DVC's filesystem for an ssh:// remote, with SSH_TIMEOUT for connecting and logging
    in, and the remote's folder on the host. It connects on first use."""
    from dvc.fs import get_cloud_fs

    cls, fs_config, path = get_cloud_fs(None, **settings)
    return cls(**{**fs_config, "timeout": SSH_TIMEOUT}), path


def check_ssh(name: str, settings: dict) -> None:
    """Log in to an ssh:// remote as DVC will, within SSH_TIMEOUT, and find its folder."""
    try:
        import asyncssh
    except ImportError:
        raise ShareError("DVC's SSH support is missing: run `make setup` "
                         "(requirements.txt installs dvc[ssh])") from None
    url = urlparse(settings["url"])
    host, port = url.hostname, settings.get("port") or url.port or 22
    user = settings.get("user") or url.username
    address = f"{host}:{port}"
    login = f"{user}@{address}" if user else address
    where = f"DVC remote '{name}'"
    keyfile = settings.get("keyfile")
    if keyfile and not Path(keyfile).expanduser().is_file():
        raise ShareError(f"{where}: cannot authenticate to {login}: "
                         f"keyfile {keyfile} does not exist")
    fs, path = ssh_filesystem(settings)
    try:
        found = fs.isdir(path)
    except PermissionError:
        why = (f"the server refused keyfile {keyfile}" if keyfile else
               f"no keyfile set (`dvc remote modify --local {name} keyfile PATH`)")
        raise ShareError(f"{where}: authentication failed for {login}: {why}") from None
    except TimeoutError:
        raise ShareError(f"{where}: no answer from {address} within {SSH_TIMEOUT} s") from None
    except socket.gaierror as err:
        raise ShareError(f"{where}: cannot resolve {host}: {err.strerror}") from None
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise ShareError(f"{where}: cannot connect to {address}: {reason}") from None
    except asyncssh.Error as err:
        raise ShareError(f"{where}: SSH to {login} failed: {err.reason}") from None
    if not found:
        raise ShareError(f"{where}: {path} does not exist on {host} "
                         "(create it there; docs/sharing.md)")


def check_verify(name: str, settings: dict) -> None:
    """A pull from the remote hash-checks each download (see the module's docstring)."""
    if not settings.get("verify"):
        raise ShareError(f"DVC remote '{name}' does not verify downloads, so a damaged "
                         f"object there would pass as good: run `dvc remote modify --local "
                         f"{name} verify true` (docs/sharing.md)")


def check_remote(name: str, settings: dict, write: bool) -> None:
    """The checks above that apply to this kind of remote."""
    folder = local_folder(settings["url"])
    if folder is not None:
        check_folder(name, folder)
        if write:
            check_writable(name, folder)
    elif is_ssh(settings["url"]):
        if not write:
            check_verify(name, settings)
        check_ssh(name, settings)


def outputs_nowhere(targets: list[str]) -> list[str]:
    """Outputs (files, for tracked folders) that neither the cache nor the remote holds."""
    proc = subprocess.run(["dvc", "status", "--cloud", "--json", *targets],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise ShareError(f"dvc status --cloud failed: {lines[0]}")
    status = json.loads(proc.stdout or "{}")
    return sorted(path for path, state in status.items() if state == NOWHERE)


def outputs_not_in_cache(targets: list[str]) -> list[str]:
    """Outputs whose objects the local cache lacks, by `dvc status` (the remote is not
    asked); none where it fails."""
    proc = subprocess.run(["dvc", "status", "--json", *targets], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        return []
    changes = [change for stage in json.loads(proc.stdout or "{}").values()
               for change in stage if isinstance(change, dict)]
    return sorted({path for change in changes
                   for path, state in change.get("changed outs", {}).items()
                   if state == NOT_IN_CACHE})


def push(targets: list[str]) -> int:
    name, settings = default_remote()
    check_remote(name, settings, write=True)
    return subprocess.run(["dvc", "push", *targets]).returncode


def pull(targets: list[str]) -> int:
    name, settings = default_remote()
    check_remote(name, settings, write=False)
    missing = outputs_nowhere(targets)
    if missing:
        raise ShareError(f"DVC remote '{name}' lacks {', '.join(missing)} (never pushed): "
                         "run `dvc repro` instead")
    code = subprocess.run(["dvc", "pull", *targets]).returncode
    lost = outputs_not_in_cache(targets) if code != 0 else []
    if lost:
        raise ShareError(f"DVC remote '{name}': {', '.join(lost)} not pulled (see above): "
                         "the transfer failed, or the copy there does not match its md5; "
                         "nothing of it was kept (docs/sharing.md#a-damaged-object)")
    return code


COMMANDS = {"push": push, "pull": pull}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("targets", nargs="*", help="stages or outputs (default: all)")
    args = parser.parse_args()
    try:
        code = COMMANDS[args.command](args.targets)
    except ShareError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
