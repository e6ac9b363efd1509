"""``pkcs11:`` references: the URI grammar as cosign reads it, and EC keys from token attributes.

The token itself (SoftHSM2) is exercised in tests/integration/test_kms_pkcs11.py.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signgate.errors import KMSError, UnsupportedKey
from signgate.keys.kms.pkcs11 import Pkcs11Uri, ec_public_key, parse_pkcs11_uri
from signgate.keys.refs import split_key_ref

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
SECRET_PIN = "s3cret-PIN-9731"


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        (
            f"pkcs11:token=T;object=O?module-path={MODULE}&pin-value=1234",
            Pkcs11Uri(token="T", object_label="O", module_path=MODULE, pin="1234"),
        ),
        ("pkcs11:token=T;object=O", Pkcs11Uri(token="T", object_label="O")),
        # cosign's url.ParseQuery: "&" separates path attributes too, ";" query ones.
        ("pkcs11:token=T&object=O", Pkcs11Uri(token="T", object_label="O")),
        (
            f"pkcs11:token=T;object=O?module-path={MODULE};pin-value=1",
            Pkcs11Uri(token="T", object_label="O", module_path=MODULE, pin="1"),
        ),
        ("pkcs11:slot-id=42;object=O", Pkcs11Uri(slot_id=42, object_label="O")),
        (
            "pkcs11:token=T;slot-id=7;id=%01%02%ff",
            Pkcs11Uri(token="T", slot_id=7, object_id=b"\x01\x02\xff"),
        ),
        (
            "pkcs11:token=My%20Token;object=release%2Fkey",
            Pkcs11Uri(token="My Token", object_label="release/key"),
        ),
        # Go's url.ParseQuery reads "+" as a space; so does cosign, so signgate does too.
        ("pkcs11:token=My+Token;object=O", Pkcs11Uri(token="My Token", object_label="O")),
        ("pkcs11:token=%C3%A9;object=cl%C3%A9", Pkcs11Uri(token="é", object_label="clé")),
        # Attributes cosign does not use are ignored, as cosign ignores them.
        (
            "pkcs11:model=SoftHSM%20v2;token=T;type=private;object=O?module-name=softhsm2",
            Pkcs11Uri(token="T", object_label="O"),
        ),
        # Empty values count as absent, as in cosign.
        ("pkcs11:token=T;slot-id=;object=O;id=", Pkcs11Uri(token="T", object_label="O")),
        (
            "pkcs11:token=T;object=O?pin-value=a%26b%3Dc",
            Pkcs11Uri(token="T", object_label="O", pin="a&b=c"),
        ),
    ],
)
def test_valid_uris(ref: str, expected: Pkcs11Uri) -> None:
    scheme, location = split_key_ref(ref)
    assert scheme == "pkcs11"
    assert parse_pkcs11_uri(location) == expected


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("object=O", "pkcs11:object=O: name the token with token=LABEL or slot-id=N"),
        ("", "pkcs11:: name the token with token=LABEL or slot-id=N"),
        ("token=T", "pkcs11:token=T: name the key with object=LABEL or id=%XX..."),
        ("token=T;type=private", "pkcs11:token=T;type=private: name the key with"),
        ("slot-id=x1;object=O", "pkcs11:slot-id=x1;object=O: slot-id 'x1' is not a number"),
        ("slot-id=-1;object=O", "slot-id '-1' is not a number"),
        ("token=T;object=O;object=P", "the object attribute is given more than once"),
        ("token=T;object=%zz", "pkcs11:token=T;object=%zz: invalid percent-encoding"),
        ("token=T;object=%ff", "the object attribute is not UTF-8"),
        ("token=T;object=O#frag", "a PKCS#11 URI has no fragment"),
        ("token=T;object=O?pin-source=file:/pin", "pin-source is not supported; set COSIGN_"),
        ("token=T;object=O?module-path=/a.so&module-path=/b.so", "given more than once"),
    ],
)
def test_invalid_uris(location: str, message: str) -> None:
    with pytest.raises(KMSError) as caught:
        parse_pkcs11_uri(location)
    diagnostics = caught.value.diagnostics()
    assert diagnostics.startswith(f"pkcs11:{location.partition('?')[0]}: ")
    assert message in diagnostics


@pytest.mark.parametrize(
    "query",
    [
        f"pin-value={SECRET_PIN}%zz",  # a bad escape inside the PIN itself
        f"pin-value={SECRET_PIN}&pin-value=other",
        f"pin-value={SECRET_PIN}&pin-source=file:/pin",
    ],
)
def test_errors_never_show_the_pin(query: str) -> None:
    for path in ("token=T;object=O", "object=O", "token=T", "token=T;object=%zz"):
        with pytest.raises(KMSError) as caught:
            parse_pkcs11_uri(f"{path}?{query}")
        assert SECRET_PIN not in str(caught.value)
        assert "?" not in str(caught.value)


def test_repr_and_name_leave_the_pin_out() -> None:
    uri = parse_pkcs11_uri(
        f"token=My Token;id=%0a%ff;object=a/b?module-path={MODULE}&pin-value={SECRET_PIN}"
    )
    assert uri.pin == SECRET_PIN
    assert SECRET_PIN not in repr(uri)
    assert uri.name == "pkcs11:token=My%20Token;id=%0a%ff;object=a%2Fb"
    assert parse_pkcs11_uri(uri.name.removeprefix("pkcs11:")) == Pkcs11Uri(
        token="My Token", object_id=b"\n\xff", object_label="a/b"
    )
    assert parse_pkcs11_uri("slot-id=3;id=%01").name == "pkcs11:slot-id=3;id=%01"


# --- the public key from CKA_EC_PARAMS and CKA_EC_POINT -----------------------------------

CURVE_PARAMS = [
    (ec.SECP256R1(), "06082a8648ce3d030107"),
    (ec.SECP384R1(), "06052b81040022"),
    (ec.SECP521R1(), "06052b81040023"),
]


def _octet_string(content: bytes) -> bytes:
    length = bytes([len(content)]) if len(content) < 0x80 else bytes([0x81, len(content)])
    return b"\x04" + length + content


@pytest.mark.parametrize(("curve", "params"), CURVE_PARAMS)
@pytest.mark.parametrize(
    "encoding",
    [serialization.PublicFormat.UncompressedPoint, serialization.PublicFormat.CompressedPoint],
)
@pytest.mark.parametrize("wrapped", [True, False], ids=["der-octet-string", "bare-point"])
def test_ec_public_key_from_token_attributes(
    curve: ec.EllipticCurve, params: str, encoding: serialization.PublicFormat, wrapped: bool
) -> None:
    expected = ec.generate_private_key(curve).public_key()
    point = expected.public_bytes(serialization.Encoding.X962, encoding)

    key = ec_public_key(bytes.fromhex(params), _octet_string(point) if wrapped else point)

    assert key == expected


def test_a_bare_point_that_looks_like_an_octet_string_header() -> None:
    # A P-256 point whose X starts with 0x3f: "04 3f ..." is 65 bytes, as a DER OCTET STRING
    # of 63 bytes would be; the curve's point size decides.
    while True:
        expected = ec.generate_private_key(ec.SECP256R1()).public_key()
        point = expected.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        if point[1] == 0x3F:
            break
    assert ec_public_key(bytes.fromhex(CURVE_PARAMS[0][1]), point) == expected


@pytest.mark.parametrize(
    ("params", "point", "message"),
    [
        ("06052b8104000a", b"\x04" * 65, "curve is not supported"),  # secp256k1
        ("06082a8648ce3d030107", b"\x05\x02ab", "neither a DER OCTET STRING nor a bare point"),
        ("06082a8648ce3d030107", b"", "neither a DER OCTET STRING nor a bare point"),
        ("06082a8648ce3d030107", _octet_string(b"\x04" + b"\x00" * 64), "not a point"),
        ("06082a8648ce3d030107", _octet_string(b"\x04" * 3), "not a point"),
    ],
)
def test_ec_public_key_refuses(params: str, point: bytes, message: str) -> None:
    with pytest.raises(UnsupportedKey, match=message):
        ec_public_key(bytes.fromhex(params), point)
