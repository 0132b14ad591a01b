#!/bin/sh
# Installs the Debian packages the local sandbox needs, when any is missing.
# Quick and silent when all are present; says what is missing when it cannot
# install them (not root, or no apt-get).
set -eu

# x11-xserver-utils: xsetroot, which the desktop stream test paints with.
# xfonts-base: Xvfb cannot start without the core "fixed" font, and
# --no-install-recommends would leave it out. python3: Debian's interpreter
# runs each session's command spawner inside its jail (never the server's venv);
# python3-pip: setup's "pip:NAME" packages run its `python3 -m pip`.
# procps: ps, which the jail tests look for other sessions' processes with.
# slirp4netns: the outbound-only network of a sandbox with --sandbox-network.
# tests/test_programs.py checks that every program the code starts is here.
PACKAGES="python3 python3-pip bubblewrap xvfb xfonts-base x11vnc x11-xserver-utils x11-utils xdotool novnc imagemagick xterm openbox chromium fonts-dejavu-core util-linux procps slirp4netns"

# One dpkg-query for all: names it does not list as installed are missing.
# shellcheck disable=SC2086  # the list is meant to split into words
installed=$(dpkg-query -W -f='${Package} ${Status}\n' $PACKAGES 2>/dev/null | awk '/install ok installed/ {print $1}' || true)
missing=""
for pkg in $PACKAGES; do
    case " $(echo $installed) " in
        *" $pkg "*) ;;
        *) missing="$missing $pkg" ;;
    esac
done

if [ -z "$missing" ]; then
    echo "system packages: all present"
    exit 0
fi

echo "system packages missing:$missing"
if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: apt-get is not available; install these packages by hand:$missing" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "error: not root and no password-less sudo; run as root: apt-get install$missing" >&2
        exit 1
    fi
else
    SUDO=""
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# shellcheck disable=SC2086  # the list is meant to split into words
$SUDO apt-get install -y -q --no-install-recommends $missing
echo "system packages: installed$missing"
