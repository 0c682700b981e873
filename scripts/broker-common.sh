# Sourced by broker-certs.sh and broker-credentials.sh: where the broker's secrets go.
# secrets_dir DIR: DIR (default $SLED_BROKER_DIR, else /etc/sled/broker) created mode 0700, and refused (exit 78)
# when it lies inside this checkout, where a copy or a commit would carry keys and passwords along.
umask 077
secrets_dir() {
    dir=${1:-${SLED_BROKER_DIR:-/etc/sled/broker}}
    checkout=$(cd "$(dirname "$0")/.." && pwd -P)
    dir=$(realpath -m "$dir")
    case "$dir/" in
        "$checkout"/*) echo "refusing to keep broker secrets in $dir, inside the checkout $checkout: use a" \
                            "directory outside it (BROKER_DIR=/etc/sled/broker, the default)" >&2; exit 78;;
    esac
    mkdir -p "$dir"
    chmod 0700 "$dir"
}
