#!/usr/bin/env bash
# Configure a development OpenBao (or Vault) for the broker demo: a KV v2 mount, a demo secret, an
# AppRole role "broker-<instance>" with the policy from docs/vault.md, and its role_id/secret_id files.
#
#   BAO_ADDR=http://127.0.0.1:8200 BAO_TOKEN=... ./examples/vault-dev-setup.sh
#
# Environment:
#   BAO_ADDR, BAO_TOKEN   the server and an admin token (the dev server's root token); VAULT_* work too
#   BAO                   the CLI to use (default: bao; "vault" works the same)
#   OUT                   where role_id and secret_id go (default: a new directory under /dev/shm, which
#                         lives in memory; the files are mode 0600)
#   INSTANCE              this broker's fleet instance name (default: the host name)
#   WRAP=1                write a response-wrapped secret_id (the broker unwraps it once at login)
#   ENABLE_PKI=1          also mount pki/ with an internal root CA and a role "agents"
#   PG_HOST, PG_PORT, PG_USER, PG_PASSWORD
#                         also mount database/ for that PostgreSQL with a role "ticket-reader"
#                         (the password is passed on stdin, never on a command line)
# Prints the [vault] section to paste into broker.toml.
set -euo pipefail

BAO=${BAO:-bao}
export BAO_ADDR=${BAO_ADDR:-${VAULT_ADDR:-http://127.0.0.1:8200}}
export BAO_TOKEN=${BAO_TOKEN:-${VAULT_TOKEN:-}}
export VAULT_ADDR=$BAO_ADDR VAULT_TOKEN=$BAO_TOKEN
INSTANCE=${INSTANCE:-$(uname -n | tr 'A-Z' 'a-z' | tr -c 'a-z0-9._\n-' '-')}
if [[ -z "$BAO_TOKEN" ]]; then
    echo "set BAO_TOKEN to an admin token" >&2
    exit 2
fi
if [[ -z "${OUT:-}" ]]; then
    OUT=$(mktemp -d /dev/shm/broker-vault.XXXXXX 2>/dev/null || mktemp -d)
fi
mkdir -p "$OUT"
chmod 0700 "$OUT"
umask 077

# Captured first: grep -q on a pipe could exit early and fail the pipeline under pipefail.
mounted() { grep -q "\"$1/\"" <<<"$("$BAO" secrets list -format=json)"; }

# KV v2 at secret/ (a dev server already has it), holding the fleet JWKS and the demo secret.
mounted secret || "$BAO" secrets enable -path=secret -version=2 kv >&2
# The demo secret's value is random and goes through stdin, so it never shows up in a process list.
head -c 18 /dev/urandom | base64 | tr -d '\n' | "$BAO" kv put -mount=secret crm/readonly api_key=- >/dev/null

"$BAO" policy write crm-read - >/dev/null <<'HCL'
path "secret/data/crm/*" {
  capabilities = ["read"]
}
HCL

"$BAO" policy write "broker-$INSTANCE" - >/dev/null <<HCL
# Fleet JWKS: write our own entry, read and list everyone's.
path "secret/data/broker/jwks/$INSTANCE" {
  capabilities = ["create", "update", "read"]
}
path "secret/data/broker/jwks/*" {
  capabilities = ["read"]
}
path "secret/metadata/broker/jwks/*" {
  capabilities = ["list"]
}
# Upstream secrets for the tools in broker.toml.
path "secret/data/crm/*" {
  capabilities = ["read"]
}
path "database/creds/ticket-reader" {
  capabilities = ["read"]
}
path "pki/issue/agents" {
  capabilities = ["create", "update"]
}
# Revoke the certificates the broker issued (at the end of a broker exec run, on reload, at shutdown).
path "pki/revoke" {
  capabilities = ["update"]
}
# Child tokens; their policies must be among this token's own (here: crm-read).
path "auth/token/create" {
  capabilities = ["create", "update"]
}
# Renew and revoke the leases of database credentials.
path "sys/leases/renew" {
  capabilities = ["update"]
}
path "sys/leases/revoke" {
  capabilities = ["update"]
}
HCL

grep -q '"approle/"' <<<"$("$BAO" auth list -format=json)" || "$BAO" auth enable approle >&2
"$BAO" write "auth/approle/role/broker-$INSTANCE" \
    token_policies="broker-$INSTANCE,crm-read" token_ttl=1h token_max_ttl=24h \
    secret_id_ttl=0 token_type=service >/dev/null
"$BAO" read -field=role_id "auth/approle/role/broker-$INSTANCE/role-id" >"$OUT/role_id"
if [[ "${WRAP:-0}" == 1 ]]; then
    "$BAO" write -f -wrap-ttl=15m -field=wrapping_token "auth/approle/role/broker-$INSTANCE/secret-id" \
        >"$OUT/secret_id"
else
    "$BAO" write -f -field=secret_id "auth/approle/role/broker-$INSTANCE/secret-id" >"$OUT/secret_id"
fi

if [[ "${ENABLE_PKI:-0}" == 1 ]]; then
    mounted pki || "$BAO" secrets enable pki >&2
    "$BAO" secrets tune -max-lease-ttl=87600h pki >&2
    "$BAO" write -field=certificate pki/root/generate/internal common_name="broker demo CA" ttl=87600h \
        >"$OUT/ca.pem"
    "$BAO" write pki/roles/agents allowed_domains=agents.internal allow_subdomains=true \
        max_ttl=1h key_type=ec key_bits=256 >/dev/null
fi

if [[ -n "${PG_HOST:-}" ]]; then
    mounted database || "$BAO" secrets enable database >&2
    PG_PORT=${PG_PORT:-5432} PG_USER=${PG_USER:-postgres} python3 -c '
import json, os
e = os.environ
print(json.dumps({
    "plugin_name": "postgresql-database-plugin",
    "allowed_roles": "ticket-reader",
    "connection_url": "postgresql://{{username}}:{{password}}@%s:%s/postgres?sslmode=disable"
                      % (e["PG_HOST"], e["PG_PORT"]),
    "username": e["PG_USER"],
    "password": e["PG_PASSWORD"],
}))' | "$BAO" write database/config/tickets - >/dev/null
    "$BAO" write database/roles/ticket-reader db_name=tickets default_ttl=10m max_ttl=1h \
        creation_statements="CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';" \
        >/dev/null
fi

cat <<TOML
[vault]
address = "$BAO_ADDR"
instance = "$INSTANCE"
  [vault.auth]
  method = "approle"
  role_id_file = "$OUT/role_id"
  secret_id_file = "$OUT/secret_id"
TOML
