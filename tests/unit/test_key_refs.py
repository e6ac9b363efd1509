"""Key references by scheme, and the signers they give."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from signgate.errors import KeyMaterialError, KMSError, WrongPassword
from signgate.keys import files
from signgate.keys.cosign_format import encrypt_private_key, parse_unencrypted_private_key
from signgate.keys.model import PrivateKeySigner, PublicKey
from signgate.keys.password import fixed_password
from signgate.keys.refs import (
    KEY_BACKENDS,
    add_key_version,
    disable_key,
    load_public_key,
    load_public_keys,
    load_signer,
    split_key_ref,
)
from tests.vectors import vector

PASSWORD = b"pw"
PAYLOAD = b'{"critical":{"type":"cosign container image signature"},"optional":null}'
IMPORTABLE = ["ec-p256-pkcs8", "ec-p256-sec1", "ec-p384-sec1", "ed25519-pkcs8", "rsa2048-pkcs1"]


def never_asked() -> bytes:
    raise AssertionError("the password was asked for")


@pytest.fixture
def key_pair(tmp_path: Path) -> files.KeyPairFiles:
    return files.generate_key_pair(tmp_path / "cosign", fixed_password(PASSWORD))


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("cosign.key", ("", "cosign.key")),
        ("/abs/path/cosign.key", ("", "/abs/path/cosign.key")),
        ("dir:with:colons/k.pub", ("", "dir:with:colons/k.pub")),
        ("env://COSIGN_KEY", ("env", "COSIGN_KEY")),
        ("hashivault://release", ("hashivault", "release")),
        ("awskms:///alias/release", ("awskms", "/alias/release")),
        ("gcpkms://projects/p/locations/l", ("gcpkms", "projects/p/locations/l")),
        (
            "pkcs11:token=t;object=o?module-path=/m.so",
            ("pkcs11", "token=t;object=o?module-path=/m.so"),
        ),
        ("k8s://ns/secret", ("k8s", "ns/secret")),
    ],
)
def test_split_key_ref(ref: str, expected: tuple[str, str]) -> None:
    assert split_key_ref(ref) == expected


def test_only_files_and_env_are_implemented_now() -> None:
    assert sorted(KEY_BACKENDS) == ["", "env"]


def test_unknown_scheme_lists_the_supported_ones() -> None:
    with pytest.raises(KeyMaterialError) as caught:
        load_public_key("https://example.com/cosign.pub", never_asked)
    assert caught.value.diagnostics() == (
        "unknown key reference scheme https://; supported: a file path, awskms://, "
        "azurekms://, env://, gcpkms://, hashivault://, k8s://, openbao://, pkcs11:"
    )


def test_empty_reference_is_refused() -> None:
    with pytest.raises(KeyMaterialError, match="empty key reference"):
        load_signer("", never_asked)


# --- files --------------------------------------------------------------------------------


def test_file_signer_signs_what_the_public_key_verifies(key_pair: files.KeyPairFiles) -> None:
    signer = load_signer(str(key_pair.private_key), fixed_password(PASSWORD))
    public = load_public_key(str(key_pair.public_key), never_asked)

    signature = signer.sign(PAYLOAD)

    assert signer.public_key() == public
    assert public.verify(signature, PAYLOAD)
    assert not public.verify(signature, PAYLOAD + b" ")


def test_public_key_of_a_private_key_file_needs_its_password(
    key_pair: files.KeyPairFiles,
) -> None:
    expected = PublicKey.from_pem(key_pair.public_key.read_bytes())
    assert load_public_key(str(key_pair.private_key), fixed_password(PASSWORD)) == expected
    with pytest.raises(WrongPassword, match=r"wrong password for .*cosign\.key"):
        load_public_key(str(key_pair.private_key), fixed_password(b"wrong"))


def test_public_key_file_cannot_sign(key_pair: files.KeyPairFiles) -> None:
    with pytest.raises(KeyMaterialError, match="holds a public key; signing needs a private key"):
        load_signer(str(key_pair.public_key), never_asked)


def test_password_is_asked_only_when_a_key_is_decrypted(key_pair: files.KeyPairFiles) -> None:
    asked: list[int] = []

    def counting() -> bytes:
        asked.append(1)
        return PASSWORD

    signer = load_signer(str(key_pair.private_key), counting)
    assert asked == [1]
    load_public_keys([str(key_pair.public_key)] * 3, counting)
    assert asked == [1]
    assert signer.public_key() == load_public_key(str(key_pair.public_key))


def test_load_public_keys_keeps_order(tmp_path: Path) -> None:
    refs = [str(vector("import-keys", f"{name}.pub")) for name in IMPORTABLE]
    keys = load_public_keys(refs, never_asked)
    assert [key.pem() for key in keys] == [Path(ref).read_bytes() for ref in refs]


def test_a_non_key_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a key")
    with pytest.raises(KeyMaterialError, match=r"notes\.txt: no PEM block found"):
        load_public_key(str(tmp_path / "notes.txt"), never_asked)


# --- env:// -------------------------------------------------------------------------------


def test_env_holding_an_encrypted_key(
    key_pair: files.KeyPairFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIGNGATE_TEST_KEY", key_pair.private_key.read_text())
    signer = load_signer("env://SIGNGATE_TEST_KEY", fixed_password(PASSWORD))
    assert signer.public_key() == PublicKey.from_pem(key_pair.public_key.read_bytes())
    with pytest.raises(WrongPassword) as caught:
        load_signer("env://SIGNGATE_TEST_KEY", fixed_password(b"wrong"))
    assert caught.value.diagnostics() == "wrong password for env://SIGNGATE_TEST_KEY"


@pytest.mark.parametrize("name", ["ec-p256-pkcs8", "ec-p256-sec1", "rsa2048-pkcs1"])
def test_env_holding_a_plain_private_key(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGNGATE_TEST_KEY", vector("import-keys", f"{name}.pem").read_text())
    expected = PublicKey.from_pem(vector("import-keys", f"{name}.pub").read_bytes())
    signer = load_signer("env://SIGNGATE_TEST_KEY", never_asked)
    assert signer.public_key() == expected
    assert load_public_key("env://SIGNGATE_TEST_KEY", never_asked) == expected


def test_env_holding_a_public_key(monkeypatch: pytest.MonkeyPatch) -> None:
    pem = vector("import-keys", "ed25519-pkcs8.pub").read_bytes()
    monkeypatch.setenv("SIGNGATE_TEST_KEY", pem.decode())
    assert load_public_key("env://SIGNGATE_TEST_KEY", never_asked).pem() == pem


def test_env_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIGNGATE_UNSET_KEY", raising=False)
    with pytest.raises(
        KeyMaterialError, match="environment variable SIGNGATE_UNSET_KEY is not set"
    ):
        load_public_key("env://SIGNGATE_UNSET_KEY", never_asked)
    with pytest.raises(KeyMaterialError, match="env:// needs a variable name"):
        load_public_key("env://", never_asked)
    monkeypatch.setenv("SIGNGATE_TEST_KEY", "garbage")
    with pytest.raises(KeyMaterialError, match="env://SIGNGATE_TEST_KEY: no PEM block found"):
        load_signer("env://SIGNGATE_TEST_KEY", never_asked)


# --- signers: each algorithm in its own scheme --------------------------------------------


@pytest.mark.parametrize("name", IMPORTABLE)
def test_signer_round_trips_for_each_algorithm(name: str, tmp_path: Path) -> None:
    key = parse_unencrypted_private_key(
        vector("import-keys", f"{name}.pem").read_bytes(), source=name
    )
    (tmp_path / "k.key").write_bytes(encrypt_private_key(key, PASSWORD))
    signer = load_signer(str(tmp_path / "k.key"), fixed_password(PASSWORD))
    public = PublicKey.from_pem(vector("import-keys", f"{name}.pub").read_bytes())

    signature = signer.sign(PAYLOAD)

    assert public.verify(signature, PAYLOAD)
    assert not public.verify(signature, PAYLOAD[:-1])
    assert not public.verify(signature[:-1] + bytes([signature[-1] ^ 1]), PAYLOAD)


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()])
def test_ecdsa_signs_der_with_sha256_on_every_curve(curve: ec.EllipticCurve) -> None:
    private = ec.generate_private_key(curve)
    signature = PrivateKeySigner(private).sign(PAYLOAD)
    # As cosign: SHA-256 whatever the curve, ASN.1 DER.
    private.public_key().verify(signature, PAYLOAD, ec.ECDSA(hashes.SHA256()))
    assert signature[0] == 0x30


def raw(signature: bytes, size: int) -> bytes:
    r, s = decode_dss_signature(signature)
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def test_raw_r_s_signatures_verify_even_when_they_start_like_der() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    signer = PrivateKeySigner(private)
    public = signer.public_key()
    seen_der_like = False
    # About one raw signature in 256 starts with 0x30 (SEQUENCE); DER-first handling must
    # still fall back to r||s for those.
    for i in range(2000):
        payload = PAYLOAD + str(i).encode()
        signature = raw(signer.sign(payload), 32)
        assert public.verify(signature, payload)
        assert not public.verify(signature, payload + b"x")
        if signature[0] == 0x30:
            seen_der_like = True
            break
    assert seen_der_like
    assert not public.verify(b"\x00" * 64, PAYLOAD)
    assert not public.verify(signature[:63], payload)


@pytest.mark.parametrize("curve", [ec.SECP384R1(), ec.SECP521R1()])
def test_larger_curves_also_accept_sha256_as_cosign_2_signs(curve: ec.EllipticCurve) -> None:
    private = ec.generate_private_key(curve)
    public = PublicKey(private.public_key())
    assert public.verify(private.sign(PAYLOAD, ec.ECDSA(hashes.SHA256())), PAYLOAD)
    assert not public.verify(private.sign(PAYLOAD, ec.ECDSA(hashes.SHA224())), PAYLOAD)


@pytest.mark.parametrize(
    ("ref", "shown"),
    [
        ("cosign.key", "cosign.key"),
        ("hashivault://release?version=2", "hashivault://release?version=2"),
        (
            "pkcs11:token=T;object=O?module-path=/lib/x.so&pin-value=1234",
            "pkcs11:token=T;object=O?module-path=/lib/x.so&pin-value=***",
        ),
        (
            "pkcs11:token=T;object=O?pin-value=1234;module-path=/m",
            "pkcs11:token=T;object=O?pin-value=***;module-path=/m",
        ),
        ("pkcs11:token=t;pin-value=secret?module-path=/m", "pkcs11:token=t;pin-value=***?module-path=/m"),  # noqa: E501
        ("awskms://user:hunter2@kms.example/alias/x", "awskms://user:***@kms.example/alias/x"),
    ],
)
def test_display_key_ref_hides_pins(ref: str, shown: str) -> None:
    from signgate.keys.refs import display_key_ref

    assert display_key_ref(ref) == shown


def test_missing_sdk_names_the_extra() -> None:
    from signgate.errors import KMSError
    from signgate.keys.kms import require_extra

    with pytest.raises(KMSError, match=r"pkcs11: keys need .*pip install 'signgate\[pkcs11\]'"):
        require_extra("no_such_sdk_module", "pkcs11", "pkcs11")


@pytest.mark.parametrize(
    ("ref", "shown", "kept"),
    [
        ("cosign.key", "cosign.key", "file"),
        ("/keys/cosign.pub", "/keys/cosign.pub", "file"),
        ("env://COSIGN_KEY", "env://COSIGN_KEY", "in an environment variable"),
    ],
)
def test_files_and_env_keys_are_neither_disabled_nor_versioned(
    ref: str, shown: str, kept: str
) -> None:
    with pytest.raises(KeyMaterialError) as disabled:
        disable_key(ref)
    assert disabled.value.diagnostics() == (
        f"{shown}: a key {kept} cannot be disabled; stop using it and delete it yourself "
        "once no verifier trusts it"
    )
    with pytest.raises(KeyMaterialError) as versioned:
        add_key_version(ref)
    assert versioned.value.diagnostics() == (
        f"{shown}: a key {kept} has no versions; rotate to a new key instead"
    )
    assert not isinstance(disabled.value, KMSError)


def test_kms_refusals_never_show_a_pin() -> None:
    ref = "pkcs11:token=T;object=k?module-path=/nowhere.so&pin-value=secret-1234"
    with pytest.raises(KMSError) as refused:
        add_key_version(ref)
    assert refused.value.diagnostics() == (
        "pkcs11:token=T;object=k?module-path=/nowhere.so&pin-value=***: pkcs11: keys have no "
        "versions; rotate to a new key instead"
    )
