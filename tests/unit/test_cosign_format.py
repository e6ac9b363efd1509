"""cosign's encrypted key format against cosign's and go-securesystemslib's own vectors."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from signgate.errors import KeyMaterialError, UnsupportedKey, WrongPassword
from signgate.keys.cosign_format import (
    LEGACY_SCRYPT_PARAMS,
    OWASP_SCRYPT_PARAMS,
    STANDARD_SCRYPT_PARAMS,
    EncryptedData,
    ScryptParams,
    decode_pem,
    decrypt,
    decrypt_private_key,
    encode_pem,
    encrypt,
    encrypt_private_key,
    parse_unencrypted_private_key,
    scrypt_key,
)
from signgate.keys.model import PublicKey
from tests.vectors import vector

ENCRYPTED = "encrypted-keys"
SSLIB = "sslib-encrypted"
IMPORT = "import-keys"


class RecordingDerivation:
    """Real scrypt, counting the calls: proves what is refused before any derivation."""

    def __init__(self) -> None:
        self.calls: list[ScryptParams] = []

    def __call__(self, password: bytes, salt: bytes, params: ScryptParams) -> bytes:
        self.calls.append(params)
        return scrypt_key(password, salt, params)


def pkcs8(key: Any) -> bytes:
    der: bytes = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return der


# --- cosign's encrypted keys (pkg/cosign/keys_test.go), password "hello" ----------------------


@pytest.mark.parametrize("name", ["cosign-keys-test-sigstore", "cosign-keys-test-cosign"])
def test_cosign_vector_decrypts_to_its_plaintext(name: str) -> None:
    pem = vector(ENCRYPTED, f"{name}.key").read_bytes()
    plaintext = bytes.fromhex(vector(ENCRYPTED, f"{name}.plaintext.hex").read_text().strip())

    key = decrypt_private_key(pem, b"hello", source=f"{name}.key")

    assert pkcs8(key) == plaintext
    assert PublicKey(key.public_key()) == PublicKey.from_pem(
        vector(ENCRYPTED, f"{name}.pub").read_bytes()
    )


def test_both_pem_labels_are_read() -> None:
    labels = {
        decode_pem(vector(ENCRYPTED, f"{name}.key").read_bytes(), source=name).label
        for name in ("cosign-keys-test-sigstore", "cosign-keys-test-cosign")
    }
    assert labels == {"ENCRYPTED SIGSTORE PRIVATE KEY", "ENCRYPTED COSIGN PRIVATE KEY"}


def test_sec1_plaintext_decrypts_but_is_refused_as_cosign_does() -> None:
    name = "cosign-keys-test-cosign-sec1"
    pem = vector(ENCRYPTED, f"{name}.key").read_bytes()
    block = decode_pem(pem, source=name)
    plaintext = bytes.fromhex(vector(ENCRYPTED, f"{name}.plaintext.hex").read_text().strip())

    # The password is right (N=65536 here) ...
    assert decrypt(block.body, b"hello", source=name) == plaintext
    # ... but the plaintext is SEC1, which cosign's x509.ParsePKCS8PrivateKey refuses.
    with pytest.raises(KeyMaterialError, match="SEC1, not PKCS#8") as caught:
        decrypt_private_key(pem, b"hello", source="sec1.key")
    assert not isinstance(caught.value, WrongPassword)
    assert "sec1.key" in caught.value.diagnostics()


@pytest.mark.parametrize("password", [b"hello", b"", b"password"])
def test_ci_key_refuses_wrong_passwords_cleanly(password: bytes) -> None:
    pem = vector(ENCRYPTED, "cosign-ci-test.key").read_bytes()
    with pytest.raises(WrongPassword) as caught:
        decrypt_private_key(pem, password, source="cosign-ci-test.key")
    assert caught.value.diagnostics() == "wrong password for cosign-ci-test.key"


@pytest.mark.parametrize(
    "name",
    ["cosign-keys-test-sigstore", "cosign-keys-test-cosign", "cosign-keys-test-cosign-sec1"],
)
def test_json_layer_is_reproduced_byte_for_byte(name: str) -> None:
    inner = vector(ENCRYPTED, f"{name}.inner.json").read_bytes()
    assert EncryptedData.parse(inner, source=name).to_json() == inner


@pytest.mark.parametrize("name", ["cosign-keys-test-sigstore", "cosign-ci-test"])
def test_pem_is_written_as_go_writes_it(name: str) -> None:
    pem = vector(ENCRYPTED, f"{name}.key").read_bytes().strip() + b"\n"
    block = decode_pem(pem, source=name)
    assert encode_pem(block.label, block.body) == pem


# --- go-securesystemslib's encrypted package (encrypted_test.go), password "supersecret" ------


@pytest.mark.parametrize(
    ("name", "params", "plaintext"),
    [
        ("marshal-legacy-n32768.json", LEGACY_SCRYPT_PARAMS, b'"cmVhbGx5aW1wb3J0YW50"'),
        ("marshal-standard-n65536.json", STANDARD_SCRYPT_PARAMS, b'"cmVhbGx5aW1wb3J0YW50"'),
        ("marshal-owasp-n131072.json", OWASP_SCRYPT_PARAMS, b'"cmVhbGx5aW1wb3J0YW50"'),
        ("encrypt-legacy-n32768.json", LEGACY_SCRYPT_PARAMS, b"reallyimportant"),
    ],
)
def test_sslib_vectors_decrypt(name: str, params: ScryptParams, plaintext: bytes) -> None:
    derivation = RecordingDerivation()
    data = vector(SSLIB, name).read_bytes()
    assert decrypt(data, b"supersecret", source=name, derive_key=derivation) == plaintext
    assert derivation.calls == [params]


def test_sslib_unsupported_parameters_are_refused_before_scrypt() -> None:
    derivation = RecordingDerivation()
    data = vector(SSLIB, "unsupported-params.json").read_bytes()
    with pytest.raises(KeyMaterialError, match="unsupported scrypt parameters"):
        decrypt(data, b"supersecret", source="unsupported-params.json", derive_key=derivation)
    assert derivation.calls == []


def with_fields(base: dict[str, Any], path: str, value: Any) -> bytes:
    """The document ``base`` with the field at dotted ``path`` set (or deleted if ...)."""
    document = json.loads(json.dumps(base))
    *parents, last = path.split(".")
    target = document
    for part in parents:
        target = target[part]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return json.dumps(document).encode()


B64_16 = base64.b64encode(bytes(16)).decode()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("kdf.params.N", 16384, r"unsupported scrypt parameters \(N=16384 r=8 p=1\)"),
        ("kdf.params.N", 262144, "unsupported scrypt parameters"),
        # 2**40 would need 128 TiB: refused by the table, never attempted.
        ("kdf.params.N", 2**40, "unsupported scrypt parameters"),
        ("kdf.params.r", 16, "unsupported scrypt parameters"),
        ("kdf.params.p", 2, "unsupported scrypt parameters"),
        ("kdf.params.N", "65536", "kdf.params.N in the encrypted key is malformed"),
        ("kdf.params.p", True, "kdf.params.p in the encrypted key is malformed"),
        ("kdf.params", ..., "has no kdf.params"),
        ("kdf.name", "argon2", "unknown kdf name 'argon2'"),
        ("kdf.name", ..., "has no kdf.name"),
        ("cipher.name", "aes-256-gcm", "unknown cipher name 'aes-256-gcm'"),
        ("kdf", ..., "has no kdf"),
        ("cipher", [], "cipher in the encrypted key is malformed"),
        ("kdf.salt", B64_16, "salt is 16 bytes, expected 32"),
        ("kdf.salt", "not base64!", "kdf.salt is not valid base64"),
        ("cipher.nonce", B64_16, "nonce is 16 bytes, expected 24"),
        ("ciphertext", B64_16[:8], "the ciphertext is truncated"),
        ("ciphertext", ..., "has no ciphertext"),
    ],
)
def test_malformed_documents_are_refused_before_scrypt(path: str, value: Any, message: str) -> None:
    base = json.loads(vector(ENCRYPTED, "cosign-keys-test-sigstore.inner.json").read_bytes())
    derivation = RecordingDerivation()
    with pytest.raises(KeyMaterialError, match=message) as caught:
        decrypt(with_fields(base, path, value), b"hello", source="x.key", derive_key=derivation)
    assert caught.value.diagnostics().startswith("x.key: ")
    assert derivation.calls == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"kdf":', "not valid JSON"),
        (b"[]", "has no kdf"),
    ],
)
def test_non_json_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(KeyMaterialError, match=message):
        decrypt(data, b"hello", source="x.key")


def test_tampered_ciphertext_fails_the_mac() -> None:
    document = json.loads(vector(ENCRYPTED, "cosign-keys-test-sigstore.inner.json").read_bytes())
    ciphertext = bytearray(base64.b64decode(document["ciphertext"]))
    ciphertext[-1] ^= 1
    document["ciphertext"] = base64.b64encode(ciphertext).decode()
    with pytest.raises(WrongPassword, match=r"wrong password for x\.key"):
        decrypt(json.dumps(document).encode(), b"hello", source="x.key")


def corrupt_pems() -> list[Any]:
    good = vector(ENCRYPTED, "cosign-keys-test-sigstore.key").read_bytes()
    lines = good.splitlines(keepends=True)
    return [
        pytest.param(b"", "no PEM block found", id="empty"),
        pytest.param(b"hello world\n", "no PEM block found", id="text"),
        pytest.param(good[: len(good) // 2], "no PEM block found", id="cut-in-half"),
        pytest.param(
            lines[0] + b"!!!not base64!!!\n" + lines[-1], "not valid base64", id="bad-base64"
        ),
        pytest.param(lines[0] + lines[1] + lines[-1], "not valid JSON", id="truncated-body"),
        pytest.param(
            vector(IMPORT, "ec-p256-pkcs8.pub").read_bytes(),
            "not an encrypted cosign private key",
            id="public-key",
        ),
        pytest.param(
            vector(IMPORT, "ec-p256-pkcs8.pem").read_bytes(),
            "not an encrypted cosign private key",
            id="plain-private-key",
        ),
    ]


@pytest.mark.parametrize(("pem", "message"), corrupt_pems())
def test_corrupt_key_files_give_one_line_errors(pem: bytes, message: str) -> None:
    with pytest.raises(KeyMaterialError, match=message) as caught:
        decrypt_private_key(pem, b"hello", source="broken.key")
    text = caught.value.diagnostics()
    assert text.startswith("broken.key: ")
    assert "\n" not in text
    assert not isinstance(caught.value, WrongPassword)


# --- writing ----------------------------------------------------------------------------------


def test_encrypted_key_round_trips_with_standard_parameters() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    derivation = RecordingDerivation()

    pem = encrypt_private_key(key, b"s3cret", derive_key=derivation)

    block = decode_pem(pem, source="new.key")
    assert block.label == "ENCRYPTED SIGSTORE PRIVATE KEY"
    document = json.loads(block.body)
    assert list(document) == ["kdf", "cipher", "ciphertext"]
    assert list(document["kdf"]) == ["name", "params", "salt"]
    assert document["kdf"]["params"] == {"N": 65536, "r": 8, "p": 1}
    assert b" " not in block.body
    assert derivation.calls == [STANDARD_SCRYPT_PARAMS]
    assert pkcs8(decrypt_private_key(pem, b"s3cret", source="new.key")) == pkcs8(key)
    with pytest.raises(WrongPassword):
        decrypt_private_key(pem, b"s3cret\n", source="new.key")


def test_each_encryption_uses_a_fresh_salt_and_nonce() -> None:
    first = EncryptedData.parse(encrypt(b"x", b"pw"), source="a")
    second = EncryptedData.parse(encrypt(b"x", b"pw"), source="b")
    assert first.salt != second.salt
    assert first.nonce != second.nonce


def test_empty_password_is_a_password() -> None:
    data = encrypt(b"plaintext", b"")
    assert decrypt(data, b"", source="k") == b"plaintext"
    with pytest.raises(WrongPassword):
        decrypt(data, b" ", source="k")


# --- plain keys for import (cosign's TestImportPrivateKey) -----------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("ec-p256-sec1", ec.EllipticCurvePrivateKey),
        ("ec-p256-pkcs8", ec.EllipticCurvePrivateKey),
        ("ec-p384-sec1", ec.EllipticCurvePrivateKey),
        ("ed25519-pkcs8", ed25519.Ed25519PrivateKey),
        ("rsa2048-pkcs1", rsa.RSAPrivateKey),
        ("rsa2048-pkcs8", rsa.RSAPrivateKey),
    ],
)
def test_import_vectors_are_accepted(name: str, kind: type[Any]) -> None:
    key = parse_unencrypted_private_key(vector(IMPORT, f"{name}.pem").read_bytes(), source=name)
    assert isinstance(key, kind)
    assert PublicKey(key.public_key()) == PublicKey.from_pem(
        vector(IMPORT, f"{name}.pub").read_bytes()
    )
    pem = encrypt_private_key(key, b"pw")
    assert pkcs8(decrypt_private_key(pem, b"pw", source=name)) == pkcs8(key)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("reject-rsa1024-pkcs1", "RSA key size 1024 is too small; minimum 2048"),
        (
            "reject-ec-p224-sec1",
            "ECDSA curve P-224 is not supported; use P-256, P-384 or P-521",
        ),
        (
            "reject-ec-secp256k1-sec1",
            "ECDSA curve secp256k1 is not supported; use P-256, P-384 or P-521",
        ),
    ],
)
def test_weak_or_unsupported_import_vectors_are_refused(name: str, message: str) -> None:
    path = vector(IMPORT, f"{name}.pem")
    with pytest.raises(UnsupportedKey) as caught:
        parse_unencrypted_private_key(path.read_bytes(), source=path.name)
    assert caught.value.diagnostics() == f"{path.name}: {message}"


def test_import_refuses_other_pem_blocks() -> None:
    with pytest.raises(KeyMaterialError, match="unsupported PEM block 'PUBLIC KEY'"):
        parse_unencrypted_private_key(vector(IMPORT, "ec-p256-pkcs8.pub").read_bytes(), source="k")
    with pytest.raises(KeyMaterialError, match="already an encrypted cosign private key"):
        parse_unencrypted_private_key(
            vector(ENCRYPTED, "cosign-ci-test.key").read_bytes(), source="k"
        )


def test_import_refuses_a_label_that_does_not_match_the_body() -> None:
    sec1_body = decode_pem(vector(IMPORT, "ec-p256-sec1.pem").read_bytes(), source="k").body
    with pytest.raises(KeyMaterialError, match="the RSA PRIVATE KEY PEM block is malformed"):
        parse_unencrypted_private_key(encode_pem("RSA PRIVATE KEY", sec1_body), source="k")


def test_vector_paths_exist() -> None:
    # The vectors are data beside the project; a missing directory must fail loudly.
    assert Path(vector(ENCRYPTED)).is_dir()
