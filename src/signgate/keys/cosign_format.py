"""cosign's encrypted private key format and the plain PEM keys it imports (pure: no I/O).

An encrypted key is, from the outside in: a PEM block ``ENCRYPTED SIGSTORE PRIVATE KEY`` (or the
legacy ``ENCRYPTED COSIGN PRIVATE KEY``); whose body is the compact JSON of
go-securesystemslib's ``encrypted`` package; whose ciphertext is a NaCl secretbox under a key
derived with scrypt from the password; whose plaintext is the PKCS#8 DER of the private key.

- https://github.com/sigstore/cosign/blob/main/pkg/cosign/keys.go
- https://github.com/secure-systems-lab/go-securesystemslib/blob/main/encrypted/encrypted.go

Every error names ``source`` (the file or reference the bytes came from) and never the password.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from signgate.errors import KeyMaterialError, UnsupportedKey, WrongPassword
from signgate.keys.model import SigningKeyTypes, check_key_allowed

SIGSTORE_PRIVATE_KEY_LABEL = "ENCRYPTED SIGSTORE PRIVATE KEY"
COSIGN_PRIVATE_KEY_LABEL = "ENCRYPTED COSIGN PRIVATE KEY"
ENCRYPTED_PRIVATE_KEY_LABELS = frozenset({SIGSTORE_PRIVATE_KEY_LABEL, COSIGN_PRIVATE_KEY_LABEL})
PKCS8_PRIVATE_KEY_LABEL = "PRIVATE KEY"
SEC1_PRIVATE_KEY_LABEL = "EC PRIVATE KEY"
PKCS1_PRIVATE_KEY_LABEL = "RSA PRIVATE KEY"
UNENCRYPTED_PRIVATE_KEY_LABELS = frozenset(
    {PKCS8_PRIVATE_KEY_LABEL, SEC1_PRIVATE_KEY_LABEL, PKCS1_PRIVATE_KEY_LABEL}
)
PUBLIC_KEY_LABEL = "PUBLIC KEY"
_FORMAT_NAMES = {SEC1_PRIVATE_KEY_LABEL: "SEC1", PKCS1_PRIVATE_KEY_LABEL: "PKCS#1"}

KDF_NAME = "scrypt"
CIPHER_NAME = "nacl/secretbox"
SALT_SIZE = 32
# NaCl secretbox sizes (XSalsa20-Poly1305); PyNaCl itself is imported only to seal or open a
# box, so that verifying with a public key does not pay for loading it.
NONCE_SIZE = 24
BOX_KEY_SIZE = 32
MAC_SIZE = 16


@dataclass(frozen=True)
class ScryptParams:
    n: int
    r: int
    p: int

    def __str__(self) -> str:
        return f"N={self.n} r={self.r} p={self.p}"


LEGACY_SCRYPT_PARAMS = ScryptParams(n=32768, r=8, p=1)
STANDARD_SCRYPT_PARAMS = ScryptParams(n=65536, r=8, p=1)
OWASP_SCRYPT_PARAMS = ScryptParams(n=131072, r=8, p=1)
# go-securesystemslib reads exactly these three and writes the standard one (cosign >= 2.2).
SUPPORTED_SCRYPT_PARAMS = (LEGACY_SCRYPT_PARAMS, STANDARD_SCRYPT_PARAMS, OWASP_SCRYPT_PARAMS)

# (password, salt, params) -> the 32-byte secretbox key. A parameter so tests can observe when
# (and whether) the expensive derivation runs.
KeyDerivation = Callable[[bytes, bytes, ScryptParams], bytes]


def scrypt_key(password: bytes, salt: bytes, params: ScryptParams) -> bytes:
    """scrypt(password, salt, N, r, p) -> 32 bytes, with room for the largest supported N."""
    memory = 128 * params.r * (params.n + params.p + 2) + (1 << 20)
    return hashlib.scrypt(
        password,
        salt=salt,
        n=params.n,
        r=params.r,
        p=params.p,
        maxmem=memory,
        dklen=BOX_KEY_SIZE,
    )


# --- PEM -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PemBlock:
    label: str
    body: bytes


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)


def encode_pem(label: str, body: bytes) -> bytes:
    """PEM as Go's ``pem.EncodeToMemory`` writes it: 64-column base64, trailing newline."""
    encoded = base64.b64encode(body).decode("ascii")
    lines = [encoded[i : i + 64] for i in range(0, len(encoded), 64)]
    return "".join(
        [f"-----BEGIN {label}-----\n", *(line + "\n" for line in lines), f"-----END {label}-----\n"]
    ).encode("ascii")


def decode_pem(data: bytes, *, source: str) -> PemBlock:
    """The first PEM block in ``data`` (text around it is ignored, as Go's ``pem.Decode`` does)."""
    match = _PEM_BLOCK.search(data)
    if match is None:
        raise KeyMaterialError(f"{source}: no PEM block found")
    label = match.group(1).decode("ascii")
    try:
        body = base64.b64decode(b"".join(match.group(2).split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise KeyMaterialError(f"{source}: the {label} PEM block is not valid base64") from e
    return PemBlock(label, body)


# --- the JSON layer (go-securesystemslib "encrypted") --------------------------------------


@dataclass(frozen=True)
class EncryptedData:
    params: ScryptParams
    salt: bytes
    nonce: bytes
    ciphertext: bytes

    def to_json(self) -> bytes:
        """Compact JSON with the fields in Go's struct order, exactly as cosign writes it."""
        document = {
            "kdf": {
                "name": KDF_NAME,
                "params": {"N": self.params.n, "r": self.params.r, "p": self.params.p},
                "salt": _b64(self.salt),
            },
            "cipher": {"name": CIPHER_NAME, "nonce": _b64(self.nonce)},
            "ciphertext": _b64(self.ciphertext),
        }
        return json.dumps(document, separators=(",", ":")).encode("ascii")

    @classmethod
    def parse(cls, data: bytes, *, source: str) -> EncryptedData:
        """Parse and check everything that can be checked without the password.

        Unsupported scrypt parameters are refused here, before any key derivation: a hostile
        file must not make us spend unbounded memory or time.
        """
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, ValueError) as e:
            raise KeyMaterialError(f"{source}: the encrypted key is not valid JSON") from e
        fields = _Fields(source)
        kdf = fields.get(document, "kdf", dict)
        cipher = fields.get(document, "cipher", dict)
        kdf_name = fields.get(kdf, "name", str, "kdf.name")
        if kdf_name != KDF_NAME:
            raise KeyMaterialError(f"{source}: unknown kdf name {kdf_name!r}")
        cipher_name = fields.get(cipher, "name", str, "cipher.name")
        if cipher_name != CIPHER_NAME:
            raise KeyMaterialError(f"{source}: unknown cipher name {cipher_name!r}")
        raw_params = fields.get(kdf, "params", dict, "kdf.params")
        params = ScryptParams(
            n=fields.get(raw_params, "N", int, "kdf.params.N"),
            r=fields.get(raw_params, "r", int, "kdf.params.r"),
            p=fields.get(raw_params, "p", int, "kdf.params.p"),
        )
        if params not in SUPPORTED_SCRYPT_PARAMS:
            raise KeyMaterialError(f"{source}: unsupported scrypt parameters ({params})")
        salt = fields.base64(kdf, "salt", "kdf.salt")
        nonce = fields.base64(cipher, "nonce", "cipher.nonce")
        ciphertext = fields.base64(document, "ciphertext", "ciphertext")
        if len(salt) != SALT_SIZE:
            raise KeyMaterialError(f"{source}: salt is {len(salt)} bytes, expected {SALT_SIZE}")
        if len(nonce) != NONCE_SIZE:
            raise KeyMaterialError(f"{source}: nonce is {len(nonce)} bytes, expected {NONCE_SIZE}")
        if len(ciphertext) < MAC_SIZE:
            raise KeyMaterialError(f"{source}: the ciphertext is truncated")
        return cls(params, salt, nonce, ciphertext)


class _Fields:
    """Typed access to the JSON document, with messages that name the missing field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def get(self, obj: object, key: str, kind: type[Any], name: str | None = None) -> Any:
        name = name or key
        if not isinstance(obj, dict) or key not in obj:
            raise KeyMaterialError(f"{self.source}: the encrypted key has no {name}")
        value = obj[key]
        # bool is an int in Python, not in JSON.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise KeyMaterialError(f"{self.source}: {name} in the encrypted key is malformed")
        return value

    def base64(self, obj: object, key: str, name: str) -> bytes:
        text: str = self.get(obj, key, str, name)
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise KeyMaterialError(f"{self.source}: {name} is not valid base64") from e


def encrypt(
    plaintext: bytes,
    password: bytes,
    *,
    params: ScryptParams = STANDARD_SCRYPT_PARAMS,
    derive_key: KeyDerivation = scrypt_key,
) -> bytes:
    """The encrypted JSON document for ``plaintext``, with a fresh random salt and nonce."""
    salt = secrets.token_bytes(SALT_SIZE)
    nonce = secrets.token_bytes(NONCE_SIZE)
    import nacl.secret

    box = nacl.secret.SecretBox(derive_key(password, salt, params))
    ciphertext = box.encrypt(plaintext, nonce).ciphertext
    return EncryptedData(params, salt, nonce, ciphertext).to_json()


def decrypt(
    data: bytes,
    password: bytes,
    *,
    source: str,
    derive_key: KeyDerivation = scrypt_key,
) -> bytes:
    """The plaintext of an encrypted JSON document; :class:`WrongPassword` if the MAC fails."""
    encrypted = EncryptedData.parse(data, source=source)
    import nacl.exceptions
    import nacl.secret

    box = nacl.secret.SecretBox(derive_key(password, encrypted.salt, encrypted.params))
    try:
        return box.decrypt(encrypted.ciphertext, encrypted.nonce)
    except nacl.exceptions.CryptoError as e:
        raise WrongPassword(f"wrong password for {source}") from e


# --- private keys --------------------------------------------------------------------------


def encrypt_private_key(
    key: SigningKeyTypes,
    password: bytes,
    *,
    params: ScryptParams = STANDARD_SCRYPT_PARAMS,
    derive_key: KeyDerivation = scrypt_key,
) -> bytes:
    """``ENCRYPTED SIGSTORE PRIVATE KEY`` PEM of ``key`` (PKCS#8 inside), as cosign writes."""
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return encode_pem(
        SIGSTORE_PRIVATE_KEY_LABEL,
        encrypt(der, password, params=params, derive_key=derive_key),
    )


def decrypt_private_key(
    pem: bytes,
    password: bytes,
    *,
    source: str,
    derive_key: KeyDerivation = scrypt_key,
) -> SigningKeyTypes:
    """The private key in a cosign encrypted key file."""
    block = decode_pem(pem, source=source)
    if block.label not in ENCRYPTED_PRIVATE_KEY_LABELS:
        raise KeyMaterialError(
            f"{source}: not an encrypted cosign private key (PEM block {block.label!r})"
        )
    der = decrypt(block.body, password, source=source, derive_key=derive_key)
    found = _der_private_key_format(der)
    if found != PKCS8_PRIVATE_KEY_LABEL:
        # cosign calls x509.ParsePKCS8PrivateKey only; a SEC1 plaintext (which old tools wrote)
        # fails there with "use ParseECPrivateKey instead for this key format".
        kind = _FORMAT_NAMES.get(found or "", "not a private key")
        raise KeyMaterialError(
            f"{source}: the decrypted private key is {kind}, not PKCS#8; cosign refuses it too"
        )
    return _load_der_private_key(der, source=source)


def parse_unencrypted_private_key(pem: bytes, *, source: str) -> SigningKeyTypes:
    """A plain PKCS#8, SEC1 or PKCS#1 PEM private key, as ``cosign import-key-pair`` takes."""
    block = decode_pem(pem, source=source)
    if block.label in ENCRYPTED_PRIVATE_KEY_LABELS:
        raise KeyMaterialError(f"{source}: already an encrypted cosign private key")
    if block.label not in UNENCRYPTED_PRIVATE_KEY_LABELS:
        raise KeyMaterialError(
            f"{source}: unsupported PEM block {block.label!r}; expected PRIVATE KEY, "
            "EC PRIVATE KEY or RSA PRIVATE KEY"
        )
    if _der_private_key_format(block.body) != block.label:
        raise KeyMaterialError(f"{source}: the {block.label} PEM block is malformed")
    return _load_der_private_key(block.body, source=source)


def _load_der_private_key(der: bytes, *, source: str) -> SigningKeyTypes:
    try:
        key = serialization.load_der_private_key(der, password=None)
    except UnsupportedAlgorithm as e:
        raise UnsupportedKey(f"{source}: unsupported private key algorithm or curve") from e
    except (ValueError, TypeError) as e:
        raise KeyMaterialError(f"{source}: the private key cannot be parsed") from e
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise UnsupportedKey(f"{source}: unsupported private key type {type(key).__name__}")
    try:
        check_key_allowed(key.public_key())
    except UnsupportedKey as e:
        raise UnsupportedKey(f"{source}: {e}") from e
    return key


def _der_private_key_format(der: bytes) -> str | None:
    """The PEM label that matches this DER private key's structure, or None if it is neither.

    PKCS#8: SEQUENCE { INTEGER version, SEQUENCE algorithm, OCTET STRING key, ... }
    SEC1:   SEQUENCE { INTEGER 1, OCTET STRING key, ... }
    PKCS#1: SEQUENCE { INTEGER 0, INTEGER modulus, ... }
    """
    try:
        tag, start, end = _read_der_element(der, 0)
        if tag != 0x30 or end != len(der):
            return None
        version_tag, version_start, version_end = _read_der_element(der, start)
        second_tag, _, _ = _read_der_element(der, version_end)
    except ValueError:
        return None
    if version_tag != 0x02:
        return None
    version = der[version_start:version_end]
    if second_tag == 0x30:
        return PKCS8_PRIVATE_KEY_LABEL
    if second_tag == 0x04 and version == b"\x01":
        return SEC1_PRIVATE_KEY_LABEL
    if second_tag == 0x02 and version == b"\x00":
        return PKCS1_PRIVATE_KEY_LABEL
    return None


def _read_der_element(der: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at ``offset``."""
    if offset + 2 > len(der):
        raise ValueError("truncated")
    tag, length = der[offset], der[offset + 1]
    start = offset + 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or start + count > len(der):
            raise ValueError("bad length")
        length = int.from_bytes(der[start : start + count], "big")
        start += count
    end = start + length
    if end > len(der):
        raise ValueError("truncated")
    return tag, start, end


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
