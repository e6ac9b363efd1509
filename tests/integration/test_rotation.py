"""Rotation against a real registry, with images signed by signgate and by the real cosign 2.

A crash is injected at each step through the library's checkpoint seam; at every checkpoint a
checker asserts that every image OLD had signed verifies under the policy in force then.
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

from signgate.errors import UsageError
from signgate.keys import PublicKey, fixed_password, load_public_keys, load_signer
from signgate.keys.files import generate_key_pair
from signgate.policy import load_policy
from signgate.reference import ImageReference, Repository
from signgate.registry import RegistryClient, RegistryOptions
from signgate.registry.images import push_image, push_index
from signgate.rotation.inventory import build_inventory, list_repositories
from signgate.rotation.journal import Journal
from signgate.rotation.rotate import RotationKeys, RotationReport, rotate
from signgate.signatures.sign import sign_digest
from signgate.signatures.verify import verify_image
from tests.integration.tools import SIGNGATE, run, signgate, tool_env

pytestmark = pytest.mark.integration

PASSWORD = "correct horse"
PLATFORMS = [("linux", "amd64"), ("linux", "arm64")]


class InjectedCrash(Exception):
    """Stands for the process dying at a checkpoint."""


@dataclass
class Scene:
    """A registry prefix full of images, the keys, and what was signed by whom."""

    host: str
    prefix: str
    home: Path
    env: dict[str, str]
    cosign: Path
    signed_by_old: list[tuple[str, str]] = field(default_factory=list)
    signed_by_third: list[tuple[str, str]] = field(default_factory=list)
    unsigned: list[tuple[str, str]] = field(default_factory=list)
    orphan: tuple[str, str] = ("", "")
    index_children: list[str] = field(default_factory=list)

    @property
    def policy(self) -> Path:
        return self.home / "policy.yaml"

    def key(self, name: str) -> Path:
        return self.home / name

    def public(self, name: str) -> PublicKey:
        return PublicKey.from_pem(self.key(f"{name}.pub").read_bytes())

    def cosign_sign(self, key: str, image: str, *extra: str) -> None:
        run([str(self.cosign), "sign", "--key", str(self.key(key)), "--tlog-upload=false",
             "--yes", "--allow-insecure-registry", *extra, image], self.env, self.home)

    def cosign_verify(self, key: str, image: str, check: bool = True) -> Any:
        return run([str(self.cosign), "verify", "--key", str(self.key(key)),
                    "--insecure-ignore-tlog", "--allow-insecure-registry", image],
                   self.env, self.home, check)

    def rotation_keys(self) -> RotationKeys:
        signer = load_signer(str(self.key("new.key")), fixed_password(PASSWORD.encode()))
        return RotationKeys(
            self.public("old"), str(self.key("old.pub")), signer, str(self.key("new.pub"))
        )


async def _populate(scene: Scene) -> None:
    password = fixed_password(PASSWORD.encode())
    old = load_signer(str(scene.key("old.key")), password)
    third = load_signer(str(scene.key("third.key")), password)
    async with RegistryClient(RegistryOptions()) as client:
        app = Repository(scene.host, f"{scene.prefix}/app")
        multi = Repository(scene.host, f"{scene.prefix}/multi")

        async def push(repo: Repository, tag: str | None, content: bytes) -> str:
            return await push_image(client, repo, tag, content=content)

        async def sign(signer: Any, repo: Repository, digest: str, **annotations: str) -> None:
            await sign_digest(
                client, signer, ImageReference(repo, digest=digest), digest, annotations
            )

        v1 = await push(app, "v1", b"old by signgate")
        await sign(old, app, v1, team="a")
        scene.signed_by_old.append((str(app), v1))
        v3 = await push(app, "v3", b"old and third")
        await sign(old, app, v3)
        await sign(third, app, v3)
        scene.signed_by_old.append((str(app), v3))
        scene.signed_by_third.append((str(app), v3))
        v4 = await push(app, "v4", b"third only")
        await sign(third, app, v4)
        scene.signed_by_third.append((str(app), v4))
        v5 = await push(app, "v5", b"unsigned")
        scene.unsigned.append((str(app), v5))
        # A tag that moved: the old digest stays deployed by digest, signed.
        moved = await push(app, "moving", b"first release")
        await sign(old, app, moved)
        scene.signed_by_old.append((str(app), moved))
        scene.orphan = (str(app), moved)
        latest = await push(app, "moving", b"second release")
        scene.unsigned.append((str(app), latest))
        index, children = await push_index(
            client, multi, "v1", content=b"multi", platforms=PLATFORMS
        )
        for digest in [index, *children]:
            await sign(old, multi, digest)
            scene.signed_by_old.append((str(multi), digest))
        scene.index_children = children
        # Lists another rule's images: their signatures are never touched.
        await push(Repository(scene.host, f"{scene.prefix}-elsewhere/x"), "v1", b"elsewhere")


def make_scene(
    host: str, prefix: str, home: Path, cosign: Path, keys_from: Path | None = None
) -> Scene:
    home.mkdir(parents=True, exist_ok=True)
    env = tool_env(home, COSIGN_PASSWORD=PASSWORD)
    scene = Scene(host, prefix, home, env, cosign)
    password = fixed_password(PASSWORD.encode())
    if keys_from is not None:
        for name in ("old.key", "old.pub", "new.key", "new.pub", "third.key", "third.pub"):
            (home / name).write_bytes((keys_from / name).read_bytes())
    else:
        run([str(cosign), "generate-key-pair", "--output-key-prefix", "old"], env, home)
        generate_key_pair(home / "new", password)
        generate_key_pair(home / "third", password)
    asyncio.run(_populate(scene))
    # Images signed with OLD by the real cosign, with annotations.
    app = f"{host}/{prefix}/app"
    digest = asyncio.run(_push(host, f"{prefix}/app", "v2", b"old by cosign"))
    scene.cosign_sign("old.key", f"{app}@{digest}", "-a", "env=prod")
    scene.signed_by_old.append((app, digest))
    scene.policy.write_text(
        "# production policy: keep this comment\n"
        "unmatched: deny\n"
        "rules:\n"
        f"  - name: ours  # our images\n"
        f"    images: [\"{host}/{prefix}/**\"]\n"
        "    keys:\n"
        f"      - {scene.key('old.pub')}   # the key being rotated\n"
        f"      - {scene.key('third.pub')}\n"
    )
    return scene


async def _push(host: str, path: str, tag: str, content: bytes) -> str:
    async with RegistryClient(RegistryOptions()) as client:
        return await push_image(client, Repository(host, path), tag, content=content)


def policy_keys(scene: Scene) -> tuple[str, ...]:
    (rule,) = load_policy(scene.policy).rules
    return rule.keys


async def check_every_signed_image_verifies(scene: Scene, client: RegistryClient) -> None:
    keys = load_public_keys(policy_keys(scene), fixed_password(b""))
    images = [*scene.signed_by_old, *scene.signed_by_third]
    for repository, digest in images:
        reference = ImageReference(Repository.parse(repository), digest=digest)
        verdict = await verify_image(client, reference, keys)
        assert verdict.ok, f"{reference} refused under {policy_keys(scene)}: {verdict.reason()}"


@pytest.fixture
def scene(registry: Any, cosign_binaries: dict[str, Path], tmp_path: Path) -> Scene:
    prefix = f"rot-{tmp_path.name}".lower()
    return make_scene(registry.host, prefix, tmp_path, cosign_binaries["cosign2"])


def rotate_once(
    scene: Scene, journal: Path, crash_at: str | None, points: list[str]
) -> RotationReport:
    async def go() -> RotationReport:
        async with RegistryClient(RegistryOptions()) as client:
            async def checkpoint(name: str) -> None:
                points.append(name)
                await check_every_signed_image_verifies(scene, client)
                if name == crash_at:
                    raise InjectedCrash(name)

            with Journal(journal) as opened:
                return await rotate(
                    client, f"{scene.host}/{scene.prefix}", scene.rotation_keys(), opened,
                    policy_path=scene.policy, concurrency=4, checkpoint=checkpoint,
                )

    return asyncio.run(go())


def below_prefix(scene: Scene, repository: str) -> str:
    return repository.split("/", 1)[1].removeprefix(scene.prefix)


def end_state(scene: Scene) -> dict[tuple[str, str], list[Any]]:
    """Per (repository below the prefix, digest): the keys of its signatures and annotations."""
    names = {scene.public(n).key_id: n for n in ("old", "new", "third")}

    async def walk() -> dict[tuple[str, str], list[Any]]:
        async with RegistryClient(RegistryOptions()) as client:
            inventory = await build_inventory(
                client, f"{scene.host}/{scene.prefix}",
                [scene.public(n) for n in ("old", "new", "third")],
            )
        return {
            (e.repository.path.removeprefix(scene.prefix), e.digest): sorted(
                (names.get(s.key_id or "", "?"), sorted(s.annotations.items()))
                for s in e.signatures
            )
            for e in inventory.entries
        }

    return asyncio.run(walk())


def test_rotation_survives_a_crash_at_every_step(scene: Scene, tmp_path: Path) -> None:
    journal = tmp_path / "rotation.journal"
    points: list[str] = []
    for crash_at in ("plan", "trust", "resign:2", "resign", "retire", "clean:2"):
        with pytest.raises(InjectedCrash):
            rotate_once(scene, journal, crash_at, points)
    report = rotate_once(scene, journal, None, points)
    assert report.finished
    assert points[-1] == "clean"
    assert {"plan", "trust", "resign:1", "resign", "retire", "clean:1"} <= set(points)
    # A finished rotation run again does nothing; its report totals what the journal holds.
    again = rotate_once(scene, journal, None, points)
    assert again.finished
    assert again.resigned == 0
    assert again.skipped == len(again.plan) == len(scene.signed_by_old)
    # A removal the crash cut off before its journal record is not counted, never redone.
    assert 0 < again.removed <= len(scene.signed_by_old)

    assert policy_keys(scene) == (str(scene.key("new.pub")), str(scene.key("third.pub")))
    policy_text = scene.policy.read_text()
    assert "# production policy: keep this comment" in policy_text
    assert "# our images" in policy_text
    for repository, digest in scene.signed_by_old:
        image = f"{repository}@{digest}"
        scene.cosign_verify("new.pub", image)
        assert scene.cosign_verify("old.pub", image, check=False).returncode != 0
    for repository, digest in scene.signed_by_third:
        scene.cosign_verify("third.pub", f"{repository}@{digest}")
    state = end_state(scene)
    for repository, digest in scene.unsigned:
        assert state[(below_prefix(scene, repository), digest)] == []
    app = "/app"
    assert [k for k, _ in state[(app, scene.orphan[1])]] == ["new"]
    # The annotations of OLD's signatures (cosign's and signgate's) were carried over.
    annotated = [v for v in state.values() if v and v[0][1]]
    assert sorted(v[0][1] for v in annotated) == [[("env", "prod")], [("team", "a")]]


def test_an_uninterrupted_rotation_ends_in_the_same_state(
    registry: Any, cosign_binaries: dict[str, Path], scene: Scene, tmp_path: Path
) -> None:
    crashed = scene
    points: list[str] = []
    for crash_at in ("resign:1", "clean:1"):
        with pytest.raises(InjectedCrash):
            rotate_once(crashed, tmp_path / "crashed.journal", crash_at, points)
    rotate_once(crashed, tmp_path / "crashed.journal", None, points)
    # The same images with the same keys, so that the end states compare key for key.
    clean_run = make_scene(
        registry.host, f"{crashed.prefix}-straight", tmp_path / "straight",
        cosign_binaries["cosign2"], keys_from=crashed.home,
    )
    report = rotate_once(clean_run, tmp_path / "straight.journal", None, [])
    assert report.finished
    assert not report.failed
    assert report.removed == len(crashed.signed_by_old)
    assert end_state(clean_run) == end_state(crashed)


class _NoCatalog(httpx.AsyncBaseTransport):
    """The real network, except that the catalog endpoint does not exist."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/_catalog":
            return httpx.Response(404, json={"errors": [{"code": "UNSUPPORTED"}]})
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_a_registry_without_a_catalog_needs_the_repositories_named(registry: Any) -> None:
    async def go() -> tuple[str, list[str]]:
        transport = _NoCatalog()
        async with RegistryClient(RegistryOptions(transport=transport)) as client:
            with pytest.raises(UsageError) as refused:
                await list_repositories(client, registry.host, "", [])
            named = await list_repositories(client, registry.host, "", ["a/b", "c"])
        await transport.aclose()
        return refused.value.diagnostics(), named

    message, named = asyncio.run(go())
    assert "--repositories" in message
    assert named == ["a/b", "c"]


def test_inventory_command_lists_orphans_children_and_keys(scene: Scene) -> None:
    out = signgate(
        "inventory", "--key", str(scene.key("old.pub")), "--key", str(scene.key("third.pub")),
        "--format", "json", f"{scene.host}/{scene.prefix}", env=scene.env, cwd=scene.home,
    ).stdout
    rows = {(r["repository"], r["digest"]): r for r in json.loads(out)}
    old_name, third_name = str(scene.key("old.pub")), str(scene.key("third.pub"))
    assert rows[scene.orphan]["tags"] == []
    assert rows[scene.orphan]["keys"] == [old_name]
    for child in scene.index_children:
        (row,) = [r for (repo, d), r in rows.items() if d == child]
        assert row["index"]
        assert row["signed"]
    for image in scene.unsigned:
        assert not rows[image]["signed"]
    for image in scene.signed_by_third:
        assert third_name in rows[image]["keys"]
    assert all(r["repository"].startswith(f"{scene.host}/{scene.prefix}/") for r in rows.values())
    dry = signgate(
        "rotate", "--old-key", str(scene.key("old.pub")), "--new-key", "new.key", "--dry-run",
        f"{scene.host}/{scene.prefix}", env=scene.env, cwd=scene.home,
    )
    assert len(dry.stdout.splitlines()) == len(scene.signed_by_old)


def test_rotate_command_end_to_end(scene: Scene) -> None:
    result = signgate(
        "rotate", "--old-key", str(scene.key("old.pub")), "--new-key", str(scene.key("new.key")),
        "--policy", str(scene.policy), "--journal", str(scene.home / "j"),
        "--propagation-delay", "0", f"{scene.host}/{scene.prefix}", env=scene.env, cwd=scene.home,
    )
    summary = json.loads(result.stdout)
    assert summary["finished"]
    assert summary["resigned"] == len(scene.signed_by_old)
    assert summary["signatures_removed"] == len(scene.signed_by_old)
    assert policy_keys(scene) == (str(scene.key("new.pub")), str(scene.key("third.pub")))




class _Flaky(httpx.AsyncBaseTransport):
    """The real network, with 429 on every third write and 503 on every fourth read."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.writes = 0
        self.reads = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method in ("PUT", "POST", "PATCH"):
            self.writes += 1
            if self.writes % 3 == 0:
                return httpx.Response(429, headers={"Retry-After": "0"})
        else:
            self.reads += 1
            if self.reads % 4 == 0:
                return httpx.Response(503)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_rotation_through_429_and_503_loses_nothing(scene: Scene, tmp_path: Path) -> None:
    statuses: list[int | str] = []

    async def go() -> RotationReport:
        transport = _Flaky()
        options = RegistryOptions(
            transport=transport, retry_backoff_seconds=0.001, on_response=statuses.append
        )
        try:
            async with RegistryClient(options) as client:
                with Journal(tmp_path / "j") as journal:
                    return await rotate(
                        client, f"{scene.host}/{scene.prefix}", scene.rotation_keys(), journal,
                        policy_path=scene.policy,
                    )
        finally:
            await transport.aclose()

    report = asyncio.run(go())
    assert report.failed == {}
    assert report.finished
    assert statuses.count(429) > 0
    assert statuses.count(503) > 0
    state = end_state(scene)
    for repository, digest in scene.signed_by_old:
        keys = [k for k, _ in state[(below_prefix(scene, repository), digest)]]
        assert "new" in keys
        assert "old" not in keys


def _journalled(journal: Path, phase: str) -> bool:
    if not journal.exists():
        return False
    for line in journal.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # being written
        if record.get("type") == "item" and record.get("phase") == phase:
            return True
    return False


def _kill_when_journal_has(process: subprocess.Popen[str], journal: Path, phase: str) -> None:
    """SIGKILL ``process`` as soon as its journal records an item of ``phase`` done."""
    while process.poll() is None:
        if _journalled(journal, phase):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    process.wait()


def test_rotate_command_killed_mid_phase_resumes(scene: Scene) -> None:
    journal = scene.home / "rotation.journal"
    argv = [
        str(SIGNGATE), "rotate", "--old-key", str(scene.key("old.pub")),
        "--new-key", str(scene.key("new.key")), "--policy", str(scene.policy),
        "--journal", str(journal), "--concurrency", "1", "--propagation-delay", "0",
        f"{scene.host}/{scene.prefix}",
    ]
    for phase in ("resign", "clean"):
        process = subprocess.Popen(
            argv, env=scene.env, cwd=scene.home, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, text=True,
        )
        _kill_when_journal_has(process, journal, phase)
        assert process.returncode == -signal.SIGKILL
        asyncio.run(_check_now(scene))
    resumed = subprocess.run(
        [*argv[:-1], "--resume", argv[-1]], env=scene.env, cwd=scene.home,
        capture_output=True, text=True, check=True,
    )
    assert json.loads(resumed.stdout)["finished"]
    asyncio.run(_check_now(scene))
    assert policy_keys(scene) == (str(scene.key("new.pub")), str(scene.key("third.pub")))
    state = end_state(scene)
    for repository, digest in scene.signed_by_old:
        keys = [k for k, _ in state[(below_prefix(scene, repository), digest)]]
        assert "new" in keys
        assert "old" not in keys


async def _check_now(scene: Scene) -> None:
    async with RegistryClient(RegistryOptions()) as client:
        await check_every_signed_image_verifies(scene, client)


def test_signatures_kept_in_cosign_repository_are_inventoried_and_rotated(
    registry: Any, cosign_binaries: dict[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefix = f"rot-sigrepo-{tmp_path.name}".lower()
    signatures = f"{registry.host}/{prefix}/signatures"  # under the prefix: not an image
    password = fixed_password(PASSWORD.encode())
    for name in ("old", "new", "third"):
        generate_key_pair(tmp_path / name, password)
    monkeypatch.setenv("COSIGN_REPOSITORY", signatures)
    env = tool_env(tmp_path, COSIGN_PASSWORD=PASSWORD, COSIGN_REPOSITORY=signatures)
    old, third = (load_signer(str(tmp_path / f"{n}.key"), password) for n in ("old", "third"))
    a = Repository(registry.host, f"{prefix}/a")
    b = Repository(registry.host, f"{prefix}/b")

    async def populate() -> dict[str, tuple[Repository, str]]:
        async with RegistryClient(RegistryOptions()) as client:
            async def sign(signer: Any, repo: Repository, digest: str) -> None:
                await sign_digest(client, signer, ImageReference(repo, digest=digest), digest)

            images = {
                "tagged": (a, await push_image(client, a, "v1", content=b"a1")),
                "moved": (a, await push_image(client, a, "moving", content=b"a2")),
                "unsigned": (a, await push_image(client, a, "v3", content=b"a3")),
                "third": (b, await push_image(client, b, "v1", content=b"b1")),
            }
            await push_image(client, a, "moving", content=b"a2 after")
            index, children = await push_index(
                client, b, "multi", content=b"b multi", platforms=PLATFORMS
            )
            images |= {"index": (b, index), "child": (b, children[0])}
            for kind in ("tagged", "moved", "index", "child"):
                await sign(old, *images[kind])
            await sign(third, *images["third"])
            images["by-cosign"] = (b, await push_image(client, b, "v2", content=b"b2"))
            return images

    images = asyncio.run(populate())
    # One signed by the real cosign, which honours COSIGN_REPOSITORY too.
    repository, digest = images["by-cosign"]
    run([str(cosign_binaries["cosign2"]), "sign", "--key", str(tmp_path / "old.key"),
         "--tlog-upload=false", "--yes", "--allow-insecure-registry",
         f"{repository}@{digest}"], env, tmp_path)
    old_signed = ["tagged", "moved", "index", "child", "by-cosign"]

    keys = ["--key", str(tmp_path / "old.pub"), "--key", str(tmp_path / "third.pub")]
    listed = signgate("inventory", *keys, "--format", "json", f"{registry.host}/{prefix}",
                      env=env, cwd=tmp_path)
    rows = {(r["repository"], r["digest"]): r for r in json.loads(listed.stdout)}
    assert {r["repository"] for r in rows.values()} == {str(a), str(b)}
    for kind in old_signed:
        repository, digest = images[kind]
        assert rows[(str(repository), digest)]["keys"] == [str(tmp_path / "old.pub")], kind
    assert rows[(str(a), images["moved"][1])]["tags"] == []  # found by digest in a, not b
    assert not rows[(str(a), images["unsigned"][1])]["signed"]
    assert rows[(str(b), images["third"][1])]["keys"] == [str(tmp_path / "third.pub")]

    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"rules:\n  - name: all\n    images: [\"{registry.host}/{prefix}/**\"]\n"
        f"    keys: [{tmp_path / 'old.pub'}, {tmp_path / 'third.pub'}]\n"
    )
    rotated = signgate(
        "rotate", "--old-key", str(tmp_path / "old.pub"), "--new-key", str(tmp_path / "new.key"),
        "--policy", str(policy), "--journal", str(tmp_path / "j"), "--propagation-delay", "0",
        f"{registry.host}/{prefix}", env=env, cwd=tmp_path,
    )
    summary = json.loads(rotated.stdout)
    assert summary["finished"]
    assert summary["resigned"] == summary["signatures_removed"] == len(old_signed)

    def cosign_verify(key: str, kind: str) -> int:
        repository, digest = images[kind]
        return run([str(cosign_binaries["cosign2"]), "verify", "--key", str(tmp_path / key),
                    "--insecure-ignore-tlog", "--allow-insecure-registry",
                    f"{repository}@{digest}"], env, tmp_path, check=False).returncode

    for kind in old_signed:
        assert cosign_verify("new.pub", kind) == 0, kind
        assert cosign_verify("old.pub", kind) != 0, kind
    assert cosign_verify("third.pub", "third") == 0

    async def tags(repository: Repository) -> list[str]:
        async with RegistryClient(RegistryOptions()) as client:
            return await client.list_tags(repository)

    # Every signature stayed in COSIGN_REPOSITORY.
    assert not [t for r in (a, b) for t in asyncio.run(tags(r)) if t.endswith(".sig")]
    # A resumed run must see the signatures where they were.
    monkeypatch.delenv("COSIGN_REPOSITORY")
    del env["COSIGN_REPOSITORY"]
    refused = signgate("rotate", "--resume", "--journal", str(tmp_path / "j"), env=env,
                       cwd=tmp_path, check=False)
    assert refused.returncode == 2
    assert f"started with COSIGN_REPOSITORY={signatures}" in refused.stderr


def test_old_signatures_stay_until_verifiers_have_had_time_to_trust_new(
    scene: Scene, tmp_path: Path
) -> None:
    shown: list[tuple[str, int, int]] = []

    def progress(phase: str, done: int, total: int) -> None:
        shown.append((phase, done, total))
        if phase == "verifiers" and done < total:
            raise InjectedCrash(phase)  # it would wait here: stop the test instead

    async def go(delay: float) -> RotationReport:
        async with RegistryClient(RegistryOptions()) as client:
            with Journal(tmp_path / "j") as journal:
                return await rotate(
                    client, f"{scene.host}/{scene.prefix}", scene.rotation_keys(), journal,
                    policy_path=scene.policy, propagation_delay=delay, progress=progress,
                )

    with pytest.raises(InjectedCrash):
        asyncio.run(go(3600))
    assert ("verifiers", 0, 3600) in shown
    phases = [json.loads(line).get("phase") for line in (tmp_path / "j").read_text().splitlines()]
    assert "retire" in phases
    assert "clean" not in phases  # OLD's signatures are all there
    asyncio.run(_check_now(scene))
    report = asyncio.run(go(0))
    assert report.finished
    phase, done, total = shown[-1]
    assert (phase, done) == ("clean", total)


def test_the_cli_waits_as_long_as_the_library_says() -> None:
    from signgate.cli.rotation import rotate as command
    from signgate.rotation.rotate import DEFAULT_PROPAGATION_DELAY, default_propagation_delay

    (delay,) = [p for p in command.params if p.name == "propagation_delay"]
    assert delay.default is None  # the library's default, which depends on --verifier
    assert default_propagation_delay(()) == DEFAULT_PROPAGATION_DELAY
    assert default_propagation_delay(["https://webhook.example/metrics"]) == 0
