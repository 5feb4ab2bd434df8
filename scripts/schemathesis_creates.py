"""How many generated creates succeed: a schemathesis hook, and the report it feeds.

Loaded by schemathesis (SCHEMATHESIS_HOOKS=this file), it appends one JSON line per
request to $VINFRA_SCHEMATHESIS_CALLS: the operation, the phase, the generation mode
(positive or negative), the status, and for a 409 whether the problem says the name is
taken. Run as `python3 schemathesis_creates.py CALLS.jsonl`, it prints, for each create
operation, what the positive requests of the examples, coverage and fuzzing phases got,
and exits 1 when fewer than 90% of the gated creates succeeded.

The ratio (docs/API.md, "Schemathesis"): successes (2xx) / (positive requests - name
collisions), over the gated creates. A 409 whose problem says the name "already exists"
is a correct refusal of a valid request (the generator reused a name), counted apart.
The stateful phase is left out: its requests follow links from earlier responses, not
the document alone. Reported but not gated are the creates whose valid requests no JSON
Schema can describe: a file path that must exist in the server's import directory, a
YAML descriptor inside a string, an NS instance keyed by the site names of a stored
descriptor, and a join that spends a one-time secret.
"""

import collections
import json
import os
import sys

GATED = [
    "/v1/blobs",
    "/v1/hosts",
    "/v1/images",
    "/v1/join-tokens",
    "/v1/networks",
    "/v1/tenants",
    "/v1/tokens",
    "/v1/vms",
]
REPORTED = {
    "/v1/blobs/import": "a path that must name a file in the server's import directory",
    "/v1/join": "a one-time join token minted at run time",
    "/v1/ns-instances": "sites keyed by the site names of a stored NSD",
    "/v1/nsds": "a YAML document in a string",
    "/v1/vnfds": "a YAML document in a string",
}
THRESHOLD = 0.90
PHASES = ("examples", "coverage", "fuzzing")

if __name__ != "__main__":
    import schemathesis

    _out = open(os.environ["VINFRA_SCHEMATHESIS_CALLS"], "a", buffering=1)

    @schemathesis.hook
    def after_call(context, case, response):
        meta = case.meta
        record = {
            "op": case.operation.label,
            "phase": meta.phase.name.value if meta is not None else None,
            "mode": meta.generation.mode.value if meta is not None else None,
            "status": response.status_code,
        }
        if response.status_code == 409:
            record["taken"] = "already exists" in response.text
        _out.write(json.dumps(record) + "\n")


def main(path):
    counts = collections.defaultdict(collections.Counter)
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            method, route = r["op"].split(" ", 1)
            if method != "POST" or r["mode"] != "positive" or r["phase"] not in PHASES:
                continue
            if route not in GATED and route not in REPORTED:
                continue
            c = counts[route]
            c["requests"] += 1
            if 200 <= r["status"] < 300:
                c["ok"] += 1
            elif r.get("taken"):
                c["taken"] += 1
            else:
                c[str(r["status"])] += 1
    total = collections.Counter()
    print("positive-phase creates (examples, coverage, fuzzing): requests, 2xx, name taken, other")
    for route in GATED + sorted(REPORTED):
        c = counts[route]
        other = ", ".join(f"{s}: {n}" for s, n in sorted(c.items()) if s.isdigit())
        note = "" if route in GATED else f"  (not gated: {REPORTED[route]})"
        print(f"  POST {route:18} {c['requests']:4} {c['ok']:4} {c['taken']:4}  {other or '-'}{note}")
        if route in GATED:
            total.update(c)
    valid = total["requests"] - total["taken"]
    ratio = total["ok"] / valid if valid else 0.0
    verdict = "ok" if ratio >= THRESHOLD else "FAIL"
    print(
        f"positive-phase create success: {total['ok']}/{valid} = {ratio:.1%} "
        f"({total['taken']} name collisions apart; at least {THRESHOLD:.0%} needed): {verdict}"
    )
    return 0 if ratio >= THRESHOLD else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
