#!/usr/bin/env bash
# The programs that the browser and SSH test suites drive, installed with apt-get where
# they are missing (as root, or through sudo): a real browser for the offline-plots test
# (tests/test_plots_offline.py) and the page's (tests/test_serve.py, through the pinned
# playwright package), and a real sshd for the SSH remote tests (tests/test_ssh_remote.py,
# which start their own on 127.0.0.1). `make test` runs it first, in .ci/run too. Where a
# program cannot be installed, one line says which suite will skip (or, with CI=true,
# fail: tests/ci_suites.py); the tests run either way.
set -uo pipefail

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null && sudo="sudo -n"
fi
apt_updated=""

# install PACKAGE where COMMAND is missing; without it, SUITE skips
install() {
    local package=$1 command=$2 suite=$3
    PATH="$PATH:/usr/sbin" command -v "$command" >/dev/null && return
    if ! command -v apt-get >/dev/null || { [ "$(id -u)" -ne 0 ] && [ -z "$sudo" ]; }; then
        echo "$command is missing: install $package, or $suite will skip"
        return
    fi
    echo "== installing $package (for $suite)"
    { [ -n "$apt_updated" ] || { $sudo apt-get update -qq && apt_updated=1; }; } &&
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$package" >/dev/null ||
        echo "$package could not be installed: $suite will skip"
}

install chromium chromium "the browser tests"
install openssh-server sshd "the SSH remote tests"
exit 0
