#!/usr/bin/env bash
# The OpenAPI document as the API's contract: schemathesis generates requests from
# GET /v1/openapi.json alone (valid and invalid ones, then chains of creates and the
# operations their links name) against a real `vinfra server` over HTTPS, and fails on
# any 5xx, any status the document does not list, any response that breaks its schema,
# and fewer than 90% of the valid generated creates succeeding (docs/API.md).
#
# Builds nothing: uses $CARGO_TARGET_DIR/debug/vinfra (the test command builds it).
# Caller: the admin token, so that every operation is reachable (a member token gets
# 403 on the admin-only half of the API and the fuzzer learns little there).
# Environment: SCHEMATHESIS_MAX_EXAMPLES (default 20), SCHEMATHESIS_SEED (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
target=${CARGO_TARGET_DIR:-/var/cache/vinfra/target}
vinfra=$target/debug/vinfra
venv=${XDG_CACHE_HOME:-/var/cache/vinfra}/schemathesis-venv
max_examples=${SCHEMATHESIS_MAX_EXAMPLES:-20}
seed=${SCHEMATHESIS_SEED:-1}

if [[ ! -x $vinfra ]]; then
    echo "schemathesis.sh: $vinfra is missing; run the test command (cargo test --workspace) first" >&2
    exit 1
fi
if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q " $SCHEMATHESIS_VERSION\$"; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
fi

tmp=$(mktemp -d)
server_pid=
beat_pid=
cleanup() {
    if [[ -n $beat_pid ]]; then
        kill "$beat_pid" 2>/dev/null || true
        wait "$beat_pid" 2>/dev/null || true
    fi
    if [[ -n $server_pid ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

# A free loopback port: bind port 0, read what the kernel gave, release it.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# HTTPS with the cluster CA (as a server beyond loopback serves it), so that the join
# routes work too. Every client trusts the CA the server writes to its data directory.
base=https://127.0.0.1:$port
"$vinfra" server --store "redb:$tmp/state.redb" --listen "127.0.0.1:$port" --data-dir "$tmp" \
    --rate-limit 0 --image-import-dir "$tmp/import" --tls on >"$tmp/server.log" 2>&1 &
server_pid=$!
mkdir -p "$tmp/import"
for _ in $(seq 1 100); do
    if [[ -s $tmp/ca.pem ]] && curl -fsS --cacert "$tmp/ca.pem" "$base/v1/openapi.json" -o /dev/null 2>/dev/null &&
        [[ -s $tmp/admin-token ]]; then
        break
    fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "schemathesis.sh: the server exited:" >&2
        cat "$tmp/server.log" >&2
        exit 1
    fi
    sleep 0.1
done
admin=$(cat "$tmp/admin-token")
auth="Authorization: Bearer $admin"

# Objects the generated creates can lean on, named as the document's examples name
# them (so that an example is a request that succeeds): a host with room (registered
# by its joined agent), the example blob (the upload's example body) in the image store
# and in the import directory, an image and a network.
api() { # METHOD PATH [JSON]
    curl -fsS --cacert "$tmp/ca.pem" -X "$1" "$base$2" -H "$auth" ${3:+-H "Content-Type: application/json" --data "$3"}
}
curl -fsS --cacert "$tmp/ca.pem" "$base/v1/openapi.json" -o "$tmp/openapi.json"
example() { # SCHEMA PROPERTY: the first example of a request schema's property
    python3 -c 'import json,sys; d = json.load(open(sys.argv[1]))
print(d["components"]["schemas"][sys.argv[2]]["properties"][sys.argv[3]]["examples"][0])' "$tmp/openapi.json" "$1" "$2"
}
host=$(example CreateVm host)
image=$(example CreateVm image)
network=$(example NicRequest network)
import_path=$(example ImportBlob path)
python3 -c 'import json,sys; d = json.load(open(sys.argv[1]))
sys.stdout.write(d["paths"]["/v1/blobs"]["post"]["requestBody"]["content"]["application/octet-stream"]["example"])' \
    "$tmp/openapi.json" >"$tmp/blob"
# The host's agent joins as one on another machine would (agent tokens over TLS need
# the agent's client certificate): a join token, then its certificate, key and token.
join=$(api POST /v1/join-tokens '{}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
curl -fsS --cacert "$tmp/ca.pem" -X POST "$base/v1/join" -H "Content-Type: application/json" \
    --data "{\"token\":\"$join\",\"host\":\"$host\"}" | python3 -c 'import json,sys
j = json.load(sys.stdin); d = sys.argv[1]
for k, f in (("cert_pem", "agent.crt"), ("key_pem", "agent.key"), ("token", "agent-token")):
    open(f"{d}/{f}", "w").write(j[k])' "$tmp"
agent() { # METHOD PATH [JSON]: as the host's agent
    curl -fsS --cacert "$tmp/ca.pem" --cert "$tmp/agent.crt" --key "$tmp/agent.key" -X "$1" "$base$2" \
        -H "Authorization: Bearer $(cat "$tmp/agent-token")" ${3:+-H "Content-Type: application/json" --data "$3"}
}
agent POST /v1/hosts "{\"name\":\"$host\",\"cpus\":4096,\"memory_mib\":67108864,\"disk_gib\":1048576,\"drivers\":[\"process\"]}" >/dev/null
kernel=$(curl -fsS --cacert "$tmp/ca.pem" -X POST "$base/v1/blobs" -H "$auth" -H "Content-Type: application/octet-stream" \
    --data-binary "@$tmp/blob" | python3 -c 'import json,sys; print(json.load(sys.stdin)["digest"])')
api POST /v1/images "{\"name\":\"$image\",\"kernel\":\"$kernel\",\"disk_mib\":1024}" >/dev/null
# An admin's first network without a tenant creates the tenant `default` (the tenant examples).
api POST /v1/networks "{\"name\":\"$network\",\"cidr\":\"10.10.0.0/16\"}" >/dev/null
cp "$tmp/blob" "$tmp/import/$import_path"
# The host stays up while the run lasts (a host without heartbeats goes down, and VM
# creates then get 409 "no up host"): its agent's heartbeat, every 2 s.
(while agent POST "/v1/hosts/$host/heartbeat" >/dev/null; do
    sleep 2
done) &
beat_pid=$!

# Not checked: use_after_free (a VM or NS instance delete is 202, the object stays
# visible, `deleting`, until its agent or sites are done) and ensure_resource_availability
# (networks and images are addressed by name and by id: a scenario deletes one by name,
# then the link by id finds it gone and the check blames the create). Positive data
# acceptance is not checked either: references and cross-field rules are not in the schemas.
# Not run: `host_events` (GET /v1/hosts/{name}/events), a response that lasts as long as
# its connection (newline-delimited JSON, pinged every 10 s): every request for a host
# that exists would end in the request timeout. tests/all/push.rs in crates/api covers it.
# One worker: with two, one worker's generated deletes remove what the other's
# scenario just created, and the availability checks fail on the race, not the server.
status=0
config=${SCHEMATHESIS_CONFIG:-$PWD/scripts/schemathesis.toml}
# Run from the scratch directory: schemathesis keeps caches (.schemathesis, .hypothesis)
# in its working directory and replays what they hold, so each run starts clean.
# The hook counts what each generated create got (scripts/schemathesis_creates.py).
calls=$tmp/calls.jsonl
hooks=$PWD/scripts/schemathesis_creates.py
(cd "$tmp" && VINFRA_SCHEMATHESIS_CALLS=$calls SCHEMATHESIS_HOOKS=$hooks \
    "$venv/bin/schemathesis" --config-file "$config" run "$base/v1/openapi.json" \
    --header "$auth" \
    --tls-verify "$tmp/ca.pem" \
    --phases examples,coverage,fuzzing,stateful \
    --mode all \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection \
    --max-examples "$max_examples" \
    --seed "$seed" \
    --generation-database none \
    --workers 1 \
    --request-timeout 10 \
    --exclude-operation-id host_events \
    --no-color \
    --report junit --report-dir "${SCHEMATHESIS_REPORT_DIR:-$tmp/report}" \
    "$@") || status=$?
if [[ $status -ne 0 ]]; then
    echo "schemathesis.sh: failures above; the server's log:" >&2
    tail -n 50 "$tmp/server.log" >&2
    exit "$status"
fi
# At least 90% of the positive creates generated from the document alone succeed.
if ! python3 scripts/schemathesis_creates.py "$calls"; then
    echo "schemathesis.sh: under 90% of the generated creates succeeded: the document does not" >&2
    echo "carry what a client needs to make a valid request (see docs/API.md, Schemathesis)" >&2
    exit 1
fi
