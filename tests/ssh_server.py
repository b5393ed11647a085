"""A real OpenSSH server for the tests: 127.0.0.1, a free port, keys made for the run.

`start(folder)` writes into FOLDER a host key, a client key, `authorized_keys` holding
the client key only, and an `sshd_config` that names them, then runs
`sshd -D -e -f FOLDER/sshd_config` as the current user. The daemon reads no /etc/ssh
file, writes no PID file and logs to FOLDER/sshd.log; it allows only key logins and
serves SFTP in-process, with no terminal, so it records no logins either. `stop()`
ends it. Nothing outside FOLDER changes, except that as root it creates /run/sshd where
it is missing: the empty folder that sshd needs then, as the ssh service creates it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
# as root, sshd needs this empty folder (its privilege-separation chroot, fixed when
# OpenSSH is built); the ssh service creates it when it starts, and so does unavailable()
PRIVSEP = Path("/run/sshd")
START_SECONDS = 10

CONFIG = """\
ListenAddress {host}
Port {port}
HostKey {folder}/host_key
PidFile none
AuthorizedKeysFile {folder}/authorized_keys
AllowUsers {user}
AuthenticationMethods publickey
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
# the folder is under /tmp, which everyone may write to
StrictModes no
PrintMotd no
PrintLastLog no
UseDNS no
Subsystem sftp internal-sftp
"""


@dataclass
class SshServer:
    folder: Path
    port: int
    user: str
    process: subprocess.Popen
    host: str = HOST

    @property
    def keyfile(self) -> Path:
        """The client's private key: the one key that authorized_keys holds."""
        return self.folder / "client_key"

    @property
    def known_hosts_line(self) -> str:
        """The server's host key as a known_hosts line, as `ssh-keyscan -p PORT HOST`
        writes it."""
        return f"[{self.host}]:{self.port} {(self.folder / 'host_key.pub').read_text()}"

    def stop(self) -> None:
        stop(self.process)


def sshd_path() -> str | None:
    return shutil.which("sshd", path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def unavailable() -> str | None:
    """Why no sshd can run here, or None; as root, first creates PRIVSEP if missing."""
    if sshd_path() is None:
        return "no sshd on this machine: install openssh-server (make test does)"
    if shutil.which("ssh-keygen") is None:
        return "no ssh-keygen on this machine: install openssh-client"
    if os.geteuid() == 0 and not PRIVSEP.is_dir():
        try:
            PRIVSEP.mkdir(mode=0o755, parents=True)
        except OSError as err:
            return f"sshd as root needs {PRIVSEP}, which cannot be created: {err.strerror}"
    return None


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    """A TCP port on HOST that nothing listens on (now)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test",
                    "-f", str(path)], check=True, capture_output=True)
    return path


def listening(process: subprocess.Popen, log: Path) -> bool:
    """Wait until sshd says it listens; False if it exits or stays silent."""
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        if "Server listening on" in log.read_text():
            return True
        time.sleep(0.05)
    return False


def start(folder: Path) -> SshServer:
    """An sshd as described above, listening (see the module's docstring)."""
    sshd = sshd_path()
    user = pwd.getpwuid(os.getuid()).pw_name
    keygen(folder / "host_key")
    keygen(folder / "client_key")
    shutil.copy(folder / "client_key.pub", folder / "authorized_keys")
    config, log = folder / "sshd_config", folder / "sshd.log"
    for _ in range(3):  # another program may take the free port before sshd does
        port = free_port()
        config.write_text(CONFIG.format(host=HOST, port=port, folder=folder, user=user))
        with log.open("w") as out:
            process = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)],
                                       stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT)
        if listening(process, log):
            return SshServer(folder, port, user, process)
        stop(process)
    raise RuntimeError(f"sshd did not start:\n{log.read_text()}")
