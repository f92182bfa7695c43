#!/usr/bin/env bash
# Set up shellserver on Debian 12 (as root) and run it, or run its tests.
#
#   ./setup.sh serve   install what is needed, then run the server in the
#                      foreground on https://localhost:8443/ (self-signed TLS)
#   ./setup.sh test    install what is needed (chromium too), then check lint
#                      (ruff) and types (mypy) and run every test
#
# Every step is idempotent: a second run installs nothing new.
set -euo pipefail

cd "$(dirname "$(readlink -f "$0")")"
here=$(pwd)
mode=${1:-}
case "$mode" in
  serve|test|install) ;;
  *) echo "usage: $0 serve|test|install" >&2; exit 2 ;;
esac
shift || true

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (the server builds a sandbox per console)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
runtime=${SHELLSERVER_RUNTIME:-/var/lib/shellserver/runtime}

say() { printf '==> %s\n' "$*"; }

# 1. Debian packages.
# nano: the consoles' editor for IPython's %edit and F2 (bound from /usr).
# gcc, libc6-dev: the runtime's build compiles its waiter (waiter.c), static.
# socat: bench/efficiency.py's relay in C, the floor under any server (bench/README.md).
packages=(python3 python3-venv python3-dev ca-certificates nano gcc libc6-dev socat)
command -v npm >/dev/null 2>&1 || packages+=(nodejs npm)
if [ "$mode" = test ]; then
  packages+=(chromium fonts-dejavu-core)
  # tests of a cluster start their own Redis (loopback, unix socket, TLS).
  packages+=(redis-server)
  # tests/vm: build a Debian guest and boot it under emulation.
  packages+=(debootstrap qemu-system-x86 e2fsprogs openssh-client rsync)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. The server's venv, from the system Python.
stamp_of() { sha256sum "$@" | sha256sum | cut -c1-16; }
want=$(stamp_of pyproject.toml)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.shellserver-stamp 2>/dev/null)" != "$want" ]; then
  say "installing the server's Python packages into .venv"
  /usr/bin/python3 -m venv .venv
  # compat mode puts the checkout on sys.path, so twistd finds twisted/plugins.
  if ! { .venv/bin/pip install --disable-pip-version-check --upgrade pip &&
         .venv/bin/pip install --disable-pip-version-check \
           --config-settings editable_mode=compat -e ".[test,lint,bench]"; } > .venv/install.log 2>&1; then
    tail -n 40 .venv/install.log >&2
    echo "setup.sh: installing the Python packages failed (full log: .venv/install.log)" >&2
    exit 1
  fi
  echo "$want" > .venv/.shellserver-stamp
fi

# 3. Browser libraries from npm (never copied into the repository).
want=$(stamp_of web/package.json web/package-lock.json)
if [ ! -d web/node_modules ] || [ "$(cat web/node_modules/.shellserver-stamp 2>/dev/null)" != "$want" ]; then
  say "installing the browser libraries (npm ci in web/)"
  (cd web && npm ci --no-audit --no-fund --loglevel=error)
  echo "$want" > web/node_modules/.shellserver-stamp
fi

# 4. The console runtime: a venv of the system Python with IPython and the
#    packages of sandbox.packages in $SHELLSERVER_CONFIG (if set), rebuilt
#    when that list changes.
runtime_args=()
[ -n "${SHELLSERVER_CONFIG:-}" ] && runtime_args=(--config "$SHELLSERVER_CONFIG")
if ! .venv/bin/python -m shellserver.sandbox.runtime --check "${runtime_args[@]}" "$runtime" 2>/dev/null; then
  say "building the console runtime into $runtime"
  .venv/bin/python -m shellserver.sandbox.runtime "${runtime_args[@]}" "$runtime"
fi

case "$mode" in
  install) ;;
  serve)
    say "serving https://localhost:8443/ (Ctrl-C stops)"
    exec .venv/bin/twistd --nodaemon --pidfile= shellserver "$@"
    ;;
  test)
    export SHELLSERVER_RUNTIME="$runtime"
    # Lint and type errors fail the run before any test starts.
    say "ruff check"
    .venv/bin/ruff check shellserver tests twisted bench
    say "mypy shellserver"
    .venv/bin/mypy shellserver
    exec .venv/bin/pytest "$@"
    ;;
esac
