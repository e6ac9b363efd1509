"""k8s://NAMESPACE/SECRET keys against a kube-apiserver double, a real registry and real cosign.

No kube-apiserver runs here: :class:`KubeAPIDouble` serves the core/v1 Secret endpoints over
HTTPS on loopback, and both signgate (the official Python client) and cosign (client-go) reach it
through a kubeconfig with a bearer token, as they would reach a cluster.
"""

from __future__ import annotations

import itertools
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from signgate.errors import KMSError
from signgate.keys.cosign_format import decrypt_private_key, encrypt_private_key
from signgate.keys.kms.kubernetes import KubernetesSecretKeys
from signgate.keys.model import PublicKey
from signgate.keys.password import fixed_password
from signgate.reference import Repository
from signgate.registry import RegistryClient, RegistryOptions
from signgate.registry.images import push_image
from tests.integration.kube_api_double import (
    Grant,
    KubeAPIDouble,
    running_kube_api,
    write_kubeconfig,
)
from tests.integration.registry_servers import (
    CertificateAuthority,
    RunningRegistry,
    ServerCertificate,
    free_port,
    issue_server_certificate,
    make_test_ca,
)
from tests.integration.tools import run, signgate, tool_env

pytestmark = pytest.mark.integration

NAMESPACE = "signing"
PASSWORD = "correct horse battery"
SIGNER_TOKEN = "signer-token-6c0ffee"
READER_TOKEN = "reader-token-d00d"
NO_RIGHTS_TOKEN = "nobody-token-bad5ec"
UNKNOWN_TOKEN = "unknown-token-f00"
ALL_TOKENS = (SIGNER_TOKEN, READER_TOKEN, NO_RIGHTS_TOKEN, UNKNOWN_TOKEN)
# Stands for a cosign key encrypted with PASSWORD in the parameter tables.
ENCRYPTED_KEY = b"<the encrypted cosign key>"
_names = itertools.count()


@dataclass(frozen=True)
class Cluster:
    """The double, and the test CA its serving certificate comes from."""

    api: KubeAPIDouble
    ca: CertificateAuthority

    def kubeconfig(self, directory: Path, token: str = SIGNER_TOKEN, server: str = "") -> Path:
        path = directory / f"kubeconfig-{next(_names)}"
        return write_kubeconfig(path, server or self.api.url, token, self.ca.cert_file)

    def keys(self, directory: Path, token: str = SIGNER_TOKEN) -> KubernetesSecretKeys:
        return KubernetesSecretKeys(environ={"KUBECONFIG": str(self.kubeconfig(directory, token))})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    pki = tmp_path_factory.mktemp("kube-pki")
    ca = make_test_ca(pki, "kube test CA")
    serving: ServerCertificate = issue_server_certificate(ca, pki, stem="kube-apiserver")
    tokens = {
        SIGNER_TOKEN: Grant("system:serviceaccount:ci:signer", frozenset({"get", "create"})),
        READER_TOKEN: Grant("reader", frozenset({"get"})),
        NO_RIGHTS_TOKEN: Grant("nobody", frozenset()),
    }
    with running_kube_api(tokens, [NAMESPACE], serving) as api:
        yield Cluster(api, ca)


def secret_name(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


def push(registry: RunningRegistry, repository: str, content: bytes) -> str:
    async def go() -> str:
        async with RegistryClient(RegistryOptions()) as client:
            return await push_image(
                client, Repository(registry.host, repository), "v1", content=content
            )

    return anyio.run(go)


def cosign(binary: Path, *args: str, env: dict[str, str], cwd: Path) -> Any:
    return run([str(binary), *args], env, cwd)


def cosign_verify(binary: Path, name: str, key: str, image: str, env: dict[str, str]) -> None:
    classic = ["--new-bundle-format=false"] if name == "cosign3" else []
    run(
        [str(binary), "verify", "--key", key, "--insecure-ignore-tlog",
         "--allow-insecure-registry", *classic, image],
        env,
    )


def assert_one_line_failure(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 1, result
    assert result.stderr == f"signgate: {expected}\n"
    for token in ALL_TOKENS:
        assert token not in result.stderr + result.stdout


# --- end to end ------------------------------------------------------------------------------


def test_generate_sign_verify_and_cosign_agrees(
    cluster: Cluster, registry: RunningRegistry, cosign_binaries: dict[str, Path], tmp_path: Path
) -> None:
    name = secret_name("release")
    ref = f"k8s://{NAMESPACE}/{name}"
    env = tool_env(tmp_path, KUBECONFIG=str(cluster.kubeconfig(tmp_path)), COSIGN_PASSWORD=PASSWORD)
    first_request = len(cluster.api.requests)

    created = signgate("generate-key-pair", "--kms", ref, env=env, cwd=tmp_path)
    assert f"Key created in {ref}" in created.stderr
    public_pem = (tmp_path / "cosign.pub").read_bytes()
    public_key = PublicKey.from_pem(public_pem)

    # The Secret is cosign's layout: three data keys, the key encrypted with the password.
    stored = cluster.api.secret(NAMESPACE, name)
    assert stored["type"] == "Opaque"
    data = cluster.api.secret_data(NAMESPACE, name)
    assert sorted(data) == ["cosign.key", "cosign.password", "cosign.pub"]
    assert data["cosign.password"] == PASSWORD.encode()
    assert data["cosign.pub"] == public_pem
    assert data["cosign.key"].startswith(b"-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n")
    private_key = decrypt_private_key(data["cosign.key"], PASSWORD.encode(), source=ref)
    assert PublicKey(private_key.public_key()) == public_key
    # ...and the real cosign opens the stored key with the stored password.
    (tmp_path / "extracted.key").write_bytes(data["cosign.key"])
    for binary in cosign_binaries.values():
        opened = cosign(binary, "public-key", "--key", "extracted.key", env=env, cwd=tmp_path)
        assert opened.stdout.encode() == public_pem

    # cosign reads the public key from the Secret through client-go, as signgate does.
    shown = signgate("public-key", "--key", ref, env=env, cwd=tmp_path)
    assert shown.stdout.encode() == public_pem
    by_cosign = cosign(
        cosign_binaries["cosign2"], "public-key", "--key", ref, env=env, cwd=tmp_path
    )
    assert by_cosign.stdout.encode() == public_pem

    repository = f"k8s/{name}"
    digest = push(registry, repository, name.encode())
    image = f"{registry.host}/{repository}:v1"
    # The Secret's own password opens the key: COSIGN_PASSWORD is not consulted.
    signing_env = {**env, "COSIGN_PASSWORD": "not the password"}
    signgate("sign", "--format", "classic", "--key", ref, image, env=signing_env, cwd=tmp_path)

    signgate("verify", "--key", ref, image, env=env, cwd=tmp_path)
    signgate("verify", "--key", "cosign.pub", f"{registry.host}/{repository}@{digest}",
             env=env, cwd=tmp_path)
    for cosign_name, binary in cosign_binaries.items():
        cosign_verify(binary, cosign_name, str(tmp_path / "cosign.pub"), image, env)
    cosign_verify(cosign_binaries["cosign2"], "cosign2", ref, image, env)

    ours = cluster.api.requests[first_request:]
    assert {request.token for request in ours} == {SIGNER_TOKEN}
    assert (ours[0].method, ours[0].path) == ("POST", f"/api/v1/namespaces/{NAMESPACE}/secrets")
    assert {(r.method, r.path) for r in ours[1:]} == {
        ("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets/{name}")
    }


def test_a_secret_holding_a_cosign_generated_key_signs(
    cluster: Cluster, registry: RunningRegistry, cosign_binaries: dict[str, Path], tmp_path: Path
) -> None:
    env = tool_env(tmp_path, KUBECONFIG=str(cluster.kubeconfig(tmp_path)), COSIGN_PASSWORD=PASSWORD)
    cosign(cosign_binaries["cosign2"], "generate-key-pair", env=env, cwd=tmp_path)
    name = secret_name("from-cosign")
    cluster.api.put_secret(
        NAMESPACE,
        name,
        {
            "cosign.key": (tmp_path / "cosign.key").read_bytes(),
            "cosign.pub": (tmp_path / "cosign.pub").read_bytes(),
            "cosign.password": PASSWORD.encode(),
        },
    )
    repository = f"k8s/{name}"
    push(registry, repository, name.encode())
    image = f"{registry.host}/{repository}:v1"
    signgate(
        "sign", "--format", "classic", "--key", f"k8s://{NAMESPACE}/{name}", image, env=env,
        cwd=tmp_path,
    )
    cosign_verify(cosign_binaries["cosign2"], "cosign2", str(tmp_path / "cosign.pub"), image, env)


# --- failures, as a user sees them -------------------------------------------------------------


def test_forbidden_token(cluster: Cluster, registry: RunningRegistry, tmp_path: Path) -> None:
    name = secret_name("guarded")
    cluster.keys(tmp_path).create_key(f"{NAMESPACE}/{name}", fixed_password(b"pw"))
    env = tool_env(tmp_path, KUBECONFIG=str(cluster.kubeconfig(tmp_path, NO_RIGHTS_TOKEN)))
    image = f"{registry.host}/k8s/{name}:v1"
    refused = signgate("sign", "--key", f"k8s://{NAMESPACE}/{name}", image, env=env, check=False)
    assert_one_line_failure(
        refused,
        f"k8s://{NAMESPACE}/{name}: permission denied to get secret {NAMESPACE}/{name}: "
        f'secrets "{name}" is forbidden: User "nobody" cannot get resource "secrets" in API '
        f'group "" in the namespace "{NAMESPACE}"',
    )


def test_unknown_token(cluster: Cluster, tmp_path: Path) -> None:
    env = tool_env(tmp_path, KUBECONFIG=str(cluster.kubeconfig(tmp_path, UNKNOWN_TOKEN)))
    refused = signgate("public-key", "--key", f"k8s://{NAMESPACE}/any", env=env, check=False)
    assert_one_line_failure(
        refused,
        f"k8s://{NAMESPACE}/any: the Kubernetes API at {cluster.api.url} refused the "
        "credentials (401 Unauthorized)",
    )


def test_missing_secret(cluster: Cluster, tmp_path: Path) -> None:
    env = tool_env(tmp_path, KUBECONFIG=str(cluster.kubeconfig(tmp_path)))
    refused = signgate("verify", "--key", f"k8s://{NAMESPACE}/absent", "example.com/app:v1",
                       env=env, check=False)
    assert_one_line_failure(
        refused,
        f"k8s://{NAMESPACE}/absent: secret {NAMESPACE}/absent not found at the Kubernetes API "
        f"at {cluster.api.url}",
    )


def test_existing_secret_is_not_overwritten(cluster: Cluster, tmp_path: Path) -> None:
    name = secret_name("taken")
    cluster.api.put_secret(NAMESPACE, name, {"cosign.pub": b"kept"})
    env = tool_env(tmp_path, KUBECONFIG=str(cluster.kubeconfig(tmp_path)), COSIGN_PASSWORD="pw")
    refused = signgate("generate-key-pair", "--kms", f"k8s://{NAMESPACE}/{name}", env=env,
                       cwd=tmp_path, check=False)
    assert_one_line_failure(
        refused,
        f"k8s://{NAMESPACE}/{name}: secret {NAMESPACE}/{name} already exists; delete it or "
        "choose another name",
    )
    assert not (tmp_path / "cosign.pub").exists()
    assert cluster.api.secret_data(NAMESPACE, name) == {"cosign.pub": b"kept"}


def test_api_down(cluster: Cluster, tmp_path: Path) -> None:
    server = f"https://127.0.0.1:{free_port()}"
    env = tool_env(tmp_path, KUBECONFIG=str(cluster.kubeconfig(tmp_path, server=server)))
    refused = signgate("public-key", "--key", f"k8s://{NAMESPACE}/any", env=env, check=False)
    assert_one_line_failure(
        refused,
        f"k8s://{NAMESPACE}/any: cannot reach the Kubernetes API at {server}: connection refused",
    )


def test_no_kubeconfig_and_no_service_account(tmp_path: Path) -> None:
    refused = signgate("public-key", "--key", f"k8s://{NAMESPACE}/any",
                       env=tool_env(tmp_path), check=False)
    assert_one_line_failure(
        refused,
        f"k8s://{NAMESPACE}/any: no Kubernetes configuration: set KUBECONFIG, create "
        "~/.kube/config, or run in a pod with a service account",
    )


@pytest.mark.parametrize(
    ("token", "namespace", "expected"),
    [
        (
            READER_TOKEN,
            NAMESPACE,
            'permission denied to create secret {secret}: secrets is forbidden: User "reader" '
            'cannot create resource "secrets" in API group "" in the namespace "signing"',
        ),
        (SIGNER_TOKEN, "elsewhere", "namespace elsewhere not found at the Kubernetes API at {url}"),
    ],
)
def test_create_refused(
    cluster: Cluster, tmp_path: Path, token: str, namespace: str, expected: str
) -> None:
    secret = f"{namespace}/{secret_name('refused')}"
    with pytest.raises(KMSError) as caught:
        cluster.keys(tmp_path, token).create_key(secret, fixed_password(b"pw"))
    message = expected.format(secret=secret, url=cluster.api.url)
    assert caught.value.diagnostics() == f"k8s://{secret}: {message}"


def test_untrusted_api_certificate(cluster: Cluster, tmp_path: Path) -> None:
    other_ca = make_test_ca(tmp_path / "other-ca", "some other CA")
    kubeconfig = write_kubeconfig(
        tmp_path / "kubeconfig", cluster.api.url, SIGNER_TOKEN, other_ca.cert_file
    )
    keys = KubernetesSecretKeys(environ={"KUBECONFIG": str(kubeconfig)})
    with pytest.raises(KMSError) as caught:
        keys.public_key(f"{NAMESPACE}/any", fixed_password(b""))
    assert caught.value.diagnostics() == (
        f"k8s://{NAMESPACE}/any: TLS with the Kubernetes API at {cluster.api.url} failed: "
        "the server certificate could not be verified"
    )


# --- the Secret's contents ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cosign_key_pem() -> bytes:
    from cryptography.hazmat.primitives.asymmetric import ec

    return encrypt_private_key(ec.generate_private_key(ec.SECP256R1()), PASSWORD.encode())


@pytest.mark.parametrize(
    ("data", "use", "expected"),
    [
        ({"cosign.pub": b"x"}, "signer", "secret {s} has no 'cosign.key' data key"),
        ({"cosign.key": b"x"}, "public_key", "secret {s} has no 'cosign.pub' data key"),
        (
            {"cosign.pub": b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"},
            "public_key",
            "'cosign.pub': not a valid PEM public key",
        ),
        (
            {"cosign.key": b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"},
            "signer",
            "(cosign.key): not an encrypted cosign private key (PEM block 'PRIVATE KEY')",
        ),
        (
            {"cosign.key": ENCRYPTED_KEY, "cosign.password": b"wrong"},
            "signer",
            "'cosign.password' in secret {s} does not open 'cosign.key'",
        ),
        (
            {"cosign.key": ENCRYPTED_KEY},
            "signer",
            "the empty password in secret {s} does not open 'cosign.key'",
        ),
    ],
)
def test_unusable_secrets(
    cluster: Cluster, tmp_path: Path, cosign_key_pem: bytes,
    data: dict[str, bytes], use: str, expected: str,
) -> None:
    name = secret_name("unusable")
    cluster.api.put_secret(
        NAMESPACE,
        name,
        {key: cosign_key_pem if value is ENCRYPTED_KEY else value for key, value in data.items()},
    )
    secret = f"{NAMESPACE}/{name}"
    with pytest.raises(KMSError) as caught:
        getattr(cluster.keys(tmp_path, READER_TOKEN), use)(secret, fixed_password(b""))
    separator = " " if expected.startswith("(") else ": "
    assert caught.value.diagnostics() == f"k8s://{secret}{separator}" + expected.format(s=secret)
    assert PASSWORD not in caught.value.diagnostics()


def test_a_secret_without_a_password_opens_a_key_with_the_empty_one(
    cluster: Cluster, tmp_path: Path
) -> None:
    # cosign reads an absent cosign.password as the empty password.
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = secret_name("no-password")
    cluster.api.put_secret(NAMESPACE, name, {"cosign.key": encrypt_private_key(key, b"")})
    keys = cluster.keys(tmp_path, READER_TOKEN)
    signer = keys.signer(f"{NAMESPACE}/{name}", fixed_password(b"x"))
    assert signer.public_key() == PublicKey(key.public_key())
    assert signer.public_key().verify(signer.sign(b"payload"), b"payload")


def test_in_cluster_service_account(cluster: Cluster, tmp_path: Path) -> None:
    name = secret_name("in-pod")
    public = cluster.keys(tmp_path).create_key(f"{NAMESPACE}/{name}", fixed_password(b"pw"))
    service_account = tmp_path / "serviceaccount"
    service_account.mkdir()
    (service_account / "token").write_text(READER_TOKEN)
    (service_account / "ca.crt").write_bytes(cluster.ca.cert_file.read_bytes())
    host, port = cluster.api.url.removeprefix("https://").split(":")
    keys = KubernetesSecretKeys(
        environ={"HOME": str(tmp_path), "KUBERNETES_SERVICE_HOST": host,
                 "KUBERNETES_SERVICE_PORT": port},
        service_account_dir=service_account,
    )
    before = len(cluster.api.requests)
    assert keys.public_key(f"{NAMESPACE}/{name}", fixed_password(b"")) == public
    (request,) = cluster.api.requests[before:]
    assert request.token == READER_TOKEN


# --- the double itself: error bodies as kube-apiserver writes them ------------------------------


def test_the_double_answers_with_kubernetes_status_objects(cluster: Cluster) -> None:
    secrets = f"{cluster.api.url}/api/v1/namespaces/{NAMESPACE}/secrets"
    trust = ssl.create_default_context(cafile=str(cluster.ca.cert_file))
    with httpx.Client(verify=trust) as http:
        unauthenticated = http.get(f"{secrets}/x")
        missing = http.get(f"{secrets}/x", headers={"Authorization": f"Bearer {READER_TOKEN}"})
    assert unauthenticated.status_code == 401
    assert unauthenticated.json() == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "Unauthorized", "reason": "Unauthorized", "code": 401,
    }
    assert missing.status_code == 404
    assert missing.json() == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'secrets "x" not found', "reason": "NotFound",
        "details": {"name": "x", "kind": "secrets"}, "code": 404,
    }
