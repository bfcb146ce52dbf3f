#!/bin/bash
# Install worker-monitor on this node as a systemd service, or upgrade it in place.
#
#   curl -fsSL https://raw.githubusercontent.com/tjkkking/worker-monitor/main/install_monitor.sh | sudo bash
#   sudo ./install_monitor.sh          # from a checkout: installs the files beside this script
#
# Environment:
#   WORKER_MONITOR_BASE_URL  where to download the files when piped
#                            (default https://raw.githubusercontent.com/tjkkking/worker-monitor/main)
#   WORKER_MONITOR_PORT      HTTP port (default 8080; an existing /etc/default/worker-monitor is kept
#                            unless this is set)
#   WORKER_MONITOR_PEERS     a peers file on this node to install as /etc/worker-monitor/peers.txt
#   WORKER_MONITOR_NO_PKG=1  never call the package manager
#
# Never reads stdin (under `curl | bash` stdin is this script). All logic is in functions and the
# only top-level command is `main "$@"` on the last line, so a download cut short runs nothing.

set -eu

DEFAULT_BASE_URL="https://raw.githubusercontent.com/tjkkking/worker-monitor/main"
SERVICE=worker-monitor
PROGRAM_DIR=/opt/worker-monitor
CONFIG_DIR=/etc/worker-monitor
UNIT_FILE=/etc/systemd/system/worker-monitor.service
DEFAULTS_FILE=/etc/default/worker-monitor
FILES="worker_monitor.py peers.txt worker-monitor.service uninstall_monitor.sh"
# Modules the agent imports that Debian's python3-minimal leaves out (they come with "python3").
STDLIB_CHECK="import argparse, email.utils, http.server, ipaddress, json, logging, selectors, shlex, socketserver, subprocess"

TMP_DIR=""
SRC_DIR=""
BASE_URL=""
PYTHON=""

say() {
    printf 'worker-monitor: %s\n' "$*" >&2
}

err() {
    say "error: $*"
    exit 1
}

need_cmd() {
    command -v "$1" >/dev/null 2>&1 || err "need '$1' (command not found)"
}

cleanup() {
    if [ -n "$TMP_DIR" ]; then
        rm -rf -- "$TMP_DIR"
    fi
}

# --- checks ----------------------------------------------------------------------------------------

check_root() {
    [ "$(id -u)" = 0 ] || err "must run as root (try: sudo bash, or sudo $0)"
}

check_systemd() {
    # sd_booted(3): the directory exists only when systemd is PID 1.
    [ -d /run/systemd/system ] || err "systemd is not running on this node (no /run/systemd/system)"
    need_cmd systemctl
}

check_python() {
    PYTHON=$(command -v python3 2>/dev/null) || err "need python3 >= 3.8 (python3 not found)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 8))' </dev/null \
        || err "need python3 >= 3.8, found $("$PYTHON" -V 2>&1 </dev/null)"
    if ! "$PYTHON" -c "$STDLIB_CHECK" </dev/null >/dev/null 2>&1; then
        say "python3's standard library is incomplete (e.g. Debian's python3-minimal); installing python3"
        install_package python3 python3 python3 python3 \
            || err "python3's standard library is incomplete and could not be installed"
        "$PYTHON" -c "$STDLIB_CHECK" </dev/null || err "python3's standard library is still incomplete"
    fi
}

check_ping() {
    if command -v ping >/dev/null 2>&1; then
        return 0
    fi
    say "ping not found; installing it"
    if install_package iputils-ping iputils iputils iputils && command -v ping >/dev/null 2>&1; then
        return 0
    fi
    say "warning: could not install ping; latency values will be null until ping is installed"
}

# install_package DEB RPM APK ZYPPER: install with whichever package manager this node has.
install_package() {
    if [ "${WORKER_MONITOR_NO_PKG:-0}" = 1 ]; then
        say "WORKER_MONITOR_NO_PKG=1: not installing $1"
        return 1
    fi
    if command -v apt-get >/dev/null 2>&1; then
        # Try the package lists the node has first; refresh them only when that fails.
        apt_install "$1" || { apt-get update -qq </dev/null >&2 && apt_install "$1"; }
    elif command -v dnf >/dev/null 2>&1; then
        dnf install -y -q "$2" </dev/null >&2
    elif command -v yum >/dev/null 2>&1; then
        yum install -y -q "$2" </dev/null >&2
    elif command -v apk >/dev/null 2>&1; then
        apk add --no-cache -q "$3" </dev/null >&2
    elif command -v zypper >/dev/null 2>&1; then
        zypper --non-interactive --quiet install "$4" </dev/null >&2
    else
        say "no known package manager (apt-get, dnf, yum, apk, zypper)"
        return 1
    fi
}

apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends "$1" \
        </dev/null >&2
}

check_port() {
    case "${WORKER_MONITOR_PORT:-8080}" in
        '' | *[!0-9]*) err "WORKER_MONITOR_PORT must be a number, got '${WORKER_MONITOR_PORT}'" ;;
    esac
    if [ "${WORKER_MONITOR_PORT:-8080}" -lt 1 ] || [ "${WORKER_MONITOR_PORT:-8080}" -gt 65535 ]; then
        err "WORKER_MONITOR_PORT must be 1..65535, got '${WORKER_MONITOR_PORT}'"
    fi
    if [ -n "${WORKER_MONITOR_PEERS:-}" ] && [ ! -r "$WORKER_MONITOR_PEERS" ]; then
        err "WORKER_MONITOR_PEERS: cannot read '$WORKER_MONITOR_PEERS'"
    fi
}

# --- fetching and validating -----------------------------------------------------------------------

# Run from a checkout, print the directory holding this script and the files beside it.
find_source_dir() {
    local self="${BASH_SOURCE[0]:-}"
    case "$self" in
        *.sh) ;;
        *) return 0 ;;
    esac
    [ -f "$self" ] || return 0
    local dir
    dir=$(cd -- "$(dirname -- "$self")" && pwd)
    if [ -f "$dir/worker_monitor.py" ] && [ -f "$dir/worker-monitor.service" ]; then
        printf '%s\n' "$dir"
    fi
}

download() {
    local url=$1 dest=$2
    if command -v curl >/dev/null 2>&1; then
        curl -fsSL --retry 3 --connect-timeout 15 --max-time 300 -o "$dest" "$url" </dev/null
    elif command -v wget >/dev/null 2>&1; then
        wget -q -T 30 -t 3 -O "$dest" "$url" </dev/null
    else
        "$PYTHON" -c 'import shutil, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=60) as r, open(sys.argv[2], "wb") as f:
    shutil.copyfileobj(r, f)' "$url" "$dest" </dev/null
    fi
}

fetch() {
    local name=$1 dest="$TMP_DIR/$1"
    if [ -n "$SRC_DIR" ]; then
        cp -- "$SRC_DIR/$name" "$dest" || err "cannot copy $SRC_DIR/$name"
    else
        download "$BASE_URL/$name" "$dest" || err "download failed: $BASE_URL/$name"
    fi
    [ -s "$dest" ] || err "$name is empty; nothing was changed"
}

validate() {
    local dir=$TMP_DIR version
    "$PYTHON" -m py_compile "$dir/worker_monitor.py" </dev/null \
        || err "worker_monitor.py does not compile (truncated download?); nothing was changed"
    # A file cut at a line boundary can still compile; the last line is what runs main().
    version=$("$PYTHON" "$dir/worker_monitor.py" --version </dev/null 2>&1) \
        || err "worker_monitor.py --version failed: $version; nothing was changed"
    [ -n "$version" ] || err "worker_monitor.py --version printed nothing (truncated?); nothing was changed"
    if ! grep -q '^ExecStart=' "$dir/worker-monitor.service" || ! grep -q '^WantedBy=' "$dir/worker-monitor.service"; then
        err "worker-monitor.service is incomplete (truncated download?); nothing was changed"
    fi
    if ! bash -n "$dir/uninstall_monitor.sh" </dev/null || [ "$(tail -n 1 "$dir/uninstall_monitor.sh")" != 'main "$@"' ]; then
        err "uninstall_monitor.sh is incomplete (truncated download?); nothing was changed"
    fi
    if [ "$PYTHON" != /usr/bin/python3 ]; then
        sed -i "s#^ExecStart=/usr/bin/python3 #ExecStart=$PYTHON #" "$dir/worker-monitor.service"
    fi
    say "fetched $version"
}

# --- installing ------------------------------------------------------------------------------------

# put SRC DEST MODE: replace DEST atomically when its content differs.
put() {
    local src=$1 dest=$2 mode=$3
    if [ -f "$dest" ] && cmp -s -- "$src" "$dest"; then
        return 0
    fi
    install -D -m "$mode" -- "$src" "$dest.tmp.$$" </dev/null
    mv -f -- "$dest.tmp.$$" "$dest"
    say "installed $dest"
}

install_peers() {
    local new="$TMP_DIR/peers.txt" cur="$CONFIG_DIR/peers.txt" dist="$PROGRAM_DIR/peers.txt.dist"
    install -d -m 0755 "$CONFIG_DIR"
    if [ -n "${WORKER_MONITOR_PEERS:-}" ]; then
        if [ -f "$cur" ] && ! cmp -s -- "$WORKER_MONITOR_PEERS" "$cur"; then
            cp -p -- "$cur" "$cur.old"
            say "previous $cur saved as $cur.old"
        fi
        put "$WORKER_MONITOR_PEERS" "$cur" 0644
    elif [ ! -f "$cur" ]; then
        put "$new" "$cur" 0644
    elif cmp -s -- "$new" "$cur"; then
        rm -f -- "$cur.new"
    elif [ -f "$dist" ] && cmp -s -- "$dist" "$cur"; then
        # Unchanged since the last install: take the new default.
        put "$new" "$cur" 0644
    else
        # Edited by the operator (dpkg's conffile rule): keep it, put ours beside it.
        put "$new" "$cur.new" 0644
        say "kept your $cur; the new default is $cur.new"
    fi
    # The shipped default, to tell an edited peers.txt from an old default on the next upgrade.
    put "$new" "$dist" 0644
}

install_defaults() {
    local port=${WORKER_MONITOR_PORT:-8080}
    if [ ! -f "$DEFAULTS_FILE" ]; then
        cat >"$TMP_DIR/defaults" <<EOF
# Options for worker-monitor; see: python3 $PROGRAM_DIR/worker_monitor.py --help
# After editing: systemctl restart $SERVICE
WORKER_MONITOR_ARGS="--port $port --peers $CONFIG_DIR/peers.txt"
EOF
        put "$TMP_DIR/defaults" "$DEFAULTS_FILE" 0644
    elif [ -n "${WORKER_MONITOR_PORT:-}" ]; then
        cp -- "$DEFAULTS_FILE" "$TMP_DIR/defaults"
        if grep -q -- '--port[= ][0-9]*' "$TMP_DIR/defaults"; then
            sed -i "s/--port[= ][0-9]*/--port $port/" "$TMP_DIR/defaults"
        else
            sed -i "s/^WORKER_MONITOR_ARGS=\"/WORKER_MONITOR_ARGS=\"--port $port /" "$TMP_DIR/defaults"
        fi
        put "$TMP_DIR/defaults" "$DEFAULTS_FILE" 0644
    fi
}

install_files() {
    install -d -m 0755 "$PROGRAM_DIR"
    put "$TMP_DIR/worker_monitor.py" "$PROGRAM_DIR/worker_monitor.py" 0644
    put "$TMP_DIR/uninstall_monitor.sh" "$PROGRAM_DIR/uninstall_monitor.sh" 0755
    install_peers
    install_defaults
    put "$TMP_DIR/worker-monitor.service" "$UNIT_FILE" 0644
}

start_service() {
    systemctl daemon-reload </dev/null
    systemctl enable --quiet "$SERVICE" </dev/null
    if ! systemctl restart "$SERVICE" </dev/null; then
        systemctl status --no-pager "$SERVICE" </dev/null >&2 || true
        err "$SERVICE did not start; see: journalctl -u $SERVICE"
    fi
}

# Print the port and the address to ask, from the options in the defaults file.
listen_address() {
    local args="" port=8080 bind=0.0.0.0
    if [ -f "$DEFAULTS_FILE" ]; then
        # shellcheck disable=SC1090
        args=$(. "$DEFAULTS_FILE" </dev/null && printf '%s' "${WORKER_MONITOR_ARGS:-}")
    fi
    set -f
    # shellcheck disable=SC2086 # word splitting, as systemd does for $WORKER_MONITOR_ARGS
    set -- $args
    while [ $# -gt 0 ]; do
        case "$1" in
            --port) port=${2:-$port}; shift ;;
            --port=*) port=${1#--port=} ;;
            --bind) bind=${2:-$bind}; shift ;;
            --bind=*) bind=${1#--bind=} ;;
        esac
        shift
    done
    case "$bind" in
        0.0.0.0) bind=127.0.0.1 ;;
        ::) bind='[::1]' ;;
        *:*) bind="[$bind]" ;;
    esac
    printf '%s %s\n' "$port" "$bind"
}

wait_for_stats() {
    local port host url body _
    read -r port host <<EOF
$(listen_address)
EOF
    url="http://$host:$port/stats"
    for _ in $(seq 1 30); do
        if body=$("$PYTHON" -c 'import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())' "$url" </dev/null 2>/dev/null); then
            say "running and listening on port $port: curl $url"
            printf '%s\n' "$body"
            return 0
        fi
        sleep 1
    done
    systemctl status --no-pager "$SERVICE" </dev/null >&2 || true
    err "$SERVICE is not answering on $url after 30 s; see: journalctl -u $SERVICE"
}

main() {
    umask 022
    check_root
    check_systemd
    check_port
    check_python
    check_ping
    need_cmd install
    need_cmd cmp

    SRC_DIR=$(find_source_dir)
    BASE_URL=${WORKER_MONITOR_BASE_URL:-$DEFAULT_BASE_URL}
    BASE_URL=${BASE_URL%/}
    if [ -n "$SRC_DIR" ]; then
        say "installing from $SRC_DIR"
    else
        say "installing from $BASE_URL"
    fi

    TMP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/worker-monitor.XXXXXX")
    trap cleanup EXIT
    local name
    for name in $FILES; do
        fetch "$name"
    done
    validate

    install_files
    start_service
    wait_for_stats
    say "logs: journalctl -u $SERVICE; uninstall: $PROGRAM_DIR/uninstall_monitor.sh"
}

main "$@"
