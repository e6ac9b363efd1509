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
from signgate.signatures.layout import SignatureLayer, parse_layers
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


@dataclass(frozen=True)
class AttachedLayer:
    """A layer of an attachment image, with the key id that verifies it when one matched."""

    layer: SignatureLayer
    key_id: str | None = None


@dataclass(frozen=True)
class Attachment:
    kind: AttachmentType
    location: ImageReference
    layers: tuple[AttachedLayer, ...]


async def attachment_tree(
    client: RegistryClient,
    reference: ImageReference,
    keys: Sequence[PublicKey] = (),
) -> tuple[str, list[Attachment]]:
    """The image's digest and every attachment that exists for it."""
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
        return Attachment(kind, location, tuple(layers))

    found = await asyncio.gather(*(one(kind) for kind in ATTACHMENT_SUFFIXES))
    return digest, [a for a in found if a is not None]


@dataclass(frozen=True)
class CleanOutcome:
    location: ImageReference
    removed: int
    kept: int
    deleted_image: bool


async def clean(
    client: RegistryClient,
    reference: ImageReference,
    kinds: Sequence[AttachmentType],
    key: PublicKey | None = None,
) -> list[CleanOutcome]:
    """Remove attachments; with ``key``, only the signatures that verify with it."""
    digest = await resolve_digest(client, reference)
    outcomes = []
    for kind in kinds:
        location = attachment_location(reference, digest, kind)
        if key is not None and kind == "signature":
            outcome = await _remove_signatures_by_key(client, location.repository, digest, key)
        else:
            outcome = await _delete_attachment(client, location)
        if outcome is not None:
            outcomes.append(outcome)
    return outcomes


async def _delete_attachment(
    client: RegistryClient, location: ImageReference
) -> CleanOutcome | None:
    manifest_digest = await client.head_manifest(location.repository, location.identifier)
    if manifest_digest is None:
        return None
    await client.delete_manifest(location.repository, manifest_digest)
    return CleanOutcome(location, removed=-1, kept=0, deleted_image=True)


async def _remove_signatures_by_key(
    client: RegistryClient, repository: Repository, digest: str, key: PublicKey
) -> CleanOutcome | None:
    image = await read_signature_image(client, repository, digest)
    if image is None:
        return None
    location = ImageReference(repository, tag=image.tag)
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
