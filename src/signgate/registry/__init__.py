"""Async OCI distribution client used by every command (sign, verify, rotate, webhook)."""

from signgate.registry.client import IMAGE_CONCURRENCY, Manifest, RegistryClient, RegistryOptions
from signgate.registry.mediatypes import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_MEDIA_TYPES,
    MANIFEST_ACCEPT,
    OCI_INDEX,
    OCI_MANIFEST,
)

__all__ = [
    "IMAGE_CONCURRENCY",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "INDEX_MEDIA_TYPES",
    "MANIFEST_ACCEPT",
    "Manifest",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "RegistryClient",
    "RegistryOptions",
]
