"""Bad input and faults, through the real ``signgate`` console script against real registries.

Every failure must end with exit code 1 (2 for a usage error), one line on stderr per failing
image (or one for a failing command) that names the problem, and never a traceback.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from signgate.keys import Signer, fixed_password, load_signer
from signgate.reference import signature_tag
from signgate.registry import RegistryClient
from signgate.registry.images import push_image
from signgate.signatures.layout import SignatureLayer
from signgate.signatures.payload import build_payload
from signgate.signatures.store import write_signature_image
from tests.integration.conftest import TEST_PASSWORD, TEST_USERNAME
from tests.integration.registry_servers import RunningRegistry, free_port
from tests.integration.tools import SIGNGATE, signgate, tool_env

pytestmark = pytest.mark.integration

KEY_PASSWORD = "fault-tests"
WRONG_REGISTRY_PASSWORD = "not the password"


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path


@dataclass(frozen=True)
class Keys:
    main: KeyPair
    other: KeyPair
    signer: Signer  # main's private key, for signature images built by hand


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    directory = tmp_path_factory.mktemp("fault-keys")
    env = tool_env(directory, COSIGN_PASSWORD=KEY_PASSWORD)
    for prefix in ("main", "other"):
        signgate("generate-key-pair", "--output-key-prefix", prefix, env=env, cwd=directory)
    main = KeyPair(directory / "main.key", directory / "main.pub")
    other = KeyPair(directory / "other.key", directory / "other.pub")
    signer = load_signer(str(main.private), fixed_password(KEY_PASSWORD.encode()))
    return Keys(main, other, signer)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return tool_env(tmp_path, COSIGN_PASSWORD=KEY_PASSWORD)


def client_for(registry: RunningRegistry) -> RegistryClient:
    return RegistryClient(registry.options())


def push(registry: RunningRegistry, path: str, tag: str, content: bytes) -> str:
    async def go() -> str:
        async with client_for(registry) as client:
            return await push_image(client, registry.repository(path), tag, content=content)

    return anyio.run(go)


def repo_name(tmp_path: Path, name: str) -> str:
    """A repository path no other test uses (the registries live for the whole session)."""
    return f"faults/{name}-{tmp_path.name}".lower()


def sg(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = signgate(*args, env=env, check=False)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    return result


def sign_ok(env: dict[str, str], keys: Keys, reference: str, *flags: str) -> None:
    signed = sg(env, "sign", "--format", "classic", "--key", str(keys.main.private), *flags,
                reference)
    assert signed.returncode == 0, signed.stderr


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("signgate: ")]


def assert_failed(
    result: subprocess.CompletedProcess[str], *words: str, exit_code: int = 1
) -> str:
    """The command failed with ``exit_code`` and one stderr line holding every word."""
    assert result.returncode == exit_code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    # The only other thing sign prints before failing is its note about signing a tag.
    other = [
        line for line in result.stderr.splitlines()
        if not line.startswith(("signgate: ", "Note: "))
    ]
    assert other == [], result.stderr
    (line,) = error_lines(result)
    for word in words:
        assert word in line, (word, line)
    return line


def assert_verified(result: subprocess.CompletedProcess[str], digest: str) -> None:
    assert result.returncode == 0, result.stderr
    (document,) = json.loads(result.stdout)
    assert document["critical"]["image"]["docker-manifest-digest"] == digest


# --- key files ---------------------------------------------------------------------------------


def pem(label: str, body: bytes) -> str:
    text = base64.b64encode(body).decode()
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n"


def encrypted_key_document(key_file: Path) -> dict[str, object]:
    lines = key_file.read_text().splitlines()
    document: dict[str, object] = json.loads(base64.b64decode("".join(lines[1:-1])))
    return document


def truncated_body_key(key_file: Path) -> str:
    body = json.dumps(encrypted_key_document(key_file)).encode()
    return pem("ENCRYPTED SIGSTORE PRIVATE KEY", body[: len(body) // 2])


def short_ciphertext_key(key_file: Path) -> str:
    document = encrypted_key_document(key_file)
    ciphertext = base64.b64decode(str(document["ciphertext"]))
    document["ciphertext"] = base64.b64encode(ciphertext[:12]).decode()
    return pem("ENCRYPTED SIGSTORE PRIVATE KEY", json.dumps(document).encode())


# name -> (file content made from the real key file, words the error line must hold)
BAD_KEY_FILES: dict[str, tuple[Callable[[Path], str], tuple[str, ...]]] = {
    "garbage": (lambda _: "this is not a key\n", ("no PEM block",)),
    "corrupt-pem": (
        lambda _: "-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n!!not base64!!\n"
        "-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n",
        ("not valid base64",),
    ),
    "cut-in-half": (lambda key: key.read_text()[: len(key.read_text()) // 2], ("no PEM block",)),
    "body-truncated": (truncated_body_key, ("not valid JSON",)),
    "ciphertext-truncated": (short_ciphertext_key, ("ciphertext is truncated",)),
}


@pytest.fixture
def image(registry: RunningRegistry, tmp_path: Path) -> str:
    """A fresh, unsigned image, by tag."""
    path = repo_name(tmp_path, "image")
    push(registry, path, "v1", f"image {tmp_path.name}".encode())
    return f"{registry.host}/{path}:v1"


@pytest.mark.parametrize("command", ["sign", "verify"])
@pytest.mark.parametrize("case", sorted(BAD_KEY_FILES))
def test_bad_key_file(
    command: str, case: str, keys: Keys, env: dict[str, str], image: str, tmp_path: Path
) -> None:
    make, words = BAD_KEY_FILES[case]
    key_file = tmp_path / f"{case}.key"
    key_file.write_text(make(keys.main.private))
    result = sg(env, command, "--key", str(key_file), image)
    assert_failed(result, str(key_file), *words)
    assert result.stdout == ""


def test_corrupt_public_key(env: dict[str, str], image: str, tmp_path: Path) -> None:
    key_file = tmp_path / "corrupt.pub"
    key_file.write_text(pem("PUBLIC KEY", b"\x30\x03\x02\x01\x01"))
    result = sg(env, "verify", "--key", str(key_file), image)
    assert_failed(result, f"{key_file}: not a valid PEM public key")


def test_signing_with_a_public_key(keys: Keys, env: dict[str, str], image: str) -> None:
    result = sg(env, "sign", "--key", str(keys.main.public), image)
    assert_failed(result, f"{keys.main.public} holds a public key", "needs a private key")


@pytest.mark.parametrize("command", ["sign", "verify"])
def test_wrong_password(command: str, keys: Keys, env: dict[str, str], image: str) -> None:
    # verify takes a private key too (its public half), as cosign does.
    env["COSIGN_PASSWORD"] = "not the password"
    result = sg(env, command, "--key", str(keys.main.private), image)
    line = assert_failed(result)
    assert line == f"signgate: wrong password for {keys.main.private}"


@pytest.mark.parametrize(("command", "key_name"), [("sign", "gone.key"), ("verify", "gone.pub")])
def test_missing_key_file(
    command: str, key_name: str, env: dict[str, str], image: str, tmp_path: Path
) -> None:
    result = sg(env, command, "--key", str(tmp_path / key_name), image)
    assert_failed(result, f"cannot read key file {tmp_path / key_name}", "No such file")


# --- references --------------------------------------------------------------------------------

COMMANDS_ON_ONE_IMAGE = ["sign", "verify", "tree", "triangulate", "clean"]


def command_line(command: str, keys: Keys, image: str) -> list[str]:
    if command == "sign":
        return ["sign", "--key", str(keys.main.private), image]
    if command == "verify":
        return ["verify", "--key", str(keys.main.public), image]
    if command == "clean":
        return ["clean", "-f", image]
    return [command, image]


@pytest.mark.parametrize("command", COMMANDS_ON_ONE_IMAGE)
def test_unknown_repository(
    command: str, keys: Keys, env: dict[str, str], registry: RunningRegistry, tmp_path: Path
) -> None:
    missing = f"{registry.host}/{repo_name(tmp_path, 'never-pushed')}:v1"
    result = sg(env, *command_line(command, keys, missing))
    line = assert_failed(result, "manifest unknown")
    # The image is named once, whatever the command.
    assert line == f"signgate: {missing}: manifest unknown"


MISSING_DIGEST = "@sha256:" + "0" * 64


# triangulate, tree and clean need no manifest for a digest (they only name where attachments
# would be), so a digest nobody pushed is a failure for sign and verify only.
@pytest.mark.parametrize(
    ("command", "identifier"),
    [(command, ":no-such-tag") for command in COMMANDS_ON_ONE_IMAGE]
    + [("sign", MISSING_DIGEST), ("verify", MISSING_DIGEST)],
)
def test_missing_tag_or_digest(
    command: str, identifier: str, keys: Keys, env: dict[str, str], image: str
) -> None:
    missing = image.replace(":v1", identifier)
    result = sg(env, *command_line(command, keys, missing))
    line = assert_failed(result, "manifest unknown")
    assert line == f"signgate: {missing}: manifest unknown"


@pytest.mark.parametrize("command", COMMANDS_ON_ONE_IMAGE)
def test_invalid_reference_is_a_usage_error(
    command: str, keys: Keys, env: dict[str, str], registry: RunningRegistry
) -> None:
    # A malformed argument is a usage error (exit 2), as a malformed -a is; nothing is contacted.
    bad = f"{registry.host}/Faults/UpperCase:v1"
    result = sg(env, *command_line(command, keys, bad))
    assert_failed(result, "invalid image reference", "must be lowercase", exit_code=2)


@pytest.mark.parametrize("command", COMMANDS_ON_ONE_IMAGE)
def test_registry_down(command: str, keys: Keys, env: dict[str, str]) -> None:
    host = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = sg(env, *command_line(command, keys, f"{host}/faults/down:v1"))
    assert_failed(result, f"cannot connect to registry {host}", "connection refused")


# --- registry credentials ----------------------------------------------------------------------


def write_docker_config(env: dict[str, str], registry: RunningRegistry, password: str) -> None:
    config_dir = Path(env["DOCKER_CONFIG"])
    config_dir.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{TEST_USERNAME}:{password}".encode()).decode()
    (config_dir / "config.json").write_text(json.dumps({"auths": {registry.host: {"auth": auth}}}))


def with_flags(env: dict[str, str], password: str) -> list[str]:
    # The password only ever travels in the environment, never in argv.
    env["SIGNGATE_REGISTRY_PASSWORD"] = password
    return ["--registry-username", TEST_USERNAME]


@pytest.fixture
def private_image(basic_auth_registry: RunningRegistry, tmp_path: Path) -> tuple[str, str]:
    """An image in the Basic-auth registry: (reference by tag, digest)."""
    path = repo_name(tmp_path, "private")
    digest = push(basic_auth_registry, path, "v1", f"private {tmp_path.name}".encode())
    return f"{basic_auth_registry.host}/{path}:v1", digest


@pytest.mark.parametrize("command", ["sign", "verify"])
def test_no_credentials(
    command: str, keys: Keys, env: dict[str, str], private_image: tuple[str, str]
) -> None:
    reference, _ = private_image
    result = sg(env, *command_line(command, keys, reference))
    assert_failed(result, reference, "unauthorized", "no credentials for this registry")


@pytest.mark.parametrize("source", ["flags", "docker-config"])
@pytest.mark.parametrize("command", ["sign", "verify"])
def test_wrong_credentials(
    command: str,
    source: str,
    keys: Keys,
    env: dict[str, str],
    basic_auth_registry: RunningRegistry,
    private_image: tuple[str, str],
) -> None:
    reference, _ = private_image
    flags = []
    if source == "flags":
        flags = with_flags(env, WRONG_REGISTRY_PASSWORD)
    else:
        write_docker_config(env, basic_auth_registry, WRONG_REGISTRY_PASSWORD)
    result = sg(env, *command_line(command, keys, reference), *flags)
    assert_failed(result, reference, "unauthorized", "refused the credentials")
    assert WRONG_REGISTRY_PASSWORD not in result.stderr + result.stdout


@pytest.mark.parametrize("source", ["flags", "docker-config"])
@pytest.mark.parametrize("registry_name", ["basic_auth_registry", "token_registry"])
def test_right_credentials_sign_and_verify(
    registry_name: str,
    source: str,
    keys: Keys,
    env: dict[str, str],
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    private: RunningRegistry = request.getfixturevalue(registry_name)
    path = repo_name(tmp_path, "signed-privately")
    digest = push(private, path, "v1", f"private {tmp_path.name}".encode())
    reference = f"{private.host}/{path}:v1"
    flags = []
    if source == "flags":
        flags = with_flags(env, TEST_PASSWORD)
    else:
        write_docker_config(env, private, TEST_PASSWORD)
    sign_ok(env, keys, reference, *flags)
    assert_verified(sg(env, "verify", "--key", str(keys.main.public), *flags, reference), digest)


# --- TLS ---------------------------------------------------------------------------------------


@pytest.fixture
def tls_image(tls_registry: RunningRegistry, tmp_path: Path) -> tuple[str, str]:
    path = repo_name(tmp_path, "tls")
    digest = push(tls_registry, path, "v1", f"tls {tmp_path.name}".encode())
    return f"{tls_registry.host}/{path}:v1", digest


@pytest.mark.parametrize("command", COMMANDS_ON_ONE_IMAGE)
def test_tls_registry_without_its_ca(
    command: str,
    keys: Keys,
    env: dict[str, str],
    tls_registry: RunningRegistry,
    tls_image: tuple[str, str],
) -> None:
    reference, _ = tls_image
    result = sg(env, *command_line(command, keys, reference))
    assert_failed(
        result,
        f"TLS certificate of registry {tls_registry.host} could not be verified",
        "--allow-insecure-registry",
    )


@pytest.mark.parametrize("trust", ["cacert", "insecure"])
def test_tls_registry_trusted(
    trust: str,
    keys: Keys,
    env: dict[str, str],
    tls_registry: RunningRegistry,
    tls_image: tuple[str, str],
) -> None:
    reference, digest = tls_image
    assert tls_registry.ca_file is not None
    flags = (
        ["--registry-cacert", str(tls_registry.ca_file)]
        if trust == "cacert"
        else ["--allow-insecure-registry"]
    )
    sign_ok(env, keys, reference, *flags)
    assert_verified(sg(env, "verify", "--key", str(keys.main.public), *flags, reference), digest)


# --- tampering and bad signature images --------------------------------------------------------


def blob_file(registry: RunningRegistry, digest: str) -> Path:
    """Where distribution's filesystem driver keeps a blob (manifests are blobs too)."""
    hex_digest = digest.removeprefix("sha256:")
    return (
        registry.storage / "docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data"
    )


def test_tampered_manifest_in_registry_storage(
    keys: Keys, env: dict[str, str], registry: RunningRegistry, tmp_path: Path
) -> None:
    path = repo_name(tmp_path, "tampered")
    digest = push(registry, path, "v1", f"tampered {tmp_path.name}".encode())
    by_tag = f"{registry.host}/{path}:v1"
    by_digest = f"{registry.host}/{path}@{digest}"
    sign_ok(env, keys, by_digest)
    stored = blob_file(registry, digest)
    tampered = stored.read_bytes() + b" "
    stored.write_bytes(tampered)
    tampered_digest = "sha256:" + hashlib.sha256(tampered).hexdigest()
    verify_by_digest = sg(env, "verify", "--key", str(keys.main.public), by_digest)
    assert_failed(
        verify_by_digest, by_digest, f"served a manifest whose digest is {tampered_digest}"
    )
    verify_by_tag = sg(env, "verify", "--key", str(keys.main.public), by_tag)
    assert_failed(
        verify_by_tag,
        by_tag,
        f"the registry says the digest is {digest}",
        f"has digest {tampered_digest}",
    )
    assert verify_by_digest.stdout == verify_by_tag.stdout == ""
    resign = sg(env, "sign", "--key", str(keys.main.private), by_digest)
    assert_failed(resign, f"served a manifest whose digest is {tampered_digest}")


def write_signatures(
    registry: RunningRegistry, path: str, digest: str, layers: list[tuple[SignatureLayer, bytes]]
) -> None:
    async def go() -> None:
        async with client_for(registry) as client:
            await write_signature_image(
                client,
                registry.repository(path),
                digest,
                [layer for layer, _ in layers],
                {layer.digest: payload for layer, payload in layers},
            )

    anyio.run(go)


def test_signed_payload_that_is_not_json(
    keys: Keys, env: dict[str, str], registry: RunningRegistry, tmp_path: Path
) -> None:
    path = repo_name(tmp_path, "not-json")
    digest = push(registry, path, "v1", f"not json {tmp_path.name}".encode())
    payload = b"this is not JSON, but it is properly signed"
    layer = SignatureLayer.for_signature(payload, keys.signer.sign(payload))
    write_signatures(registry, path, digest, [(layer, payload)])
    reference = f"{registry.host}/{path}:v1"
    result = sg(env, "verify", "--key", str(keys.main.public), reference)
    assert_failed(result, reference, "not JSON")
    assert result.stdout == ""


def test_signature_layer_of_another_media_type(
    keys: Keys, env: dict[str, str], registry: RunningRegistry, tmp_path: Path
) -> None:
    path = repo_name(tmp_path, "text-plain")
    digest = push(registry, path, "v1", f"text/plain {tmp_path.name}".encode())
    # A valid payload and signature, but in a layer that does not say it is a signature.
    payload = build_payload(f"{registry.host}/{path}", digest)
    signed = SignatureLayer.for_signature(payload, keys.signer.sign(payload))
    layer = SignatureLayer("text/plain", signed.digest, signed.size, signed.annotations)
    write_signatures(registry, path, digest, [(layer, payload)])
    reference = f"{registry.host}/{path}:v1"
    result = sg(env, "verify", "--key", str(keys.main.public), reference)
    assert_failed(result, reference, f"layer {layer.digest} is not a signature")


def copy_manifest(registry: RunningRegistry, path: str, source_tag: str, target_tag: str) -> None:
    async def go() -> None:
        repository = registry.repository(path)
        async with client_for(registry) as client:
            manifest = await client.get_manifest(repository, source_tag)
            await client.put_manifest(repository, target_tag, manifest.raw, manifest.media_type)

    anyio.run(go)


def test_signature_copied_to_another_image(
    keys: Keys, env: dict[str, str], registry: RunningRegistry, tmp_path: Path
) -> None:
    path = repo_name(tmp_path, "copied")
    signed_digest = push(registry, path, "a", f"image a {tmp_path.name}".encode())
    other_digest = push(registry, path, "b", f"image b {tmp_path.name}".encode())
    sign_ok(env, keys, f"{registry.host}/{path}:a")
    copy_manifest(registry, path, signature_tag(signed_digest), signature_tag(other_digest))
    reference = f"{registry.host}/{path}:b"
    result = sg(env, "verify", "--key", str(keys.main.public), reference)
    assert_failed(result, reference, f"digest claim mismatch: signature is for {signed_digest}")


def test_verify_with_the_wrong_key(
    keys: Keys, env: dict[str, str], registry: RunningRegistry, tmp_path: Path
) -> None:
    path = repo_name(tmp_path, "wrong-key")
    push(registry, path, "v1", f"wrong key {tmp_path.name}".encode())
    reference = f"{registry.host}/{path}:v1"
    sign_ok(env, keys, reference)
    result = sg(env, "verify", "--key", str(keys.other.public), reference)
    assert_failed(result, reference, "does not verify")


def test_verify_several_images_where_some_fail(
    keys: Keys, env: dict[str, str], registry: RunningRegistry, tmp_path: Path
) -> None:
    path = repo_name(tmp_path, "several")
    good_digest = push(registry, path, "good", f"good {tmp_path.name}".encode())
    unsigned_digest = push(registry, path, "unsigned", f"unsigned {tmp_path.name}".encode())
    good = f"{registry.host}/{path}:good"
    unsigned = f"{registry.host}/{path}:unsigned"
    missing = f"{registry.host}/{path}:missing"
    sign_ok(env, keys, good)
    result = sg(env, "verify", "--key", str(keys.main.public), unsigned, good, missing)
    assert result.returncode == 1, result.stderr
    (document,) = json.loads(result.stdout)
    assert document["critical"]["image"]["docker-manifest-digest"] == good_digest
    assert sorted(error_lines(result)) == sorted(
        [
            f"signgate: {unsigned}: no signatures found for "
            f"{registry.host}/{path}@{unsigned_digest}",
            f"signgate: {missing}: manifest unknown",
        ]
    )


def test_sign_several_images_where_some_fail(
    keys: Keys, env: dict[str, str], registry: RunningRegistry, tmp_path: Path
) -> None:
    path = repo_name(tmp_path, "sign-several")
    first = push(registry, path, "first", f"first {tmp_path.name}".encode())
    second = push(registry, path, "second", f"second {tmp_path.name}".encode())
    missing = [f"{registry.host}/{path}:missing{i}" for i in range(2)]
    images = [missing[0], f"{registry.host}/{path}:first", missing[1],
              f"{registry.host}/{path}:second"]
    result = sg(env, "sign", "--key", str(keys.main.private), *images)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(error_lines(result)) == sorted(
        f"signgate: {image}: manifest unknown" for image in missing
    )
    # The failures stopped nothing: both existing images were signed.
    for tag, digest in (("first", first), ("second", second)):
        assert_verified(
            sg(env, "verify", "--key", str(keys.main.public), f"{registry.host}/{path}:{tag}"),
            digest,
        )


# --- usage errors ------------------------------------------------------------------------------


def test_clean_without_force_and_without_a_terminal(
    keys: Keys, env: dict[str, str], registry: RunningRegistry, tmp_path: Path
) -> None:
    path = repo_name(tmp_path, "keep")
    digest = push(registry, path, "v1", f"keep {tmp_path.name}".encode())
    reference = f"{registry.host}/{path}:v1"
    sign_ok(env, keys, reference)
    # stdin is not a terminal here whatever runs the tests.
    result = subprocess.run(
        [str(SIGNGATE), "clean", reference],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert_failed(result, "refusing to remove all attachments", reference, "without -f",
                  exit_code=2)
    assert_verified(sg(env, "verify", "--key", str(keys.main.public), reference), digest)


@pytest.mark.parametrize("command", ["sign", "verify"])
def test_annotation_without_equals_sign(
    command: str, keys: Keys, env: dict[str, str], image: str
) -> None:
    key = keys.main.private if command == "sign" else keys.main.public
    result = sg(env, command, "--key", str(key), "-a", "env", image)
    assert_failed(result, "annotation 'env' is not of the form key=value", exit_code=2)
