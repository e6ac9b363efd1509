"""``pkcs11:`` keys on a real SoftHSM2 token that this test session initialises.

End to end through the ``signgate`` console script: generate the key on the token, sign an image
in a real registry, verify with signgate (the URI and the exported cosign.pub) and with the real
cosign 2 and 3 (Debian's cosign has no PKCS#11 support, so they verify with cosign.pub). The
error cases run in-process against the same token.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, KeyType, ObjectClass

from signgate.errors import KMSError
from signgate.keys.kms.pkcs11 import MODULE_PATH_ENV, PIN_ENV, Pkcs11Backend
from signgate.keys.model import PublicKey
from signgate.reference import Repository
from signgate.registry import RegistryClient, RegistryOptions
from signgate.registry.images import push_image
from tests.integration.registry_servers import RunningRegistry
from tests.integration.tools import SIGNGATE, run, signgate, tool_env

pytestmark = pytest.mark.integration

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOKEN = "T"
PIN = "1234"
SO_PIN = "5678"
# A wrong PIN distinctive enough to search for in output.
WRONG_PIN = "wrong-pin-8e3f"
PAYLOAD = b'{"critical":{"type":"cosign container image signature"},"optional":null}'


def never_asked() -> bytes:
    raise AssertionError("the key password was asked for")


def no_terminal(prompt: str) -> str | None:
    """Stands in for a prompt where stdin is not a terminal: no PIN."""
    return None


@dataclass(frozen=True)
class SoftHsm:
    """A SoftHSM2 token store of this test session, with token ``T`` (user PIN 1234)."""

    conf: Path
    slot_id: int

    def env(self, home: Path, **extra: str) -> dict[str, str]:
        return tool_env(home, SOFTHSM2_CONF=str(self.conf), **extra)


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    util = shutil.which("softhsm2-util")
    if util is None or not Path(MODULE).is_file():
        pytest.fail(f"SoftHSM2 is missing (softhsm2-util, {MODULE}): apt-get install softhsm2")
    workdir = tmp_path_factory.mktemp("softhsm")
    (workdir / "tokens").mkdir()
    conf = workdir / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {workdir / 'tokens'}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
    )
    with pytest.MonkeyPatch.context() as env:
        # SoftHSM reads its configuration when the module is first initialised in a process:
        # this one (the in-process tests) and every signgate the tests start.
        env.setenv("SOFTHSM2_CONF", str(conf))
        run(
            [util, "--init-token", "--free", "--label", TOKEN, "--pin", PIN, "--so-pin", SO_PIN],
            dict(os.environ),
        )
        token = pkcs11.lib(MODULE).get_token(token_label=TOKEN)
        yield SoftHsm(conf, token.slot.slot_id)


@dataclass(frozen=True)
class OtherObjects:
    """Objects the tests put on the token by hand: keys of the wrong type, a lone certificate."""

    certificate_key: PublicKey


@pytest.fixture(scope="session")
def other_objects(softhsm: SoftHsm) -> OtherObjects:
    token = pkcs11.lib(MODULE).get_token(token_label=TOKEN)
    private = ec.generate_private_key(ec.SECP256R1())
    certificate = _self_signed(private)
    with token.open(rw=True, user_pin=PIN) as session:
        session.generate_keypair(KeyType.RSA, 2048, label="rsa-key", store=True)
        session.generate_key(KeyType.AES, 256, label="aes-key", store=True)
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.CERTIFICATE,
                Attribute.CERTIFICATE_TYPE: pkcs11.CertificateType.X_509,
                Attribute.TOKEN: True,
                Attribute.LABEL: "cert-only",
                Attribute.SUBJECT: certificate.subject.public_bytes(),
                Attribute.VALUE: certificate.public_bytes(serialization.Encoding.DER),
            }
        )
    return OtherObjects(PublicKey(private.public_key()))


def _self_signed(private: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "signgate test")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(private, hashes.SHA256())
    )


@pytest.fixture
def backend(softhsm: SoftHsm) -> Iterator[Pkcs11Backend]:
    """A backend with the module path and PIN in its environment; logged out at the end."""
    hsm = Pkcs11Backend({MODULE_PATH_ENV: MODULE, PIN_ENV: PIN}, ask_pin=no_terminal)
    try:
        yield hsm
    finally:
        hsm.close()


def push(registry: RunningRegistry, repository: str, content: bytes) -> str:
    async def push_one() -> str:
        async with RegistryClient(RegistryOptions()) as client:
            return await push_image(
                client, Repository(registry.host, repository), "v1", content=content
            )

    return anyio.run(push_one)


def token_attributes(label: str, object_class: ObjectClass, *names: Attribute) -> list[Any]:
    token = pkcs11.lib(MODULE).get_token(token_label=TOKEN)
    with token.open(user_pin=PIN) as session:
        key = session.get_key(object_class=object_class, label=label)
        return [key[name] for name in names]


# --- end to end ----------------------------------------------------------------------------


def test_generate_sign_verify_and_cosign_agrees(
    softhsm: SoftHsm,
    registry: RunningRegistry,
    cosign_binaries: dict[str, Path],
    tmp_path: Path,
) -> None:
    label = f"release-{tmp_path.name}"
    uri = f"pkcs11:token={TOKEN};object={label}?module-path={MODULE}"
    with_pin = softhsm.env(tmp_path, COSIGN_PKCS11_PIN=PIN)
    without_pin = softhsm.env(tmp_path)

    generated = signgate("generate-key-pair", "--kms", uri, env=with_pin, cwd=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cosign.pub"]
    assert PIN not in generated.stderr
    exported = (tmp_path / "cosign.pub").read_text()
    # The public key object is readable without logging in: verifiers need no PIN.
    shown = signgate("public-key", "--key", uri, env=without_pin, cwd=tmp_path)
    assert shown.stdout == exported

    # The private key stays on the token: sensitive, never extractable.
    token, sensitive, extractable, key_type = token_attributes(
        label,
        ObjectClass.PRIVATE_KEY,
        Attribute.TOKEN,
        Attribute.SENSITIVE,
        Attribute.EXTRACTABLE,
        Attribute.KEY_TYPE,
    )
    assert (token, sensitive, extractable, key_type) == (True, True, False, KeyType.EC)

    repository = f"pkcs11/{tmp_path.name}".lower()
    digest = push(registry, repository, b"signed on a token")
    image = f"{registry.host}/{repository}:v1"
    signed = signgate(
        "sign", "--format", "classic", "--key", uri, image, env=with_pin, cwd=tmp_path
    )
    assert PIN not in signed.stderr

    signgate("verify", "--key", uri, image, env=without_pin, cwd=tmp_path)
    signgate("verify", "--key", "cosign.pub", image, env=without_pin, cwd=tmp_path)
    for name, cosign in sorted(cosign_binaries.items()):
        classic = ["--new-bundle-format=false"] if name == "cosign3" else []
        verified = run(
            [
                str(cosign), "verify", "--key", "cosign.pub", "--insecure-ignore-tlog",
                "--allow-insecure-registry", *classic, image,
            ],
            without_pin,
            tmp_path,
        )
        assert digest in verified.stdout, name

    # And an image signed by nobody is refused by the same key.
    unsigned = f"{registry.host}/{repository}-unsigned:v1"
    push(registry, f"{repository}-unsigned", b"not signed")
    refused = signgate("verify", "--key", uri, unsigned, env=without_pin, check=False)
    assert refused.returncode == 1


def test_generate_refuses_a_label_already_on_the_token(
    softhsm: SoftHsm, tmp_path: Path
) -> None:
    uri = f"pkcs11:token={TOKEN};object=taken-{tmp_path.name}?module-path={MODULE}"
    env = softhsm.env(tmp_path, COSIGN_PKCS11_PIN=PIN)
    signgate("generate-key-pair", "--kms", uri, env=env, cwd=tmp_path)
    first = (tmp_path / "cosign.pub").read_bytes()

    again = signgate("generate-key-pair", "--kms", uri, "--force", env=env, cwd=tmp_path,
                     check=False)

    assert again.returncode == 1
    assert again.stderr.splitlines() == [
        f"signgate: pkcs11:token={TOKEN};object=taken-{tmp_path.name}: token 'T' already holds "
        f"an object named 'taken-{tmp_path.name}'; choose another object label"
    ]
    assert (tmp_path / "cosign.pub").read_bytes() == first


@pytest.mark.parametrize(
    ("command", "uri", "expected"),
    [
        pytest.param(
            "sign",
            f"pkcs11:token={TOKEN};object=O?module-path={MODULE}&pin-value={WRONG_PIN}",
            f"signgate: pkcs11:token={TOKEN};object=O: token 'T' refused the PIN "
            "(CKR_PIN_INCORRECT)",
            id="wrong-pin",
        ),
        pytest.param(
            "public-key",
            f"pkcs11:token={TOKEN};object=O?module-path=/nonexistent/lib.so&pin-value={WRONG_PIN}",
            f"signgate: pkcs11:token={TOKEN};object=O: PKCS#11 module /nonexistent/lib.so "
            "not found",
            id="module-not-found",
        ),
    ],
)
def test_cli_errors_are_one_line_without_the_pin(
    softhsm: SoftHsm, registry: RunningRegistry, tmp_path: Path, command: str, uri: str,
    expected: str,
) -> None:
    argv = [command, "--key", uri]
    if command == "sign":
        argv.append(f"{registry.host}/pkcs11/never-signed:v1")
    result = signgate(*argv, env=softhsm.env(tmp_path), cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [expected]
    assert WRONG_PIN not in result.stdout + result.stderr


def test_a_module_that_cannot_initialise(softhsm: SoftHsm, tmp_path: Path) -> None:
    env = softhsm.env(tmp_path)
    env["SOFTHSM2_CONF"] = str(tmp_path / "missing.conf")
    uri = f"pkcs11:token={TOKEN};object=O?module-path={MODULE}"
    result = signgate("public-key", "--key", uri, env=env, cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"signgate: pkcs11:token={TOKEN};object=O: PKCS#11 module {MODULE} failed to "
        "initialise (GeneralError)"
    ]


def test_a_file_that_is_not_a_module(tmp_path: Path) -> None:
    not_a_module = tmp_path / "not-a-module.so"
    not_a_module.write_text("not a shared library\n" * 100)
    hsm = Pkcs11Backend({MODULE_PATH_ENV: str(not_a_module)})
    with pytest.raises(KMSError) as caught:
        hsm.public_key(f"token={TOKEN};object=O", never_asked)
    assert str(caught.value) == (
        f"pkcs11:token={TOKEN};object=O: cannot load PKCS#11 module {not_a_module}: "
        "invalid ELF header"
    )


# --- disabling keys ------------------------------------------------------------------------


def test_disabling_a_key_stops_signing_and_trust_and_is_harmless_twice(
    softhsm: SoftHsm, backend: Pkcs11Backend, registry: RunningRegistry, tmp_path: Path
) -> None:
    label = f"retired-{tmp_path.name}"
    location = f"token={TOKEN};object={label}"
    name = f"pkcs11:{location}"
    backend.create_key(location, never_asked)
    signer = backend.signer(location, never_asked)
    assert signer.public_key().verify(signer.sign(PAYLOAD), PAYLOAD)

    done = f"{name}: CKA_SIGN false on the private key, CKA_VERIFY false on its public key"
    assert backend.disable_key(location) == done
    # The token itself refuses the key now, even to a signer loaded before.
    with pytest.raises(KMSError, match=f"^{name}: the PKCS#11 module failed: "):
        signer.sign(PAYLOAD)
    with pytest.raises(KMSError) as refused:
        backend.signer(location, never_asked)
    assert refused.value.diagnostics() == (
        f"{name}: the key '{label}' may not sign (CKA_SIGN is false: it is disabled, or not "
        "made for signing)"
    )
    with pytest.raises(KMSError) as untrusted:
        backend.public_key(location, never_asked)
    assert untrusted.value.diagnostics() == (
        f"{name}: the key '{label}' on token 'T' is disabled (CKA_VERIFY false on its public key)"
    )
    assert backend.disable_key(location) == done
    backend.close()  # logged out, so that another session may log in
    assert token_attributes(label, ObjectClass.PRIVATE_KEY, Attribute.SIGN) == [False]
    assert token_attributes(label, ObjectClass.PUBLIC_KEY, Attribute.VERIFY) == [False]

    # Another process sees the same: one line, no traceback.
    uri = f"pkcs11:{location}?module-path={MODULE}"
    env = softhsm.env(tmp_path, COSIGN_PKCS11_PIN=PIN)
    image = f"{registry.host}/pkcs11/{label}:v1"
    for argv in (["sign", "--key", uri, image], ["verify", "--key", uri, image]):
        result = signgate(*argv, env=env, cwd=tmp_path, check=False)
        assert result.returncode == 1
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith(f"signgate: {name}: the key '{label}' ")
        assert "disabled" in result.stderr


def test_a_key_the_token_keeps_unmodifiable_cannot_be_disabled(
    backend: Pkcs11Backend, tmp_path: Path
) -> None:
    label = f"fixed-{tmp_path.name}"
    token = pkcs11.lib(MODULE).get_token(token_label=TOKEN)
    with token.open(rw=True, user_pin=PIN) as session:
        parameters = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: bytes.fromhex("06082a8648ce3d030107")}, local=True
        )
        parameters.generate_keypair(
            store=True,
            label=label,
            id=b"\x7f\x01",
            public_template={Attribute.TOKEN: True, Attribute.PRIVATE: False},
            private_template={
                Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.MODIFIABLE: False,
            },
        )
    location = f"token={TOKEN};object={label}"
    with pytest.raises(KMSError) as refused:
        backend.disable_key(location)
    assert refused.value.diagnostics() == (
        f"pkcs11:{location}: the key '{label}' on token 'T' cannot be disabled: the token "
        "keeps it unmodifiable (CKA_MODIFIABLE false)"
    )
    # Nothing was changed, not even the (modifiable) public key.
    signer = backend.signer(location, never_asked)
    assert signer.public_key().verify(signer.sign(PAYLOAD), PAYLOAD)
    assert backend.public_key(location, never_asked) == signer.public_key()


def test_disabling_a_missing_key(backend: Pkcs11Backend) -> None:
    with pytest.raises(KMSError) as refused:
        backend.disable_key(f"token={TOKEN};object=no-such-key")
    assert refused.value.diagnostics() == (
        f"pkcs11:token={TOKEN};object=no-such-key: no private key 'no-such-key' on token 'T'"
    )


# --- in-process: addressing keys -----------------------------------------------------------


def test_slot_id_and_key_id_name_the_same_key(
    softhsm: SoftHsm, backend: Pkcs11Backend, tmp_path: Path
) -> None:
    label = f"by-id-{tmp_path.name}"
    created = backend.create_key(f"token={TOKEN};object={label};id=%5a%01", never_asked)

    by_slot = backend.signer(f"slot-id={softhsm.slot_id};object={label}", never_asked)
    by_id = backend.public_key(f"token={TOKEN};id=%5a%01", never_asked)

    assert by_slot.public_key() == by_id == created
    signature = by_slot.sign(PAYLOAD)
    assert signature[0] == 0x30  # the token's raw r||s, turned into DER
    assert created.verify(signature, PAYLOAD)
    assert not created.verify(signature, PAYLOAD + b" ")


def test_a_signer_serves_concurrent_signing(backend: Pkcs11Backend, tmp_path: Path) -> None:
    label = f"threads-{tmp_path.name}"
    public = backend.create_key(f"token={TOKEN};object={label}", never_asked)
    signer = backend.signer(f"token={TOKEN};object={label}", never_asked)
    payloads = [PAYLOAD + str(n).encode() for n in range(16)]

    async def sign_all() -> list[bytes]:
        results: dict[int, bytes] = {}

        async def sign_one(n: int) -> None:
            results[n] = await anyio.to_thread.run_sync(signer.sign, payloads[n])

        async with anyio.create_task_group() as group:
            for n in range(len(payloads)):
                group.start_soon(sign_one, n)
        return [results[n] for n in range(len(payloads))]

    signatures = anyio.run(sign_all)
    assert all(public.verify(s, p) for s, p in zip(signatures, payloads, strict=True))


def test_public_key_from_a_certificate_when_there_is_no_public_key_object(
    backend: Pkcs11Backend, other_objects: OtherObjects
) -> None:
    key = backend.public_key(f"token={TOKEN};object=cert-only", never_asked)
    assert key == other_objects.certificate_key


def test_a_key_made_by_another_process_is_found(
    softhsm: SoftHsm, backend: Pkcs11Backend, tmp_path: Path
) -> None:
    label = f"made-by-cli-{tmp_path.name}"
    uri = f"pkcs11:token={TOKEN};object={label}?module-path={MODULE}"
    signgate("generate-key-pair", "--kms", uri, env=softhsm.env(tmp_path, COSIGN_PKCS11_PIN=PIN),
             cwd=tmp_path)
    exported = PublicKey.from_pem((tmp_path / "cosign.pub").read_bytes())
    assert backend.signer(f"token={TOKEN};object={label}", never_asked).public_key() == exported


def test_the_pin_is_asked_for_when_neither_uri_nor_environment_has_it(
    softhsm: SoftHsm, tmp_path: Path
) -> None:
    label = f"prompted-{tmp_path.name}"
    asked: list[str] = []

    def typed(prompt: str) -> str:
        asked.append(prompt)
        return PIN

    hsm = Pkcs11Backend({MODULE_PATH_ENV: MODULE}, ask_pin=typed)
    try:
        public = hsm.create_key(f"token={TOKEN};object={label}", never_asked)
        signer = hsm.signer(f"token={TOKEN};object={label}", never_asked)
        assert public.verify(signer.sign(PAYLOAD), PAYLOAD)
    finally:
        hsm.close()
    # Once per process and token: the session stays logged in for the signer.
    assert asked == [f"Enter PIN for key '{label}' in PKCS11 token 'T': "]


def test_without_a_pin_or_terminal_the_cli_says_where_the_pin_goes(
    softhsm: SoftHsm, tmp_path: Path
) -> None:
    uri = f"pkcs11:token={TOKEN};object=no-pin?module-path={MODULE}"
    result = subprocess.run(
        [str(SIGNGATE), "generate-key-pair", "--kms", uri],
        env=softhsm.env(tmp_path), cwd=tmp_path, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"signgate: pkcs11:token={TOKEN};object=no-pin: token 'T' needs the user PIN: "
        f"set {PIN_ENV}"
    ]
    assert not (tmp_path / "cosign.pub").exists()


# --- in-process: errors --------------------------------------------------------------------

ERRORS = [
    pytest.param(
        "public_key",
        f"token={TOKEN};object=O?module-path=/nonexistent/libmissing.so&pin-value={WRONG_PIN}",
        {},
        f"pkcs11:token={TOKEN};object=O: PKCS#11 module /nonexistent/libmissing.so not found",
        id="module-not-found",
    ),
    pytest.param(
        "public_key",
        f"token={TOKEN};object=O?module-path=relative/lib.so",
        {},
        f"pkcs11:token={TOKEN};object=O: the PKCS#11 module path relative/lib.so is not absolute",
        id="module-path-relative",
    ),
    pytest.param(
        "signer",
        f"token={TOKEN};object=O",
        {PIN_ENV: PIN},
        f"pkcs11:token={TOKEN};object=O: no PKCS#11 module: add ?module-path=/path/to/module.so "
        f"or set {MODULE_PATH_ENV}",
        id="no-module",
    ),
    pytest.param(
        "signer",
        f"token=Nope;object=O?pin-value={WRONG_PIN}",
        {MODULE_PATH_ENV: MODULE},
        f"pkcs11:token=Nope;object=O: no token labelled 'Nope' in PKCS#11 module {MODULE}",
        id="token-not-found",
    ),
    pytest.param(
        "public_key",
        "slot-id=4242;object=O",
        {MODULE_PATH_ENV: MODULE},
        f"pkcs11:slot-id=4242;object=O: no token in slot 4242 of PKCS#11 module {MODULE}",
        id="slot-not-found",
    ),
    pytest.param(
        "signer",
        f"token={TOKEN};object=O?pin-value={WRONG_PIN}",
        {MODULE_PATH_ENV: MODULE, PIN_ENV: PIN},
        f"pkcs11:token={TOKEN};object=O: token 'T' refused the PIN (CKR_PIN_INCORRECT)",
        id="wrong-pin",
    ),
    pytest.param(
        "create_key",
        f"token={TOKEN};object=O",
        {MODULE_PATH_ENV: MODULE},
        f"pkcs11:token={TOKEN};object=O: token 'T' needs the user PIN: set {PIN_ENV}",
        id="no-pin",
    ),
    pytest.param(
        "signer",
        f"token={TOKEN};object=missing",
        {MODULE_PATH_ENV: MODULE, PIN_ENV: PIN},
        f"pkcs11:token={TOKEN};object=missing: no private key 'missing' on token 'T'",
        id="object-not-found",
    ),
    pytest.param(
        "public_key",
        f"token={TOKEN};object=missing",
        {MODULE_PATH_ENV: MODULE},
        f"pkcs11:token={TOKEN};object=missing: no public key or certificate 'missing' on "
        f"token 'T' (if it is a private object, set {PIN_ENV})",
        id="public-key-not-found",
    ),
    pytest.param(
        "signer",
        f"token={TOKEN};object=rsa-key",
        {MODULE_PATH_ENV: MODULE, PIN_ENV: PIN},
        f"pkcs11:token={TOKEN};object=rsa-key: the key 'rsa-key' is an RSA key; signgate needs "
        "an EC key (P-256)",
        id="rsa-signer",
    ),
    pytest.param(
        "public_key",
        f"token={TOKEN};object=rsa-key",
        {MODULE_PATH_ENV: MODULE},
        f"pkcs11:token={TOKEN};object=rsa-key: the key 'rsa-key' is an RSA key; signgate needs "
        "an EC key (P-256)",
        id="rsa-public-key",
    ),
    pytest.param(
        "signer",
        f"token={TOKEN};object=aes-key",
        {MODULE_PATH_ENV: MODULE, PIN_ENV: PIN},
        f"pkcs11:token={TOKEN};object=aes-key: the key 'aes-key' is a secret (symmetric) key; "
        "signgate needs an EC key pair (P-256)",
        id="symmetric-key",
    ),
    pytest.param(
        "signer",
        f"token={TOKEN};object=cert-only",
        {MODULE_PATH_ENV: MODULE, PIN_ENV: PIN},
        f"pkcs11:token={TOKEN};object=cert-only: no private key 'cert-only' on token 'T'",
        id="certificate-without-key",
    ),
    pytest.param(
        "create_key",
        f"token={TOKEN};object=rsa-key",
        {MODULE_PATH_ENV: MODULE, PIN_ENV: PIN},
        f"pkcs11:token={TOKEN};object=rsa-key: token 'T' already holds an object named "
        "'rsa-key'; choose another object label",
        id="create-existing",
    ),
]


@pytest.mark.parametrize(("operation", "location", "environ", "expected"), ERRORS)
def test_errors_name_token_and_key_never_the_pin(
    other_objects: OtherObjects,
    operation: str,
    location: str,
    environ: dict[str, str],
    expected: str,
) -> None:
    hsm = Pkcs11Backend(environ, ask_pin=no_terminal)
    try:
        with pytest.raises(KMSError) as caught:
            getattr(hsm, operation)(location, never_asked)
    finally:
        hsm.close()
    message = str(caught.value)
    assert message == expected
    assert "\n" not in message
    assert WRONG_PIN not in message
    assert f"={PIN}" not in message
    assert f" {PIN}" not in message

