"""What hangs off an image (signatures, attestations, SBOMs): where, what, and removing it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from signgate.errors import NotFound
from signgate.keys.model import PublicKey
from signgate.reference import ImageReference, Repository, signature_tag
from signgate.registry import RegistryClient
from signgate.signatures.bundle import BUNDLE_MEDIA_TYPE, check_bundle
from signgate.signatures.formats import SignatureFormat
from signgate.signatures.layout import SignatureLayer, parse_layers
from signgate.signatures.referrers import BundleArtifact, read_bundles, remove_bundles
from signgate.signatures.store import (
    fetch_payload,
    read_signature_image,
    signature_repository,
    write_signature_image,
)
from signgate.signatures.verify import resolve_digest

AttachmentType = Literal["signature", "attestation", "sbom"]
ATTACHMENT_SUFFIXES: dict[AttachmentType, str] = {
    "signature": "sig",
    "attestation": "att",
    "sbom": "sbom",
}


def attachment_location(
    reference: ImageReference, digest: str, kind: AttachmentType = "signature"
) -> ImageReference:
    """Where cosign keeps ``kind`` for ``digest`` (honouring COSIGN_REPOSITORY)."""
    repository = signature_repository(reference.repository)
    return ImageReference(repository, tag=signature_tag(digest, ATTACHMENT_SUFFIXES[kind]))


# Attachment kinds that cosign 3 also stores as Sigstore bundles (told apart by predicate type).
BUNDLE_KINDS: tuple[AttachmentType, ...] = ("signature", "attestation")


@dataclass(frozen=True)
class AttachedLayer:
    """A layer of an attachment image, or a bundle's referring manifest (its digest), with the
    key id that verifies it when one matched."""

    layer: SignatureLayer
    key_id: str | None = None


@dataclass(frozen=True)
class Attachment:
    """The attachments of one kind in one format; ``location`` is the classic image's tag, or
    where the bundles are listed (the fallback index's tag, or the referrers API)."""

    kind: AttachmentType
    location: str
    layers: tuple[AttachedLayer, ...]
    format: SignatureFormat = SignatureFormat.CLASSIC


def _bundle_kind(artifact: BundleArtifact) -> AttachmentType:
    return "signature" if artifact.is_signature else "attestation"


def _bundle_key(
    artifact: BundleArtifact, keys: Sequence[PublicKey], digest: str
) -> PublicKey | None:
    """The key whose signature the bundle carries (whatever its statement claims), as a classic
    signature is matched to a key by its signature alone."""
    if artifact.problem is not None or not keys:
        return None
    return check_bundle(artifact.bundle_digest, artifact.bundle, keys, digest, {}).key


async def attachment_tree(
    client: RegistryClient,
    reference: ImageReference,
    keys: Sequence[PublicKey] = (),
) -> tuple[str, list[Attachment]]:
    """The image's digest and every attachment that exists for it, classic and bundle."""
    digest = await resolve_digest(client, reference)

    async def one(kind: AttachmentType) -> Attachment | None:
        location = attachment_location(reference, digest, kind)
        try:
            manifest = await client.get_manifest(location.repository, location.identifier)
        except NotFound:
            return None
        layers = []
        for layer in parse_layers(manifest.json()):
            key_id = None
            signature = layer.signature()
            if kind == "signature" and keys and signature is not None:
                payload = await fetch_payload(client, location.repository, layer)
                key_id = next((k.key_id for k in keys if k.verify(signature, payload)), None)
            layers.append(AttachedLayer(layer, key_id))
        return Attachment(kind, str(location), tuple(layers))

    repository = signature_repository(reference.repository)
    classic, bundles = await asyncio.gather(
        asyncio.gather(*(one(kind) for kind in ATTACHMENT_SUFFIXES)),
        read_bundles(client, repository, digest),
    )
    found: list[Attachment] = []
    for kind, attachment in zip(ATTACHMENT_SUFFIXES, classic, strict=True):
        if attachment is not None:
            found.append(attachment)
        of_kind = [a for a in bundles.artifacts if _bundle_kind(a) == kind]
        if of_kind:
            layers = tuple(
                AttachedLayer(
                    SignatureLayer(BUNDLE_MEDIA_TYPE, a.manifest_digest, len(a.bundle)),
                    key.key_id if (key := _bundle_key(a, keys, digest)) is not None else None,
                )
                for a in of_kind
            )
            found.append(Attachment(kind, bundles.location, layers, SignatureFormat.BUNDLE))
    return digest, found


@dataclass(frozen=True)
class CleanOutcome:
    """What clean did to one kind of attachment in one format: ``removed`` signatures (-1: the
    whole classic image, uncounted) and the ``kept`` ones, at ``location``."""

    location: str
    removed: int
    kept: int
    deleted_image: bool
    format: SignatureFormat = SignatureFormat.CLASSIC
    kind: AttachmentType = "signature"


async def clean(
    client: RegistryClient,
    reference: ImageReference,
    kinds: Sequence[AttachmentType],
    key: PublicKey | None = None,
) -> list[CleanOutcome]:
    """Remove attachments in both formats; with ``key``, only the signatures made with it."""
    digest = await resolve_digest(client, reference)
    outcomes = []
    for kind in kinds:
        location = attachment_location(reference, digest, kind)
        if key is not None and kind == "signature":
            outcome = await _remove_signatures_by_key(client, location.repository, digest, key)
        else:
            outcome = await _delete_attachment(client, location, kind)
        if outcome is not None:
            outcomes.append(outcome)
    bundle_kinds = [kind for kind in kinds if kind in BUNDLE_KINDS]
    if bundle_kinds:
        outcomes.extend(await _remove_bundles(client, reference, digest, bundle_kinds, key))
    return outcomes


async def _delete_attachment(
    client: RegistryClient, location: ImageReference, kind: AttachmentType
) -> CleanOutcome | None:
    manifest_digest = await client.head_manifest(location.repository, location.identifier)
    if manifest_digest is None:
        return None
    await client.delete_manifest(location.repository, manifest_digest)
    return CleanOutcome(str(location), removed=-1, kept=0, deleted_image=True, kind=kind)


async def _remove_signatures_by_key(
    client: RegistryClient, repository: Repository, digest: str, key: PublicKey
) -> CleanOutcome | None:
    image = await read_signature_image(client, repository, digest)
    if image is None:
        return None
    location = image.location
    kept: list[SignatureLayer] = []
    for layer in image.layers:
        signature = layer.signature()
        if signature is not None:
            payload = await fetch_payload(client, repository, layer)
            if key.verify(signature, payload):
                continue
        kept.append(layer)
    removed = len(image.layers) - len(kept)
    if removed == 0:
        return CleanOutcome(location, 0, len(kept), deleted_image=False)
    if not kept:
        await client.delete_manifest(repository, image.manifest.digest)
        return CleanOutcome(location, removed, 0, deleted_image=True)
    await write_signature_image(client, repository, digest, kept, {})
    return CleanOutcome(location, removed, len(kept), deleted_image=False)


async def _remove_bundles(
    client: RegistryClient,
    reference: ImageReference,
    digest: str,
    kinds: Sequence[AttachmentType],
    key: PublicKey | None,
) -> list[CleanOutcome]:
    """Remove the bundles of ``kinds`` referring to the image (signatures: only ``key``'s when
    given); one outcome per kind that has bundles."""
    repository = signature_repository(reference.repository)
    bundles = await read_bundles(client, repository, digest)
    outcomes = []
    removed: list[str] = []
    for kind in kinds:
        of_kind = [a for a in bundles.artifacts if _bundle_kind(a) == kind]
        if not of_kind:
            continue
        chosen, dangling = of_kind, []
        if key is not None and kind == "signature":
            chosen = [a for a in of_kind if _bundle_key(a, [key], digest) is not None]
            # Entries whose manifest is gone go too: distribution refuses to store an index
            # that names a missing manifest, so the index could not be rewritten with them.
            dangling = [a for a in of_kind if a.manifest_missing]
        removed.extend(a.manifest_digest for a in (*chosen, *dangling))
        outcomes.append(
            CleanOutcome(
                bundles.location, len(chosen), len(of_kind) - len(chosen) - len(dangling),
                deleted_image=False, format=SignatureFormat.BUNDLE, kind=kind,
            )
        )
    await remove_bundles(client, repository, digest, removed)
    return outcomes
