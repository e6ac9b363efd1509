"""Key references as cosign spells them (``cosign.key``, ``env://VAR``, ``hashivault://k``...).

A reference's scheme picks a :class:`KeyBackend` from :data:`KEY_BACKENDS`; a plain path has no
scheme. KMS backends join the table when they are written; until then their schemes are
recognised and refused with a clear message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from signgate.errors import KeyMaterialError
from signgate.keys.cosign_format import (
    ENCRYPTED_PRIVATE_KEY_LABELS,
    PUBLIC_KEY_LABEL,
    UNENCRYPTED_PRIVATE_KEY_LABELS,
    decode_pem,
    decrypt_private_key,
    parse_unencrypted_private_key,
)
from signgate.keys.files import read_key_file
from signgate.keys.model import PrivateKeySigner, PublicKey, Signer, SigningKeyTypes
from signgate.keys.password import PasswordSource, password_source


class KeyBackend(Protocol):
    """Where keys of one scheme live. ``location`` is the reference without ``scheme://``."""

    def signer(self, location: str, password: PasswordSource) -> Signer: ...

    def public_key(self, location: str, password: PasswordSource) -> PublicKey: ...


class FileBackend:
    """A PEM file: an encrypted cosign key, a plain private key, or a public key."""

    def signer(self, location: str, password: PasswordSource) -> Signer:
        path = Path(location)
        return PrivateKeySigner(_private_key_from_pem(read_key_file(path), password, str(path)))

    def public_key(self, location: str, password: PasswordSource) -> PublicKey:
        path = Path(location)
        return _public_key_from_pem(read_key_file(path), password, str(path))


class EnvBackend:
    """``env://VAR``: the PEM text is the value of the environment variable VAR."""

    def signer(self, location: str, password: PasswordSource) -> Signer:
        return PrivateKeySigner(
            _private_key_from_pem(_read_env(location), password, f"env://{location}")
        )

    def public_key(self, location: str, password: PasswordSource) -> PublicKey:
        return _public_key_from_pem(_read_env(location), password, f"env://{location}")


# scheme -> backend; "" is a plain file path.
KEY_BACKENDS: dict[str, KeyBackend] = {
    "": FileBackend(),
    "env": EnvBackend(),
}

# cosign's other schemes, refused with "not supported yet" until their backend is added above.
KMS_SCHEMES = ("awskms", "azurekms", "gcpkms", "hashivault", "k8s", "openbao", "pkcs11")

_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://(.*)$", re.DOTALL)
# PKCS#11 URIs (RFC 7512) have no "//".
_PKCS11_PREFIX = "pkcs11:"


def split_key_ref(ref: str) -> tuple[str, str]:
    """(scheme, location); the scheme of a plain path is ``""``."""
    if ref.startswith(_PKCS11_PREFIX):
        return "pkcs11", ref[len(_PKCS11_PREFIX) :]
    match = _SCHEME.match(ref)
    if match is None:
        return "", ref
    return match.group(1), match.group(2)


def load_signer(ref: str, password: PasswordSource) -> Signer:
    """A signer for the private key at ``ref``; ``password`` is called only if it is needed."""
    backend, location = _backend_for(ref)
    return backend.signer(location, password)


def load_public_key(ref: str, password: PasswordSource | None = None) -> PublicKey:
    """The public key at ``ref``.

    A private key reference gives its public half, as ``cosign public-key`` does; an encrypted
    one needs its password (by default from ``COSIGN_PASSWORD``, a prompt or stdin).
    """
    backend, location = _backend_for(ref)
    return backend.public_key(location, password or password_source(confirm=False))


def load_public_keys(
    refs: Iterable[str], password: PasswordSource | None = None
) -> list[PublicKey]:
    """:func:`load_public_key` for each reference, in order, sharing one password source."""
    shared = password or password_source(confirm=False)
    return [load_public_key(ref, shared) for ref in refs]


def _backend_for(ref: str) -> tuple[KeyBackend, str]:
    if not ref:
        raise KeyMaterialError("empty key reference")
    scheme, location = split_key_ref(ref)
    backend = KEY_BACKENDS.get(scheme)
    if backend is not None:
        return backend, location
    spelled = "pkcs11:" if scheme == "pkcs11" else f"{scheme}://"
    if scheme in KMS_SCHEMES:
        raise KeyMaterialError(f"KMS scheme {spelled} is not supported yet")
    supported = ", ".join(["a file path", *(f"{name}://" for name in sorted(KEY_BACKENDS) if name)])
    raise KeyMaterialError(f"unknown key reference scheme {spelled}; supported: {supported}")


def _read_env(name: str) -> bytes:
    if not name:
        raise KeyMaterialError("env:// needs a variable name, as in env://COSIGN_KEY")
    value = os.environ.get(name)
    if value is None:
        raise KeyMaterialError(f"environment variable {name} is not set")
    return os.fsencode(value)


def _private_key_from_pem(data: bytes, password: PasswordSource, source: str) -> SigningKeyTypes:
    label = decode_pem(data, source=source).label
    if label in ENCRYPTED_PRIVATE_KEY_LABELS:
        return decrypt_private_key(data, password(), source=source)
    if label in UNENCRYPTED_PRIVATE_KEY_LABELS:
        return parse_unencrypted_private_key(data, source=source)
    if label == PUBLIC_KEY_LABEL:
        raise KeyMaterialError(f"{source} holds a public key; signing needs a private key")
    raise KeyMaterialError(f"{source}: unsupported PEM block {label!r}")


def _public_key_from_pem(data: bytes, password: PasswordSource, source: str) -> PublicKey:
    label = decode_pem(data, source=source).label
    if label != PUBLIC_KEY_LABEL:
        return PublicKey(_private_key_from_pem(data, password, source).public_key())
    try:
        return PublicKey.from_pem(data)
    except KeyMaterialError as e:
        raise type(e)(f"{source}: {e}") from e
