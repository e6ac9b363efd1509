"""hashivault:// and openbao:// references, settings and Transit replies: the pure parts."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from signgate.errors import KMSError
from signgate.keys.kms.vault import (
    TransitBackend,
    TransitKeyRef,
    TransitSettings,
    describe_transit_key,
    parse_signature_reply,
    parse_transit_ref,
    retirement_config,
    transit_settings,
)
from signgate.keys.model import PublicKey
from signgate.keys.refs import (
    KeyBackend,
    KeyCreator,
    KeyDisabler,
    KeyVersioner,
    VersionedKeys,
    split_key_ref,
)


@pytest.mark.parametrize(
    ("scheme", "location", "expected"),
    [
        ("hashivault", "release", TransitKeyRef("hashivault", "release")),
        ("openbao", "release", TransitKeyRef("openbao", "release")),
        ("hashivault", "a", TransitKeyRef("hashivault", "a")),
        ("hashivault", "team_a.release-2", TransitKeyRef("hashivault", "team_a.release-2")),
        ("hashivault", "_x_", TransitKeyRef("hashivault", "_x_")),
        ("hashivault", "release?version=1", TransitKeyRef("hashivault", "release", 1)),
        ("openbao", "release?version=42", TransitKeyRef("openbao", "release", 42)),
    ],
)
def test_valid_references(scheme: str, location: str, expected: TransitKeyRef) -> None:
    ref = parse_transit_ref(scheme, location)
    assert ref == expected
    assert str(ref) == f"{scheme}://{location}"


@pytest.mark.parametrize(
    ("location", "complaint"),
    [
        ("", "not a Transit key reference"),
        ("-release", "not a Transit key reference"),
        ("release-", "not a Transit key reference"),
        (".release", "not a Transit key reference"),
        ("team/release", "not a Transit key reference"),
        ("transit/keys/release", "not a Transit key reference"),
        ("rélease", "not a Transit key reference"),
        ("release key", "not a Transit key reference"),
        ("?version=1", "not a Transit key reference"),
        ("release?", "the only query"),
        ("release?version=", "the only query"),
        ("release?version=0", "the only query"),
        ("release?version=01", "the only query"),
        ("release?version=-1", "the only query"),
        ("release?version=latest", "the only query"),
        ("release?v=1", "the only query"),
        ("release?version=1&version=2", "the only query"),
        ("release?version=1#x", "the only query"),
    ],
)
def test_invalid_references(location: str, complaint: str) -> None:
    with pytest.raises(KMSError, match=complaint) as refused:
        parse_transit_ref("hashivault", location)
    assert f"hashivault://{location}" in str(refused.value)


def settings(environ: dict[str, str], tmp_path: Path, scheme: str = "hashivault"
             ) -> TransitSettings:
    return transit_settings(TransitKeyRef(scheme, "k"), environ, tmp_path / ".vault-token")


# cosign reads VAULT_* before BAO_* for both schemes (sigstore pkg/signature/kms/hashivault).
@pytest.mark.parametrize("scheme", ["hashivault", "openbao"])
@pytest.mark.parametrize(
    ("environ", "address", "token"),
    [
        ({"VAULT_ADDR": "http://v", "VAULT_TOKEN": "vt"}, "http://v", "vt"),
        ({"BAO_ADDR": "http://b", "BAO_TOKEN": "bt"}, "http://b", "bt"),
        (
            {"VAULT_ADDR": "http://v", "BAO_ADDR": "http://b", "VAULT_TOKEN": "vt",
             "BAO_TOKEN": "bt"},
            "http://v", "vt",
        ),
        ({"VAULT_ADDR": "", "BAO_ADDR": "http://b", "VAULT_TOKEN": "", "BAO_TOKEN": "bt"},
         "http://b", "bt"),
        ({"BAO_ADDR": "http://b", "VAULT_TOKEN": "vt"}, "http://b", "vt"),
    ],
)
def test_address_and_token_in_cosigns_order(
    scheme: str, environ: dict[str, str], address: str, token: str, tmp_path: Path
) -> None:
    resolved = settings(environ, tmp_path, scheme)
    assert (resolved.address, resolved.token) == (address, token)
    assert resolved.mount == "transit"
    assert resolved.namespace is None
    assert resolved.ca_cert is None


def test_token_file_is_the_last_resort(tmp_path: Path) -> None:
    (tmp_path / ".vault-token").write_text("file-token\n")
    assert settings({"VAULT_ADDR": "http://v"}, tmp_path).token == "file-token"
    assert settings({"VAULT_ADDR": "http://v", "BAO_TOKEN": "bt"}, tmp_path).token == "bt"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"VAULT_TOKEN": "t"},
            "hashivault://k: set VAULT_ADDR or BAO_ADDR to the address of Vault",
        ),
        (
            {"VAULT_ADDR": "http://v"},
            "hashivault://k: no Vault token: set VAULT_TOKEN or BAO_TOKEN",
        ),
        ({"VAULT_ADDR": "http://v", "VAULT_TOKEN": ""}, "hashivault://k: no Vault token"),
    ],
)
def test_missing_settings(environ: dict[str, str], message: str, tmp_path: Path) -> None:
    with pytest.raises(KMSError) as refused:
        settings(environ, tmp_path)
    assert str(refused.value).startswith(message)


def test_openbao_messages_name_openbao(tmp_path: Path) -> None:
    with pytest.raises(KMSError, match="address of OpenBao"):
        settings({}, tmp_path, "openbao")


@pytest.mark.parametrize("token", ["s.abc\n", "s.a bc", "s.abc\r\nX-Injected: 1", "tökén"])
def test_a_token_unfit_for_a_header_is_refused_without_showing_it(
    token: str, tmp_path: Path
) -> None:
    with pytest.raises(KMSError, match="the token in VAULT_TOKEN has spaces or control") as e:
        settings({"VAULT_ADDR": "http://v", "VAULT_TOKEN": token}, tmp_path)
    assert "s.a" not in str(e.value)
    assert "tök" not in str(e.value)


def test_mount_namespace_and_ca(tmp_path: Path) -> None:
    resolved = settings(
        {
            "VAULT_ADDR": "https://user:pw@vault.example:8200/", "VAULT_TOKEN": "t",
            "TRANSIT_SECRET_ENGINE_PATH": "/team/transit/", "BAO_NAMESPACE": "ns1",
            "VAULT_CACERT": "/etc/ca.pem",
        },
        tmp_path,
    )
    assert resolved.mount == "team/transit"
    assert resolved.namespace == "ns1"
    assert resolved.ca_cert == "/etc/ca.pem"
    assert resolved.display_address == "https://vault.example:8200/"
    assert "token" not in repr(resolved)


def pem_of_new_key() -> tuple[str, PublicKey]:
    public = PublicKey(ec.generate_private_key(ec.SECP256R1()).public_key())
    return public.pem().decode(), public


def key_reply(versions: range, **fields: Any) -> tuple[dict[str, Any], dict[int, PublicKey]]:
    keys: dict[str, Any] = {}
    public_keys: dict[int, PublicKey] = {}
    for version in versions:
        pem, public_keys[version] = pem_of_new_key()
        keys[str(version)] = {"name": "P-256", "public_key": pem, "creation_time": "x"}
    data = {
        "type": "ecdsa-p256", "keys": keys, "latest_version": versions[-1],
        "min_decryption_version": 1, "min_available_version": 0, **fields,
    }
    return data, public_keys


REF = TransitKeyRef("hashivault", "release")


def test_every_version_from_min_decryption_to_latest_is_trusted() -> None:
    data, public_keys = key_reply(range(1, 4))
    key = describe_transit_key(REF, data)
    assert key.latest_version == 3
    assert key.public_keys == public_keys
    assert key.versions_for(REF) == [1, 2, 3]
    assert key.signing_version(REF) == 3
    pinned = TransitKeyRef("hashivault", "release", 2)
    assert key.versions_for(pinned) == [2]
    assert key.signing_version(pinned) == 2


@pytest.mark.parametrize(
    ("fields", "trusted"),
    [
        ({"min_decryption_version": 3}, [3, 4]),
        ({"min_available_version": 2}, [2, 3, 4]),
        ({"min_decryption_version": 2, "min_available_version": 3}, [3, 4]),
        ({"min_decryption_version": 4}, [4]),
    ],
)
def test_versions_transit_no_longer_verifies_with_are_dropped(
    fields: dict[str, int], trusted: list[int]
) -> None:
    data, _ = key_reply(range(1, 5), **fields)
    assert describe_transit_key(REF, data).versions_for(REF) == trusted


def test_a_version_outside_the_trusted_range_is_refused() -> None:
    data, _ = key_reply(range(1, 4), min_decryption_version=2)
    key = describe_transit_key(REF, data)
    with pytest.raises(KMSError, match=r"hashivault://release\?version=1: .*no usable version 1 "
                       r"\(it has versions 2 to 3\)"):
        key.versions_for(TransitKeyRef("hashivault", "release", 1))
    with pytest.raises(KMSError, match="no usable version 7"):
        key.signing_version(TransitKeyRef("hashivault", "release", 7))


@pytest.mark.parametrize(
    ("version", "fields", "config"),
    [
        # Retiring version N raises min_decryption_version to N+1...
        (1, {}, {"min_decryption_version": 2}),
        (3, {}, {"min_decryption_version": 4}),
        (2, {"min_decryption_version": 2}, {"min_decryption_version": 3}),
        # ...and a non-zero min_encryption_version with it, never leaving it below.
        (2, {"min_encryption_version": 2}, {"min_decryption_version": 3,
                                            "min_encryption_version": 3}),
        (2, {"min_encryption_version": 3}, {"min_decryption_version": 3}),
        (1, {"min_encryption_version": 4}, {"min_decryption_version": 2}),
        # Retired already: nothing to change, never a lower minimum.
        (1, {"min_decryption_version": 2}, None),
        (2, {"min_decryption_version": 4}, None),
    ],
)
def test_retiring_a_version_raises_the_minimum_versions(
    version: int, fields: dict[str, int], config: dict[str, int] | None
) -> None:
    data, _ = key_reply(range(1, 5), **fields)
    ref = TransitKeyRef("hashivault", "release", version)
    assert retirement_config(ref, data) == config


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (None, "hashivault://release: Transit cannot disable a whole key, only retire its older "
               "versions; name the version to retire, as in hashivault://release?version=N "
               "(versions up to N are retired)"),
        (4, "hashivault://release?version=4: version 4 is the Transit key's latest, which "
            "Transit cannot retire; add a new version first (rotate the key)"),
        (5, "hashivault://release?version=5: the Transit key has no version 5 (latest 4)"),
    ],
)
def test_what_transit_cannot_retire(version: int | None, message: str) -> None:
    data, _ = key_reply(range(1, 5))
    with pytest.raises(KMSError) as refused:
        retirement_config(TransitKeyRef("hashivault", "release", version), data)
    assert refused.value.diagnostics() == message


@pytest.mark.parametrize(
    ("key_type", "keys"),
    [
        ("aes256-gcm96", {"1": 1796402403}),
        ("chacha20-poly1305", {"1": 1796402403}),
        ("rsa-2048", {"1": {"name": "rsa-2048", "public_key": "..."}}),
        ("ecdsa-p384", {"1": {"name": "P-384", "public_key": "..."}}),
        ("ed25519", {"1": {"name": "ed25519", "public_key": "..."}}),
        (None, {}),
    ],
)
def test_other_key_types_are_refused_by_name(key_type: str | None, keys: dict[str, Any]) -> None:
    data = {"type": key_type, "keys": keys, "latest_version": 1}
    with pytest.raises(KMSError) as refused:
        describe_transit_key(REF, data)
    assert str(refused.value) == (
        f"hashivault://release: the Transit key is of type {key_type}; signgate signs with "
        "ecdsa-p256 keys, as cosign does (create one with generate-key-pair --kms)"
    )


@pytest.mark.parametrize(
    "broken",
    [
        {"latest_version": 3},
        {"keys": {"1": {"public_key": "not pem"}}},
        {"keys": {"1": "flat"}},
        {"latest_version": None},
        {"keys": None},
    ],
)
def test_malformed_key_replies(broken: dict[str, Any]) -> None:
    data, _ = key_reply(range(1, 2))
    data.update(broken)
    with pytest.raises(KMSError, match="hashivault://release: "):
        describe_transit_key(REF, data)


def test_signature_reply() -> None:
    der = ec.generate_private_key(ec.SECP256R1()).sign(b"x", ec.ECDSA(hashes.SHA256()))
    reply = f"vault:v12:{base64.b64encode(der).decode()}"
    assert parse_signature_reply(REF, reply) == (12, der)


@pytest.mark.parametrize(
    "reply",
    [None, 42, "", "MEUCIQ==", "vault:v0:MEUCIQ==", "vault:v1:", "vault:v1:MEUCIQ",
     "vault:vx:MEUCIQ==", "vault:v1:MEUC IQ==", "vault:v1:MEUCIQ==\n"],
)
def test_malformed_signature_replies(reply: object) -> None:
    with pytest.raises(KMSError, match="hashivault://release: Transit's sign reply"):
        parse_signature_reply(REF, reply)


@pytest.mark.parametrize("scheme", ["hashivault", "openbao"])
def test_both_schemes_reach_a_backend_that_creates_and_has_versions(scheme: str) -> None:
    assert split_key_ref(f"{scheme}://release?version=2") == (scheme, "release?version=2")
    backend = TransitBackend(scheme)
    assert isinstance(backend, KeyBackend)
    assert isinstance(backend, KeyCreator)
    assert isinstance(backend, VersionedKeys)
    assert isinstance(backend, KeyDisabler)
    assert isinstance(backend, KeyVersioner)
