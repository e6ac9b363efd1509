"""hashivault:// and openbao:// against a real OpenBao dev server, and cosign verifying the result.

Debian's cosign builds lack the hashivault provider, so cosign verifies with the exported
``cosign.pub``; signgate itself reads the key from Transit.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from signgate.errors import KMSError
from signgate.keys.kms.vault import TransitBackend
from signgate.keys.model import PublicKey
from signgate.keys.refs import (
    add_key_version,
    create_key,
    disable_key,
    load_public_keys,
    load_signer,
)
from signgate.reference import Repository
from signgate.registry import RegistryClient, RegistryOptions
from signgate.registry.images import push_image
from tests.integration.openbao_server import OpenBaoServer, running_openbao
from tests.integration.tools import run, signgate, tool_env

pytestmark = pytest.mark.integration

PAYLOAD = b'{"critical":{"type":"cosign container image signature"},"optional":null}'


def no_password() -> bytes:
    raise AssertionError("a Transit key never needs a password")


@pytest.fixture(scope="module")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBaoServer]:
    with running_openbao(tmp_path_factory.mktemp("openbao")) as server:
        server.enable_transit("transit")
        yield server


@pytest.fixture
def key_name() -> str:
    return f"signgate-{secrets.token_hex(4)}"


def transit(
    server: OpenBaoServer, tmp_path: Path, scheme: str = "hashivault", **environ: str
) -> TransitBackend:
    """A backend that sees only ``environ`` (by default the server's address and root token)."""
    settings = {"VAULT_ADDR": server.address, "VAULT_TOKEN": server.root_token, **environ}
    return TransitBackend(
        scheme, {k: v for k, v in settings.items() if v}, tmp_path / "no-token-file"
    )


def transit_verifies(server: OpenBaoServer, name: str, version: int, signature: bytes) -> bool:
    """Transit's own verdict on a signature over PAYLOAD, as cosign's verifier asks it."""
    reply = server.api("POST", f"transit/verify/{name}/sha2-256", {
        "input": base64.b64encode(hashlib.sha256(PAYLOAD).digest()).decode(),
        "prehashed": True,
        "signature": f"vault:v{version}:{base64.b64encode(signature).decode()}",
    })
    valid: bool = reply["data"]["valid"]
    return valid


def test_create_makes_a_non_exportable_ecdsa_p256_key_and_refuses_to_replace_it(
    openbao: OpenBaoServer, tmp_path: Path, key_name: str
) -> None:
    backend = transit(openbao, tmp_path)
    created = backend.create_key(key_name, no_password)
    data = openbao.key_data("transit", key_name)
    assert data["type"] == "ecdsa-p256"
    assert data["exportable"] is False
    assert created == PublicKey.from_pem(data["keys"]["1"]["public_key"].encode())
    assert backend.public_key(key_name, no_password) == created
    with pytest.raises(KMSError, match="already exists") as refused:
        backend.create_key(key_name, no_password)
    assert f"hashivault://{key_name}" in str(refused.value)
    assert openbao.key_data("transit", key_name)["latest_version"] == 1


def test_signature_from_transit_verifies_here_and_in_transit(
    openbao: OpenBaoServer, tmp_path: Path, key_name: str
) -> None:
    backend = transit(openbao, tmp_path)
    public_key = backend.create_key(key_name, no_password)
    signer = backend.signer(key_name, no_password)
    signature = signer.sign(PAYLOAD)
    assert signer.public_key() == public_key
    assert public_key.verify(signature, PAYLOAD)
    assert not public_key.verify(signature, PAYLOAD + b" ")
    assert transit_verifies(openbao, key_name, 1, signature)


def test_rotation_signs_with_the_latest_version_and_verifiers_trust_every_version(
    openbao: OpenBaoServer, tmp_path: Path, key_name: str
) -> None:
    backend = transit(openbao, tmp_path)
    first = backend.create_key(key_name, no_password)
    openbao.rotate("transit", key_name)
    openbao.rotate("transit", key_name)
    versions = backend.public_keys(key_name, no_password)
    assert len(set(versions)) == 3
    assert versions[0] == first
    latest = backend.public_key(key_name, no_password)
    assert versions[-1] == latest

    signature = backend.signer(key_name, no_password).sign(PAYLOAD)
    assert latest.verify(signature, PAYLOAD)
    assert not first.verify(signature, PAYLOAD)
    assert transit_verifies(openbao, key_name, 3, signature)

    pinned = f"{key_name}?version=1"
    assert backend.public_key(pinned, no_password) == first
    assert backend.public_keys(pinned, no_password) == [first]
    old_signature = backend.signer(pinned, no_password).sign(PAYLOAD)
    assert first.verify(old_signature, PAYLOAD)
    assert transit_verifies(openbao, key_name, 1, old_signature)

    # Transit no longer verifies below min_decryption_version: neither does a verifier here.
    openbao.api("POST", f"transit/keys/{key_name}/config", {"min_decryption_version": 2})
    assert backend.public_keys(key_name, no_password) == versions[1:]
    with pytest.raises(KMSError, match=r"no usable version 1 \(it has versions 2 to 3\)"):
        backend.public_keys(pinned, no_password)
    with pytest.raises(KMSError, match="no usable version 9"):
        backend.signer(f"{key_name}?version=9", no_password)


# Retiring versions and adding new ones, through the reference functions rotation calls.


@pytest.fixture
def vault_env(openbao: OpenBaoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The process environment pointing hashivault:// references at the test server."""
    for name in list(os.environ):
        if name.startswith(("VAULT_", "BAO_")) or name == "TRANSIT_SECRET_ENGINE_PATH":
            monkeypatch.delenv(name)
    monkeypatch.setenv("VAULT_ADDR", openbao.address)
    monkeypatch.setenv("VAULT_TOKEN", openbao.root_token)


@pytest.mark.usefixtures("vault_env")
def test_a_new_version_signs_and_retiring_the_old_one_ends_trust_in_it(
    openbao: OpenBaoServer, key_name: str
) -> None:
    ref = f"hashivault://{key_name}"
    old_ref = f"{ref}?version=1"
    first = create_key(ref, no_password)
    old_signature = load_signer(old_ref, no_password).sign(PAYLOAD)

    second = add_key_version(ref)
    assert second != first
    assert openbao.key_data("transit", key_name)["latest_version"] == 2
    signer = load_signer(ref, no_password)
    assert signer.public_key() == second
    assert second.verify(signer.sign(PAYLOAD), PAYLOAD)
    # Until the old version is retired, verifiers of the reference trust both.
    assert load_public_keys([ref], no_password) == [first, second]

    shown = disable_key(old_ref)
    assert shown == (
        f"{old_ref}: version 1 retired in Vault at {openbao.address} "
        "(min_decryption_version 2)"
    )
    trusted = load_public_keys([ref], no_password)
    assert trusted == [second]
    assert not any(key.verify(old_signature, PAYLOAD) for key in trusted)
    with pytest.raises(KMSError) as refused:
        load_signer(old_ref, no_password)
    assert refused.value.diagnostics() == (
        f"{old_ref}: the Transit key has no usable version 1 (it has version 2)"
    )
    # Transit itself refuses the retired version, whoever asks.
    with pytest.raises(AssertionError, match="too old"):
        transit_verifies(openbao, key_name, 1, old_signature)

    assert disable_key(old_ref) == (
        f"{old_ref}: version 1 retired already in Vault at {openbao.address}"
    )
    assert openbao.key_data("transit", key_name)["min_decryption_version"] == 2
    assert second.verify(load_signer(ref, no_password).sign(PAYLOAD), PAYLOAD)


@pytest.mark.usefixtures("vault_env")
def test_retiring_a_version_retires_the_older_ones_and_keeps_min_encryption_in_step(
    openbao: OpenBaoServer, key_name: str
) -> None:
    ref = f"hashivault://{key_name}"
    create_key(ref, no_password)
    add_key_version(ref)
    third = add_key_version(ref)
    # Transit refuses a min_decryption_version above a non-zero min_encryption_version.
    openbao.api("POST", f"transit/keys/{key_name}/config", {"min_encryption_version": 2})

    disable_key(f"{ref}?version=2")
    data = openbao.key_data("transit", key_name)
    assert (data["min_decryption_version"], data["min_encryption_version"]) == (3, 3)
    assert load_public_keys([ref], no_password) == [third]
    with pytest.raises(KMSError, match="no usable version 1 "):
        load_signer(f"{ref}?version=1", no_password)
    # Retiring an older version afterwards changes nothing: it is retired already.
    assert disable_key(f"{ref}?version=1").endswith("version 1 retired already in Vault at "
                                                    f"{openbao.address}")
    assert openbao.key_data("transit", key_name)["min_decryption_version"] == 3


@pytest.mark.usefixtures("vault_env")
def test_transit_cannot_disable_a_whole_key_nor_retire_its_latest_version(
    openbao: OpenBaoServer, key_name: str
) -> None:
    ref = f"hashivault://{key_name}"
    create_key(ref, no_password)
    with pytest.raises(KMSError) as whole:
        disable_key(ref)
    assert whole.value.diagnostics() == (
        f"{ref}: Transit cannot disable a whole key, only retire its older versions; name the "
        f"version to retire, as in {ref}?version=N (versions up to N are retired)"
    )
    with pytest.raises(KMSError) as latest:
        disable_key(f"{ref}?version=1")
    assert latest.value.diagnostics() == (
        f"{ref}?version=1: version 1 is the Transit key's latest, which Transit cannot "
        "retire; add a new version first (rotate the key)"
    )
    with pytest.raises(KMSError, match=r"\?version=5: the Transit key has no version 5"):
        disable_key(f"{ref}?version=5")
    assert openbao.key_data("transit", key_name)["min_decryption_version"] == 1
    with pytest.raises(KMSError, match=f"no Transit key '{key_name}-none'"):
        add_key_version(f"{ref}-none")
    with pytest.raises(KMSError, match=f"no Transit key '{key_name}-none'"):
        disable_key(f"{ref}-none?version=1")


@pytest.mark.parametrize("key_type", ["aes256-gcm96", "rsa-2048", "ed25519", "ecdsa-p384"])
def test_keys_of_another_type_are_refused_by_name(
    openbao: OpenBaoServer, tmp_path: Path, key_name: str, key_type: str
) -> None:
    openbao.create_transit_key("transit", key_name, key_type)
    backend = transit(openbao, tmp_path)
    for use in (backend.signer, backend.public_key, backend.public_keys):
        with pytest.raises(KMSError) as refused:
            use(key_name, no_password)
        message = str(refused.value)
        assert f"hashivault://{key_name}" in message
        assert f"type {key_type}" in message
        assert "ecdsa-p256" in message
    # Nor is a new version made of it.
    with pytest.raises(KMSError, match=f"type {key_type}"):
        backend.add_key_version(key_name)
    assert openbao.key_data("transit", key_name)["latest_version"] == 1


def test_missing_key_and_missing_mount(
    openbao: OpenBaoServer, tmp_path: Path, key_name: str
) -> None:
    backend = transit(openbao, tmp_path)
    with pytest.raises(KMSError) as missing:
        backend.signer(key_name, no_password)
    assert str(missing.value) == (
        f"hashivault://{key_name}: no Transit key '{key_name}' at mount 'transit' of "
        f"Vault at {openbao.address}"
    )
    elsewhere = transit(openbao, tmp_path, TRANSIT_SECRET_ENGINE_PATH="nowhere")
    with pytest.raises(KMSError, match="no secrets engine is mounted at 'nowhere'"):
        elsewhere.public_key(key_name, no_password)
    with pytest.raises(KMSError, match="no secrets engine is mounted at 'nowhere'"):
        elsewhere.create_key(key_name, no_password)


def test_token_whose_policy_forbids_signing(
    openbao: OpenBaoServer, tmp_path: Path, key_name: str
) -> None:
    transit(openbao, tmp_path).create_key(key_name, no_password)
    reader = openbao.token_with_policy(
        f"read-{key_name}", f'path "transit/keys/{key_name}*" {{ capabilities = ["read"] }}'
    )
    backend = transit(openbao, tmp_path, VAULT_TOKEN=reader)
    assert backend.public_key(key_name, no_password)
    signer = backend.signer(key_name, no_password)
    with pytest.raises(KMSError) as refused:
        signer.sign(PAYLOAD)
    message = str(refused.value)
    assert message.startswith(f"hashivault://{key_name}: Vault at {openbao.address} denied "
                              "permission to sign with the Transit key")
    assert reader not in message
    assert "\n" not in message
    with pytest.raises(KMSError, match="denied permission to create the Transit key"):
        backend.create_key(f"{key_name}-new", no_password)


def test_unknown_token_is_refused_without_showing_it(
    openbao: OpenBaoServer, tmp_path: Path, key_name: str
) -> None:
    transit(openbao, tmp_path).create_key(key_name, no_password)
    bogus = f"s.{secrets.token_urlsafe(18)}"
    with pytest.raises(KMSError, match="denied permission to read the Transit key") as refused:
        transit(openbao, tmp_path, VAULT_TOKEN=bogus).public_key(key_name, no_password)
    assert bogus not in str(refused.value)
    assert openbao.root_token not in str(refused.value)


def test_server_down(tmp_path: Path) -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{placeholder.getsockname()[1]}"
    token = secrets.token_urlsafe(18)
    backend = TransitBackend(
        "openbao", {"BAO_ADDR": address, "BAO_TOKEN": token}, tmp_path / "no-token-file"
    )
    with pytest.raises(KMSError) as refused:
        backend.signer("release", no_password)
    message = str(refused.value)
    assert message == f"openbao://release: cannot reach OpenBao at {address}: Connection refused"
    assert token not in message


def test_openbao_scheme_other_mount_and_token_file(
    openbao: OpenBaoServer, tmp_path: Path, key_name: str
) -> None:
    openbao.enable_transit(f"signing-{key_name}")
    token_file = tmp_path / ".vault-token"
    token_file.write_text(openbao.root_token + "\n")
    backend = TransitBackend(
        "openbao",
        {"BAO_ADDR": openbao.address, "TRANSIT_SECRET_ENGINE_PATH": f"signing-{key_name}"},
        token_file,
    )
    created = backend.create_key(key_name, no_password)
    assert openbao.key_data(f"signing-{key_name}", key_name)["type"] == "ecdsa-p256"
    assert created.verify(backend.signer(key_name, no_password).sign(PAYLOAD), PAYLOAD)


# End to end: the signgate CLI against OpenBao and a real registry; the real cosign verifies.


def push(host: str, repository: str, content: bytes) -> str:
    async def pushed() -> str:
        async with RegistryClient(RegistryOptions()) as client:
            return await push_image(client, Repository(host, repository), "v1", content=content)

    return anyio.run(pushed)


def cosign_verify(cosign: Path, name: str, public_key: Path, image: str, env: dict[str, str],
                  cwd: Path) -> Any:
    classic = ["--new-bundle-format=false"] if name == "cosign3" else []
    return run(
        [str(cosign), "verify", "--key", str(public_key), "--insecure-ignore-tlog",
         "--allow-insecure-registry", *classic, image],
        env, cwd,
    )


def test_cli_signs_with_transit_and_cosign_verifies_across_a_rotation(
    openbao: OpenBaoServer, registry: Any, cosign_binaries: dict[str, Path], tmp_path: Path,
    key_name: str,
) -> None:
    env = {k: v for k, v in tool_env(tmp_path).items() if not k.startswith(("VAULT_", "BAO_"))}
    env.update(VAULT_ADDR=openbao.address, VAULT_TOKEN=openbao.root_token)
    ref = f"hashivault://{key_name}"

    created = signgate("generate-key-pair", "--kms", ref, env=env, cwd=tmp_path)
    assert not (tmp_path / "cosign.key").exists()
    exported = PublicKey.from_pem((tmp_path / "cosign.pub").read_bytes())
    printed = signgate("public-key", "--key", ref, env=env, cwd=tmp_path).stdout
    assert PublicKey.from_pem(printed.encode()) == exported
    assert openbao.root_token not in created.stdout + created.stderr

    repository = f"vault/{key_name}"
    first = push(registry.host, repository, b"first")
    first_image = f"{registry.host}/{repository}@{first}"
    signgate("sign", "--format", "classic", "--key", ref, first_image, env=env, cwd=tmp_path)
    signgate("verify", "--key", ref, first_image, env=env, cwd=tmp_path)
    for name, cosign in cosign_binaries.items():
        cosign_verify(cosign, name, tmp_path / "cosign.pub", first_image, env, tmp_path)

    # After a rotation new signatures use version 2; both keep verifying with the reference.
    openbao.rotate("transit", key_name)
    (tmp_path / "v2.pub").write_text(
        signgate("public-key", "--key", ref, env=env, cwd=tmp_path).stdout
    )
    second = push(registry.host, repository, b"second")
    second_image = f"{registry.host}/{repository}@{second}"
    signgate("sign", "--format", "classic", "--key", ref, second_image, env=env, cwd=tmp_path)
    for image in (first_image, second_image):
        signgate("verify", "--key", ref, image, env=env, cwd=tmp_path)
    cosign_verify(cosign_binaries["cosign2"], "cosign2", tmp_path / "v2.pub", second_image,
                  env, tmp_path)
    refused = signgate("verify", "--key", "cosign.pub", second_image, env=env, cwd=tmp_path,
                       check=False)
    assert refused.returncode == 1
    pinned = signgate("verify", "--key", f"{ref}?version=1", second_image, env=env,
                      cwd=tmp_path, check=False)
    assert pinned.returncode == 1


def test_cli_reports_a_missing_key_in_one_line_without_the_token(
    openbao: OpenBaoServer, registry: Any, tmp_path: Path, key_name: str
) -> None:
    env = {k: v for k, v in tool_env(tmp_path).items() if not k.startswith(("VAULT_", "BAO_"))}
    env.update(BAO_ADDR=openbao.address, BAO_TOKEN=openbao.root_token)
    image = f"{registry.host}/vault/missing@sha256:{'0' * 64}"
    result = signgate("sign", "--key", f"openbao://{key_name}", image, env=env, cwd=tmp_path,
                      check=False)
    assert result.returncode == 1
    assert result.stderr == (
        f"signgate: openbao://{key_name}: no Transit key '{key_name}' at mount 'transit' of "
        f"OpenBao at {openbao.address}\n"
    )


def test_tls_with_the_servers_ca_and_without(tmp_path: Path, key_name: str) -> None:
    with running_openbao(tmp_path / "openbao-tls", tls=True) as server:
        assert server.ca_file is not None
        server.enable_transit("transit")
        settings = {"BAO_ADDR": server.address, "BAO_TOKEN": server.root_token}
        trusting = TransitBackend(
            "openbao", {**settings, "BAO_CACERT": str(server.ca_file)}, tmp_path / "none"
        )
        created = trusting.create_key(key_name, no_password)
        assert created.verify(trusting.signer(key_name, no_password).sign(PAYLOAD), PAYLOAD)
        with pytest.raises(KMSError) as refused:
            TransitBackend("openbao", settings, tmp_path / "none").public_key(
                key_name, no_password
            )
        assert str(refused.value) == (
            f"openbao://{key_name}: TLS failure talking to OpenBao at {server.address} "
            "(set VAULT_CACERT to the CA that issued its certificate)"
        )
