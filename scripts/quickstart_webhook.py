"""The quickstart's second half: the admission webhook and the chart a user would install.

Starts `signgate serve` over TLS with a CA made here, sends it a signed and an unsigned pod
exactly as the Kubernetes API server would (through the project's API-server stand-in: no
cluster runs here), shows the digest pin, then renders the Helm chart and lists what it installs.

Usage: quickstart_webhook.py REGISTRY WORKDIR   (cosign.pub in WORKDIR; images pushed already)
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
from tests.integration.apiserver_standin import ApiServerStandIn
from tests.integration.helm import render
from tests.integration.registry_servers import free_port, issue_server_certificate, make_test_ca

ROOT = Path(__file__).resolve().parents[1]


def pod(name: str, image: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"containers": [{"name": "app", "image": image}]},
    }


def main() -> None:
    registry, work = sys.argv[1], Path(sys.argv[2])
    for directory in ("ca", "tls"):
        (work / directory).mkdir(exist_ok=True)
    ca = make_test_ca(work / "ca")
    serving = issue_server_certificate(ca, work / "tls")
    policy = work / "policy.yaml"
    policy.write_text(
        "unmatched: deny\n"
        "rules:\n"
        "  - name: ours\n"
        f"    images: [\"{registry}/demo/**\"]\n"
        f"    keys: [{work / 'cosign.pub'}]\n"
    )
    port = free_port()
    log = (work / "serve.log").open("wb")
    server = subprocess.Popen(
        [Path(sys.executable).with_name("signgate"), "serve", "--policy", str(policy),
         "--tls-cert", str(serving.cert_file), "--tls-key", str(serving.key_file),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=log,
    )
    base = f"https://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{base}/readyz", verify=str(ca.cert_file)).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        else:
            raise SystemExit(f"signgate serve did not become ready; see {work / 'serve.log'}")
        print(f"signgate serve is ready on {base} (TLS from a CA made for the demo)")
        with ApiServerStandIn(base, ca.cert_file) as apiserver:
            signed = apiserver.admit(pod("web", f"{registry}/demo/web:1.0"))
            image = signed.admitted_object["spec"]["containers"][0]["image"]  # type: ignore[index]
            print(f"\nsigned pod    -> allowed={signed.allowed}; its image pinned to {image}")
            unsigned = apiserver.admit(pod("intruder", f"{registry}/demo/unsigned:v1"))
            print(f"unsigned pod  -> allowed={unsigned.allowed}: {unsigned.mutating.message}")
            if not signed.allowed or unsigned.allowed:
                raise SystemExit("quickstart: FAILED: the webhook did not decide as expected")
    finally:
        server.terminate()
        server.wait()
        log.close()

    objects = render(
        ROOT / "charts" / "signgate", {}, home=work / "helm", release="signgate",
        namespace="signgate-system",
    )
    print("\nhelm template charts/signgate (what `helm install` would create):")
    for obj in objects:
        print(f"  {obj['kind']:<34} {obj['metadata']['name']}")
    webhooks = [o for o in objects if o["kind"] == "ValidatingWebhookConfiguration"]
    for hook in webhooks[0]["webhooks"] if webhooks else []:
        excluded = hook["namespaceSelector"]["matchExpressions"][0]["values"]
        print(f"\n  {hook['name']}: failurePolicy={hook['failurePolicy']}, "
              f"timeoutSeconds={hook['timeoutSeconds']}, never sent: namespaces {excluded}")


if __name__ == "__main__":
    main()
