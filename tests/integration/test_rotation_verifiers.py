"""Rotation that delivers its policy to a real webhook and waits for the webhook to confirm.

A real ``signgate serve`` reads its policy from a ConfigMap-like volume (reloaded every 0.2 s)
and verifies against the test registry. ``signgate rotate`` edits its own copy of the policy,
publishes it into that volume with ``--policy-hook`` (as ``kubectl apply`` of the ConfigMap
would), and asks the webhook's ``/metrics`` (``--verifier``) until it trusts NEW, then until it
no longer trusts OLD. Meanwhile a checker sends AdmissionReviews through the API server stand-in
for every image OLD signed: none may be refused at any moment.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from signgate.keys import PublicKey, fixed_password, load_signer
from signgate.keys.files import generate_key_pair
from signgate.reference import ImageReference, Repository
from signgate.registry import RegistryClient, RegistryOptions
from signgate.registry.images import push_image
from signgate.signatures.sign import sign_digest, sign_digest_as_bundle
from tests.integration.apiserver_standin import WebhookCallFailed
from tests.integration.registry_servers import (
    CertificateAuthority,
    RunningRegistry,
    ServerCertificate,
    free_port,
    issue_server_certificate,
    make_test_ca,
)
from tests.integration.test_webhook_server import (
    ConfigMapVolume,
    WebhookProcess,
    pod,
    running_webhook,
    trusted_keys,
)
from tests.integration.tools import signgate, tool_env

pytestmark = pytest.mark.integration

PASSWORD = "correct horse"

# Publishes $SIGNGATE_POLICY into the volume as the kubelet updates a ConfigMap volume: a new
# directory, then one rename of the ..data link. With FAIL_FIRST set, its first run fails.
DELIVER = """\
set -eu
echo "$SIGNGATE_ROTATION_STEP" >> "$HOOK_LOG"
if [ -n "${FAIL_FIRST:-}" ] && [ ! -e "$FAIL_FIRST" ]; then
  touch "$FAIL_FIRST"
  echo "cannot reach the cluster" >&2
  exit 3
fi
generation="..$(date +%s%N)"
mkdir "$VOLUME/$generation"
cp "$SIGNGATE_POLICY" "$VOLUME/$generation/policy.yaml"
ln -s "$generation" "$VOLUME/..data_tmp"
mv -T "$VOLUME/..data_tmp" "$VOLUME/..data"
"""


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    certificate: ServerCertificate


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("rotation-pki")
    ca = make_test_ca(directory)
    return Pki(ca, issue_server_certificate(ca, directory))


@dataclass
class Scene:
    """Images under one prefix signed by OLD (both formats), an unsigned one, the policy the
    rotation edits (``deploy/policy.yaml``), and the webhook's volume holding its copy."""

    host: str
    prefix: str
    home: Path
    env: dict[str, str]
    signed: list[str] = field(default_factory=list)
    unsigned: str = ""

    @property
    def target(self) -> str:
        return f"{self.host}/{self.prefix}"

    @property
    def policy(self) -> Path:
        return self.home / "deploy" / "policy.yaml"

    @property
    def journal(self) -> Path:
        return self.home / "rotation.journal"

    @property
    def hook(self) -> str:
        return f"sh {self.home / 'deliver.sh'}"

    def key_id(self, name: str) -> str:
        return PublicKey.from_pem((self.home / f"{name}.pub").read_bytes()).key_id

    def hook_runs(self) -> list[str]:
        log = self.home / "hook.log"
        return log.read_text().split() if log.exists() else []

    def rotate(self, *args: str, check: bool = True) -> Any:
        return signgate("rotate", *args, env=self.env, cwd=self.home, check=check)

    def start(self, *args: str, check: bool = True) -> Any:
        return self.rotate(
            "--old-key", str(self.home / "old.pub"), "--new-key", str(self.home / "new.key"),
            "--policy", str(self.policy), "--journal", str(self.journal), *args, self.target,
            check=check,
        )

    def journal_phases(self, kind: str) -> list[str]:
        records = [json.loads(line) for line in self.journal.read_text().splitlines()]
        return [str(r.get("phase")) for r in records if r.get("type") == kind]


def make_scene(registry: RunningRegistry, home: Path) -> tuple[Scene, ConfigMapVolume]:
    volume = ConfigMapVolume(home / "configmap")
    env = tool_env(home, COSIGN_PASSWORD=PASSWORD, VOLUME=str(volume.directory),
                   HOOK_LOG=str(home / "hook.log"))
    scene = Scene(registry.host, f"rot-verifiers-{home.name}".lower(), home, env)
    password = fixed_password(PASSWORD.encode())
    for name in ("old", "new"):
        generate_key_pair(home / name, password)
    old = load_signer(str(home / "old.key"), password)
    repository = Repository(registry.host, f"{scene.prefix}/app")

    async def populate() -> None:
        async with RegistryClient(RegistryOptions()) as client:
            for n in range(4):
                digest = await push_image(client, repository, f"v{n}", content=f"{n}".encode())
                reference = ImageReference(repository, digest=digest)
                sign = sign_digest_as_bundle if n % 2 else sign_digest
                await sign(client, old, reference, digest, {"n": str(n)})
                scene.signed.append(f"{repository}@{digest}")
            digest = await push_image(client, repository, "unsigned", content=b"unsigned")
            scene.unsigned = f"{repository}@{digest}"

    asyncio.run(populate())
    policy = (
        "unmatched: deny\n"
        "rules:\n"
        "  - name: ours\n"
        f"    images: [\"{scene.target}/**\"]\n"
        f"    keys: [{home / 'old.pub'}]\n"
    )
    scene.policy.parent.mkdir()
    scene.policy.write_text(policy)
    volume.publish(policy)
    (home / "deliver.sh").write_text(DELIVER)
    return scene, volume


@pytest.fixture
def scene_and_volume(registry: RunningRegistry, tmp_path: Path) -> tuple[Scene, ConfigMapVolume]:
    return make_scene(registry, tmp_path)


@pytest.fixture
def webhook(
    scene_and_volume: tuple[Scene, ConfigMapVolume], pki: Pki, tmp_path: Path
) -> Iterator[WebhookProcess]:
    _, volume = scene_and_volume
    with running_webhook(
        tmp_path / "server", volume.policy_file, pki.certificate, pki.ca.cert_file,
        # Every review verifies afresh: no verdict or tag cached across the policy's changes.
        "--policy-reload-interval", "0.2", "--verdict-ttl", "0", "--tag-ttl", "0",
    ) as running:
        yield running


class Checker(threading.Thread):
    """Sends an AdmissionReview for each image, round after round, until stopped; keeps every
    refusal (a denial, or an answer the API server could not use)."""

    def __init__(self, webhook: WebhookProcess, images: list[str]) -> None:
        super().__init__(daemon=True)
        self.webhook = webhook
        self.images = images
        self.refusals: list[tuple[str, str]] = []
        self.rounds = 0
        self.first_round = threading.Event()
        self.stopping = threading.Event()

    def run(self) -> None:
        with self.webhook.standin() as apiserver:
            while not self.stopping.is_set():
                for image in self.images:
                    try:
                        call = apiserver.validate(pod(image))
                    except WebhookCallFailed as e:
                        self.refusals.append((image, str(e)))
                        continue
                    if not call.allowed:
                        self.refusals.append((image, call.message))
                self.rounds += 1
                self.first_round.set()

    def __enter__(self) -> Checker:
        self.start()
        assert self.first_round.wait(60), "the checker's first round did not end"
        return self

    def __exit__(self, *exc_info: object) -> None:
        rounds_during_the_run = self.rounds
        self.stopping.set()
        self.join()
        assert rounds_during_the_run > 1, "the checker did not check during the run"


def test_the_policy_reaches_the_webhook_and_no_signed_image_is_refused(
    scene_and_volume: tuple[Scene, ConfigMapVolume], webhook: WebhookProcess, pki: Pki
) -> None:
    scene, volume = scene_and_volume
    old_id, new_id = scene.key_id("old"), scene.key_id("new")
    with webhook.standin() as apiserver:
        assert trusted_keys(apiserver) == {old_id}
        # The checker can fail: an image OLD did not sign is refused.
        assert not apiserver.validate(pod(scene.unsigned)).allowed
    metrics = f"{webhook.url}/metrics"
    with Checker(webhook, scene.signed) as checker:
        result = scene.start(
            "--policy-hook", scene.hook, "--verifier", metrics,
            "--verifier-cacert", str(pki.ca.cert_file),
        )
    assert checker.refusals == []
    summary = json.loads(result.stdout)
    assert summary["finished"]
    assert summary["resigned"] == summary["signatures_removed"] == len(scene.signed)
    assert summary["work_items_by_format"] == {"classic": 2, "bundle": 2}
    assert scene.hook_runs() == ["trust", "retire"]
    with webhook.standin() as apiserver:
        assert trusted_keys(apiserver) == {new_id}
        for image in scene.signed:
            assert apiserver.validate(pod(image)).allowed, image
        assert not apiserver.validate(pod(scene.unsigned)).allowed
    assert volume.policy_file.read_text() == scene.policy.read_text()
    assert str(scene.home / "new.pub") in scene.policy.read_text()
    assert str(scene.home / "old.pub") not in scene.policy.read_text()
    # Each confirmation was journalled, begun and ended, in the order of the steps; no
    # propagation delay was waited for (the confirmations replace it).
    ended = scene.journal_phases("end")
    assert ended.index("trust") < ended.index("trust-hook") < ended.index("confirm-new")
    assert ended.index("confirm-new") < ended.index("resign") < ended.index("retire")
    assert ended.index("retire-hook") < ended.index("confirm-old") < ended.index("clean")
    assert {"confirm-new", "confirm-old"} <= set(scene.journal_phases("begin"))
    header = json.loads(scene.journal.read_text().splitlines()[0])
    assert header["verifiers"] == [metrics]
    assert header["policy_hook"] == scene.hook


def test_a_failed_policy_hook_stops_the_run_and_runs_again_on_resume(
    scene_and_volume: tuple[Scene, ConfigMapVolume], tmp_path: Path
) -> None:
    scene, volume = scene_and_volume
    scene.env["FAIL_FIRST"] = str(tmp_path / "failed-once")
    stopped = scene.start("--policy-hook", scene.hook, "--propagation-delay", "0", check=False)
    assert stopped.returncode == 1
    assert "cannot reach the cluster" in stopped.stderr  # the hook's own output, on stderr
    assert (
        "signgate: policy hook: --policy-hook exited 3 after the trust edit, so the verifiers "
        "may not have the policy" in stopped.stderr
    )
    assert not json.loads(stopped.stdout)["finished"]
    # NEW is trusted in the file, not yet delivered; nothing was re-signed.
    assert str(scene.home / "new.pub") in scene.policy.read_text()
    assert str(scene.home / "new.pub") not in volume.policy_file.read_text()
    assert "trust-hook" in scene.journal_phases("begin")
    assert "trust-hook" not in scene.journal_phases("end")
    assert "resign" not in scene.journal_phases("begin")
    # Resumed with nothing but the journal: the hook (recorded) runs again, then goes on.
    resumed = scene.rotate("--resume", "--journal", str(scene.journal))
    assert json.loads(resumed.stdout)["finished"]
    assert scene.hook_runs() == ["trust", "trust", "retire"]
    assert volume.policy_file.read_text() == scene.policy.read_text()


def test_a_verifier_that_does_not_confirm_stops_the_run_at_the_bound(
    scene_and_volume: tuple[Scene, ConfigMapVolume], webhook: WebhookProcess, pki: Pki
) -> None:
    scene, volume = scene_and_volume
    metrics = f"{webhook.url}/metrics"
    unreachable = f"http://127.0.0.1:{free_port()}/metrics"
    # No hook: the webhook never sees the policy that trusts NEW.
    stopped = scene.start(
        "--verifier", metrics, "--verifier", unreachable,
        "--verifier-cacert", str(pki.ca.cert_file), "--verifier-wait", "1", check=False,
    )
    assert stopped.returncode == 1
    new_id = scene.key_id("new")
    lines = stopped.stderr.splitlines()
    assert (
        f"signgate: verifier {metrics}: did not confirm within 1 s that it trusts NEW "
        f"({new_id}): does not trust it yet"
    ) in lines
    assert any(line.startswith(f"signgate: verifier {unreachable}: did not confirm within 1 s")
               and "unreachable (ConnectError" in line for line in lines), lines
    assert "confirm-new" in scene.journal_phases("begin")
    assert "confirm-new" not in scene.journal_phases("end")
    assert "resign" not in scene.journal_phases("begin")
    assert str(scene.home / "new.pub") not in volume.policy_file.read_text()
    # Resumed with a hook that delivers, and only the verifier that exists.
    with Checker(webhook, scene.signed) as checker:
        resumed = scene.rotate(
            "--resume", "--journal", str(scene.journal), "--policy-hook", scene.hook,
            "--verifier", metrics,
        )
    assert checker.refusals == []
    assert json.loads(resumed.stdout)["finished"]
    assert scene.hook_runs() == ["trust", "retire"]
    with webhook.standin() as apiserver:
        assert trusted_keys(apiserver) == {new_id}
