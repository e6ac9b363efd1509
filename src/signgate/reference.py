"""Image references, parsed and normalised exactly as docker/distribution does (pure).

Grammar: https://github.com/distribution/reference/blob/main/regexp.go
Normalisation: https://github.com/distribution/reference/blob/main/normalize.go

One deliberate difference: Docker Hub is spelled ``index.docker.io``, as cosign and
go-containerregistry spell it (distribution says ``docker.io``), because that spelling goes into
the ``docker-reference`` of every signature payload.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from signgate.digests import DIGEST_HEX_LENGTHS
from signgate.errors import InvalidReference

DEFAULT_REGISTRY = "index.docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io"})
OFFICIAL_REPOSITORY_PREFIX = "library/"
MAX_REPOSITORY_PATH_LENGTH = 255

# The regular expressions of distribution/reference regexp.go, with Go's ASCII-only \w spelled out.
_ALPHANUMERIC = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALPHANUMERIC}(?:{_SEPARATOR}{_ALPHANUMERIC})*"
_REMOTE_NAME = rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_DOMAIN_NAME_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_NAME_COMPONENT}(?:\.{_DOMAIN_NAME_COMPONENT})*"
_IPV6_ADDRESS = r"\[(?:[a-fA-F0-9:]+)\]"
_DOMAIN_AND_PORT = rf"(?:{_DOMAIN_NAME}|{_IPV6_ADDRESS})(?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"

_REMOTE_NAME_RE = re.compile(_REMOTE_NAME)
_DOMAIN_AND_PORT_RE = re.compile(_DOMAIN_AND_PORT)
_TAG_RE = re.compile(_TAG)
_DIGEST_RE = re.compile(_DIGEST)
_IMAGE_ID_RE = re.compile(r"[a-f0-9]{64}")
_TAG_SUFFIX_RE = re.compile(r"[A-Za-z0-9_.-]*")

_LOWERCASE_HEX_RE = re.compile(r"[a-f0-9]+")


def _quoted(text: str) -> str:
    """The input as it appears in an error message: quoted, escaped to one line, bounded."""
    if len(text) > 300:
        text = text[:300] + "..."
    return repr(text)


def _invalid(text: str, problem: str) -> InvalidReference:
    return InvalidReference(f"invalid image reference {_quoted(text)}: {problem}")


def _split_domain(name: str) -> tuple[str, str]:
    """Registry and path of a name without tag or digest, as splitDockerDomain does."""
    first, slash, rest = name.partition("/")
    if not slash:
        # A single component is always a Docker Hub name, even "localhost" or "example.com".
        return DEFAULT_REGISTRY, OFFICIAL_REPOSITORY_PREFIX + name
    if first == "localhost" or "." in first or ":" in first or first.lower() != first:
        # Upper case is not allowed in a path, so distribution takes such a component for a host.
        domain, path = first, rest
    else:
        domain, path = DEFAULT_REGISTRY, name
    if domain in DOCKER_HUB_ALIASES:
        domain = DEFAULT_REGISTRY
        if "/" not in path:
            path = OFFICIAL_REPOSITORY_PREFIX + path
    return domain, path


def _digest_problem(digest: str) -> str | None:
    """What is wrong with ``digest``, or None when it is usable."""
    if not _DIGEST_RE.fullmatch(digest):
        return f"invalid digest {_quoted(digest)} (want algorithm:hex)"
    algorithm, _, encoded = digest.partition(":")
    hex_length = DIGEST_HEX_LENGTHS.get(algorithm)
    if hex_length is None:
        return f"unsupported digest algorithm {_quoted(algorithm)} in {_quoted(digest)}"
    if len(encoded) != hex_length or not _LOWERCASE_HEX_RE.fullmatch(encoded):
        return (
            f"invalid {algorithm} digest {_quoted(digest)} "
            f"(want {hex_length} lowercase hex characters)"
        )
    return None


def _parse_repository(text: str, name: str) -> Repository:
    if not name:
        raise _invalid(text, "repository name is empty")
    registry, path = _split_domain(name)
    if not _DOMAIN_AND_PORT_RE.fullmatch(registry):
        raise _invalid(text, f"invalid registry host {_quoted(registry)}")
    if not path:
        raise _invalid(text, "repository name is empty")
    if path.lower() != path:
        raise _invalid(text, f"repository name {_quoted(path)} must be lowercase")
    if not _REMOTE_NAME_RE.fullmatch(path):
        raise _invalid(
            text,
            f"invalid repository name {_quoted(path)} (want lowercase letters and digits, "
            "components separated by '/', joined within by '.', '_', '__' or '-')",
        )
    if len(path) > MAX_REPOSITORY_PATH_LENGTH:
        raise _invalid(
            text,
            f"repository name is {len(path)} characters long, "
            f"more than {MAX_REPOSITORY_PATH_LENGTH}",
        )
    return Repository(registry, path)


@dataclass(frozen=True, order=True)
class Repository:
    """A repository in a registry: ``registry`` is host[:port], ``path`` like ``library/nginx``."""

    registry: str
    path: str

    @classmethod
    def parse(cls, text: str) -> Repository:
        """Parse and normalise a repository name that has neither tag nor digest
        (``COSIGN_REPOSITORY``, policy entries); raise :class:`InvalidReference`."""
        reference = ImageReference.parse(text)
        if reference.tag is not None or reference.digest is not None:
            raise _invalid(text, "a repository name takes no tag or digest")
        return reference.repository

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
        """Parse and normalise; raise :class:`signgate.errors.InvalidReference`.

        A reference with both tag and digest keeps both (the digest is what gets pulled).
        Without either, ``tag`` stays None and :attr:`identifier` is ``latest``.
        """
        return _parse_image_reference(text)

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


def signature_tag(digest: str, suffix: str = "sig") -> str:
    """The tag cosign stores an artifact for ``digest`` under: ``sha256:HEX`` -> ``sha256-HEX.sig``.

    ``suffix`` is ``sig``, ``att`` or ``sbom``; an empty suffix gives the bare ``sha256-HEX``
    that cosign 3 uses for its referrers fallback index.
    https://github.com/sigstore/cosign/blob/main/pkg/oci/remote/remote.go (``suffixTag``)
    """
    if problem := _digest_problem(digest):
        raise InvalidReference(f"cannot name a signature tag: {problem}")
    if not _TAG_SUFFIX_RE.fullmatch(suffix):
        raise InvalidReference(f"invalid signature tag suffix {_quoted(suffix)}")
    tag = digest.replace(":", "-", 1) + (f".{suffix}" if suffix else "")
    if not _TAG_RE.fullmatch(tag):
        raise InvalidReference(
            f"the tag {_quoted(tag)} for digest {_quoted(digest)} is not a valid tag "
            "(longer than 128 characters)"
        )
    return tag


# The webhook parses the same few hundred images on every review: parsing is pure and the
# result immutable, so it is cached (errors are not cached, they are raised every time).
@functools.lru_cache(maxsize=8192)
def _parse_image_reference(text: str) -> ImageReference:
    if not text:
        raise _invalid(text, "empty")
    if _IMAGE_ID_RE.fullmatch(text):
        raise _invalid(text, "a 64-character hex string is an image ID, not a repository name")
    name_and_tag, at, digest = text.partition("@")
    if at and (problem := _digest_problem(digest)):
        raise _invalid(text, problem)
    tag: str | None = None
    colon = name_and_tag.rfind(":")
    if colon > name_and_tag.rfind("/"):
        name_and_tag, tag = name_and_tag[:colon], name_and_tag[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise _invalid(
                text,
                f"invalid tag {_quoted(tag)} (want up to 128 letters, digits, '_', '.' "
                "or '-', not starting with '.' or '-')",
            )
    repository = _parse_repository(text, name_and_tag)
    return ImageReference(repository, tag, digest if at else None)
