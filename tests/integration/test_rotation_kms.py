"""Rotation with keys in OpenBao Transit: NEW created once however often the run is resumed,
OLD disabled last, and rotation to a new version of the same key (the policy untouched).

A crash is injected through the library's checkpoint seam; the resumed runs are the real CLI
with nothing but ``--resume --journal``. At each checkpoint every signed image must verify
under the policy as a verifier loads it at that moment (a Transit key without a version stands
for all its live versions).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from signgate.errors import UsageError
from signgate.keys import PublicKey, fixed_password, load_public_keys, load_signer
from signgate.keys.files import generate_key_pair
from signgate.policy import load_policy
from signgate.reference import ImageReference, Repository
from signgate.registry import RegistryClient, RegistryOptions
from signgate.registry.images import push_image, push_index
from signgate.rotation.journal import Journal
from signgate.rotation.rotate import RotationReport, prepare_keys, rotate
from signgate.rotation.settings import RotationSettings
from signgate.signatures.sign import sign_digest
from signgate.signatures.verify import verify_image
from tests.integration.openbao_server import OpenBaoServer, running_openbao
from tests.integration.registry_servers import (
    RunningRegistry,
    free_port,
    issue_server_certificate,
    make_test_ca,
)
from tests.integration.test_rotation import InjectedCrash
from tests.integration.tools import SIGNGATE, run, signgate, tool_env, tool_path

pytestmark = pytest.mark.integration

PASSWORD = "correct horse"
NO_PASSWORD = fixed_password(b"")


@pytest.fixture(scope="module")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBaoServer]:
    with running_openbao(tmp_path_factory.mktemp("openbao")) as server:
        server.enable_transit("transit")
        yield server


@dataclass
class Scene:
    """Images in one repository prefix, signed by OLD; a policy naming ``policy_key``."""

    host: str
    prefix: str
    home: Path
    env: dict[str, str]
    images: list[tuple[str, str]]
    openbao: OpenBaoServer

    @property
    def target(self) -> str:
        return f"{self.host}/{self.prefix}"

    @property
    def policy(self) -> Path:
        return self.home / "policy.yaml"

    @property
    def journal(self) -> Path:
        return self.home / "rotation.journal"

    def policy_keys(self) -> tuple[str, ...]:
        (rule,) = load_policy(self.policy).rules
        return rule.keys

    def write_policy(self, key: str) -> None:
        self.policy.write_text(
            "unmatched: deny\n"
            "rules:\n"
            "  - name: release  # signed by the release pipeline\n"
            f"    images: [\"{self.target}/**\"]\n"
            f"    keys: [\"{key}\"]\n"
        )

    def transit(self, name: str) -> dict[str, Any]:
        return self.openbao.key_data("transit", name)

    def transit_public_key(self, name: str, version: int) -> PublicKey:
        pem = self.transit(name)["keys"][str(version)]["public_key"]
        return PublicKey.from_pem(pem.encode())

    def signgate(self, *args: str, check: bool = True) -> Any:
        return signgate(*args, env=self.env, cwd=self.home, check=check)


def make_scene(
    registry: RunningRegistry, openbao: OpenBaoServer, home: Path, old_ref: str,
    policy_key: str, monkeypatch: pytest.MonkeyPatch,
) -> Scene:
    """Images signed by ``old_ref`` (a Transit key or a key file), a policy naming
    ``policy_key``."""
    monkeypatch.setenv("VAULT_ADDR", openbao.address)
    monkeypatch.setenv("VAULT_TOKEN", openbao.root_token)
    monkeypatch.setenv("COSIGN_PASSWORD", PASSWORD)
    env = tool_env(
        home, COSIGN_PASSWORD=PASSWORD, VAULT_ADDR=openbao.address, VAULT_TOKEN=openbao.root_token
    )
    prefix = f"kms-{home.name}".lower()
    signer = load_signer(old_ref, fixed_password(PASSWORD.encode()))

    async def populate() -> list[tuple[str, str]]:
        async with RegistryClient(RegistryOptions()) as client:
            app = Repository(registry.host, f"{prefix}/app")
            multi = Repository(registry.host, f"{prefix}/multi")
            digests = [(app, await push_image(client, app, "v1", content=b"one"))]
            digests.append((app, await push_image(client, app, "moving", content=b"before")))
            digests.append((app, await push_image(client, app, "moving", content=b"after")))
            index, children = await push_index(
                client, multi, "v1", content=b"multi",
                platforms=[("linux", "amd64"), ("linux", "arm64")],
            )
            digests += [(multi, d) for d in [index, *children]]
            for repository, digest in digests:
                await sign_digest(
                    client, signer, ImageReference(repository, digest=digest), digest,
                    {"pipeline": "release"},
                )
            return [(str(repository), digest) for repository, digest in digests]

    scene = Scene(registry.host, prefix, home, env, asyncio.run(populate()), openbao)
    scene.write_policy(policy_key)
    return scene


def check_every_signed_image_verifies(scene: Scene) -> None:
    keys = load_public_keys(scene.policy_keys(), NO_PASSWORD)

    async def check() -> None:
        async with RegistryClient(RegistryOptions()) as client:
            for repository, digest in scene.images:
                reference = ImageReference(Repository.parse(repository), digest=digest)
                verdict = await verify_image(client, reference, keys)
                assert verdict.ok, f"{reference} refused: {verdict.reason()}"

    asyncio.run(check())


def verifies_with(scene: Scene, key: PublicKey) -> list[bool]:
    async def check() -> list[bool]:
        async with RegistryClient(RegistryOptions()) as client:
            results = []
            for repository, digest in scene.images:
                reference = ImageReference(Repository.parse(repository), digest=digest)
                results.append((await verify_image(client, reference, [key])).ok)
            return results

    return asyncio.run(check())


def settings_for(scene: Scene, old_ref: str, new_ref: str, **extra: Any) -> RotationSettings:
    return RotationSettings(
        target=scene.target, old_ref=old_ref, new_ref=new_ref, new_policy_ref=new_ref,
        policy=str(scene.policy), **extra,
    )


def rotate_in_process(
    scene: Scene, settings: RotationSettings, crash_at: str | None, points: list[str]
) -> RotationReport:
    """What `signgate rotate` runs, with a checker at each checkpoint and a crash at one."""

    async def checkpoint(name: str) -> None:
        points.append(name)
        await asyncio.to_thread(check_every_signed_image_verifies, scene)
        if name == crash_at:
            raise InjectedCrash(name)

    async def go() -> RotationReport:
        with Journal(scene.journal) as journal:
            password = fixed_password(PASSWORD.encode())
            keys = await prepare_keys(journal, settings, password, checkpoint=checkpoint)
            async with RegistryClient(RegistryOptions()) as client:
                return await rotate(
                    client, settings.target, keys, journal, policy_path=Path(settings.policy),
                    disable_old_key=settings.disable_old_key, checkpoint=checkpoint,
                )

    return asyncio.run(go())


def journal_records(scene: Scene, kind: str) -> list[dict[str, Any]]:
    lines = scene.journal.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def resume_with_the_cli(scene: Scene) -> dict[str, Any]:
    result = scene.signgate(
        "rotate", "--resume", "--journal", str(scene.journal), "--propagation-delay", "0"
    )
    assert result.stderr == ""
    summary: dict[str, Any] = json.loads(result.stdout)
    assert summary["finished"]
    return summary


# A new key in Transit ------------------------------------------------------------------------


@pytest.fixture
def signed_by_a_key_file(
    registry: RunningRegistry, openbao: OpenBaoServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Scene:
    """Images signed by the key file old.key; the policy names old.pub."""
    generate_key_pair(tmp_path / "old", fixed_password(PASSWORD.encode()))
    return make_scene(
        registry, openbao, tmp_path, str(tmp_path / "old.key"), str(tmp_path / "old.pub"),
        monkeypatch,
    )


def test_new_key_is_created_once_across_a_crash_and_a_resume(
    signed_by_a_key_file: Scene, tmp_path: Path
) -> None:
    scene = signed_by_a_key_file
    old_ref = str(tmp_path / "old.pub")
    name = f"release-{secrets.token_hex(4)}"
    new_ref = f"hashivault://{name}"
    settings = settings_for(scene, old_ref, new_ref, create_new_key=True)
    points: list[str] = []
    with pytest.raises(InjectedCrash):
        rotate_in_process(scene, settings, "new-key", points)
    assert points == ["new-key"]
    created = scene.transit_public_key(name, 1)
    (record,) = journal_records(scene, "new-key")
    assert record["key_id"] == created.key_id
    assert record["created"] is True
    with pytest.raises(InjectedCrash):
        rotate_in_process(scene, settings, "resign:2", points)
    # The rest by the CLI, told nothing but the journal: the key is not created again.
    summary = resume_with_the_cli(scene)
    assert summary["new_key_created"] == created.key_id
    assert summary["resigned"] + summary["skipped"] == len(scene.images)
    assert scene.transit(name)["latest_version"] == 1
    assert len(journal_records(scene, "new-key")) == 1
    assert scene.policy_keys() == (new_ref,)
    assert "# signed by the release pipeline" in scene.policy.read_text()
    check_every_signed_image_verifies(scene)
    assert not any(verifies_with(scene, PublicKey.from_pem(Path(old_ref).read_bytes())))
    # The real cosign agrees, with Transit's public key exported (Debian's cosign has no
    # hashivault provider).
    (tmp_path / "new.pub").write_bytes(created.pem())
    cosign = tool_path("cosign2")
    for repository, digest in scene.images[:2]:
        run([str(cosign), "verify", "--key", str(tmp_path / "new.pub"), "--insecure-ignore-tlog",
             "--allow-insecure-registry", f"{repository}@{digest}"], scene.env)


def test_a_new_key_this_rotation_did_not_create_is_refused(
    signed_by_a_key_file: Scene, openbao: OpenBaoServer, tmp_path: Path
) -> None:
    scene = signed_by_a_key_file
    name = f"taken-{secrets.token_hex(4)}"
    openbao.create_transit_key("transit", name, "ecdsa-p256")
    refused = scene.signgate(
        "rotate", "--old-key", str(tmp_path / "old.pub"), "--new-key", f"hashivault://{name}",
        "--create-new-key", "--policy", str(scene.policy), "--journal", str(scene.journal),
        scene.target, check=False,
    )
    assert refused.returncode == 2
    assert "NEW exists already and this rotation did not create it" in refused.stderr
    assert scene.policy_keys() == (str(tmp_path / "old.pub"),)  # nothing ran

    # A key the journal recorded as created, and then replaced under the same name.
    other = f"created-{secrets.token_hex(4)}"
    settings = settings_for(
        scene, str(tmp_path / "old.pub"), f"hashivault://{other}", create_new_key=True
    )
    scene.journal.unlink()
    with pytest.raises(InjectedCrash):
        rotate_in_process(scene, settings, "new-key", [])
    openbao.rotate("transit", other)  # hashivault://OTHER now signs with version 2
    with pytest.raises(UsageError, match="not the key this rotation created"):
        rotate_in_process(scene, settings, None, [])


def test_a_key_created_just_before_a_crash_is_adopted(
    signed_by_a_key_file: Scene, openbao: OpenBaoServer, tmp_path: Path
) -> None:
    scene = signed_by_a_key_file
    name = f"adopted-{secrets.token_hex(4)}"
    settings = settings_for(
        scene, str(tmp_path / "old.pub"), f"hashivault://{name}", create_new_key=True
    )
    old = PublicKey.from_pem((tmp_path / "old.pub").read_bytes())
    # The journal of a run that died after asking Transit for the key, before recording it.
    with Journal(scene.journal) as journal:
        journal.append({**settings.header(), "old": old.key_id,
                        "old_public_key": old.pem().decode()})
        journal.append({"type": "begin", "phase": "create-key"})
    openbao.create_transit_key("transit", name, "ecdsa-p256")
    summary = resume_with_the_cli(scene)
    assert summary["new_key_created"] == scene.transit_public_key(name, 1).key_id
    assert scene.transit(name)["latest_version"] == 1


# A new version of the same key ---------------------------------------------------------------


def test_rotation_to_a_new_version_of_the_key_leaves_the_policy_and_retires_the_old_version(
    registry: RunningRegistry, openbao: OpenBaoServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = f"release-{secrets.token_hex(4)}"
    openbao.create_transit_key("transit", name, "ecdsa-p256")
    key_ref = f"hashivault://{name}"
    scene = make_scene(registry, openbao, tmp_path, key_ref, key_ref, monkeypatch)
    policy_before = scene.policy.read_text()
    version_1 = scene.transit_public_key(name, 1)
    # NEW as the policy would name it on its own: its version (the policy's reference, all
    # versions, already stands for it).
    settings = replace(
        settings_for(
            scene, f"{key_ref}?version=1", key_ref, create_new_key=True, disable_old_key=True
        ),
        new_policy_ref=f"{key_ref}?version=2",
    )
    points: list[str] = []
    for crash_at in ("new-key", "trust", "resign:1", "clean:1", "clean"):
        with pytest.raises(InjectedCrash):
            rotate_in_process(scene, settings, crash_at, points)
        # One version added, however many times the run started.
        assert scene.transit(name)["latest_version"] == 2
    summary = resume_with_the_cli(scene)
    assert "version 1" in summary["old_key_disabled"]
    assert scene.policy.read_text() == policy_before  # no duplicate, and NEW not removed
    data = scene.transit(name)
    assert data["latest_version"] == 2
    assert data["min_decryption_version"] == 2  # version 1 retired, not deleted
    assert data["deletion_allowed"] is False
    assert load_public_keys([key_ref], NO_PASSWORD) == [scene.transit_public_key(name, 2)]
    check_every_signed_image_verifies(scene)
    assert not any(verifies_with(scene, version_1))
    # Disabling is harmless to repeat: a finished rotation run again changes nothing.
    assert resume_with_the_cli(scene)["resigned"] == 0


def test_disable_old_key_is_refused_at_once_for_a_key_that_cannot_be_disabled(
    tmp_path: Path,
) -> None:
    """Before anything runs: no journal, no KMS or registry asked (neither is reachable)."""
    generate_key_pair(tmp_path / "old", fixed_password(PASSWORD.encode()))
    env = tool_env(tmp_path, COSIGN_PASSWORD=PASSWORD, OLD_KEY="unused",
                   VAULT_ADDR="http://127.0.0.1:9", VAULT_TOKEN="unused")
    key_file = str(tmp_path / "old.pub")
    refusals = {
        key_file: f"{key_file}: a key file cannot be disabled",
        "env://OLD_KEY": "env://OLD_KEY: a key in an environment variable cannot be disabled",
        "k8s://signgate/release": "k8s://signgate/release: k8s:// keys cannot be disabled: "
                                  "their store has no disabled state",
        "hashivault://release": "hashivault://release: Transit cannot disable a whole key, only "
                                "retire its older versions; name the version to retire",
    }
    for old, reason in refusals.items():
        refused = signgate(
            "rotate", "--old-key", old, "--new-key", "hashivault://new", "--disable-old-key",
            "--policy", str(tmp_path / "policy.yaml"), "--journal", str(tmp_path / "j"),
            "127.0.0.1:9/unreachable", env=env, cwd=tmp_path, check=False,
        )
        assert refused.returncode == 2, old
        assert refused.stderr.startswith(f"signgate: --disable-old-key: {reason}"), old
        assert refused.stderr.endswith("; drop the option\n"), old
        assert len(refused.stderr.splitlines()) == 1
        assert not (tmp_path / "j").exists()


@dataclass(frozen=True)
class Webhook:
    url: str
    ca_file: Path

    @property
    def metrics(self) -> str:
        return f"{self.url}/metrics"

    def get(self, path: str) -> httpx.Response:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        with httpx.Client(verify=context, timeout=5) as client:
            return client.get(self.url + path)

    def trusted_key_ids(self) -> set[str]:
        from signgate.rotation.verifiers import trusted_key_ids

        return trusted_key_ids(self.get("/metrics").text)


@contextmanager
def webhook_reading_transit(scene: Scene, key_refresh: str) -> Iterator[Webhook]:
    """A real `signgate serve` enforcing the scene's policy, with OpenBao's credentials: it
    loads the Transit key's live versions again every ``key_refresh`` seconds."""
    ca = make_test_ca(scene.home / "pki")
    certificate = issue_server_certificate(ca, scene.home / "pki")
    port = free_port()
    log = (scene.home / "webhook.log").open("wb")
    process = subprocess.Popen(
        [str(SIGNGATE), "serve", "--policy", str(scene.policy), "--tls-cert",
         str(certificate.cert_file), "--tls-key", str(certificate.key_file), "--host",
         "127.0.0.1", "--port", str(port), "--key-refresh", key_refresh],
        env=scene.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )
    webhook = Webhook(f"https://127.0.0.1:{port}", ca.cert_file)
    try:
        give_up = time.monotonic() + 60
        while True:
            assert process.poll() is None, (scene.home / "webhook.log").read_text()[-2000:]
            try:
                if webhook.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < give_up, "signgate serve did not become ready"
            time.sleep(0.05)
        yield webhook
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_a_key_version_rotation_waits_for_the_webhook_to_load_the_new_version(
    registry: RunningRegistry, openbao: OpenBaoServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The policy never changes: the run waits until the webhook has loaded NEW's version, and
    does not wait for OLD's to go before clean (OLD's version is trusted until step 7)."""
    name = f"release-{secrets.token_hex(4)}"
    openbao.create_transit_key("transit", name, "ecdsa-p256")
    key_ref = f"hashivault://{name}"
    scene = make_scene(registry, openbao, tmp_path, key_ref, key_ref, monkeypatch)
    version_1 = scene.transit_public_key(name, 1).key_id
    with webhook_reading_transit(scene, key_refresh="0.5") as webhook:
        assert webhook.trusted_key_ids() == {version_1}
        result = scene.signgate(
            "rotate", "--old-key", f"{key_ref}?version=1", "--new-key", key_ref,
            "--create-new-key", "--disable-old-key", "--policy", str(scene.policy),
            "--journal", str(scene.journal), "--verifier", webhook.metrics,
            "--verifier-cacert", str(webhook.ca_file), scene.target,
        )
        summary = json.loads(result.stdout)
        assert summary["finished"]
        version_2 = scene.transit_public_key(name, 2).key_id
        ends = {r["phase"]: r for r in journal_records(scene, "end")}
        assert "confirm-new" in ends
        assert "skipped" not in ends["confirm-new"]
        assert "stands for NEW's key version too" in ends["confirm-old"]["skipped"]
        # No propagation delay was waited for: NEW was confirmed instead.
        phases = [r["phase"] for r in journal_records(scene, "end")]
        assert phases.index("confirm-new") < phases.index("resign") < phases.index("clean")
        assert phases[-1] == "retire-key"
        # Once OLD's version is retired, the webhook drops it at its next key refresh.
        give_up = time.monotonic() + 60
        while webhook.trusted_key_ids() != {version_2}:
            assert time.monotonic() < give_up, webhook.trusted_key_ids()
            time.sleep(0.1)
    check_every_signed_image_verifies(scene)
