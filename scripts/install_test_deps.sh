#!/usr/bin/env bash
# Installs the system services that the annotate tests drive: Debian's chromium
# (Playwright uses it via executable_path; we never run `playwright install`) and
# PostgreSQL (the tests start a throwaway server on loopback).
# Idempotent and fast when both are already present.
set -euo pipefail

need_chromium=0
need_postgres=0
[ -x /usr/bin/chromium ] || need_chromium=1
# initdb is not on PATH in Debian; it lives under the versioned postgresql dir.
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need_postgres=1

if [ "$need_chromium" = 0 ] && [ "$need_postgres" = 0 ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
packages=()
[ "$need_chromium" = 1 ] && packages+=(chromium)
[ "$need_postgres" = 1 ] && packages+=(postgresql)
$SUDO apt-get install -y --no-install-recommends "${packages[@]}"
