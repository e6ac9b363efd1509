"""Bundle signatures in a registry: found as OCI referrers, written beside the image (I/O).

Discovery goes through :meth:`RegistryClient.referrers` (the referrers API, or the fallback
index at tag ``sha256-HEX`` on registries without it, such as distribution 2.8).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import weakref
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from signgate.digests import compute_digest
from signgate.errors import NotFound, RegistryError
from signgate.keys.model import Signer
from signgate.reference import Repository, signature_tag
from signgate.registry import Manifest, RegistryClient
from signgate.registry.client import Referrers
from signgate.registry.mediatypes import OCI_INDEX, OCI_MANIFEST
from signgate.signatures.bundle import (
    BUNDLE_MEDIA_TYPE,
    BUNDLE_MEDIA_TYPES,
    BUNDLE_PREDICATE_TYPE_ANNOTATION,
    COSIGN_SIGN_PREDICATE_TYPE,
    EMPTY_CONFIG,
    EMPTY_MEDIA_TYPE,
    IN_TOTO_PAYLOAD_TYPE,
    Descriptor,
    build_bundle,
    build_statement,
    bundle_manifest,
    check_bundle,
    index_with,
    index_without,
    pae,
    parse_descriptor,
)

MAX_BUNDLE_BYTES = 1 << 20  # bundles are about a kilobyte; refuse anything huge
# A concurrent signer or cleaner can replace the fallback index between our read and our write;
# we read back and merge again, a bounded number of times.
_INDEX_WRITE_ATTEMPTS = 5
# How long after our write we read the index back. A writer that read the index before our write
# lands its (stale) version within its own read-to-write gap, a few milliseconds, more on a busy
# machine: reading back only after that finds our entry dropped, and we write it again.
INDEX_SETTLE_SECONDS = 0.2


@dataclass
class _IndexLock:
    lock: asyncio.Lock
    users: int = 0


# Updates of one fallback index by coroutines sharing a client (a `signgate sign` of many
# images, a rotation) take turns: between processes only the read-back protects an entry, and
# coroutines of one busy event loop interleave far more tightly than processes do. Keyed by
# client, which is bound to one event loop; an index's lock lives while someone holds it.
_INDEX_LOCKS: weakref.WeakKeyDictionary[RegistryClient, dict[str, _IndexLock]] = (
    weakref.WeakKeyDictionary()
)


@contextlib.asynccontextmanager
async def _index_turn(client: RegistryClient, index: str) -> AsyncIterator[None]:
    locks = _INDEX_LOCKS.setdefault(client, {})
    held = locks.setdefault(index, _IndexLock(asyncio.Lock()))
    held.users += 1
    try:
        async with held.lock:
            yield
    finally:
        held.users -= 1
        if held.users == 0:
            del locks[index]


@dataclass(frozen=True)
class BundleArtifact:
    """One referring bundle manifest: its bundle's bytes, or why it could not be read."""

    manifest_digest: str
    bundle_digest: str = ""
    bundle: bytes = b""
    problem: str | None = None
    # The manifest's dev.sigstore.bundle.predicateType (None when it has none or is missing).
    predicate_type: str | None = None
    manifest_missing: bool = False  # listed in the fallback index, but not in the registry

    @property
    def is_signature(self) -> bool:
        """True for a signature (cosign's ``sign/v1`` predicate), False for an attestation."""
        return self.predicate_type in (None, COSIGN_SIGN_PREDICATE_TYPE)


@dataclass(frozen=True)
class BundleReferrers:
    artifacts: tuple[BundleArtifact, ...]
    location: str  # where they were listed, for messages


def _candidate(entry: Descriptor, api: bool) -> bool:
    if entry.artifact_type in BUNDLE_MEDIA_TYPES:
        return True
    # cosign 3 (go-containerregistry) lists its bundles in the fallback index with the config's
    # media type as artifactType (application/vnd.oci.empty.v1+json): the manifest says the rest.
    return not api and entry.artifact_type in (EMPTY_MEDIA_TYPE, None)


async def read_bundles(
    client: RegistryClient, repository: Repository, digest: str
) -> BundleReferrers:
    """The bundle signatures referring to ``repository@digest`` (empty when there are none)."""
    referrers = await client.referrers(repository, digest)
    location = (
        f"{repository} referrers API" if referrers.api
        else f"{repository}:{signature_tag(digest, '')}"
    )
    artifacts = []
    for raw_entry in referrers.descriptors:
        entry = parse_descriptor(raw_entry)
        if entry is None or not _candidate(entry, referrers.api):
            continue
        artifact = await _read_bundle(client, repository, digest, entry, location)
        if artifact is not None:
            artifacts.append(artifact)
    return BundleReferrers(tuple(artifacts), location)


async def _read_bundle(
    client: RegistryClient, repository: Repository, digest: str, entry: Descriptor,
    location: str,
) -> BundleArtifact | None:
    try:
        manifest = await client.get_manifest(repository, entry.digest)
    except NotFound:
        return BundleArtifact(
            entry.digest,
            problem=f"not a signature: referrer manifest {entry.digest} listed in {location} "
            "is missing",
            manifest_missing=True,
        )
    try:
        document = manifest.json()
    except ValueError:
        return BundleArtifact(entry.digest, problem=f"not a signature: {entry.digest} is not JSON")
    if document.get("artifactType") not in BUNDLE_MEDIA_TYPES:
        return None  # another kind of referrer (an SBOM, an attestation)
    annotations = document.get("annotations")
    predicate = (
        annotations.get(BUNDLE_PREDICATE_TYPE_ANNOTATION) if isinstance(annotations, dict) else None
    )
    predicate_type = predicate if isinstance(predicate, str) else None
    subject = parse_descriptor(document.get("subject"))
    if subject is None or subject.digest != digest:
        return BundleArtifact(
            entry.digest,
            problem=f"digest claim mismatch: referrer {entry.digest} has another subject",
            predicate_type=predicate_type,
        )
    layers = document.get("layers")
    layer = parse_descriptor(layers[0]) if isinstance(layers, list) and len(layers) == 1 else None
    if layer is None or layer.media_type not in BUNDLE_MEDIA_TYPES:
        return BundleArtifact(
            entry.digest, problem=f"not a signature: {entry.digest} holds no single bundle layer",
            predicate_type=predicate_type,
        )
    if layer.size > MAX_BUNDLE_BYTES:
        return BundleArtifact(
            entry.digest, problem=f"not a signature: bundle {layer.digest} is too large",
            predicate_type=predicate_type,
        )
    bundle = await client.get_blob(repository, layer.digest, max_bytes=MAX_BUNDLE_BYTES)
    return BundleArtifact(entry.digest, layer.digest, bundle, predicate_type=predicate_type)


def _now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def write_bundle(
    client: RegistryClient, repository: Repository, subject: Manifest, bundle: bytes
) -> str:
    """Push ``bundle`` as a manifest referring to ``subject``; on registries without the
    referrers API, add it to the fallback index. Its digest."""
    await client.push_blob(repository, EMPTY_CONFIG)
    await client.push_blob(repository, bundle)
    raw = bundle_manifest(
        bundle, Descriptor(subject.media_type, subject.digest, len(subject.raw)), _now_rfc3339()
    )
    digest = await client.put_manifest(repository, compute_digest(raw), raw, OCI_MANIFEST)
    entry = Descriptor(OCI_MANIFEST, digest, len(raw), artifact_type=BUNDLE_MEDIA_TYPE)
    await _settle_fallback_index(
        client,
        repository,
        subject.digest,
        settled=lambda referrers: bool(_listed(referrers, {digest})),
        revise=lambda index: index_with(index, entry),
        unsettled_api=f"the registry does not list the bundle {digest} as a referrer",
    )
    return digest


async def remove_bundles(
    client: RegistryClient, repository: Repository, digest: str, manifest_digests: Collection[str]
) -> None:
    """Remove the bundle manifests ``manifest_digests`` referring to ``repository@digest``:
    first from the fallback index (deleted once it lists nothing), then the manifests."""
    removed = frozenset(manifest_digests)
    if not removed:
        return
    await _settle_fallback_index(
        client,
        repository,
        digest,
        # With the referrers API, the registry stops listing a manifest when it is deleted.
        settled=lambda referrers: referrers.api or not _listed(referrers, removed),
        revise=lambda index: index_without(index, removed) if index is not None else None,
        unsettled_api="",
    )
    for manifest_digest in sorted(removed):
        # NotFound: removed by someone else meanwhile, or listed but never pushed.
        with contextlib.suppress(NotFound):
            await client.delete_manifest(repository, manifest_digest)


def _listed(referrers: Referrers, digests: Collection[str]) -> set[str]:
    return {d["digest"] for d in referrers.descriptors if d.get("digest") in digests}


async def _settle_fallback_index(
    client: RegistryClient,
    repository: Repository,
    digest: str,
    settled: Callable[[Referrers], bool],
    revise: Callable[[Mapping[str, Any] | None], bytes | None],
    unsettled_api: str,
) -> None:
    """Bring the fallback index of ``digest`` to a state ``settled`` accepts: read it, write
    ``revise`` of what was read (None: delete it), read it back, and while it is not settled
    (a concurrent writer replaced it with a version built on an older read), revise what is
    there now and write again, a bounded number of times.

    Each writer reads back a moment after its own write (:data:`INDEX_SETTLE_SECONDS`), so an
    entry a concurrent writer dropped is written again by its owner. Registries offer no
    conditional tag write, so a writer stalled for longer than that between its read and its
    write can still drop an entry; cosign (go-containerregistry) writes the index once
    without reading it back.
    """
    tag = signature_tag(digest, "")
    async with _index_turn(client, f"{repository}:{tag}"):
        for attempt in range(_INDEX_WRITE_ATTEMPTS + 1):
            referrers = await client.referrers(repository, digest)
            if settled(referrers):
                return
            if referrers.api:
                raise RegistryError(f"{repository}: {unsettled_api}")
            if attempt == _INDEX_WRITE_ATTEMPTS:
                break
            index = referrers.index
            revised = revise(index.json() if index is not None else None)
            if revised is not None:
                await client.put_manifest(repository, tag, revised, OCI_INDEX)
            elif index is not None:
                # By digest: a version a concurrent writer put meanwhile keeps the tag.
                with contextlib.suppress(NotFound):
                    await client.delete_manifest(repository, index.digest)
            await asyncio.sleep(INDEX_SETTLE_SECONDS)
    raise RegistryError(
        f"{repository}:{tag} was overwritten by concurrent writers {_INDEX_WRITE_ATTEMPTS} "
        "times; try again"
    )


@dataclass(frozen=True)
class SignedBundle:
    """One digest signed in the bundle format (or found already signed by the key)."""

    digest: str
    manifest_digest: str
    location: str
    already_signed: bool


async def sign_digest_bundle(
    client: RegistryClient,
    signer: Signer,
    repository: Repository,
    digest: str,
    annotations: Mapping[str, str] | None = None,
    signature_repo: Repository | None = None,
) -> SignedBundle:
    """Sign ``repository@digest`` as cosign 3 does with a key and no transparency log; the
    bundle goes to ``signature_repo`` when given (``COSIGN_REPOSITORY``).

    A bundle by the same key over the same statement already there is not added twice
    (ECDSA signatures differ each time, so the bundle bytes cannot be compared).
    """
    subject = await client.get_manifest(repository, digest)
    repository = signature_repo or repository
    statement = build_statement(digest, annotations)
    public_key = signer.public_key()
    existing = await read_bundles(client, repository, digest)
    for artifact in existing.artifacts:
        if artifact.problem is not None:
            continue
        check = check_bundle(artifact.bundle_digest, artifact.bundle, [public_key], digest, {})
        if check.verified and check.statement_bytes == statement:
            return SignedBundle(digest, artifact.manifest_digest, existing.location, True)
    signature = await asyncio.to_thread(signer.sign, pae(IN_TOTO_PAYLOAD_TYPE, statement))
    bundle = build_bundle(statement, signature, public_key)
    manifest_digest = await write_bundle(client, repository, subject, bundle)
    return SignedBundle(digest, manifest_digest, existing.location, False)
