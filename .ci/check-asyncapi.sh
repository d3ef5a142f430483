#!/usr/bin/env bash
# Validates asyncapi.yaml with the AsyncAPI CLI (npm ci --prefix
# tests/asyncapi first), and shows that the validation reads what matters:
# a copy whose protobuf payload schema does not parse, and a copy whose
# channel names a message that does not exist, must each be refused for
# that reason (not for any other failure).
set -euo pipefail
cd "$(dirname "$0")/.."
export CI=true SUPPRESS_NO_CONFIG_WARNING=1
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
validate() {
    npx --no-install --prefix tests/asyncapi asyncapi validate \
        --diagnostics-format json "$1" >"$work/output" 2>&1
}

if ! validate asyncapi.yaml; then
    cat "$work/output" >&2
    echo "asyncapi validate refuses asyncapi.yaml" >&2
    exit 1
fi
echo "asyncapi.yaml is valid"

refused_for() {
    local what="$1" from="$2" to="$3" expected="$4" copy="$work/broken.yaml"
    python3 - "$from" "$to" "$copy" <<'PY'
import sys
source = open("asyncapi.yaml").read()
old, new, out = sys.argv[1:4]
assert old in source, f"{old!r} is not in asyncapi.yaml"
open(out, "w").write(source.replace(old, new, 1))
PY
    if validate "$copy"; then
        echo "asyncapi validate accepts $what" >&2
        exit 1
    fi
    if ! grep -q -- "$expected" "$work/output"; then
        cat "$work/output" >&2
        echo "asyncapi validate refuses $what, but not for $expected" >&2
        exit 1
    fi
    echo "asyncapi validate refuses $what ($expected)"
}

refused_for "a payload schema that is not protobuf" \
    "string order_id = 1;" "strin order_id = 1 garbage;" "illegal token 'garbage'"
refused_for "a channel naming a message that does not exist" \
    '$ref: "#/components/messages/OrderPlaced"' '$ref: "#/components/messages/NoSuchEvent"' \
    "invalid-ref"
