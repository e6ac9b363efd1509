"""Public keys and signers, independent of where the key lives."""

from __future__ import annotations

import hashlib
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from signgate.errors import UnsupportedKey

VerificationKeyTypes = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

# cosign hashes with SHA-256 for P-256 and RSA, and with the curve's own size for P-384/P-521
# (sigstore/sigstore pkg/signature: LoadDefaultVerifier / ecdsa defaults).
_EC_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}


class PublicKey:
    """A verification key: ECDSA (P-256/384/521), RSA >= 2048 or Ed25519."""

    def __init__(self, key: PublicKeyTypes) -> None:
        if isinstance(key, ec.EllipticCurvePublicKey):
            if key.curve.name not in _EC_HASHES:
                raise UnsupportedKey(f"ECDSA curve {key.curve.name} is not supported")
        elif isinstance(key, rsa.RSAPublicKey):
            if key.key_size < 2048:
                raise UnsupportedKey(f"RSA key size {key.key_size} is too small (minimum 2048)")
        elif not isinstance(key, ed25519.Ed25519PublicKey):
            raise UnsupportedKey(f"unsupported public key type {type(key).__name__}")
        self.key: VerificationKeyTypes = key

    @classmethod
    def from_pem(cls, data: bytes) -> PublicKey:
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as e:
            raise UnsupportedKey(f"not a PEM public key: {e}") from e
        return cls(key)

    def der(self) -> bytes:
        return self.key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def pem(self) -> bytes:
        return self.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def key_id(self) -> str:
        """SHA-256 of the DER public key, hex: the id shown to people."""
        return hashlib.sha256(self.der()).hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and self.der() == other.der()

    def __hash__(self) -> int:
        return hash(self.der())

    def verify(self, signature: bytes, payload: bytes) -> bool:
        """True if ``signature`` is valid over ``payload`` under this key's own scheme.

        ECDSA signatures are accepted as ASN.1 DER or as raw r||s, as cosign does.
        """
        key = self.key
        try:
            if isinstance(key, ec.EllipticCurvePublicKey):
                algorithm = _EC_HASHES[key.curve.name]()
                size = (key.curve.key_size + 7) // 8
                if len(signature) == 2 * size and signature[0] != 0x30:
                    signature = encode_dss_signature(
                        int.from_bytes(signature[:size], "big"),
                        int.from_bytes(signature[size:], "big"),
                    )
                key.verify(signature, payload, ec.ECDSA(algorithm))
            elif isinstance(key, rsa.RSAPublicKey):
                key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
            else:
                key.verify(signature, payload)
        except (InvalidSignature, ValueError):
            return False
        return True


class Signer(Protocol):
    """Something that signs payloads with one private key (a file, a KMS, an HSM)."""

    def public_key(self) -> PublicKey: ...

    def sign(self, payload: bytes) -> bytes:
        """The signature over ``payload`` in the key's scheme (ECDSA: ASN.1 DER)."""
        ...
