#!/bin/sh
# A private CA and a server certificate for the production broker.
#   broker-certs.sh DIR HOSTNAME   ->  DIR/ca.crt, DIR/ca.key, DIR/server.crt, DIR/server.key
# DIR must lie outside this checkout (empty: $SLED_BROKER_DIR, else /etc/sled/broker); it is made mode 0700.
# Devices and verifiers get ca.crt (SLED_CA_FILE) to check the broker.
set -eu
. "$(dirname "$0")/broker-common.sh"
host=$2
secrets_dir "$1"
openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=SLED broker CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=$host" -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:%s,DNS:localhost,IP:127.0.0.1\n' "$host" > "$dir/server.ext"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial -days 825 \
    -extfile "$dir/server.ext" -out "$dir/server.crt" 2>/dev/null
rm -f "$dir/server.csr" "$dir/server.ext" "$dir/ca.srl"
chmod 0600 "$dir/ca.key" "$dir/server.key"
echo "wrote $dir/ca.crt $dir/server.crt $dir/server.key (CA key: $dir/ca.key, keep it offline)"
