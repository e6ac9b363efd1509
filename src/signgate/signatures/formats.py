"""The two signature formats signgate reads and writes (pure; shared by the CLI and the policy)."""

from __future__ import annotations

from collections.abc import Collection
from enum import StrEnum


class SignatureFormat(StrEnum):
    """classic: cosign 2's ``sha256-HEX.sig`` image; bundle: cosign 3's Sigstore bundle, an OCI
    1.1 referrer (listed in the fallback index ``sha256-HEX`` where the registry has no
    referrers API)."""

    CLASSIC = "classic"
    BUNDLE = "bundle"


SIGNATURE_FORMATS: tuple[SignatureFormat, ...] = tuple(SignatureFormat)
# The bundle's own media type (and the referring manifest's artifactType), as cosign 3 writes it.
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
# What cosign 3 writes by default, and so what `signgate sign` and the library write.
DEFAULT_SIGN_FORMAT = SignatureFormat.BUNDLE


def describe_formats(formats: Collection[str]) -> str:
    """``classic``, ``bundle`` or ``classic or bundle``, in the canonical order."""
    return " or ".join(f for f in SIGNATURE_FORMATS if f in formats)
