"""Inventory of a registry: every digest, its tags, and which keys signed it.

Walks the catalog, each repository's tags, the children of multi-platform indexes, and every
signature tag (``sha256-HEX.sig``), so that digests no tag points to any more are found too:
an image deployed by digest must stay verifiable through a rotation.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from signgate.errors import Denied, NotFound, Unauthorized, UsageError
from signgate.keys.model import PublicKey
from signgate.reference import Repository
from signgate.registry import INDEX_MEDIA_TYPES, RegistryClient
from signgate.signatures.store import fetch_payload, read_signature_image
from signgate.signatures.verify import check_signature, predictable_payloads

_SIGNATURE_TAG = re.compile(r"^sha256-([0-9a-f]{64})\.sig$")
# Other cosign artifacts (attestations, SBOMs, cosign 3's referrers fallback) are not images.
_ARTIFACT_TAG = re.compile(r"^sha256-[0-9a-f]{64}(\.[a-z]+)?$")


@dataclass(frozen=True)
class SignatureEntry:
    """One signature layer: the id of the known key that verifies it (None: unknown key) and
    the optional annotations of its payload."""

    key_id: str | None
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)


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


async def inventory_repository(
    client: RegistryClient,
    repository: Repository,
    keys: Sequence[PublicKey],
    limit: asyncio.Semaphore,
) -> list[DigestEntry]:
    """Every digest of one repository with its tags and signatures."""
    async with limit:
        tags = await client.list_tags(repository)
    tagged: dict[str, list[str]] = {}
    parents: dict[str, list[str]] = {}
    signature_digests: set[str] = set()
    image_tags = []
    for tag in tags:
        match = _SIGNATURE_TAG.match(tag)
        if match:
            signature_digests.add(f"sha256:{match.group(1)}")
        elif not _ARTIFACT_TAG.match(tag):
            image_tags.append(tag)

    async def resolve(tag: str) -> None:
        async with limit:
            try:
                manifest = await client.get_manifest(repository, tag)
            except NotFound:
                return  # deleted while we walked
        tagged.setdefault(manifest.digest, []).append(tag)
        if manifest.media_type in INDEX_MEDIA_TYPES:
            for child in manifest.json().get("manifests", []):
                if isinstance(child, dict) and isinstance(child.get("digest"), str):
                    parents.setdefault(child["digest"], []).append(manifest.digest)

    await asyncio.gather(*(resolve(tag) for tag in image_tags))
    digests = sorted(set(tagged) | set(parents) | signature_digests)

    async def one(digest: str) -> DigestEntry:
        signatures: tuple[SignatureEntry, ...] = ()
        if digest in signature_digests:
            async with limit:
                signatures = await _signatures(client, repository, digest, keys)
        return DigestEntry(
            repository,
            digest,
            tuple(sorted(tagged.get(digest, []))),
            tuple(sorted(set(parents.get(digest, [])))),
            signatures,
        )

    return list(await asyncio.gather(*(one(d) for d in digests)))


async def _signatures(
    client: RegistryClient, repository: Repository, digest: str, keys: Sequence[PublicKey]
) -> tuple[SignatureEntry, ...]:
    image = await read_signature_image(client, repository, digest)
    if image is None:
        return ()
    known = predictable_payloads(repository, digest, {})
    found = []
    for layer in image.layers:
        if layer.signature() is None:
            continue
        payload = known.get(layer.digest)
        if payload is None:
            payload = await fetch_payload(client, repository, layer)
        check = check_signature(layer, payload, keys, digest, {})
        annotations: dict[str, str] = {}
        if check.payload is not None:
            annotations = {str(k): str(v) for k, v in check.payload.annotations.items()}
        key_id = check.key.key_id if check.verified and check.key is not None else None
        found.append(SignatureEntry(key_id, annotations))
    return tuple(found)


async def build_inventory(
    client: RegistryClient,
    target: str,
    keys: Sequence[PublicKey] = (),
    key_names: Mapping[str, str] | None = None,
    repositories: Sequence[str] = (),
    concurrency: int = 8,
) -> Inventory:
    """Walk ``REGISTRY[/PREFIX]`` with at most ``concurrency`` requests in flight."""
    if concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    registry, prefix = split_target(target)
    names = await list_repositories(client, registry, prefix, repositories)
    limit = asyncio.Semaphore(concurrency)
    per_repository = await asyncio.gather(
        *(inventory_repository(client, Repository(registry, n), keys, limit) for n in names)
    )
    entries = tuple(entry for group in per_repository for entry in group)
    return Inventory(registry, entries, dict(key_names or {}))
