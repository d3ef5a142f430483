#!/usr/bin/env bash
# Shows that `buf breaking` against the released contracts
# (proto/released.binpb) catches real breaking changes: an unchanged copy of
# proto/ must pass, and each breaking change below, made to a copy, must be
# refused for the rule it breaks (not for any other failure).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
image="$root/proto/released.binpb"
[ -s "$image" ] || { echo "no released contracts at $image" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

copy() {
    local dir="$work/$1"
    mkdir -p "$dir"
    cp -r "$root/proto" "$root/buf.yaml" "$dir/"
    echo "$dir"
}

# The control: the contracts as they are pass.
control="$(copy unchanged)"
(cd "$control" && buf breaking --against "$image") || {
    echo "buf breaking fails on the unchanged contracts" >&2
    exit 1
}

refused_for() {
    local what="$1" file="$2" edit="$3" rule="$4" dir status=0 output
    dir="$(copy "$edit")"
    python3 - "$dir/proto/$file" "$edit" <<'PY'
import re, sys
path, edit = sys.argv[1], sys.argv[2]
text = open(path).read()
changed = {
    # A field renumbered.
    "renumber": lambda t: t.replace("message GetOrderRequest {\n  // Order id (UUID).\n  string order_id = 1;",
                                    "message GetOrderRequest {\n  // Order id (UUID).\n  string order_id = 7;", 1),
    # An RPC removed.
    "remove-rpc": lambda t: re.sub(r"\n  // Returns the payment of an order\.\n  rpc GetPayment\(.*?\n  \}\n", "\n", t, count=1, flags=re.S),
}[edit](text)
if changed == text:
    sys.exit(f"the {edit} edit did not apply to {path}")
open(path, "w").write(changed)
PY
    output="$(cd "$dir" && buf breaking --error-format=json --against "$image" 2>&1)" || status=$?
    if [ "$status" -ne 100 ] || ! grep -q "\"type\":\"$rule\"" <<<"$output"; then
        echo "buf breaking did not refuse $what for $rule (exit $status): $output" >&2
        exit 1
    fi
    echo "buf breaking refuses: $what ($rule)"
}

refused_for "a field renumbered (GetOrderRequest.order_id 1 → 7)" \
    shop/order/v1/order.proto renumber FIELD_NO_DELETE
refused_for "an RPC removed (PaymentService.GetPayment)" \
    shop/payment/v1/payment.proto remove-rpc RPC_NO_DELETE
