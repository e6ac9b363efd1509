"""Bundle signatures in a registry: found as OCI referrers, written beside the image (I/O).

Discovery goes through :meth:`RegistryClient.referrers` (the referrers API, or the fallback
index at tag ``sha256-HEX`` on registries without it, such as distribution 2.8).
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Mapping
from dataclasses import dataclass

from signgate.digests import compute_digest
from signgate.errors import NotFound, RegistryError
from signgate.keys.model import Signer
from signgate.reference import Repository, signature_tag
from signgate.registry import Manifest, RegistryClient
from signgate.registry.mediatypes import OCI_INDEX, OCI_MANIFEST
from signgate.signatures.bundle import (
    BUNDLE_MEDIA_TYPE,
    BUNDLE_MEDIA_TYPES,
    EMPTY_CONFIG,
    EMPTY_MEDIA_TYPE,
    IN_TOTO_PAYLOAD_TYPE,
    Descriptor,
    build_bundle,
    build_statement,
    bundle_manifest,
    check_bundle,
    index_with,
    pae,
    parse_descriptor,
)

MAX_BUNDLE_BYTES = 1 << 20  # bundles are about a kilobyte; refuse anything huge
# A concurrent signer can replace the fallback index between our read and our write; we read
# back and add our entry again, a bounded number of times.
_INDEX_WRITE_ATTEMPTS = 5


@dataclass(frozen=True)
class BundleArtifact:
    """One referring bundle manifest: its bundle's bytes, or why it could not be read."""

    manifest_digest: str
    bundle_digest: str = ""
    bundle: bytes = b""
    problem: str | None = None


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
        )
    try:
        document = manifest.json()
    except ValueError:
        return BundleArtifact(entry.digest, problem=f"not a signature: {entry.digest} is not JSON")
    if document.get("artifactType") not in BUNDLE_MEDIA_TYPES:
        return None  # another kind of referrer (an SBOM, an attestation)
    subject = parse_descriptor(document.get("subject"))
    if subject is None or subject.digest != digest:
        return BundleArtifact(
            entry.digest,
            problem=f"digest claim mismatch: referrer {entry.digest} has another subject",
        )
    layers = document.get("layers")
    layer = parse_descriptor(layers[0]) if isinstance(layers, list) and len(layers) == 1 else None
    if layer is None or layer.media_type not in BUNDLE_MEDIA_TYPES:
        return BundleArtifact(
            entry.digest, problem=f"not a signature: {entry.digest} holds no single bundle layer"
        )
    if layer.size > MAX_BUNDLE_BYTES:
        return BundleArtifact(
            entry.digest, problem=f"not a signature: bundle {layer.digest} is too large"
        )
    bundle = await client.get_blob(repository, layer.digest, max_bytes=MAX_BUNDLE_BYTES)
    return BundleArtifact(entry.digest, layer.digest, bundle)


def _now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def write_bundle(
    client: RegistryClient, repository: Repository, subject: Manifest, bundle: bytes
) -> str:
    """Push ``bundle`` as a manifest referring to ``subject``; on registries without the
    referrers API, add it to the fallback index (read, add, write, read back). Its digest."""
    await client.push_blob(repository, EMPTY_CONFIG)
    await client.push_blob(repository, bundle)
    raw = bundle_manifest(
        bundle, Descriptor(subject.media_type, subject.digest, len(subject.raw)), _now_rfc3339()
    )
    digest = await client.put_manifest(repository, compute_digest(raw), raw, OCI_MANIFEST)
    entry = Descriptor(OCI_MANIFEST, digest, len(raw), artifact_type=BUNDLE_MEDIA_TYPE)
    tag = signature_tag(subject.digest, "")
    for attempt in range(_INDEX_WRITE_ATTEMPTS + 1):
        referrers = await client.referrers(repository, subject.digest)
        if any(d.get("digest") == digest for d in referrers.descriptors):
            return digest
        if referrers.api:
            raise RegistryError(
                f"{repository}: the registry does not list the bundle {digest} as a referrer"
            )
        if attempt == _INDEX_WRITE_ATTEMPTS:
            break
        index = referrers.index.json() if referrers.index is not None else None
        await client.put_manifest(repository, tag, index_with(index, entry), OCI_INDEX)
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
