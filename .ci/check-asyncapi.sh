#!/usr/bin/env bash
# Validates asyncapi.yaml with the AsyncAPI CLI (npm ci --prefix
# tests/asyncapi first), and shows that the validation reads what matters:
# a copy whose protobuf payload schema does not parse, and a copy whose
# operation names a message that does not exist, must both be refused.
set -euo pipefail
cd "$(dirname "$0")/.."
export CI=true SUPPRESS_NO_CONFIG_WARNING=1
validate() { npx --no-install --prefix tests/asyncapi asyncapi validate "$1"; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

validate asyncapi.yaml

refused() {
    local what="$1" from="$2" to="$3" copy="$work/broken.yaml"
    python3 - "$from" "$to" "$copy" <<'PY'
import sys
source = open("asyncapi.yaml").read()
old, new, out = sys.argv[1:4]
assert old in source, f"{old!r} is not in asyncapi.yaml"
open(out, "w").write(source.replace(old, new, 1))
PY
    if validate "$copy" >"$work/output" 2>&1; then
        echo "asyncapi validate accepts $what" >&2
        exit 1
    fi
    echo "asyncapi validate refuses $what"
}

refused "a payload schema that is not protobuf" \
    "string order_id = 1;" "strin order_id = 1 garbage;"
refused "an operation naming a message that does not exist" \
    '$ref: "#/components/messages/OrderPlaced"' '$ref: "#/components/messages/NoSuchEvent"'
