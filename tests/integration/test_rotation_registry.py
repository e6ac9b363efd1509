"""Rotation of a registry of over 200 digests, in one run and in three shards.

The registry is built once for the module, twice over (two prefixes holding the same images
and signatures): one is rotated by a single `signgate rotate`, the other by three shards. Each
repository has tagged images, images reachable only by digest (their tag moved, or never had
one), some a multi-platform index with its children; digests are signed by OLD only (some with
annotations), by OLD and a third key, by the third key only, or not at all.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from signgate.keys import PublicKey, fixed_password, load_public_keys, load_signer
from signgate.keys.files import generate_key_pair
from signgate.keys.model import Signer
from signgate.policy import load_policy
from signgate.reference import ImageReference, Repository
from signgate.registry import RegistryClient, RegistryOptions
from signgate.registry.images import push_image, push_index
from signgate.signatures.sign import sign_digest
from signgate.signatures.verify import verify_images
from tests.integration.registry_servers import RunningRegistry
from tests.integration.tools import SIGNGATE, run, signgate, tool_env

pytestmark = pytest.mark.integration

PASSWORD = "correct horse"
REPOSITORIES = [f"svc-{i}" for i in range(8)]
TAGGED_PER_REPOSITORY = 20
MOVES_PER_REPOSITORY = 4  # pushes of one tag: all but the last are reachable by digest only
UNTAGGED_PER_REPOSITORY = 2
INDEXED_REPOSITORIES = 2
PLATFORMS = [("linux", "amd64"), ("linux", "arm64"), ("linux", "arm/v7")]
# Who signs the n-th image of a repository.
SIGNERS = [("old",), ("old",), ("old",), ("old", "third"), ("third",), ()]
SHARDS = 3


@dataclass(frozen=True)
class Image:
    repository: str  # below the prefix, e.g. "svc-3"
    digest: str
    signers: tuple[str, ...]
    annotations: tuple[tuple[str, str], ...] = ()
    tagged: bool = True
    child: bool = False


@dataclass
class World:
    """The keys, and what was pushed and signed under each prefix."""

    host: str
    home: Path
    env: dict[str, str]
    cosign: Path
    images: list[Image] = field(default_factory=list)

    def key(self, name: str) -> Path:
        return self.home / name

    def public(self, name: str) -> PublicKey:
        return PublicKey.from_pem(self.key(f"{name}.pub").read_bytes())

    def signed_by(self, name: str) -> list[Image]:
        return [image for image in self.images if name in image.signers]

    def unsigned(self) -> list[Image]:
        return [image for image in self.images if not image.signers]

    def reference(self, prefix: str, image: Image) -> str:
        return f"{self.host}/{prefix}/{image.repository}@{image.digest}"

    def policy(self, prefix: str) -> Path:
        return self.home / prefix / "policy.yaml"

    def write_policy(self, prefix: str) -> None:
        self.policy(prefix).parent.mkdir(exist_ok=True)
        self.policy(prefix).write_text(
            "unmatched: deny\n"
            "rules:\n"
            f"  - name: services\n"
            f"    images: [\"{self.host}/{prefix}/**\"]\n"
            "    keys:\n"
            f"      - {self.key('old.pub')}\n"
            f"      - {self.key('third.pub')}\n"
        )

    def policy_keys(self, prefix: str) -> tuple[str, ...]:
        (rule,) = load_policy(self.policy(prefix)).rules
        return rule.keys


async def _push_repository(
    client: RegistryClient, repository: Repository, number: int, limit: asyncio.Semaphore
) -> list[tuple[str, bool, bool]]:
    """Push one repository's images; (digest, tagged, index child) of each, in push order."""
    name = repository.path.rsplit("/", 1)[1]
    pushed: list[tuple[str, bool, bool]] = []

    async def push_tagged(n: int) -> str:
        async with limit:
            return await push_image(client, repository, f"v{n}", content=f"{name} v{n}".encode())

    tagged = await asyncio.gather(*(push_tagged(n) for n in range(TAGGED_PER_REPOSITORY)))
    pushed += [(digest, True, False) for digest in tagged]
    for move in range(MOVES_PER_REPOSITORY):  # one after the other: the last one keeps the tag
        digest = await push_image(client, repository, "latest", content=f"{name} {move}".encode())
        pushed.append((digest, move == MOVES_PER_REPOSITORY - 1, False))
    for n in range(UNTAGGED_PER_REPOSITORY):
        digest = await push_image(client, repository, None, content=f"{name} u{n}".encode())
        pushed.append((digest, False, False))
    if number < INDEXED_REPOSITORIES:
        index, children = await push_index(
            client, repository, "multi", content=f"{name} multi".encode(), platforms=PLATFORMS
        )
        pushed.append((index, True, False))
        pushed += [(child, False, True) for child in children]
    return pushed


async def _populate(world: World, prefixes: list[str], signers: dict[str, Signer]) -> None:
    limit = asyncio.Semaphore(8)
    async with RegistryClient(RegistryOptions()) as client:
        per_repository = await asyncio.gather(*(
            _push_repository(client, Repository(world.host, f"{prefix}/{name}"), number, limit)
            for prefix in prefixes for number, name in enumerate(REPOSITORIES)
        ))
        images: list[Image] = []
        for number, name in enumerate(REPOSITORIES):
            for n, (digest, tagged, child) in enumerate(per_repository[number]):
                who = SIGNERS[(n + number) % len(SIGNERS)] if not child else ("old",)
                annotations = (("team", name),) if n % 7 == 0 and "old" in who else ()
                images.append(Image(name, digest, who, annotations, tagged, child))
        world.images = images

        async def sign(prefix: str, image: Image) -> None:
            repository = Repository(world.host, f"{prefix}/{image.repository}")
            reference = ImageReference(repository, digest=image.digest)
            async with limit:
                # One key after the other: two writers of one signature image at once can
                # lose a signature (the registry has no compare-and-swap).
                for key in image.signers:
                    await sign_digest(
                        client, signers[key], reference, image.digest, dict(image.annotations)
                    )

        await asyncio.gather(*(sign(prefix, image) for prefix in prefixes for image in images))


@pytest.fixture(scope="module")
def world(
    registry: RunningRegistry, cosign_binaries: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> World:
    home = tmp_path_factory.mktemp("rotation-200")
    password = fixed_password(PASSWORD.encode())
    for name in ("old", "new", "third"):
        generate_key_pair(home / name, password)
    world = World(
        registry.host, home, tool_env(home, COSIGN_PASSWORD=PASSWORD), cosign_binaries["cosign2"]
    )
    signers = {n: load_signer(str(home / f"{n}.key"), password) for n in ("old", "third")}
    asyncio.run(_populate(world, [_prefix(home, "single"), _prefix(home, "sharded")], signers))
    for kind in ("single", "sharded"):
        world.write_policy(_prefix(home, kind))
    return world


def _prefix(home: Path, kind: str) -> str:
    return f"{home.name.lower()}-{kind}"


def test_the_registry_has_what_the_issue_asks_for(world: World) -> None:
    assert len(world.images) >= 200
    assert len({image.repository for image in world.images}) == len(REPOSITORIES)
    kinds = {image.signers for image in world.images}
    assert {("old",), ("old", "third"), ("third",), ()} <= kinds
    assert any(image.child for image in world.images)
    reachable_by_digest_only = [i for i in world.images if not i.tagged and not i.child]
    assert {i.signers for i in reachable_by_digest_only} >= {("old",), ("third",), ()}
    assert any(image.annotations for image in world.images)


# Checks ----------------------------------------------------------------------------------------


def check_every_signed_image_verifies(world: World, prefix: str) -> None:
    """Under the policy in force now, every image that was signed (by OLD or the third key)
    is admitted."""
    keys = load_public_keys(world.policy_keys(prefix), fixed_password(b""))
    signed = [i for i in world.images if i.signers]
    references = [ImageReference.parse(world.reference(prefix, i)) for i in signed]

    async def verify() -> list[str]:
        async with RegistryClient(RegistryOptions()) as client:
            results = await verify_images(client, references, keys)
        return [f"{r.reference}: {r.reason()}" for r in results if not r.ok]

    refused = asyncio.run(verify())
    assert not refused, f"refused under {world.policy_keys(prefix)}: {refused[:3]}"


def end_state(world: World, prefix: str, shard: int | None = None) -> dict[str, Any]:
    """Per repository@digest below the prefix: (key name, annotations) of each signature."""
    argv = ["inventory", "--format", "json"]
    for name in ("old", "new", "third"):
        argv += ["--key", str(world.key(f"{name}.pub"))]
    if shard is not None:
        argv += ["--shard", f"{shard}/{SHARDS}"]
    result = signgate(*argv, f"{world.host}/{prefix}", env=world.env)
    assert result.stderr == ""  # not a terminal: no progress bar
    return state_of(world, prefix, json.loads(result.stdout))


def state_of(world: World, prefix: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Inventory rows as {repository below the prefix @ digest: (key names, unknown count)}."""
    names = {str(world.key(f"{n}.pub")): n for n in ("old", "new", "third")}
    state: dict[str, Any] = {}
    for row in rows:
        below = row["repository"].removeprefix(f"{world.host}/{prefix}/")
        keys = sorted(names[k] for k in row["keys"])
        state[f"{below}@{row['digest']}"] = (keys, row["unknown_signatures"])
    return state


def run_on_terminal(
    argv: list[str], env: dict[str, str], cwd: Path
) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal, stdout on a pipe: (status, stdout, terminal)."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal, env=env,
        cwd=cwd,
    )
    os.close(terminal)
    shown = bytearray()

    def read_terminal() -> None:
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the other side is closed
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=read_terminal)
    reader.start()
    assert process.stdout is not None
    with process.stdout:
        stdout = process.stdout.read().decode()
    process.wait()
    reader.join()
    os.close(controller)
    return process.returncode, stdout, shown.decode(errors="replace")


def references_of(world: World, prefix: str, images: list[Image]) -> list[str]:
    return [world.reference(prefix, image) for image in images]


def verify_all(world: World, key: str, references: list[str]) -> subprocess.CompletedProcess[str]:
    return signgate(
        "verify", "--key", str(world.key(f"{key}.pub")), *references, env=world.env, check=False
    )


# One run ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OneRun:
    prefix: str
    status: int
    stdout: str
    terminal: str


@pytest.fixture(scope="module")
def one_run(world: World) -> OneRun:
    """The first prefix rotated by one `signgate rotate`, its stderr on a terminal."""
    prefix = _prefix(world.home, "single")
    check_every_signed_image_verifies(world, prefix)
    argv = [
        str(SIGNGATE), "rotate", "--old-key", str(world.key("old.pub")),
        "--new-key", str(world.key("new.key")), "--policy", str(world.policy(prefix)),
        "--journal", str(world.home / f"{prefix}.journal"), "--propagation-delay", "0",
        f"{world.host}/{prefix}",
    ]
    return OneRun(prefix, *run_on_terminal(argv, world.env, world.home))


def test_one_rotation_moves_every_signature_by_old_to_new(world: World, one_run: OneRun) -> None:
    prefix, stdout, terminal = one_run.prefix, one_run.stdout, one_run.terminal
    assert one_run.status == 0, terminal
    report = json.loads(stdout)  # stdout holds the report alone
    old_signatures = len(world.signed_by("old"))  # one each
    assert report["finished"]
    assert report["resigned"] == report["work_items"] == old_signatures
    assert report["signatures_removed"] == old_signatures
    assert report["failed"] == {}
    # The progress bars were drawn on the terminal, one per phase, each to its end.
    for label in ("inventory", "re-sign", "clean"):
        assert label in terminal
    assert f"{old_signatures}/{old_signatures}" in terminal
    check_every_signed_image_verifies(world, prefix)

    assert world.policy_keys(prefix) == (str(world.key("new.pub")), str(world.key("third.pub")))
    old_signed = references_of(world, prefix, world.signed_by("old"))
    by_new = verify_all(world, "new", old_signed)
    assert by_new.returncode == 0, by_new.stderr[-2000:]
    by_old = verify_all(world, "old", old_signed)
    assert by_old.returncode == 1
    assert by_old.stderr.count("signgate: ") == len(old_signed)
    by_third = verify_all(world, "third", references_of(world, prefix, world.signed_by("third")))
    assert by_third.returncode == 0, by_third.stderr[-2000:]
    # The real cosign agrees, on a sample that has an index child, an image reachable only by
    # digest and one with annotations.
    sample = world.signed_by("old")[:: max(1, len(world.signed_by("old")) // 8)]
    sample += [next(i for i in world.signed_by("old") if i.child)]
    sample += [next(i for i in world.signed_by("old") if not i.tagged and not i.child)]
    sample += [next(i for i in world.signed_by("old") if i.annotations)]
    for image in sample:
        reference = world.reference(prefix, image)
        run([str(world.cosign), "verify", "--key", str(world.key("new.pub")),
             "--insecure-ignore-tlog", "--allow-insecure-registry", reference], world.env)
        refused = run([str(world.cosign), "verify", "--key", str(world.key("old.pub")),
                       "--insecure-ignore-tlog", "--allow-insecure-registry", reference],
                      world.env, check=False)
        assert refused.returncode != 0, reference

    # The inventory, with a progress bar on a terminal and the JSON alone on stdout.
    argv = [str(SIGNGATE), "inventory", "--format", "json"]
    for name in ("old", "new", "third"):
        argv += ["--key", str(world.key(f"{name}.pub"))]
    status, stdout, terminal = run_on_terminal(
        [*argv, f"{world.host}/{prefix}"], world.env, world.home
    )
    assert status == 0
    assert f"{len(REPOSITORIES)}/{len(REPOSITORIES)}" in terminal
    state = state_of(world, prefix, json.loads(stdout))
    for image in world.images:
        found = f"{image.repository}@{image.digest}"
        if not (image.signers or image.tagged or image.child):
            assert found not in state  # nothing points to it: no registry lists it
            continue
        want = sorted(["new" if s == "old" else s for s in image.signers])
        assert state[found] == (want, 0), image
    unsigned = verify_all(world, "new", references_of(world, prefix, world.unsigned()))
    assert unsigned.returncode == 1
    assert unsigned.stderr.count("no signatures found") == len(world.unsigned())


# Three shards ----------------------------------------------------------------------------------


def test_three_shards_cover_every_repository_once_and_end_as_one_run(
    world: World, one_run: OneRun
) -> None:
    prefix = _prefix(world.home, "sharded")
    target = f"{world.host}/{prefix}"
    shares = [end_state(world, prefix, shard) for shard in range(SHARDS)]
    whole = end_state(world, prefix)
    repositories = [{key.split("@")[0] for key in share} for share in shares]
    assert all(repositories), "a shard without repositories tests nothing"
    assert sum(len(r) for r in repositories) == len(REPOSITORIES)
    assert set().union(*repositories) == set(REPOSITORIES)
    assert sum(len(share) for share in shares) == len(whole)

    def argv(shard: int) -> list[str]:
        return [
            str(SIGNGATE), "rotate", "--old-key", str(world.key("old.pub")),
            "--new-key", str(world.key("new.key")), "--policy", str(world.policy(prefix)),
            "--journal", str(world.home / f"{prefix}-{shard}.journal"),
            "--propagation-delay", "0", "--shard", f"{shard}/{SHARDS}", target,
        ]

    # The last shard first, told not to wait: it re-signs its share and stops before retiring
    # OLD, since the other shards' images carry OLD's signatures alone.
    first = subprocess.run(
        [*argv(2), "--shard-wait", "0"], env=world.env, capture_output=True, text=True,
        check=False,
    )
    assert first.returncode == 1, first.stderr
    stopped = json.loads(first.stdout)
    assert not stopped["finished"]
    assert stopped["resigned"] == stopped["work_items"] > 0
    assert {r.rsplit("/", 1)[1] for r in stopped["waiting_for_shards"]} == (
        repositories[0] | repositories[1]
    )
    assert "other shards" in first.stderr
    assert str(world.key("old.pub")) in world.policy_keys(prefix)
    check_every_signed_image_verifies(world, prefix)
    # A journal belongs to its shard.
    refused = subprocess.run(
        [*argv(2)[:-2], "1/3", target], env=world.env, capture_output=True, text=True,
        check=False,
    )
    assert refused.returncode == 2
    assert "belongs to another rotation (--shard was 2/3)" in refused.stderr

    # The other two at once, as the workers of an Indexed Job: each waits for the other.
    workers = [
        subprocess.Popen(argv(shard), env=world.env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for shard in (0, 1)
    ]
    while any(worker.poll() is None for worker in workers):
        check_every_signed_image_verifies(world, prefix)
    for worker in workers:
        stdout, stderr = worker.communicate()
        assert worker.returncode == 0, stderr
        assert stderr == ""  # not a terminal: no progress bars
        assert json.loads(stdout)["finished"]
    check_every_signed_image_verifies(world, prefix)
    # The first shard, run again, finds the others done and finishes.
    again = subprocess.run(argv(2), env=world.env, capture_output=True, text=True, check=True)
    report = json.loads(again.stdout)
    assert report["finished"]
    assert report["shard"] == "2/3"
    assert report["resigned"] == 0
    assert report["skipped"] == stopped["work_items"]
    check_every_signed_image_verifies(world, prefix)

    assert world.policy_keys(prefix) == (str(world.key("new.pub")), str(world.key("third.pub")))
    assert one_run.status == 0
    assert end_state(world, prefix) == end_state(world, one_run.prefix)
