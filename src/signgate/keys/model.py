"""Public keys and signers, independent of where the key lives."""

from __future__ import annotations

import hashlib
from typing import Protocol

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from signgate.errors import UnsupportedKey

VerificationKeyTypes = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
SigningKeyTypes = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

# Each curve's own hash. cosign 2 signs with SHA-256 whatever the curve, and `cosign verify --key`
# checks SHA-256 unless told otherwise (--signature-digest-algorithm), so signgate signs with
# SHA-256 too and accepts either on verify.
_EC_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}

# The names people know the curves by, for messages.
_CURVE_DISPLAY_NAMES = {
    "secp224r1": "P-224",
    "secp256r1": "P-256",
    "secp384r1": "P-384",
    "secp521r1": "P-521",
}

MINIMUM_RSA_KEY_SIZE = 2048


def check_key_allowed(key: PublicKeyTypes) -> VerificationKeyTypes:
    """``key`` itself if signgate (and cosign) accept it; :class:`UnsupportedKey` with the reason.

    Accepted: ECDSA P-256/P-384/P-521, RSA of at least 2048 bits, Ed25519 (sigstore's
    ``cryptoutils.ValidatePubKey``).
    """
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _EC_HASHES:
            name = _CURVE_DISPLAY_NAMES.get(key.curve.name, key.curve.name)
            raise UnsupportedKey(f"ECDSA curve {name} is not supported; use P-256, P-384 or P-521")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MINIMUM_RSA_KEY_SIZE:
            raise UnsupportedKey(
                f"RSA key size {key.key_size} is too small; minimum {MINIMUM_RSA_KEY_SIZE}"
            )
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise UnsupportedKey(f"unsupported key type {type(key).__name__.lstrip('_')}")


class PublicKey:
    """A verification key: ECDSA (P-256/384/521), RSA >= 2048 or Ed25519."""

    def __init__(self, key: PublicKeyTypes) -> None:
        self.key: VerificationKeyTypes = check_key_allowed(key)

    @classmethod
    def from_pem(cls, data: bytes) -> PublicKey:
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as e:
            raise UnsupportedKey("not a valid PEM public key") from e
        except UnsupportedAlgorithm as e:
            raise UnsupportedKey("unsupported public key algorithm or curve") from e
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

    def __repr__(self) -> str:
        return f"PublicKey(key_id={self.key_id[:16]}...)"

    def verify(self, signature: bytes, payload: bytes) -> bool:
        """True if ``signature`` is valid over ``payload`` under this key's own scheme.

        ECDSA signatures are accepted as ASN.1 DER or as raw r||s, as cosign does.
        """
        key = self.key
        if isinstance(key, ec.EllipticCurvePublicKey):
            return _verify_ecdsa(key, signature, payload)
        try:
            if isinstance(key, rsa.RSAPublicKey):
                key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
            else:
                key.verify(signature, payload)
        except (InvalidSignature, ValueError):
            return False
        return True


def _verify_ecdsa(key: ec.EllipticCurvePublicKey, signature: bytes, payload: bytes) -> bool:
    # DER first; a fixed-width r||s (what PKCS#11 tokens and some KMSs return) as the fallback,
    # as sigstore's ECDSAVerifier does. A raw signature may itself start with 0x30, so the
    # length alone decides whether the fallback is tried.
    encodings = [signature]
    size = (key.curve.key_size + 7) // 8
    if len(signature) == 2 * size:
        encodings.append(
            encode_dss_signature(
                int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
            )
        )
    algorithms = [_EC_HASHES[key.curve.name]()]
    if not isinstance(algorithms[0], hashes.SHA256):
        algorithms.append(hashes.SHA256())
    for encoded in encodings:
        for algorithm in algorithms:
            try:
                key.verify(encoded, payload, ec.ECDSA(algorithm))
            except (InvalidSignature, ValueError):
                continue
            return True
    return False


class Signer(Protocol):
    """Something that signs payloads with one private key (a file, a KMS, an HSM)."""

    def public_key(self) -> PublicKey: ...

    def sign(self, payload: bytes) -> bytes:
        """The signature over ``payload`` in the key's scheme (ECDSA: ASN.1 DER)."""
        ...


class PrivateKeySigner:
    """A :class:`Signer` over a private key held in memory (read from a key file or env://).

    Schemes, as cosign's defaults: ECDSA with SHA-256 on every curve (ASN.1 DER), RSA PKCS#1
    v1.5 with SHA-256, Ed25519 over the payload itself.
    """

    def __init__(self, key: SigningKeyTypes) -> None:
        self._public_key = PublicKey(key.public_key())
        self._key = key

    def public_key(self) -> PublicKey:
        return self._public_key

    def sign(self, payload: bytes) -> bytes:
        key = self._key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(payload, ec.ECDSA(hashes.SHA256()))
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
        return key.sign(payload)

    def __repr__(self) -> str:
        return f"PrivateKeySigner(key_id={self._public_key.key_id[:16]}...)"
