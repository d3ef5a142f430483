#!/usr/bin/env bash
# Shows that `buf breaking` against the released contracts
# (proto/released.binpb) catches real breaking changes: each change below is
# made to a copy of proto/, and the check must fail on it.
set -euo pipefail
cd "$(dirname "$0")/.."

fails_on() {
    local what="$1" file="$2" edit="$3"
    local scratch
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' RETURN
    cp -r proto buf.yaml "$scratch/"
    python3 - "$scratch/proto/$file" "$edit" <<'PY'
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
    if (cd "$scratch" && buf breaking --against "$OLDPWD/proto/released.binpb" >/dev/null 2>&1); then
        echo "buf breaking accepted a breaking change: $what" >&2
        exit 1
    fi
    echo "buf breaking refuses: $what"
}

fails_on "a field renumbered (GetOrderRequest.order_id 1 → 7)" shop/order/v1/order.proto renumber
fails_on "an RPC removed (PaymentService.GetPayment)" shop/payment/v1/payment.proto remove-rpc
