#!/bin/sh
# make deploy-edge / deploy-verifier: copy this checkout (no secrets: deploy/exclude) to HOST into a fresh
# root-owned directory, install it there as root, enable and restart the unit, remove the copy.
#   deploy.sh HOST ROLE UNIT      environment: INSTANCE PREFIX SYSCONFDIR; DRY_RUN=1 prints every command
# The directory comes from `sudo mktemp -d` on HOST (mode 0700, a name nobody could have made first), so no
# local user can plant files in what `sudo make install` runs; rsync writes into it through `sudo rsync`.
set -eu
host=$1 role=$2 unit=$3
cd "$(dirname "$0")/.."
install="sudo make install ROLE=$role INSTANCE=${INSTANCE:-main} PREFIX=${PREFIX:-/opt/sled} SYSCONFDIR=${SYSCONFDIR:-/etc/sled}"
run() {  # DRY_RUN: print the command, an argument with spaces in single quotes (as a shell would take it)
    if [ -z "${DRY_RUN:-}" ]; then "$@"; return; fi
    line="+"
    for arg in "$@"; do case "$arg" in *" "*) line="$line '$arg'";; *) line="$line $arg";; esac; done
    echo "$line"
}

if [ -n "${DRY_RUN:-}" ]; then
    echo "+ ssh $host sudo mktemp -d /tmp/sled-src.XXXXXXXXXX"
    src='$SRC'
else
    src=$(ssh "$host" 'sudo mktemp -d /tmp/sled-src.XXXXXXXXXX')
    case "$src" in /tmp/sled-src.*) ;; *) echo "deploy: mktemp on $host gave '$src'" >&2; exit 70;; esac
    trap 'ssh "$host" "sudo rm -rf $src" || true' EXIT
fi
run rsync -rlptz --no-owner --no-group --exclude-from=deploy/exclude --rsync-path="sudo rsync" ./ "$host:$src/"
run ssh "$host" "cd $src && $install"
run ssh "$host" "sudo systemctl daemon-reload && sudo systemctl enable $unit && sudo systemctl restart $unit"
run ssh "$host" "systemctl --no-pager --lines=5 status $unit"
[ -z "${DRY_RUN:-}" ] || echo "+ ssh $host sudo rm -rf $src"
