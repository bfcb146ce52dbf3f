#!/bin/bash
# Remove worker-monitor from this node: stop and disable the service, remove the unit, the program
# and /etc/default/worker-monitor, reload systemd. /etc/worker-monitor (peers.txt) is kept unless
# --purge is given. Running it again, or on a node without worker-monitor, exits 0.
#
#   sudo ./uninstall_monitor.sh [--purge]
#   sudo /opt/worker-monitor/uninstall_monitor.sh [--purge]
#   curl -fsSL https://raw.githubusercontent.com/tjkkking/worker-monitor/main/uninstall_monitor.sh | sudo bash -s -- --purge
#
# Never reads stdin. All logic is in functions and `main "$@"` is the last line.

set -eu

SERVICE=worker-monitor
PROGRAM_DIR=/opt/worker-monitor
CONFIG_DIR=/etc/worker-monitor
UNIT_FILE=/etc/systemd/system/worker-monitor.service
DEFAULTS_FILE=/etc/default/worker-monitor

PURGE=0

say() {
    printf 'worker-monitor: %s\n' "$*" >&2
}

err() {
    say "error: $*"
    exit 1
}

usage() {
    printf 'usage: %s [--purge]\n  --purge  also remove %s (peers.txt) and %s.d\n' "$0" "$CONFIG_DIR" "$UNIT_FILE"
}

parse_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --purge) PURGE=1 ;;
            -h | --help) usage; exit 0 ;;
            *) usage >&2; exit 2 ;;
        esac
        shift
    done
}

check_root() {
    [ "$(id -u)" = 0 ] || err "must run as root (try: sudo $0)"
}

stop_service() {
    if ! command -v systemctl >/dev/null 2>&1 || [ ! -d /run/systemd/system ]; then
        say "systemd is not running; only removing files"
        return 0
    fi
    if systemctl is-active --quiet "$SERVICE" </dev/null || systemctl is-enabled --quiet "$SERVICE" </dev/null 2>/dev/null; then
        systemctl disable --now --quiet "$SERVICE" </dev/null || say "warning: could not stop $SERVICE"
        say "stopped and disabled $SERVICE"
    fi
}

remove_files() {
    local path
    for path in "$UNIT_FILE" "$DEFAULTS_FILE"; do
        if [ -e "$path" ]; then
            rm -f -- "$path"
            say "removed $path"
        fi
    done
    if [ -d "$PROGRAM_DIR" ]; then
        rm -rf -- "$PROGRAM_DIR"
        say "removed $PROGRAM_DIR"
    fi
    if [ "$PURGE" = 1 ] && [ -d "$UNIT_FILE.d" ]; then
        rm -rf -- "$UNIT_FILE.d"
        say "removed $UNIT_FILE.d"
    fi
    if [ -d "$CONFIG_DIR" ]; then
        if [ "$PURGE" = 1 ]; then
            rm -rf -- "$CONFIG_DIR"
            say "removed $CONFIG_DIR"
        else
            say "kept $CONFIG_DIR (remove it with --purge)"
        fi
    fi
}

reload_systemd() {
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl daemon-reload </dev/null
        systemctl reset-failed "$SERVICE" </dev/null 2>/dev/null || true
    fi
}

main() {
    parse_args "$@"
    check_root
    stop_service
    remove_files
    reload_systemd
    say "worker-monitor is uninstalled"
}

main "$@"
