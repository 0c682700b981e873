#!/bin/sh
# Add an account to the production broker's password file (and ACL for verifiers).
#   broker-credentials.sh device|verifier|inspector NAME DIR [BROKER_HOST]
# DIR must lie outside this checkout (empty: $SLED_BROKER_DIR, else /etc/sled/broker); it is made mode 0700.
# Prints the SLED_MQTT_URL line for the account's env file (to stdout only: the one place the password is
# shown). Re-running for a name replaces its password.
set -eu
. "$(dirname "$0")/broker-common.sh"
kind=$1 name=$2 host=${4:-broker.local}
case "$name" in *[!A-Za-z0-9._-]*|"") echo "name must be letters, digits, '.', '_' or '-'" >&2; exit 78;; esac
secrets_dir "$3"
[ -f "$dir/acl" ] || cp "$(dirname "$0")/../broker/acl.base" "$dir/acl"
password=$(openssl rand -hex 16)
if [ -f "$dir/passwords" ]; then
    mosquitto_passwd -b "$dir/passwords" "$name" "$password"
else
    touch "$dir/passwords" && chmod 0600 "$dir/passwords"
    mosquitto_passwd -b "$dir/passwords" "$name" "$password"
fi
case "$kind" in
    device) ;;  # the ACL patterns cover every device
    verifier)
        if ! grep -q "^user $name\$" "$dir/acl"; then
            printf '\npattern write sled/v1/drafts/%s/%%u\nuser %s\ntopic read sled/v1/drafts/%s/+\ntopic write sled/v1/verdicts/+\ntopic readwrite sled/v1/verifiers/%s\n' \
                "$name" "$name" "$name" "$name" >> "$dir/acl"
        fi ;;
    inspector)
        grep -q "^user $name\$" "$dir/acl" || printf '\nuser %s\ntopic read sled/#\n' "$name" >> "$dir/acl" ;;
    *) echo "kind must be device, verifier or inspector" >&2; exit 78;;
esac
echo "SLED_MQTT_URL=mqtts://$name:$password@$host:8883"
