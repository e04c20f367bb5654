#!/usr/bin/env bash
# Run a command inside a network namespace that has only loopback (as root), so that
# Ray, Serve, DDP rendezvous and the test S3 server never touch a routable address.
# Elsewhere (not root, no unshare) the command runs as is.
#   scripts/loopback.sh python -m pytest -q
set -euo pipefail
if [ "$(id -u)" = "0" ] && command -v unshare >/dev/null 2>&1 && unshare -n true 2>/dev/null; then
  exec unshare -n sh -c 'ip link set lo up && exec "$@"' sh "$@"
fi
echo "loopback.sh: no network namespace available (needs root + unshare); running directly" >&2
exec "$@"
