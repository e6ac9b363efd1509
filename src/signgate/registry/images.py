"""Minimal single-layer images, built in memory and pushed: the demo images of the quickstart,
the benchmarks and the tests.

Building is pure and deterministic (the same content and platform always give the same
digest); pushing goes through :class:`~signgate.registry.client.RegistryClient`.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from signgate.digests import compute_digest
from signgate.errors import DigestMismatch, UsageError
from signgate.reference import Repository
from signgate.registry.client import RegistryClient
from signgate.registry.mediatypes import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
)

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

LAYER_FILE_NAME = "content"
"""The one file in an image's layer; it holds the ``content`` bytes."""

# manifest media type -> (config media type, layer media type)
_IMAGE_PARTS_MEDIA_TYPES = {
    OCI_MANIFEST: (OCI_CONFIG, OCI_LAYER_GZIP),
    DOCKER_MANIFEST: (DOCKER_CONFIG, DOCKER_LAYER_GZIP),
}
# index media type -> media type of its images (Docker lists hold Docker manifests only)
_INDEX_CHILD_MEDIA_TYPE = {
    OCI_INDEX: OCI_MANIFEST,
    DOCKER_MANIFEST_LIST: DOCKER_MANIFEST,
}


def _compact_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": compute_digest(data), "size": len(data)}


def _platform_object(platform: tuple[str, str]) -> dict[str, str]:
    """``("linux", "arm/v7")`` -> ``{"os": "linux", "architecture": "arm", "variant": "v7"}``."""
    os_name, arch = platform
    architecture, _, variant = arch.partition("/")
    if not os_name or not architecture:
        raise UsageError(f"platform {os_name}/{arch} needs an OS and an architecture")
    value = {"os": os_name, "architecture": architecture}
    if variant:
        value["variant"] = variant
    return value


def layer_tar(content: bytes) -> bytes:
    """An uncompressed tar with one file, :data:`LAYER_FILE_NAME`, holding ``content``.

    Fixed owner, mode and mtime, so the bytes depend on ``content`` alone.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(LAYER_FILE_NAME)
        info.size = len(content)
        info.mode = 0o644
        info.mtime = 0
        tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@dataclass(frozen=True)
class ImageBlobs:
    """Everything one image is made of, as pushed: layer, config and manifest bytes."""

    layer: bytes
    config: bytes
    manifest: bytes
    media_type: str
    platform: dict[str, str]

    @property
    def digest(self) -> str:
        return compute_digest(self.manifest)


def build_image(
    content: bytes, platform: tuple[str, str] = ("linux", "amd64"), media_type: str = OCI_MANIFEST
) -> ImageBlobs:
    """A single-layer image for ``platform`` whose one file holds ``content`` (pure)."""
    if media_type not in _IMAGE_PARTS_MEDIA_TYPES:
        raise UsageError(f"cannot build an image manifest of media type {media_type}")
    config_media_type, layer_media_type = _IMAGE_PARTS_MEDIA_TYPES[media_type]
    tar = layer_tar(content)
    # mtime=0 leaves the gzip header without a timestamp, so the layer digest is reproducible.
    layer = gzip.compress(tar, mtime=0)
    platform_object = _platform_object(platform)
    config = _compact_json(
        {
            **platform_object,
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [compute_digest(tar)]},
        }
    )
    manifest = _compact_json(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": _descriptor(config_media_type, config),
            "layers": [_descriptor(layer_media_type, layer)],
        }
    )
    return ImageBlobs(layer, config, manifest, media_type, platform_object)


def build_index(images: Sequence[ImageBlobs], media_type: str = OCI_INDEX) -> bytes:
    """An index (or Docker manifest list) of ``images``, one platform descriptor each (pure)."""
    child_media_type = _INDEX_CHILD_MEDIA_TYPE.get(media_type)
    if child_media_type is None:
        raise UsageError(f"cannot build an index of media type {media_type}")
    manifests = []
    for image in images:
        if image.media_type != child_media_type:
            raise UsageError(f"an index of media type {media_type} cannot hold {image.media_type}")
        manifests.append(
            {**_descriptor(image.media_type, image.manifest), "platform": image.platform}
        )
    return _compact_json({"schemaVersion": 2, "mediaType": media_type, "manifests": manifests})


async def _put_manifest(
    client: RegistryClient, repo: Repository, tag: str | None, manifest: bytes, media_type: str
) -> str:
    expected = compute_digest(manifest)
    digest = await client.put_manifest(repo, tag or expected, manifest, media_type)
    if digest != expected:
        raise DigestMismatch(f"{repo} stored manifest {expected} under digest {digest}")
    return digest


async def _push_built_image(
    client: RegistryClient, repo: Repository, tag: str | None, image: ImageBlobs
) -> str:
    await client.push_blob(repo, image.layer)
    await client.push_blob(repo, image.config)
    return await _put_manifest(client, repo, tag, image.manifest, image.media_type)


async def push_image(
    client: RegistryClient,
    repo: Repository,
    tag: str | None,
    *,
    content: bytes,
    platform: tuple[str, str] = ("linux", "amd64"),
    media_type: str = OCI_MANIFEST,
) -> str:
    """Push a single-layer image holding ``content``, tagged ``tag`` (or by digest only when
    ``tag`` is None). Returns the manifest digest."""
    image = build_image(content, platform, media_type)
    return await _push_built_image(client, repo, tag, image)


async def push_index(
    client: RegistryClient,
    repo: Repository,
    tag: str | None,
    *,
    content: bytes,
    platforms: Sequence[tuple[str, str]],
    media_type: str = OCI_INDEX,
) -> tuple[str, list[str]]:
    """Push one image per platform (by digest) and then an index of them, tagged ``tag``.

    Returns the index digest and the image digests, in the order of ``platforms``.
    """
    if not platforms:
        raise UsageError("an index needs at least one platform")
    child_media_type = _INDEX_CHILD_MEDIA_TYPE.get(media_type)
    if child_media_type is None:
        raise UsageError(f"cannot build an index of media type {media_type}")
    images = [build_image(content, platform, child_media_type) for platform in platforms]
    index = build_index(images, media_type)
    child_digests = [await _push_built_image(client, repo, None, image) for image in images]
    index_digest = await _put_manifest(client, repo, tag, index, media_type)
    return index_digest, child_digests
