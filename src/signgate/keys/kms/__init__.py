"""Keys held in a KMS, an HSM or a secret store, chosen by the reference's URI scheme.

Each backend is a module here that defines ``backend(scheme: str) -> KeyBackend``; it is
imported only when a reference of its scheme is used, and it imports its SDK (an optional
extra, ``pip install 'signgate[aws]'``...) only then, through :func:`require_extra`.

Where the KMS can sign, the private key never leaves it: signgate sends the SHA-256 digest of
the payload and gets the signature back (ASN.1 DER, converted from raw r||s where the KMS
returns that).
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from types import ModuleType

from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from signgate.errors import KMSError
from signgate.keys.model import PublicKey

# scheme -> module of this package that implements it, and the extra its SDK comes in.
BACKEND_MODULES: dict[str, tuple[str, str]] = {
    "awskms": ("aws", "aws"),
    "azurekms": ("azure", "azure"),
    "gcpkms": ("gcp", "gcp"),
    "hashivault": ("vault", "vault"),
    "k8s": ("kubernetes", "k8s"),
    "openbao": ("vault", "vault"),
    "pkcs11": ("pkcs11", "pkcs11"),
}


def require_extra(module: str, extra: str, scheme: str) -> ModuleType:
    """Import an optional SDK, or say which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        spelled = "pkcs11:" if scheme == "pkcs11" else f"{scheme}://"
        raise KMSError(
            f"{spelled} keys need the {module!r} package: pip install 'signgate[{extra}]'"
        ) from e


def der_signature(raw: bytes) -> bytes:
    """An ECDSA signature as ASN.1 DER, from raw r||s (PKCS#11, Azure) or DER already."""
    if raw[:1] == b"\x30":
        try:
            decode_dss_signature(raw)
            return raw
        except ValueError:
            pass
    if not raw or len(raw) % 2:
        raise KMSError(f"the KMS returned a signature of {len(raw)} bytes: not r||s or DER")
    half = len(raw) // 2
    return encode_dss_signature(
        int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
    )


class DigestSigner:
    """A :class:`~signgate.keys.model.Signer` whose key stays in a KMS: the payload's SHA-256
    digest is sent, the signature comes back. ``sign_digest`` returns DER or raw r||s."""

    def __init__(
        self, public_key: PublicKey, sign_digest: Callable[[bytes], bytes], name: str
    ) -> None:
        self._public_key = public_key
        self._sign_digest = sign_digest
        self.name = name

    def public_key(self) -> PublicKey:
        return self._public_key

    def sign(self, payload: bytes) -> bytes:
        signature = der_signature(self._sign_digest(hashlib.sha256(payload).digest()))
        if not self._public_key.verify(signature, payload):
            # A KMS that hashed again, or signed with another key version than we expect:
            # never push a signature that would not verify.
            raise KMSError(f"{self.name}: the signature returned does not verify with its key")
        return signature

    def __repr__(self) -> str:
        return f"DigestSigner({self.name})"
