"""Key references as cosign spells them (``cosign.key``, ``env://VAR``, ``hashivault://k``...).

A reference's scheme picks a :class:`KeyBackend` from :data:`KEY_BACKENDS`; a plain path has no
scheme. KMS backends join the table when they are written; until then their schemes are
recognised and refused with a clear message.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

from signgate.errors import KeyMaterialError, KMSError
from signgate.keys.cosign_format import (
    ENCRYPTED_PRIVATE_KEY_LABELS,
    PUBLIC_KEY_LABEL,
    UNENCRYPTED_PRIVATE_KEY_LABELS,
    decode_pem,
    decrypt_private_key,
    parse_unencrypted_private_key,
)
from signgate.keys.files import read_key_file
from signgate.keys.kms import BACKEND_MODULES
from signgate.keys.model import PrivateKeySigner, PublicKey, Signer, SigningKeyTypes
from signgate.keys.password import PasswordSource, password_source


@runtime_checkable
class KeyBackend(Protocol):
    """Where keys of one scheme live. ``location`` is the reference without ``scheme://``."""

    def signer(self, location: str, password: PasswordSource) -> Signer: ...

    def public_key(self, location: str, password: PasswordSource) -> PublicKey: ...


@runtime_checkable
class KeyCreator(Protocol):
    """A backend that can make a new key (``generate-key-pair --kms URI``)."""

    def create_key(self, location: str, password: PasswordSource) -> PublicKey:
        """Create the key at ``location`` (non-exportable where the KMS allows) and return its
        public key; refuse with :class:`~signgate.errors.KMSError` if it exists already."""
        ...


@runtime_checkable
class VersionedKeys(Protocol):
    """A backend whose keys have versions: every version a verifier should trust."""

    def public_keys(self, location: str, password: PasswordSource) -> list[PublicKey]: ...


@runtime_checkable
class KeyDisabler(Protocol):
    """A backend that can take a key, or one version of it, out of use without deleting it."""

    def disable_key(self, location: str) -> str:
        """Disable what ``location`` names so that it can no longer sign and verifiers stop
        loading it; harmless if it is disabled already. Return a one-line description of what
        was disabled, without secrets; refuse with :class:`~signgate.errors.KMSError` where
        the KMS cannot do it, saying why."""
        ...


@runtime_checkable
class DisableCheck(Protocol):
    """A :class:`KeyDisabler` that can tell, from the reference alone, that it would refuse."""

    def can_disable(self, location: str) -> str | None:
        """Why ``disable_key(location)`` would be refused, or None; no request to the KMS."""
        ...


@runtime_checkable
class KeyVersioner(Protocol):
    """A backend whose keys have versions and can be given a new one."""

    def add_key_version(self, location: str) -> PublicKey:
        """Make a new version of the key ``location`` names (a version in it is ignored: the
        key is the same) and return the new version's public key; the key's unversioned
        reference signs with it from then on."""
        ...


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


# A PKCS#11 PIN (RFC 7512 pin-value, in the path or the query) and a URL's userinfo password.
_SECRET_IN_REFERENCE = re.compile(r"(pin-value=)[^;&?]*|(://[^/@:]*:)[^/@]*(@)")


def display_key_ref(ref: str) -> str:
    """``ref`` as messages and logs may show it: PINs and URL passwords replaced by ``***``."""
    return _SECRET_IN_REFERENCE.sub(
        lambda m: f"{m[1]}***" if m[1] else f"{m[2]}***{m[3]}", ref
    )


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
    """The public keys of each reference, in order, sharing one password source.

    A reference to a versioned KMS key may stand for several versions (a verifier trusts all
    the versions the reference names, which is how a key is rotated inside its KMS).
    """
    shared = password or password_source(confirm=False)
    keys: list[PublicKey] = []
    for ref in refs:
        backend, location = _backend_for(ref)
        if isinstance(backend, VersionedKeys):
            keys.extend(backend.public_keys(location, shared))
        else:
            keys.append(backend.public_key(location, shared))
    return keys


def create_key(ref: str, password: PasswordSource) -> PublicKey:
    """Create a new key at a KMS reference; its public key."""
    backend, location = _backend_for(ref)
    if not isinstance(backend, KeyCreator):
        raise KeyMaterialError(f"{ref}: keys cannot be created there; use a KMS reference")
    return backend.create_key(location, password)


def disable_key(ref: str) -> str:
    """Disable (never delete) the key or key version at a KMS reference; what was disabled.

    Afterwards it no longer signs, and loading the reference's public keys no longer gives it
    (a versioned key's reference skips disabled versions; a reference naming only disabled
    keys is an error). A second call is harmless. Where a key has versions, a reference without
    one stands for all its live versions, so it is refused when there are several rather than
    guessed at: name the version. By KMS:

    - Vault/OpenBao Transit: ``?version=N`` retires N and every older version (Transit keeps
      versions by a ``min_decryption_version`` threshold); the latest version and a reference
      without a version are refused.
    - AWS KMS: DisableKey (an alias keeps pointing to the disabled key).
    - Cloud KMS and Azure Key Vault: the version's state DISABLED / ``enabled`` false; without
      a version, the key's only enabled version.
    - PKCS#11: ``CKA_SIGN`` false on the private key and ``CKA_VERIFY`` false on its public
      key object, if the token lets them change.
    - Kubernetes Secrets, key files and ``env://`` keys: refused (KMSError, KeyMaterialError).
    """
    backend, location = _backend_for(ref)
    if not isinstance(backend, KeyDisabler):
        raise _cannot_disable(ref)
    return display_key_ref(backend.disable_key(location))


def can_disable(ref: str) -> str | None:
    """Why :func:`disable_key` cannot disable ``ref`` (one line, without secrets), or None when
    it can, as far as the reference tells: nothing is asked of the KMS, so that a command can
    refuse the option before it does anything. A Transit reference must name a version (which
    must be older than the key's latest when it is disabled, as a key-version rotation makes
    it); Kubernetes Secrets, key files and ``env://`` keys cannot be disabled."""
    try:
        backend, location = _backend_for(ref)
    except KeyMaterialError as e:
        return e.diagnostics()
    if not isinstance(backend, KeyDisabler):
        return _cannot_disable(ref).diagnostics()
    if isinstance(backend, DisableCheck):
        return backend.can_disable(location)
    return None


def add_key_version(ref: str) -> PublicKey:
    """A new version of the KMS key at ``ref`` (a version in ``ref`` is ignored); its public key.

    The reference without a version signs with the new version from then on, and verifiers
    that load it trust the new version next to the older live ones. Vault/OpenBao Transit
    rotates the key, Cloud KMS makes a CryptoKeyVersion, Azure Key Vault creates the key again;
    KMSs without key versions (AWS KMS, PKCS#11, Kubernetes Secrets) refuse: rotate to a new
    key instead.
    """
    backend, location = _backend_for(ref)
    if not isinstance(backend, KeyVersioner):
        raise _refusal(
            ref,
            "has no versions; rotate to a new key instead",
            "have no versions; rotate to a new key instead",
        )
    return backend.add_key_version(location)


_KEPT_IN = {"": "file", "env": "in an environment variable"}


def _cannot_disable(ref: str) -> KeyMaterialError:
    return _refusal(
        ref,
        "cannot be disabled; stop using it and delete it yourself once no verifier trusts it",
        "cannot be disabled: their store has no disabled state; delete the key yourself "
        "once no verifier trusts it",
    )


def _refusal(ref: str, key_cannot: str, kms_keys_cannot: str) -> KeyMaterialError:
    """Why ``ref`` cannot take the operation: a key file or ``env://`` key, or a KMS without it."""
    shown = display_key_ref(ref)
    scheme = split_key_ref(ref)[0]
    if scheme in KEY_BACKENDS:
        return KeyMaterialError(f"{shown}: a key {_KEPT_IN[scheme]} {key_cannot}")
    return KMSError(f"{shown}: {_spelled(scheme)} keys {kms_keys_cannot}")


def _backend_for(ref: str) -> tuple[KeyBackend, str]:
    if not ref:
        raise KeyMaterialError("empty key reference")
    scheme, location = split_key_ref(ref)
    backend = KEY_BACKENDS.get(scheme)
    if backend is not None:
        return backend, location
    if scheme in BACKEND_MODULES:
        return _kms_backend(scheme), location
    schemes = sorted([*(name for name in KEY_BACKENDS if name), *BACKEND_MODULES])
    supported = ", ".join(["a file path", *(_spelled(name) for name in schemes)])
    raise KeyMaterialError(
        f"unknown key reference scheme {_spelled(scheme)}; supported: {supported}"
    )


def _spelled(scheme: str) -> str:
    return "pkcs11:" if scheme == "pkcs11" else f"{scheme}://"


@functools.cache
def _kms_backend(scheme: str) -> KeyBackend:
    module = importlib.import_module(f"signgate.keys.kms.{BACKEND_MODULES[scheme][0]}")
    backend = module.backend(scheme)
    assert isinstance(backend, KeyBackend)
    return backend


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
