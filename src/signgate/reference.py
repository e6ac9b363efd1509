"""Image references, parsed and normalised exactly as docker/distribution does (pure).

Grammar: https://github.com/distribution/reference/blob/main/reference.go
Normalisation: https://github.com/distribution/reference/blob/main/normalize.go
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_REGISTRY = "index.docker.io"


@dataclass(frozen=True, order=True)
class Repository:
    """A repository in a registry: ``registry`` is host[:port], ``path`` like ``library/nginx``."""

    registry: str
    path: str

    def __str__(self) -> str:
        return f"{self.registry}/{self.path}"


@dataclass(frozen=True)
class ImageReference:
    """A parsed, normalised image reference: repository plus tag and/or digest."""

    repository: Repository
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> ImageReference:
        """Parse and normalise; raise :class:`signgate.errors.InvalidReference`."""
        raise NotImplementedError

    @property
    def registry(self) -> str:
        return self.repository.registry

    def with_digest(self, digest: str) -> ImageReference:
        """The same repository pinned to ``digest`` (the tag is kept)."""
        return ImageReference(self.repository, self.tag, digest)

    @property
    def identifier(self) -> str:
        """What the registry's /manifests/ endpoint takes: the digest if any, else the tag."""
        if self.digest:
            return self.digest
        return self.tag or "latest"

    def __str__(self) -> str:
        text = str(self.repository)
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text
