"""Rotation of signatures in both formats, against a real registry (distribution 2.8: bundles
are listed in the fallback index ``sha256-HEX``) with the real cosign 3 signing bundles and the
real cosign 2 signing classic ``.sig`` images; and through a registry with the referrers API
(a test double in front of the real registry).

OLD's bundles must become NEW's bundles, OLD's classic signatures NEW's classic ones, with the
same annotations; at every step every image OLD signed verifies under the policy in force.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from signgate.keys import (
    PrivateKeySigner,
    PublicKey,
    fixed_password,
    load_public_keys,
    load_signer,
)
from signgate.keys.files import generate_key_pair
from signgate.policy import load_policy
from signgate.reference import ImageReference, Repository
from signgate.registry import RegistryClient, RegistryOptions
from signgate.registry.images import push_image
from signgate.rotation.inventory import build_inventory
from signgate.rotation.journal import Journal
from signgate.rotation.rotate import RotationKeys, RotationReport, rotate
from signgate.signatures.referrers import read_bundles, sign_digest_bundle
from signgate.signatures.verify import verify_image
from tests.integration.registry_servers import RunningRegistry
from tests.integration.test_bundle_interop import ReferrersApiDouble
from tests.integration.test_rotation import InjectedCrash
from tests.integration.tools import SIGNGATE, run, signgate, tool_env

pytestmark = pytest.mark.integration

PASSWORD = "correct horse"


@dataclass
class Scene:
    """Images under one prefix, signed by the real cosign 3 (bundles) and cosign 2 (classic).

    ``signed`` maps each case to its (repository, digest); ``old_formats`` says in which formats
    OLD signed it, and ``annotations`` with which annotations (the same in each format).
    """

    host: str
    prefix: str
    home: Path
    env: dict[str, str]
    cosign2: Path
    cosign3: Path
    signed: dict[str, tuple[str, str]] = field(default_factory=dict)
    old_formats: dict[str, tuple[str, ...]] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"{self.host}/{self.prefix}"

    @property
    def policy(self) -> Path:
        return self.home / "policy.yaml"

    @property
    def journal(self) -> Path:
        return self.home / "rotation.journal"

    def key(self, name: str) -> Path:
        return self.home / name

    def public(self, name: str) -> PublicKey:
        return PublicKey.from_pem(self.key(f"{name}.pub").read_bytes())

    def image(self, case: str) -> str:
        repository, digest = self.signed[case]
        return f"{repository}@{digest}"

    def cosign3_sign_bundle(self, key: str, image: str, *extra: str) -> None:
        config = self.home / "signing-config.json"
        if not config.exists():
            run([str(self.cosign3), "signing-config", "create", "--no-default-fulcio",
                 "--no-default-oidc", "--no-default-rekor", "--no-default-tsa", "--out",
                 str(config)], self.env, self.home)
        run([str(self.cosign3), "sign", "--key", str(self.key(key)), "--signing-config",
             str(config), "--yes", "--allow-insecure-registry", *extra, image],
            self.env, self.home)

    def cosign2_sign(self, key: str, image: str, *extra: str) -> None:
        run([str(self.cosign2), "sign", "--key", str(self.key(key)), "--tlog-upload=false",
             "--yes", "--allow-insecure-registry", *extra, image], self.env, self.home)

    def cosign3_verifies(self, key: str, case: str) -> bool:
        """cosign 3 verifies a bundle by ``key``."""
        result = run([str(self.cosign3), "verify", "--key", str(self.key(key)),
                      "--insecure-ignore-tlog", "--allow-insecure-registry", self.image(case)],
                     self.env, self.home, check=False)
        return result.returncode == 0

    def cosign2_verifies(self, key: str, case: str) -> bool:
        """cosign 2 verifies a classic signature by ``key``."""
        result = run([str(self.cosign2), "verify", "--key", str(self.key(key)),
                      "--insecure-ignore-tlog", "--allow-insecure-registry", self.image(case)],
                     self.env, self.home, check=False)
        return result.returncode == 0

    def rotation_keys(self) -> RotationKeys:
        signer = load_signer(str(self.key("new.key")), fixed_password(PASSWORD.encode()))
        return RotationKeys(
            self.public("old"), str(self.key("old.pub")), signer, str(self.key("new.pub"))
        )

    def signgate(self, *args: str, check: bool = True) -> Any:
        return signgate(*args, env=self.env, cwd=self.home, check=check)


def push(host: str, path: str, tag: str, content: bytes) -> str:
    async def go() -> str:
        async with RegistryClient(RegistryOptions()) as client:
            return await push_image(client, Repository(host, path), tag, content=content)

    return asyncio.run(go())


def make_scene(registry: RunningRegistry, cosign: dict[str, Path], home: Path) -> Scene:
    env = tool_env(home, COSIGN_PASSWORD=PASSWORD)
    prefix = f"rot-formats-{home.name}".lower()
    scene = Scene(registry.host, prefix, home, env, cosign["cosign2"], cosign["cosign3"])
    run([str(scene.cosign3), "generate-key-pair", "--output-key-prefix", "old"], env, home)
    run([str(scene.cosign2), "generate-key-pair", "--output-key-prefix", "third"], env, home)
    generate_key_pair(home / "new", fixed_password(PASSWORD.encode()))
    app = f"{prefix}/app"
    cases = {  # what OLD signed: in which formats, with which annotation
        "bundle": (("bundle",), "env=prod"),
        "classic": (("classic",), "team=a"),
        "both": (("classic", "bundle"), "env=prod"),
        "bundle+third": (("bundle",), "env=prod"),
        "moved bundle": (("bundle",), "env=prod"),
    }
    for case, (formats, annotation) in cases.items():
        tag = "moving" if case == "moved bundle" else case.replace(" ", "-").replace("+", "-")
        digest = push(registry.host, app, tag, f"{case} {home.name}".encode())
        image = f"{registry.host}/{app}@{digest}"
        scene.signed[case] = (f"{registry.host}/{app}", digest)
        scene.old_formats[case] = formats
        scene.annotations[case] = annotation
        if "bundle" in formats:
            scene.cosign3_sign_bundle("old.key", image, "-a", annotation)
        if "classic" in formats:
            scene.cosign2_sign("old.key", image, "-a", annotation)
    scene.cosign2_sign("third.key", scene.image("bundle+third"))
    # Its tag moved on: only the fallback index of its bundle names the old digest now.
    push(registry.host, app, "moving", f"moved on {home.name}".encode())
    scene.signed["unsigned"] = (
        f"{registry.host}/{app}",
        push(registry.host, app, "unsigned", f"unsigned {home.name}".encode()),
    )
    scene.policy.write_text(
        "unmatched: deny\n"
        "rules:\n"
        "  - name: ours\n"
        f"    images: [\"{scene.target}/**\"]\n"
        "    keys:\n"
        f"      - {scene.key('old.pub')}\n"
        f"      - {scene.key('third.pub')}\n"
    )
    return scene


@pytest.fixture
def scene(registry: RunningRegistry, cosign_binaries: dict[str, Path], tmp_path: Path) -> Scene:
    return make_scene(registry, cosign_binaries, tmp_path)


def inventory_formats(scene: Scene) -> dict[str, dict[str, list[str]]]:
    """Per case: ``signgate inventory``'s formats of each key (named old, new, third)."""
    keys = [f for name in ("old", "new", "third") for f in ("--key", f"{name}.pub")]
    listed = scene.signgate("inventory", *keys, "--format", "json", scene.target)
    rows = {(r["repository"], r["digest"]): r for r in json.loads(listed.stdout)}
    found = {}
    for case, image in scene.signed.items():
        row = rows[image]
        assert row["unknown_signatures"] == 0, row
        found[case] = {name.removesuffix(".pub"): f for name, f in row["formats"].items()}
    return found


def journal_plan(journal: Path) -> list[list[Any]]:
    for line in journal.read_text().splitlines():
        record = json.loads(line)
        if record.get("type") == "plan":
            items: list[list[Any]] = record["items"]
            return items
    raise AssertionError("no plan in the journal")


def resign_records(journal: Path) -> int:
    count = 0
    for line in journal.read_text().splitlines() if journal.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # being written
        count += record.get("type") == "item" and record.get("phase") == "resign"
    return count


def test_inventory_and_rotate_handle_both_formats(scene: Scene) -> None:
    before = inventory_formats(scene)
    assert before == {
        "bundle": {"old": ["bundle"]},
        "classic": {"old": ["classic"]},
        "both": {"old": ["classic", "bundle"]},
        "bundle+third": {"old": ["bundle"], "third": ["classic"]},
        "moved bundle": {"old": ["bundle"]},
        "unsigned": {},
    }
    dry = scene.signgate("rotate", "--old-key", "old.pub", "--new-key", "new.key", "--dry-run",
                         scene.target)
    planned = {line.split("\t")[0]: line.split("\t")[1:] for line in dry.stdout.splitlines()}
    assert planned == {
        scene.image(case): ["+".join(formats), scene.annotations[case]]
        for case, formats in scene.old_formats.items()
    }

    # Killed in the middle of re-signing a bundle, then resumed with nothing but the journal.
    argv = [
        str(SIGNGATE), "rotate", "--old-key", str(scene.key("old.pub")),
        "--new-key", str(scene.key("new.key")),
        "--policy", str(scene.policy), "--journal", str(scene.journal), "--concurrency", "1",
        "--propagation-delay", "0", scene.target,
    ]
    process = subprocess.Popen(argv, env=scene.env, cwd=scene.home,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # With one at a time, items are signed in the plan's order: stop while the first bundle
    # item after the first item is being signed.
    while process.poll() is None and not scene.journal.exists():
        time.sleep(0.001)
    kill_after: int | None = None
    while process.poll() is None:
        if kill_after is None:
            try:
                plan = journal_plan(scene.journal)
            except (AssertionError, ValueError):
                time.sleep(0.001)
                continue
            kill_after = next(i for i, item in enumerate(plan) if i and "bundle" in item[3])
        if resign_records(scene.journal) >= kill_after:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    asyncio.run(check_now(scene))
    resumed = scene.signgate("rotate", "--resume", "--journal", str(scene.journal))
    summary = json.loads(resumed.stdout)
    assert summary["finished"]
    assert summary["work_items_by_format"] == {"classic": 2, "bundle": 4}
    assert summary["resigned"] + summary["skipped"] == summary["work_items"] == 5
    assert summary["signatures_removed"] == 6
    asyncio.run(check_now(scene))

    after = inventory_formats(scene)
    for case, formats in scene.old_formats.items():
        assert after[case]["new"] == list(formats), case
        assert "old" not in after[case], case
    assert after["bundle+third"]["third"] == ["classic"]
    assert after["unsigned"] == {}
    for case, formats in scene.old_formats.items():
        # cosign 2 reads classic signatures only: none was added where OLD had none.
        assert scene.cosign2_verifies("new.pub", case) is ("classic" in formats), case
        if "bundle" in formats:
            assert scene.cosign3_verifies("new.pub", case), case
        assert not scene.cosign3_verifies("old.pub", case), case
        assert not scene.cosign2_verifies("old.pub", case), case
    assert scene.cosign2_verifies("third.pub", "bundle+third")
    # The annotations of OLD's signatures were carried over, in each format.
    for case, annotation in scene.annotations.items():
        for signature_format in scene.old_formats[case]:
            scene.signgate("verify", "--key", "new.pub", "-a", annotation,
                           "--format", signature_format, scene.image(case))


async def check_every_signed_image_verifies(scene: Scene, client: RegistryClient) -> None:
    """Every image OLD (or the third key) signed verifies under the policy in force now."""
    (rule,) = load_policy(scene.policy).rules
    keys = load_public_keys(rule.keys, fixed_password(b""))
    for case in scene.old_formats:
        repository, digest = scene.signed[case]
        reference = ImageReference(Repository.parse(repository), digest=digest)
        verdict = await verify_image(client, reference, keys)
        assert verdict.ok, f"{case} refused under {rule.keys}: {verdict.reason()}"


async def check_now(scene: Scene) -> None:
    async with RegistryClient(RegistryOptions()) as client:
        await check_every_signed_image_verifies(scene, client)


def rotate_once(scene: Scene, crash_at: str | None, points: list[str]) -> RotationReport:
    async def go() -> RotationReport:
        async with RegistryClient(RegistryOptions()) as client:
            async def checkpoint(name: str) -> None:
                points.append(name)
                await check_every_signed_image_verifies(scene, client)
                if name == crash_at:
                    raise InjectedCrash(name)

            with Journal(scene.journal) as journal:
                return await rotate(
                    client, scene.target, scene.rotation_keys(), journal,
                    policy_path=scene.policy, concurrency=2, checkpoint=checkpoint,
                )

    return asyncio.run(go())


def test_a_crash_at_each_step_of_a_rotation_of_bundles(scene: Scene) -> None:
    points: list[str] = []
    for crash_at in ("plan", "trust", "resign:1", "resign:3", "resign", "retire", "clean:2"):
        with pytest.raises(InjectedCrash):
            rotate_once(scene, crash_at, points)
    report = rotate_once(scene, None, points)
    assert report.finished
    assert not report.failed
    # A removal the crash cut off before its journal record is not counted, never redone.
    assert 0 < report.removed <= 6
    after = inventory_formats(scene)
    for case, formats in scene.old_formats.items():
        assert after[case] == ({"new": list(formats)} | (
            {"third": ["classic"]} if case == "bundle+third" else {})), case


class ReferrersApiWithDeletes(ReferrersApiDouble):
    """The referrers API double, which also stops listing a manifest once it is deleted, as a
    registry with the API does."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "DELETE" and "/manifests/sha256:" in request.url.path:
            gone = request.url.path.rsplit("/", 1)[1]
            for entries in self.referrers.values():
                entries[:] = [e for e in entries if e["digest"] != gone]
        return await super().handle_async_request(request)


def test_a_registry_with_the_referrers_api(registry: RunningRegistry, tmp_path: Path) -> None:
    """No fallback index: the inventory asks the referrers API for each digest's bundles."""
    old, new = (PrivateKeySigner(ec.generate_private_key(ec.SECP256R1())) for _ in range(2))
    prefix = f"rot-api-{tmp_path.name}".lower()
    repository = Repository(registry.host, f"{prefix}/app")
    policy = tmp_path / "policy.yaml"
    (tmp_path / "old.pub").write_bytes(old.public_key().pem())
    (tmp_path / "new.pub").write_bytes(new.public_key().pem())
    policy.write_text(
        f"rules:\n  - name: all\n    images: [\"{registry.host}/{prefix}/**\"]\n"
        f"    keys: [{tmp_path / 'old.pub'}]\n"
    )
    double = ReferrersApiWithDeletes()

    async def go() -> None:
        async with RegistryClient(RegistryOptions(transport=double)) as client:
            digests = [await push_image(client, repository, f"v{i}", content=f"{i}".encode())
                       for i in range(3)]
            double.tag_writes.clear()
            for digest in digests[:2]:
                await sign_digest_bundle(client, old, repository, digest, {"n": digest[-4:]})
            inventory = await build_inventory(client, f"{registry.host}/{prefix}",
                                              [old.public_key()])
            signed = {e.digest: e.formats() for e in inventory.entries}
            assert signed == {
                digests[0]: {old.public_key().key_id: ("bundle",)},
                digests[1]: {old.public_key().key_id: ("bundle",)},
                digests[2]: {},
            }
            keys = RotationKeys(old.public_key(), str(tmp_path / "old.pub"), new,
                                str(tmp_path / "new.pub"))
            with Journal(tmp_path / "j") as journal:
                report = await rotate(client, f"{registry.host}/{prefix}", keys, journal,
                                      policy_path=policy)
            assert report.finished, report.failed
            assert report.removed == 2
            assert double.tag_writes == []  # no fallback index where the API exists
            for digest in digests[:2]:
                reference = ImageReference(repository, digest=digest)
                verdict = await verify_image(client, reference, [new.public_key()],
                                             {"n": digest[-4:]}, formats=("bundle",))
                assert verdict.ok, verdict.reason()
                assert verdict.signature_location == f"{repository} referrers API"
                assert not (await verify_image(client, reference, [old.public_key()])).ok
                # OLD's bundle manifest is gone, not only unlisted.
                bundles = await read_bundles(client, repository, digest)
                assert len(bundles.artifacts) == 1
        await double.aclose()

    asyncio.run(go())
