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

Remotes that are not folders (s3://, ssh://, ...) skip the folder check. Then DVC runs
as usual and its exit status is this command's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

# `dvc status --cloud`: neither in the local cache nor in the remote
NOWHERE = "missing"


class ShareError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""


def default_remote() -> tuple[str, str]:
    """The default remote's name and URL (local paths absolute), as DVC resolves them."""
    from dvc.config import Config
    from dvc.exceptions import DvcException

    try:
        config = Config.from_cwd()
    except DvcException as err:  # a malformed config; not inside a DVC repository
        raise ShareError(str(err).splitlines()[0]) from None
    name = config["core"].get("remote")
    if not name:
        raise ShareError("no default DVC remote: run `make setup` (docs/sharing.md)")
    if name not in config["remote"]:
        raise ShareError(f"the default DVC remote '{name}' is not defined in .dvc/config*")
    return name, str(config["remote"][name]["url"])


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


def outputs_nowhere(targets: list[str]) -> list[str]:
    """Outputs (files, for tracked folders) that neither the cache nor the remote holds."""
    proc = subprocess.run(["dvc", "status", "--cloud", "--json", *targets],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise ShareError(f"dvc status --cloud failed: {lines[0]}")
    status = json.loads(proc.stdout or "{}")
    return sorted(path for path, state in status.items() if state == NOWHERE)


def push(targets: list[str]) -> int:
    name, url = default_remote()
    folder = local_folder(url)
    if folder is not None:
        check_folder(name, folder)
        check_writable(name, folder)
    return subprocess.run(["dvc", "push", *targets]).returncode


def pull(targets: list[str]) -> int:
    name, url = default_remote()
    folder = local_folder(url)
    if folder is not None:
        check_folder(name, folder)
    missing = outputs_nowhere(targets)
    if missing:
        raise ShareError(f"DVC remote '{name}' lacks {', '.join(missing)} (never pushed): "
                         "run `dvc repro` instead")
    return subprocess.run(["dvc", "pull", *targets]).returncode


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
