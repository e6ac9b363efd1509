"""Inventory of a registry: every digest, its tags, and which keys signed it, in which format.

Walks the catalog, each repository's tags, the children of multi-platform indexes, every
classic signature tag (``sha256-HEX.sig``) and every fallback index of cosign 3's bundles
(``sha256-HEX``), so that digests no tag points to any more are found too: an image deployed by
digest must stay verifiable through a rotation. On a registry with the referrers API, bundles
are looked up for every digest found; a digest that nothing but the referrers API knows (no tag,
no ``.sig``, no fallback index) cannot be found, since no endpoint lists it.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from signgate.errors import Denied, NotFound, RegistryError, Unauthorized, UsageError
from signgate.keys.model import PublicKey
from signgate.reference import Repository
from signgate.registry import INDEX_MEDIA_TYPES, RegistryClient
from signgate.rotation.settings import Shard
from signgate.signatures.bundle import check_bundle
from signgate.signatures.formats import SignatureFormat
from signgate.signatures.referrers import read_bundles
from signgate.signatures.store import fetch_payload, read_signature_image, signature_repository
from signgate.signatures.verify import check_signature, predictable_payloads

_SIGNATURE_TAG = re.compile(r"^sha256-([0-9a-f]{64})\.sig$")
# cosign 3's referrers fallback index: it names the digest its bundles refer to.
_FALLBACK_INDEX_TAG = re.compile(r"^sha256-([0-9a-f]{64})$")
# Other cosign artifacts (attestations, SBOMs, the referrers fallback) are not images.
_ARTIFACT_TAG = re.compile(r"^sha256-[0-9a-f]{64}(\.[a-z]+)?$")
# A digest no image has: asking the registry for its referrers says whether it has the API.
_PROBE_DIGEST = "sha256:" + "0" * 64

INVENTORY = "inventory"
Progress = Callable[[str, int, int], None]
"""Told (phase, done, total) as work advances: the CLI draws a progress bar on a terminal."""


def no_progress(phase: str, done: int, total: int) -> None:
    return None


@dataclass(frozen=True)
class SignatureEntry:
    """One signature: the id of the known key that verifies it (None: unknown key), the
    annotations it signed (a classic payload's ``optional``, a bundle statement's subject
    annotations), and its format."""

    key_id: str | None
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    format: SignatureFormat = SignatureFormat.CLASSIC


@dataclass(frozen=True)
class DigestEntry:
    """One digest of one repository: its tags, its parent index (if a child), its signatures."""

    repository: Repository
    digest: str
    tags: tuple[str, ...] = ()
    parents: tuple[str, ...] = ()
    signatures: tuple[SignatureEntry, ...] = ()

    @property
    def signed(self) -> bool:
        return bool(self.signatures)

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.key_id for s in self.signatures if s.key_id is not None))

    @property
    def unknown_signatures(self) -> int:
        return sum(1 for s in self.signatures if s.key_id is None)

    def formats(self) -> dict[str | None, tuple[SignatureFormat, ...]]:
        """Per key id (None: the unknown keys), the formats of its signatures, classic first."""
        found: dict[str | None, set[SignatureFormat]] = {}
        for signature in self.signatures:
            found.setdefault(signature.key_id, set()).add(signature.format)
        return {
            key_id: tuple(f for f in SignatureFormat if f in formats)
            for key_id, formats in found.items()
        }


@dataclass(frozen=True)
class Inventory:
    registry: str
    entries: tuple[DigestEntry, ...]
    key_names: Mapping[str, str] = field(default_factory=dict, hash=False)


def split_target(target: str) -> tuple[str, str]:
    """``REGISTRY[/PREFIX]`` into the registry host and the repository prefix (may be empty)."""
    registry, _, prefix = target.strip().rstrip("/").partition("/")
    if not registry:
        raise UsageError(f"{target!r}: want REGISTRY[/PREFIX]")
    return registry.lower(), prefix


def select_repositories(
    names: Sequence[str], prefix: str, globs: Sequence[str]
) -> list[str]:
    """The catalog names under ``prefix`` that match one of ``globs`` (all when none), sorted."""
    chosen = []
    for name in names:
        if prefix and name != prefix and not name.startswith(prefix + "/"):
            continue
        if globs and not any(fnmatch.fnmatchcase(name, glob) for glob in globs):
            continue
        chosen.append(name)
    return sorted(set(chosen))


async def list_repositories(
    client: RegistryClient, registry: str, prefix: str, globs: Sequence[str]
) -> list[str]:
    """The repositories to walk: from the catalog, or the names given when it has none."""
    try:
        names = await client.catalog(registry)
    except (NotFound, Unauthorized, Denied) as e:
        literal = [g for g in globs if not any(c in g for c in "*?[")]
        if not globs:
            raise UsageError(
                f"registry {registry} does not list its repositories ({e.diagnostics()}); "
                "name them with --repositories"
            ) from e
        if len(literal) != len(globs):
            raise UsageError(
                f"registry {registry} does not list its repositories, so --repositories "
                "must name them without globs"
            ) from e
        return sorted(set(literal))
    return select_repositories(names, prefix, globs)


@dataclass
class _RepositoryDigests:
    """What a repository's tags show: tagged digests, index children, the digests named by
    classic signature tags (``signed``) and by fallback indexes of bundles (``referred``)."""

    repository: Repository
    tagged: dict[str, list[str]] = field(default_factory=dict)
    parents: dict[str, list[str]] = field(default_factory=dict)
    signed: set[str] = field(default_factory=set)
    referred: set[str] = field(default_factory=set)

    @property
    def images(self) -> set[str]:
        return set(self.tagged) | set(self.parents)


def _signature_tags(tags: Sequence[str]) -> tuple[set[str], set[str]]:
    """The digests named by ``sha256-HEX.sig`` tags and by ``sha256-HEX`` fallback indexes."""
    signed, referred = set(), set()
    for tag in tags:
        if match := _SIGNATURE_TAG.match(tag):
            signed.add(f"sha256:{match.group(1)}")
        elif match := _FALLBACK_INDEX_TAG.match(tag):
            referred.add(f"sha256:{match.group(1)}")
    return signed, referred


async def _read_tags(
    client: RegistryClient, repository: Repository, limit: asyncio.Semaphore
) -> _RepositoryDigests:
    async with limit:
        tags = await client.list_tags(repository)
    found = _RepositoryDigests(repository)
    found.signed, found.referred = _signature_tags(tags)
    image_tags = [tag for tag in tags if not _ARTIFACT_TAG.match(tag)]

    async def resolve(tag: str) -> None:
        async with limit:
            try:
                manifest = await client.get_manifest(repository, tag)
            except NotFound:
                return  # deleted while we walked
        found.tagged.setdefault(manifest.digest, []).append(tag)
        if manifest.media_type in INDEX_MEDIA_TYPES:
            for child in manifest.json().get("manifests", []):
                if isinstance(child, dict) and isinstance(child.get("digest"), str):
                    found.parents.setdefault(child["digest"], []).append(manifest.digest)

    await asyncio.gather(*(resolve(tag) for tag in image_tags))
    return found


async def _entries(
    client: RegistryClient,
    found: _RepositoryDigests,
    signature_repo: Repository,
    keys: Sequence[PublicKey],
    limit: asyncio.Semaphore,
    referrers_api: bool,
) -> list[DigestEntry]:
    """One entry per digest of the repository, its signatures read from ``signature_repo``:
    classic ones where a ``.sig`` tag names the digest, bundles where a fallback index does
    (or for every digest, when the registry lists referrers through its API)."""

    async def one(digest: str) -> DigestEntry:
        signatures: tuple[SignatureEntry, ...] = ()
        if digest in found.signed:
            async with limit:
                signatures = await _signatures(
                    client, found.repository, signature_repo, digest, keys
                )
        if referrers_api or digest in found.referred:
            async with limit:
                signatures += await _bundle_signatures(client, signature_repo, digest, keys)
        return DigestEntry(
            found.repository,
            digest,
            tuple(sorted(found.tagged.get(digest, []))),
            tuple(sorted(set(found.parents.get(digest, [])))),
            signatures,
        )

    digests = sorted(found.images | found.signed | found.referred)
    return list(await asyncio.gather(*(one(d) for d in digests)))


async def inventory_repository(
    client: RegistryClient,
    repository: Repository,
    keys: Sequence[PublicKey],
    limit: asyncio.Semaphore,
    referrers_api: bool = False,
) -> list[DigestEntry]:
    """Every digest of one repository with its tags and signatures, the signatures beside it
    (its ``sha256-HEX.sig`` tags and ``sha256-HEX`` fallback indexes name the digests no tag
    points to any more)."""
    found = await _read_tags(client, repository, limit)
    return await _entries(client, found, repository, keys, limit, referrers_api)


async def has_referrers_api(client: RegistryClient, repository: Repository) -> bool:
    """Whether the registry lists referrers through the OCI 1.1 API (then bundles need no
    fallback index, and every digest is asked for its bundles)."""
    try:
        return (await client.referrers(repository, _PROBE_DIGEST)).api
    except (Unauthorized, Denied):
        raise
    except RegistryError:
        # A registry that answers the API's path with an error has no usable API: its bundles,
        # if any, are listed in fallback indexes, which the tags show.
        return False


async def _signatures(
    client: RegistryClient,
    repository: Repository,
    signature_repo: Repository,
    digest: str,
    keys: Sequence[PublicKey],
) -> tuple[SignatureEntry, ...]:
    image = await read_signature_image(client, signature_repo, digest)
    if image is None:
        return ()
    known = predictable_payloads(repository, digest, {})
    found = []
    for layer in image.layers:
        if layer.signature() is None:
            continue
        payload = known.get(layer.digest)
        if payload is None:
            payload = await fetch_payload(client, signature_repo, layer)
        check = check_signature(layer, payload, keys, digest, {})
        annotations: dict[str, str] = {}
        if check.payload is not None:
            annotations = {str(k): str(v) for k, v in check.payload.annotations.items()}
        key_id = check.key.key_id if check.verified and check.key is not None else None
        found.append(SignatureEntry(key_id, annotations))
    return tuple(found)


async def _bundle_signatures(
    client: RegistryClient, signature_repo: Repository, digest: str, keys: Sequence[PublicKey]
) -> tuple[SignatureEntry, ...]:
    """The bundle signatures referring to ``digest``: attestations (another predicate type) and
    index entries whose manifest is gone are not signatures; a bundle no given key verifies
    (for this digest, as a cosign signature) counts as another key's."""
    bundles = await read_bundles(client, signature_repo, digest)
    found = []
    for artifact in bundles.artifacts:
        if not artifact.is_signature or artifact.manifest_missing:
            continue
        key_id: str | None = None
        annotations: dict[str, str] = {}
        if artifact.problem is None:
            check = check_bundle(artifact.bundle_digest, artifact.bundle, keys, digest, {})
            if check.statement is not None:
                annotations = {str(k): str(v) for k, v in check.statement.annotations.items()}
            if check.verified and check.key is not None:
                key_id = check.key.key_id
        found.append(SignatureEntry(key_id, annotations, SignatureFormat.BUNDLE))
    return tuple(found)


def shared_signature_repository(registry: str) -> Repository | None:
    """The repository that holds every image's signatures when ``COSIGN_REPOSITORY`` is set
    (as sign and verify use it); None when signatures live beside each image."""
    probe = Repository(registry, "")
    found = signature_repository(probe)
    return None if found == probe else found


async def _shared_inventory(
    client: RegistryClient,
    repositories: Sequence[Repository],
    signature_repo: Repository,
    keys: Sequence[PublicKey],
    limit: asyncio.Semaphore,
    progress: Progress,
    referrers_api: bool,
) -> list[DigestEntry]:
    """The inventory when one repository holds all signatures: its signature tags do not say
    which repository an image is in, so a signed digest no tag points to is looked for in
    each repository."""
    try:
        async with limit:
            tags = await client.list_tags(signature_repo)
    except NotFound:
        tags = []
    signed, referred = _signature_tags(tags)
    walked = await asyncio.gather(*(_read_tags(client, r, limit) for r in repositories))
    orphans = (signed | referred) - set().union(*(found.images for found in walked))

    async def look_for(found: _RepositoryDigests, digest: str) -> None:
        async with limit:
            if await client.head_manifest(found.repository, digest) is not None:
                found.tagged.setdefault(digest, [])

    await asyncio.gather(*(look_for(found, d) for found in walked for d in sorted(orphans)))
    done = 0

    async def entries(found: _RepositoryDigests) -> list[DigestEntry]:
        nonlocal done
        found.signed = found.images & signed
        found.referred = found.images & referred
        result = await _entries(client, found, signature_repo, keys, limit, referrers_api)
        done += 1
        progress(INVENTORY, done, len(repositories))
        return result

    per_repository = await asyncio.gather(*(entries(found) for found in walked))
    return [entry for group in per_repository for entry in group]


async def build_inventory(
    client: RegistryClient,
    target: str,
    keys: Sequence[PublicKey] = (),
    key_names: Mapping[str, str] | None = None,
    repositories: Sequence[str] = (),
    concurrency: int = 8,
    *,
    shard: Shard | None = None,
    progress: Progress | None = None,
) -> Inventory:
    """Walk ``REGISTRY[/PREFIX]`` (with ``shard``, only that shard's repositories) with at most
    ``concurrency`` requests in flight."""
    if concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    report = progress or no_progress
    registry, prefix = split_target(target)
    names = await list_repositories(client, registry, prefix, repositories)
    if shard is not None:
        names = [name for name in names if shard.holds(name)]
    signature_repo = shared_signature_repository(registry)
    if signature_repo is not None:
        # It holds signatures of other repositories' images, not images of its own.
        names = [n for n in names if Repository(registry, n) != signature_repo]
    limit = asyncio.Semaphore(concurrency)
    report(INVENTORY, 0, len(names))
    chosen = [Repository(registry, n) for n in names]
    if not chosen:
        return Inventory(registry, (), dict(key_names or {}))
    referrers_api = await has_referrers_api(client, signature_repo or chosen[0])
    if signature_repo is not None:
        shared = await _shared_inventory(
            client, chosen, signature_repo, keys, limit, report, referrers_api
        )
        return Inventory(registry, tuple(shared), dict(key_names or {}))
    done = 0

    async def walk(repository: Repository) -> list[DigestEntry]:
        nonlocal done
        result = await inventory_repository(client, repository, keys, limit, referrers_api)
        done += 1
        report(INVENTORY, done, len(chosen))
        return result

    per_repository = await asyncio.gather(*(walk(r) for r in chosen))
    entries = tuple(entry for group in per_repository for entry in group)
    return Inventory(registry, entries, dict(key_names or {}))
