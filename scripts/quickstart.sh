#!/usr/bin/env bash
# The main job end to end on one machine: set up, start a local registry, make a key pair, push a
# demo image, sign it with signgate, verify it with signgate and with the real cosign, and watch
# an unsigned image and a tampered tag be refused; then the admission webhook admits a signed pod
# and refuses an unsigned one, and the Helm chart is rendered. Everything stays under .quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

bash scripts/setup.sh
export PATH=$ROOT/.venv/bin:$PATH
COSIGN=$ROOT/.tools/bin/cosign2

WORK=$ROOT/.quickstart
rm -rf "$WORK"
mkdir -p "$WORK/registry"
PORT=${SIGNGATE_QUICKSTART_PORT:-5055}
REGISTRY=127.0.0.1:$PORT

cat >"$WORK/registry.yml" <<YAML
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: $WORK/registry}
  delete: {enabled: true}
  cache: {blobdescriptor: inmemory}
http: {addr: $REGISTRY}
YAML
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
REGISTRY_PID=$!
trap 'kill $REGISTRY_PID 2>/dev/null; wait $REGISTRY_PID 2>/dev/null || true' EXIT
python - "$REGISTRY" <<'PY' || { echo "quickstart: the registry did not start" >&2; exit 1; }
import sys, time, urllib.request
for _ in range(100):
    try:
        urllib.request.urlopen(f"http://{sys.argv[1]}/v2/", timeout=1)
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(1)
PY

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
expect_refusal() {
    if "$@"; then
        echo "quickstart: FAILED: expected a refusal from: $*" >&2
        exit 1
    fi
    echo "(refused, as it should be)"
}

cd "$WORK"
# A demo password for the demo key; in CI it comes from the secret store.
export COSIGN_PASSWORD=quickstart-demo-password

say "generate a cosign-compatible key pair"
signgate generate-key-pair
ls -l cosign.key cosign.pub

say "push a demo image and sign it"
python "$ROOT/scripts/push_demo_image.py" "$REGISTRY/demo/app:v1" "hello, signed world"
signgate sign --format classic --key cosign.key "$REGISTRY/demo/app:v1"   # cosign 2 verifies it below

say "verify with signgate"
signgate verify --key cosign.pub "$REGISTRY/demo/app:v1"

say "verify with the real cosign CLI"
"$COSIGN" verify --key cosign.pub --insecure-ignore-tlog --allow-insecure-registry \
    "$REGISTRY/demo/app:v1"

say "an unsigned image is refused"
python "$ROOT/scripts/push_demo_image.py" "$REGISTRY/demo/unsigned:v1" "nobody signed me"
expect_refusal signgate verify --key cosign.pub "$REGISTRY/demo/unsigned:v1"

say "a tampered tag (moved to other content) is refused"
python "$ROOT/scripts/push_demo_image.py" "$REGISTRY/demo/app:v1" "attacker's code"
expect_refusal signgate verify --key cosign.pub "$REGISTRY/demo/app:v1"
expect_refusal "$COSIGN" verify --key cosign.pub --insecure-ignore-tlog --allow-insecure-registry \
    "$REGISTRY/demo/app:v1"

say "a pipeline step builds and signs a release (signing the pushed digest)"
DIGEST=$(python "$ROOT/scripts/push_demo_image.py" "$REGISTRY/demo/web:1.0" "release 1.0")
signgate sign --key cosign.key -a "pipeline=quickstart" "$REGISTRY/demo/web@$DIGEST"

say "the admission webhook: a signed pod is admitted and pinned, an unsigned one refused"
(cd "$ROOT" && python -m scripts.quickstart_webhook "$REGISTRY" "$WORK")

say "quickstart complete"
