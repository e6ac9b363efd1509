"""``pkcs11:token=T;object=O?module-path=M&pin-value=P``: an EC key on a PKCS#11 token (an HSM).

The URI is read as cosign reads it (``Pkcs11UriConfig.Parse`` in pkg/cosign/pkcs11key/util.go,
https://github.com/sigstore/cosign/blob/main/pkg/cosign/pkcs11key/util.go): RFC 7512 path
attributes ``token``, ``slot-id``, ``object`` and ``id``; query attributes ``module-path`` and
``pin-value``, else ``COSIGN_PKCS11_MODULE_PATH`` and ``COSIGN_PKCS11_PIN``. A PIN in the URI is
visible to every user of the machine (``ps``), so the environment variable is the better home.

The private key never leaves the token: signgate hashes the payload and the token signs the
digest with ``CKM_ECDSA`` (SoftHSM2 and many HSMs lack ``CKM_ECDSA_SHA256``), returning raw
r||s. The SDK is python-pkcs11 (``pip install 'signgate[pkcs11]'``).

Disabling a key sets ``CKA_SIGN`` false on the private key and ``CKA_VERIFY`` false on its
public key object, so that the token refuses to sign with it and signgate refuses to trust a
public key its token marks as not for verifying; setting them back enables it again. The token
must allow the change (``CKA_MODIFIABLE``). Keys on a token have no versions: a new key pair is
a new key.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import secrets
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import quote, unquote_to_bytes

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from signgate.errors import KMSError, UnsupportedKey
from signgate.keys.kms import DigestSigner, require_extra
from signgate.keys.model import PublicKey
from signgate.keys.password import PasswordSource

if TYPE_CHECKING:
    from pkcs11 import Attribute as AttributeType
    from pkcs11.types import Session, Token

SCHEME = "pkcs11"
MODULE_PATH_ENV = "COSIGN_PKCS11_MODULE_PATH"
PIN_ENV = "COSIGN_PKCS11_PIN"

# Characters cosign leaves unencoded in a path attribute value (pathAttrValueChars).
_PATH_VALUE_SAFE = "-._~:[]@!$'()*+,=&"
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PATH_ATTRIBUTES = ("token", "slot-id", "object", "id")
_QUERY_ATTRIBUTES = ("module-path", "pin-value")

# DER of the namedCurve OID in CKA_EC_PARAMS.
_CURVES_BY_PARAMS: dict[bytes, ec.EllipticCurve] = {
    bytes.fromhex("06082a8648ce3d030107"): ec.SECP256R1(),
    bytes.fromhex("06052b81040022"): ec.SECP384R1(),
    bytes.fromhex("06052b81040023"): ec.SECP521R1(),
}
P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")


@dataclass(frozen=True)
class Pkcs11Uri:
    """The parts of a ``pkcs11:`` key reference signgate uses; the PIN is never shown."""

    token: str | None = None
    slot_id: int | None = None
    object_label: str | None = None
    object_id: bytes | None = None
    module_path: str | None = None
    pin: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """The reference without its query (which may hold the PIN), for messages."""
        parts = []
        if self.token is not None:
            parts.append(f"token={quote(self.token, safe=_PATH_VALUE_SAFE)}")
        if self.slot_id is not None:
            parts.append(f"slot-id={self.slot_id}")
        if self.object_id is not None:
            parts.append("id=" + "".join(f"%{byte:02x}" for byte in self.object_id))
        if self.object_label is not None:
            parts.append(f"object={quote(self.object_label, safe=_PATH_VALUE_SAFE)}")
        return f"{SCHEME}:" + ";".join(parts)

    @property
    def key_description(self) -> str:
        """How the key is named on its token: ``'O'`` or ``id %01%02``."""
        if self.object_label is not None:
            return repr(self.object_label)
        assert self.object_id is not None
        return "id " + "".join(f"%{byte:02x}" for byte in self.object_id)

    @property
    def token_description(self) -> str:
        if self.token is not None:
            return f"token {self.token!r}"
        return f"slot {self.slot_id}"


def parse_pkcs11_uri(location: str) -> Pkcs11Uri:
    """Parse a reference without its ``pkcs11:`` prefix, as cosign does.

    As in cosign, ``;`` and ``&`` both separate attributes, values are percent-decoded with
    ``+`` read as a space (Go's ``url.ParseQuery``), and attributes signgate does not use
    (``type``, ``serial``...) are ignored. Unlike cosign, an attribute given twice is refused
    rather than the first one silently winning.
    """
    path, _, query = location.partition("?")
    shown = f"{SCHEME}:{path}"
    if "#" in location:
        raise KMSError(f"{shown}: a PKCS#11 URI has no fragment; write '#' as %23")
    path_attributes = _attributes(path, _PATH_ATTRIBUTES, shown)
    query_attributes = _attributes(query, _QUERY_ATTRIBUTES, shown)
    if "pin-source" in _attribute_names(query):
        raise KMSError(f"{shown}: pin-source is not supported; set {PIN_ENV} instead")

    def text(attributes: dict[str, bytes], name: str) -> str | None:
        value = attributes.get(name)
        if not value:
            return None
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise KMSError(f"{shown}: the {name} attribute is not UTF-8") from e

    slot_text = text(path_attributes, "slot-id")
    slot_id = None
    if slot_text is not None:
        if not slot_text.isascii() or not slot_text.isdigit():
            raise KMSError(f"{shown}: slot-id {slot_text!r} is not a number")
        slot_id = int(slot_text)
    uri = Pkcs11Uri(
        token=text(path_attributes, "token"),
        slot_id=slot_id,
        object_label=text(path_attributes, "object"),
        object_id=path_attributes.get("id") or None,
        module_path=text(query_attributes, "module-path"),
        pin=text(query_attributes, "pin-value"),
    )
    if uri.token is None and uri.slot_id is None:
        raise KMSError(f"{shown}: name the token with token=LABEL or slot-id=N")
    if uri.object_label is None and uri.object_id is None:
        raise KMSError(f"{shown}: name the key with object=LABEL or id=%XX...")
    return uri


def _attribute_names(part: str) -> list[str]:
    return [item.partition("=")[0] for item in re.split("[;&]", part) if item]


def _attributes(part: str, wanted: tuple[str, ...], shown: str) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for item in re.split("[;&]", part):
        if not item:
            continue
        raw_name, _, raw_value = item.partition("=")
        name = _unescape(raw_name, shown).decode("utf-8", "replace")
        if name not in wanted:
            continue
        if name in found:
            raise KMSError(f"{shown}: the {name} attribute is given more than once")
        found[name] = _unescape(raw_value, shown)
    return found


def _unescape(value: str, shown: str) -> bytes:
    if _BAD_ESCAPE.search(value):
        # Never echo the value: it may be the PIN.
        raise KMSError(f"{shown}: invalid percent-encoding in the URI")
    return unquote_to_bytes(value.replace("+", " "))


def ec_public_key(ec_params: bytes, ec_point: bytes) -> ec.EllipticCurvePublicKey:
    """The public key of ``CKA_EC_PARAMS`` and ``CKA_EC_POINT``.

    PKCS#11 says the point is a DER OCTET STRING, but some tokens store the bare point: the
    curve's point sizes tell them apart.
    """
    curve = _CURVES_BY_PARAMS.get(ec_params)
    if curve is None:
        raise UnsupportedKey("the key's EC curve is not supported; use P-256, P-384 or P-521")
    size = (curve.key_size + 7) // 8
    bare = ec_point[:1] in (b"\x02", b"\x03", b"\x04") and len(ec_point) in (1 + size, 1 + 2 * size)
    point = ec_point if bare else _octet_string(ec_point)
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
    except ValueError as e:
        raise UnsupportedKey("the token's EC point is not a point on its curve") from e


def _octet_string(der: bytes) -> bytes:
    if len(der) >= 2 and der[0] == 0x04:
        if der[1] < 0x80 and len(der) == 2 + der[1]:
            return der[2:]
        if der[1] == 0x81 and len(der) >= 3 and len(der) == 3 + der[2]:
            return der[3:]
    raise UnsupportedKey("the token's EC point is neither a DER OCTET STRING nor a bare point")


def backend(scheme: str) -> Pkcs11Backend:
    require_extra("pkcs11", "pkcs11", scheme)
    return Pkcs11Backend()


@dataclass
class _OpenToken:
    """One session on one token, shared by every use in this process.

    PKCS#11 login is per application, not per session: a second C_Login fails and closing any
    logged-in session logs all of them out. So each token gets one session, used under a lock.
    """

    session: Session
    pin_digest: bytes | None  # SHA-256 of the PIN it logged in with; None: not logged in
    lock: threading.Lock = field(default_factory=threading.Lock)


class Pkcs11Backend:
    """Keys on PKCS#11 tokens.

    ``environ`` defaults to the process's environment; ``ask_pin`` is asked for the PIN when a
    login is needed and neither the URI nor the environment has one (by default: a prompt on
    the terminal, if there is one; ``None`` means no PIN).
    """

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        ask_pin: Callable[[str], str | None] | None = None,
    ) -> None:
        self._environ = environ
        self._ask_pin = ask_pin or ask_pin_on_terminal
        self._tokens: dict[tuple[str, int], _OpenToken] = {}
        self._tokens_lock = threading.Lock()

    def signer(self, location: str, password: PasswordSource) -> DigestSigner:
        uri = parse_pkcs11_uri(location)
        token = self._open(uri, login=True)
        with token.lock, _pkcs11_errors(uri):
            private_key = _find_private_key(token, uri)
            public_key = _public_key_for(token, uri, private_key_id=private_key.id)

        def sign_digest(digest: bytes) -> bytes:
            import pkcs11

            with token.lock, _pkcs11_errors(uri):
                signature: bytes = private_key.sign(digest, mechanism=pkcs11.Mechanism.ECDSA)
            return signature

        return DigestSigner(public_key, sign_digest, uri.name)

    def public_key(self, location: str, password: PasswordSource) -> PublicKey:
        uri = parse_pkcs11_uri(location)
        token = self._open(uri, login=False)
        with token.lock, _pkcs11_errors(uri):
            return _public_key_for(token, uri, private_key_id=None)

    def create_key(self, location: str, password: PasswordSource) -> PublicKey:
        """An EC P-256 key pair on the token under the URI's label (and id, if given)."""
        from pkcs11 import Attribute, KeyType, MechanismFlag

        uri = parse_pkcs11_uri(location)
        token = self._open(uri, login=True)
        with token.lock, _pkcs11_errors(uri):
            if not token.session.rw:
                raise KMSError(f"{uri.name}: {uri.token_description} is write-protected")
            existing = list(token.session.get_objects(_search(uri)))
            if existing:
                raise KMSError(
                    f"{uri.name}: {uri.token_description} already holds an object named "
                    f"{uri.key_description}; choose another object label"
                )
            parameters = token.session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: P256_PARAMS}, local=True
            )
            public, _ = parameters.generate_keypair(
                store=True,
                label=uri.object_label,
                # crypto11 (cosign) pairs a private key with the public key of the same id.
                id=uri.object_id or secrets.token_bytes(16),
                capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                public_template={Attribute.TOKEN: True, Attribute.PRIVATE: False},
                private_template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                },
            )
            return PublicKey(_ec_public_key_of(public, uri))

    def disable_key(self, location: str) -> str:
        """``CKA_SIGN`` false on the private key, ``CKA_VERIFY`` false on its public key object
        (if it has one): a key pair marked so neither signs nor is trusted by signgate."""
        from pkcs11 import Attribute, ObjectClass

        uri = parse_pkcs11_uri(location)
        token = self._open(uri, login=True)
        with token.lock, _pkcs11_errors(uri):
            if not token.session.rw:
                raise KMSError(f"{uri.name}: {uri.token_description} is write-protected")
            private_key = _one(token, uri, ObjectClass.PRIVATE_KEY)
            if private_key is None:
                _refuse_missing(token, uri, "private key")
            _require_ec(private_key.key_type, uri)
            extra = {"ID": private_key.id} if private_key.id else {}
            public = _one(token, uri, ObjectClass.PUBLIC_KEY, **extra)
            changes = [(private_key, Attribute.SIGN, "CKA_SIGN false on the private key")]
            if public is not None:
                changes.append((public, Attribute.VERIFY, "CKA_VERIFY false on its public key"))
            # Every object is checked before any is changed, so that a refusal leaves the
            # pair as it was rather than half disabled.
            if not all(obj[Attribute.MODIFIABLE] for obj, _, _ in changes):
                raise KMSError(
                    f"{uri.name}: the key {uri.key_description} on {uri.token_description} "
                    "cannot be disabled: the token keeps it unmodifiable (CKA_MODIFIABLE false)"
                )
            for obj, attribute, _ in changes:
                if obj[attribute]:
                    obj[attribute] = False
        return f"{uri.name}: " + ", ".join(done for _, _, done in changes)

    def close(self) -> None:
        """Close every session this backend opened (logging the tokens out)."""
        with self._tokens_lock:
            tokens, self._tokens = list(self._tokens.values()), {}
        for token in tokens:
            with token.lock:
                token.session.close()

    def _open(self, uri: Pkcs11Uri, login: bool) -> _OpenToken:
        import pkcs11

        environ = os.environ if self._environ is None else self._environ
        module_path = uri.module_path or environ.get(MODULE_PATH_ENV) or None
        pin = uri.pin or environ.get(PIN_ENV) or None
        with self._tokens_lock:
            library = _load_module(uri, module_path)
            with _pkcs11_errors(uri):
                token = _find_token(library, uri, module_path or "")
                key = (module_path or "", token.slot.slot_id)
                opened = self._tokens.get(key)
                needs_pin = login and bool(token.flags & pkcs11.TokenFlag.LOGIN_REQUIRED)
                if opened is not None and _can_reuse(opened, pin, needs_pin, uri):
                    return opened
                if pin is None and needs_pin:
                    # cosign's prompt (pkcs11key.go).
                    pin = self._ask_pin(
                        f"Enter PIN for key {uri.key_description} in PKCS11 "
                        f"{uri.token_description}: "
                    )
                    if not pin:
                        raise KMSError(
                            f"{uri.name}: {uri.token_description} needs the user PIN: "
                            f"set {PIN_ENV}"
                        )
                rw = not token.flags & pkcs11.TokenFlag.WRITE_PROTECTED
                try:
                    session = token.open(rw=rw, user_pin=pin)
                except pkcs11.UserAlreadyLoggedIn as e:
                    raise KMSError(
                        f"{uri.name}: {uri.token_description} is already logged in by "
                        "another session of this process"
                    ) from e
                if opened is not None:
                    with opened.lock:
                        opened.session.close()
                opened = _OpenToken(session, None if pin is None else _digest(pin))
                self._tokens[key] = opened
                return opened


def _can_reuse(opened: _OpenToken, pin: str | None, needs_pin: bool, uri: Pkcs11Uri) -> bool:
    if opened.pin_digest is None:
        return not needs_pin and pin is None
    if pin is not None and _digest(pin) != opened.pin_digest:
        raise KMSError(
            f"{uri.name}: {uri.token_description} is already logged in with another PIN "
            "in this process"
        )
    return True


def _digest(pin: str) -> bytes:
    return hashlib.sha256(pin.encode()).digest()


def ask_pin_on_terminal(prompt: str) -> str | None:
    """The PIN typed at a terminal; ``None`` when stdin is not one."""
    if sys.stdin is None or not sys.stdin.isatty():
        return None
    try:
        return getpass.getpass(prompt)
    except EOFError:
        return None


def _load_module(uri: Pkcs11Uri, module_path: str | None) -> Any:
    import pkcs11

    if module_path is None:
        raise KMSError(
            f"{uri.name}: no PKCS#11 module: add ?module-path=/path/to/module.so "
            f"or set {MODULE_PATH_ENV}"
        )
    path = Path(module_path)
    if not path.is_absolute():
        raise KMSError(f"{uri.name}: the PKCS#11 module path {module_path} is not absolute")
    if not path.is_file():
        raise KMSError(f"{uri.name}: PKCS#11 module {module_path} not found")
    try:
        return pkcs11.lib(module_path)
    except pkcs11.PKCS11Error as e:
        loading = f"OS exception while loading {module_path}: "
        message = str(e)
        if message.startswith(loading):
            # dlopen's own words: "invalid ELF header", "undefined symbol: C_GetFunctionList".
            detail = message.removeprefix(loading).removeprefix(f"{module_path}: ")
            raise KMSError(
                f"{uri.name}: cannot load PKCS#11 module {module_path}: {detail}"
            ) from e
        raise KMSError(
            f"{uri.name}: PKCS#11 module {module_path} failed to initialise "
            f"({type(e).__name__})"
        ) from e


def _find_token(library: Any, uri: Pkcs11Uri, module_path: str) -> Token:
    import pkcs11

    if uri.slot_id is None:
        try:
            token: Token = library.get_token(token_label=uri.token)
        except pkcs11.NoSuchToken as e:
            raise KMSError(
                f"{uri.name}: no token labelled {uri.token!r} in PKCS#11 module {module_path}"
            ) from e
        except pkcs11.MultipleTokensReturned as e:
            raise KMSError(
                f"{uri.name}: several tokens are labelled {uri.token!r}; name one by slot-id"
            ) from e
        return token
    for slot in library.get_slots(token_present=True):
        if slot.slot_id == uri.slot_id:
            token = slot.get_token()
            if uri.token is not None and token.label != uri.token:
                raise KMSError(
                    f"{uri.name}: the token in slot {uri.slot_id} is labelled {token.label!r}"
                )
            return token
    raise KMSError(f"{uri.name}: no token in slot {uri.slot_id} of PKCS#11 module {module_path}")


def _search(uri: Pkcs11Uri, **extra: Any) -> dict[AttributeType, Any]:
    from pkcs11 import Attribute

    attributes: dict[AttributeType, Any] = {}
    if uri.object_label is not None:
        attributes[Attribute.LABEL] = uri.object_label
    if uri.object_id is not None:
        attributes[Attribute.ID] = uri.object_id
    for name, value in extra.items():
        attributes[Attribute[name]] = value
    return attributes


def _one(token: _OpenToken, uri: Pkcs11Uri, object_class: Any, **extra: Any) -> Any | None:
    found = list(token.session.get_objects(_search(uri, CLASS=object_class, **extra)))
    if len(found) > 1:
        kind = object_class.name.lower().replace("_", " ")
        raise KMSError(
            f"{uri.name}: {len(found)} {kind}s on {uri.token_description} match "
            f"{uri.key_description}; add id= to the URI to pick one"
        )
    return found[0] if found else None


def _find_private_key(token: _OpenToken, uri: Pkcs11Uri) -> Any:
    from pkcs11 import ObjectClass, SignMixin

    key = _one(token, uri, ObjectClass.PRIVATE_KEY)
    if key is None:
        _refuse_missing(token, uri, "private key")
    _require_ec(key.key_type, uri)
    if not isinstance(key, SignMixin):
        raise KMSError(
            f"{uri.name}: the key {uri.key_description} may not sign (CKA_SIGN is false: "
            "it is disabled, or not made for signing)"
        )
    return key


def _public_key_for(
    token: _OpenToken, uri: Pkcs11Uri, private_key_id: bytes | None
) -> PublicKey:
    """The public half, from its public key object or else from a certificate, as crypto11."""
    from pkcs11 import Attribute, ObjectClass

    extra = {"ID": private_key_id} if private_key_id else {}
    public = _one(token, uri, ObjectClass.PUBLIC_KEY, **extra)
    if public is not None:
        _require_ec(public.key_type, uri)
        if not public[Attribute.VERIFY]:
            raise KMSError(
                f"{uri.name}: the key {uri.key_description} on {uri.token_description} is "
                "disabled (CKA_VERIFY false on its public key)"
            )
        return PublicKey(_ec_public_key_of(public, uri))
    certificate = _one(token, uri, ObjectClass.CERTIFICATE, **extra)
    if certificate is not None:
        try:
            key = x509.load_der_x509_certificate(certificate[Attribute.VALUE]).public_key()
        except ValueError as e:
            raise KMSError(f"{uri.name}: the certificate on the token cannot be read") from e
        if not isinstance(key, ec.EllipticCurvePublicKey):
            _wrong_type(type(key).__name__.lstrip("_").removesuffix("PublicKey"), uri)
        return _checked(key, uri)
    _refuse_missing(token, uri, "public key or certificate")


def _ec_public_key_of(public: Any, uri: Pkcs11Uri) -> ec.EllipticCurvePublicKey:
    from pkcs11 import Attribute

    try:
        key = ec_public_key(public[Attribute.EC_PARAMS], public[Attribute.EC_POINT])
    except UnsupportedKey as e:
        raise KMSError(f"{uri.name}: {e}") from e
    return key


def _checked(key: ec.EllipticCurvePublicKey, uri: Pkcs11Uri) -> PublicKey:
    try:
        return PublicKey(key)
    except UnsupportedKey as e:
        raise KMSError(f"{uri.name}: {e}") from e


def _require_ec(key_type: Any, uri: Pkcs11Uri) -> None:
    from pkcs11 import KeyType

    if key_type != KeyType.EC:
        _wrong_type(getattr(key_type, "name", str(key_type)), uri)


def _wrong_type(kind: str, uri: Pkcs11Uri) -> NoReturn:
    raise KMSError(
        f"{uri.name}: the key {uri.key_description} is an {kind} key; signgate needs an EC "
        "key (P-256)"
    )


def _refuse_missing(token: _OpenToken, uri: Pkcs11Uri, wanted: str) -> NoReturn:
    from pkcs11 import ObjectClass

    classes = {obj.object_class for obj in token.session.get_objects(_search(uri))}
    if ObjectClass.SECRET_KEY in classes:
        raise KMSError(
            f"{uri.name}: the key {uri.key_description} is a secret (symmetric) key; signgate "
            "needs an EC key pair (P-256)"
        )
    hint = "" if token.pin_digest is not None else f" (if it is a private object, set {PIN_ENV})"
    raise KMSError(
        f"{uri.name}: no {wanted} {uri.key_description} on {uri.token_description}{hint}"
    )


_PIN_ERRORS = {
    "PinIncorrect": "refused the PIN (CKR_PIN_INCORRECT)",
    "PinInvalid": "refused the PIN (CKR_PIN_INVALID)",
    "PinLenRange": "refused the PIN (CKR_PIN_LEN_RANGE)",
    "PinLocked": "has locked its user PIN (CKR_PIN_LOCKED)",
    "PinExpired": "says the PIN has expired (CKR_PIN_EXPIRED)",
    "UserPinNotInitialized": "has no user PIN set (CKR_USER_PIN_NOT_INITIALIZED)",
    "UserNotLoggedIn": f"needs a login (CKR_USER_NOT_LOGGED_IN): set {PIN_ENV}",
    "TokenNotPresent": "is not present (CKR_TOKEN_NOT_PRESENT)",
    "DeviceRemoved": "was removed (CKR_DEVICE_REMOVED)",
}


@contextmanager
def _pkcs11_errors(uri: Pkcs11Uri) -> Iterator[None]:
    """Turn python-pkcs11's exceptions into one-line :class:`KMSError`s.

    Messages are built from the exception's class only: neither python-pkcs11 nor signgate
    ever puts the PIN in them.
    """
    import pkcs11

    try:
        yield
    except pkcs11.PKCS11Error as e:
        kind = type(e).__name__
        problem = _PIN_ERRORS.get(kind)
        if problem is not None:
            raise KMSError(f"{uri.name}: {uri.token_description} {problem}") from e
        raise KMSError(f"{uri.name}: the PKCS#11 module failed: {kind}") from e
