"""The async OCI distribution client (interface; implemented by the registry work)."""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signgate.reference import Repository


@dataclass(frozen=True)
class RegistryOptions:
    """How to reach registries.

    ``insecure_registries``: hosts (host[:port]) reached over plain HTTP / unverified TLS when
    the user names them. Loopback registries (localhost, 127.0.0.0/8, [::1]) are tried with
    plain HTTP too, as docker does.
    """

    insecure_registries: Collection[str] = ()
    username: str | None = None
    password: str | None = None
    docker_config_dir: Path | None = None  # default: $DOCKER_CONFIG or ~/.docker
    ca_bundle: Path | None = None  # extra CA file trusted for TLS
    max_manifest_bytes: int = 4 * 1024 * 1024
    max_retries: int = 4
    timeout_seconds: float = 30.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """A manifest or index as stored: exact bytes, its digest (checked), and media type."""

    media_type: str
    digest: str
    raw: bytes

    def json(self) -> dict[str, Any]:
        value = json.loads(self.raw)
        if not isinstance(value, dict):
            raise ValueError("manifest is not a JSON object")
        return value


class RegistryClient:
    """One connection pool per process; use as ``async with RegistryClient(opts) as client``."""

    def __init__(self, options: RegistryOptions | None = None) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> RegistryClient:
        raise NotImplementedError

    async def __aexit__(self, *exc: object) -> None:
        raise NotImplementedError

    async def get_manifest(self, repo: Repository, reference: str) -> Manifest:
        """GET a manifest by tag or digest; digest checked, size bounded. NotFound if absent."""
        raise NotImplementedError

    async def head_manifest(self, repo: Repository, reference: str) -> str | None:
        """The digest a tag or digest resolves to, or None if it does not exist."""
        raise NotImplementedError

    async def put_manifest(
        self, repo: Repository, reference: str, raw: bytes, media_type: str
    ) -> str:
        """PUT a manifest under a tag or digest; returns its digest."""
        raise NotImplementedError

    async def delete_manifest(self, repo: Repository, digest: str) -> None:
        raise NotImplementedError

    async def get_blob(self, repo: Repository, digest: str, max_bytes: int = 64 << 20) -> bytes:
        """GET a blob, checked against its digest."""
        raise NotImplementedError

    async def blob_exists(self, repo: Repository, digest: str) -> bool:
        raise NotImplementedError

    async def push_blob(
        self,
        repo: Repository,
        data: bytes,
        *,
        mount_from: Repository | None = None,
        chunk_size: int | None = None,
    ) -> str:
        """Upload a blob unless present (monolithic, or chunked when chunk_size is set);
        cross-repository mount from ``mount_from`` when given. Returns its digest."""
        raise NotImplementedError

    async def list_tags(self, repo: Repository) -> list[str]:
        """All tags, following Link pagination."""
        raise NotImplementedError

    async def catalog(self, registry: str) -> list[str]:
        """All repository paths, following Link pagination."""
        raise NotImplementedError
