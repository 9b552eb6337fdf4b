#!/usr/bin/env bash
# Installs the Debian packages kvtier's local launcher and tests use, when they are missing:
# redis-server (the remote tier), prometheus + promtool (local monitoring, scrape tests),
# docker-compose (validates docker-compose.yml without an engine). Needs root or sudo.
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v prometheus >/dev/null || need+=(prometheus)
command -v docker-compose >/dev/null || need+=(docker-compose)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q >/dev/null || true
$SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
