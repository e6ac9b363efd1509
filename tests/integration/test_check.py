"""``signgate check`` end to end: the console script, a real registry, manifests on disk."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from signgate.keys.model import PrivateKeySigner
from signgate.reference import ImageReference
from signgate.registry import RegistryClient
from signgate.registry.images import push_image
from signgate.signatures.sign import sign_digest
from tests.integration.registry_servers import RunningRegistry
from tests.integration.tools import SIGNGATE, signgate, tool_env
from tests.unit.test_review import admission_review

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Workspace:
    home: Path
    env: dict[str, str]
    policy: Path
    good: str  # signed, by tag
    good_digest: str
    bad: str  # unsigned

    def check(self, *args: str) -> Any:
        return signgate("check", "--policy", str(self.policy), *args, env=self.env,
                        cwd=self.home, check=False)


@pytest.fixture
def ws(registry: RunningRegistry, tmp_path: Path) -> Workspace:
    signer = PrivateKeySigner(ec.generate_private_key(ec.SECP256R1()))
    (tmp_path / "cosign.pub").write_bytes(signer.public_key().pem())
    prefix = tmp_path.name.lower().replace("_", "-")
    good_repo = registry.repository(f"{prefix}/good")
    bad_repo = registry.repository(f"{prefix}/bad")

    async def push_and_sign() -> str:
        async with RegistryClient(registry.options()) as client:
            digest = await push_image(client, good_repo, "v1", content=b"good")
            await sign_digest(client, signer, ImageReference(good_repo), digest)
            await push_image(client, bad_repo, "v1", content=b"bad")
            return digest

    digest = anyio.run(push_and_sign)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"""\
rules:
  - name: ours
    images: ["{registry.host}/{prefix}/**"]
    keys: [cosign.pub]
"""
    )
    return Workspace(
        tmp_path, tool_env(tmp_path), policy, f"{good_repo}:v1", digest, f"{bad_repo}:v1"
    )


def deployment(image: str) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": image}]},
            },
        },
    }


def pod(image: str, name: str = "worker", namespace: str = "batch") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"containers": [{"name": "main", "image": image}]},
    }


SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {}}


def write_yaml(path: Path, *documents: Any) -> Path:
    path.write_text("---\n" + yaml.safe_dump_all(documents) + "---\n")
    return path


def test_multi_document_yaml_table(ws: Workspace) -> None:
    manifests = write_yaml(
        ws.home / "app.yaml", deployment(ws.good), SERVICE, pod(ws.bad)
    )
    result = ws.check(str(manifests))
    assert result.returncode == 1, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["RESOURCE", "IMAGE", "DIGEST", "VERDICT", "REASON"]
    assert len(rows) == 2
    good, bad = rows
    assert good.startswith("Deployment shop/web")
    assert ws.good in good
    assert ws.good_digest[: len("sha256:") + 12] in good
    assert " allowed " in good
    assert "verified by rule 'ours'" in good
    assert bad.startswith("Pod batch/worker")
    assert " denied " in bad
    assert "no signatures found" in bad
    assert "3 resources, 2 images: 1 resource would be refused" in result.stderr


def test_list_json_output(ws: Workspace) -> None:
    # As `kubectl get pods -A -o json` prints it.
    listing = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [pod(ws.good, "a", "shop"), pod(ws.bad, "b", "shop")],
        "metadata": {"resourceVersion": ""},
    }
    (ws.home / "pods.json").write_text(json.dumps(listing, indent=4))
    result = ws.check("-o", "json", "pods.json")
    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)
    assert document["allowed"] is False
    first, second = document["resources"]
    assert (first["kind"], first["namespace"], first["name"], first["allowed"]) == (
        "Pod", "shop", "a", True
    )
    assert first["images"] == [
        {
            "container": "main",
            "image": ws.good,
            "digest": ws.good_digest,
            "verdict": "allowed",
            "rule": "ours",
            "reason": first["images"][0]["reason"],
        }
    ]
    assert (second["name"], second["allowed"]) == ("b", False)
    assert second["images"][0]["verdict"] == "denied"
    assert "no signatures found" in second["message"]
    assert first["source"] == "pods.json"


def test_everything_admitted_exits_0_and_reviews_are_read_as_is(ws: Workspace) -> None:
    review = admission_review(pod(ws.good), operation="UPDATE", old=pod(ws.bad))
    (ws.home / "review.json").write_text(json.dumps(review))
    write_yaml(ws.home / "good.yaml", deployment(ws.good))
    result = ws.check("good.yaml", "review.json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" allowed ") == 2
    # An UPDATE keeping the stored image needs no verification: reported as unchanged.
    unchanged = admission_review(pod(ws.bad), operation="UPDATE", old=pod(ws.bad))
    (ws.home / "unchanged.json").write_text(json.dumps(unchanged))
    result = ws.check("unchanged.json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert " unchanged " in result.stdout


def test_stdin_and_a_key_that_does_not_load(ws: Workspace) -> None:
    manifest = yaml.safe_dump(pod(ws.good))
    result = subprocess.run(
        [str(SIGNGATE), "check", "--policy", str(ws.policy), "-"],
        input=manifest, env=ws.env, cwd=ws.home, capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Pod batch/worker" in result.stdout
    (ws.home / "cosign.pub").write_text("not a key")
    (ws.home / "pod.yaml").write_text(manifest)
    result = ws.check("pod.yaml")
    assert result.returncode == 1
    assert result.stderr.startswith("signgate: rule 'ours': key cosign.pub is not loaded: ")


def test_unreadable_input_is_a_usage_error(ws: Workspace) -> None:
    (ws.home / "broken.yaml").write_text("kind: Pod\n  spec: [\n")
    result = ws.check("broken.yaml")
    assert result.returncode == 2
    assert result.stderr.startswith("signgate: broken.yaml:")
    (ws.home / "nokind.yaml").write_text("metadata: {name: x}\n")
    result = ws.check("nokind.yaml")
    assert result.returncode == 2
    assert "needs apiVersion and kind" in result.stderr
