#!/usr/bin/env bash
# Checks Cargo.lock against the vendored RustSec advisory database (deny/README.md):
#   scripts/advisories.sh                 run `cargo deny check advisories` offline
#   scripts/advisories.sh --refresh CLONE rebuild deny/advisory-db.tar.gz from a clone
set -euo pipefail
cd "$(dirname "$0")/.."
snap=deny/advisory-db.tar.gz
meta=deny/advisory-db.commit

if [[ "${1:-}" == "--refresh" ]]; then
    clone=${2:?usage: scripts/advisories.sh --refresh PATH-TO-ADVISORY-DB-CLONE}
    git -C "$clone" archive --format=tar HEAD crates rust LICENSES | gzip -9n > "$snap"
    git -C "$clone" show -s --format='%H %cI' HEAD > "$meta"
    echo "advisories: snapshot refreshed to $(cat "$meta")"
    exit 0
fi

command -v cargo-deny >/dev/null || { echo "advisories: cargo-deny missing: cargo install --locked cargo-deny" >&2; exit 1; }
read -r commit date < "$meta"
work=$(mktemp -d /tmp/vinfra-advisories.XXXXXX)
trap 'rm -rf "$work"' EXIT
# cargo-deny looks for its database in DB-PATH/<name derived from the default URL> and
# reads it as a git repository (the HEAD commit's date is the database's age).
db="$work/db/advisory-db-3157b0e258782691"
mkdir -p "$db"
tar -xzf "$snap" -C "$db"
(
    cd "$db"
    git init -q
    git add -A
    GIT_AUTHOR_DATE="$date" GIT_COMMITTER_DATE="$date" \
        git -c user.name=vinfra -c user.email=ci@localhost commit -qm "rustsec/advisory-db $commit"
)
age_days=$(( ($(date +%s) - $(date -d "$date" +%s)) / 86400 ))
echo "advisories: RustSec database snapshot $commit of $date ($age_days days old)"
# The repository's deny.toml, pointed at the snapshot. Its age is printed above rather
# than refused: an old snapshot still catches every advisory it holds.
sed -e "s|^\[advisories\]|[advisories]\ndb-path = \"$work/db\"\nmaximum-db-staleness = \"P3650D\"|" deny.toml > "$work/deny.toml"
cargo deny --config "$work/deny.toml" --offline check advisories
