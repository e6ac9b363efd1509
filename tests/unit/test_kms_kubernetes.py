"""k8s:// keys: the reference grammar, which cluster configuration is used, the Secret's shape."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from signgate.errors import KMSError
from signgate.keys.kms.kubernetes import (
    KubeconfigFiles,
    KubernetesSecretKeys,
    SecretLocation,
    ServiceAccount,
    backend,
    find_cluster_access,
    parse_secret_location,
    secret_field,
    secret_manifest,
    status_message,
)
from signgate.keys.refs import (
    KeyBackend,
    KeyCreator,
    KeyDisabler,
    KeyVersioner,
    VersionedKeys,
    add_key_version,
    disable_key,
    split_key_ref,
)

SA_DIR = Path("/sa")
HOME_CONFIG = Path("/home/u/.kube/config")
IN_POD = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
NO_PUB = "k8s://signing/release-key: secret signing/release-key has no 'cosign.pub' data key"
LOCATION = SecretLocation("signing", "release-key")


def never_asked() -> bytes:
    raise AssertionError("the password was asked for")


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("ns/name", SecretLocation("ns", "name")),
        ("cosign-system/signing-key", SecretLocation("cosign-system", "signing-key")),
        ("a/b.c-d.e", SecretLocation("a", "b.c-d.e")),
        ("0/9", SecretLocation("0", "9")),
        ("n" * 63 + "/" + "s" * 253, SecretLocation("n" * 63, "s" * 253)),
    ],
)
def test_valid_references(location: str, expected: SecretLocation) -> None:
    assert parse_secret_location(location) == expected
    assert expected.ref == f"k8s://{location}"


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("", "k8s://: expected k8s://NAMESPACE/SECRET"),
        ("ns", "k8s://ns: expected k8s://NAMESPACE/SECRET"),
        ("ns/", "k8s://ns/: expected k8s://NAMESPACE/SECRET"),
        ("/name", "k8s:///name: expected k8s://NAMESPACE/SECRET"),
        ("ns/name/extra", "k8s://ns/name/extra: expected k8s://NAMESPACE/SECRET"),
        ("ns//name", "k8s://ns//name: expected k8s://NAMESPACE/SECRET"),
        ("NS/name", "k8s://NS/name: 'NS' is not a Kubernetes namespace name"),
        ("my.ns/name", "k8s://my.ns/name: 'my.ns' is not a Kubernetes namespace name"),
        ("-ns/name", "k8s://-ns/name: '-ns' is not a Kubernetes namespace name"),
        ("n" * 64 + "/name", "is not a Kubernetes namespace name"),
        ("ns/Name", "k8s://ns/Name: 'Name' is not a Kubernetes Secret name"),
        ("ns/cosign_key", "k8s://ns/cosign_key: 'cosign_key' is not a Kubernetes Secret name"),
        ("ns/name.", "k8s://ns/name.: 'name.' is not a Kubernetes Secret name"),
        ("ns/a..b", "k8s://ns/a..b: 'a..b' is not a Kubernetes Secret name"),
        ("ns/name?x=1", "'name?x=1' is not a Kubernetes Secret name"),
        ("ns/" + "s" * 254, "is not a Kubernetes Secret name"),
    ],
)
def test_invalid_references(location: str, message: str) -> None:
    with pytest.raises(KMSError) as caught:
        parse_secret_location(location)
    assert message in caught.value.diagnostics()


def test_invalid_reference_is_refused_before_any_configuration_is_read() -> None:
    with pytest.raises(KMSError, match="expected k8s://NAMESPACE/SECRET"):
        KubernetesSecretKeys(environ={}).public_key("just-a-name", never_asked)


def test_the_scheme_reaches_this_backend() -> None:
    assert split_key_ref("k8s://signing/release-key") == ("k8s", "signing/release-key")
    keys = backend("k8s")
    assert isinstance(keys, KeyBackend)
    assert isinstance(keys, KeyCreator)
    assert not isinstance(keys, VersionedKeys)
    assert not isinstance(keys, KeyDisabler)
    assert not isinstance(keys, KeyVersioner)


def test_a_secret_is_neither_disabled_nor_versioned_and_no_cluster_is_asked() -> None:
    # No kubeconfig nor service account is set up here: a refusal that tried the API server
    # would complain about the configuration instead.
    with pytest.raises(KMSError) as disabled:
        disable_key("k8s://signing/release-key")
    assert disabled.value.diagnostics() == (
        "k8s://signing/release-key: k8s:// keys cannot be disabled: their store has no "
        "disabled state; delete the key yourself once no verifier trusts it"
    )
    with pytest.raises(KMSError) as versioned:
        add_key_version("k8s://signing/release-key")
    assert versioned.value.diagnostics() == (
        "k8s://signing/release-key: k8s:// keys have no versions; rotate to a new key instead"
    )


# --- which configuration: client-go's loading rules -----------------------------------------


def exists_among(*paths: str) -> Callable[[Path], bool]:
    present = {Path(p) for p in paths}
    return lambda path: path in present


@pytest.mark.parametrize(
    ("environ", "files", "expected"),
    [
        # ~/.kube/config when KUBECONFIG is unset or empty
        ({"HOME": "/home/u"}, [str(HOME_CONFIG)], KubeconfigFiles((HOME_CONFIG,))),
        (
            {"HOME": "/home/u", "KUBECONFIG": ""},
            [str(HOME_CONFIG)],
            KubeconfigFiles((HOME_CONFIG,)),
        ),
        # KUBECONFIG replaces ~/.kube/config; missing entries are skipped, order kept
        (
            {"HOME": "/home/u", "KUBECONFIG": os.pathsep.join(["/b", "/missing", "", "/a"])},
            ["/a", "/b", "/home/u/.kube/config"],
            KubeconfigFiles((Path("/b"), Path("/a"))),
        ),
        # a kubeconfig wins over the pod's service account, as in client-go
        (
            {"HOME": "/home/u", "KUBECONFIG": "/kc", **IN_POD},
            ["/kc", "/sa/token"],
            KubeconfigFiles((Path("/kc"),)),
        ),
        # no kubeconfig: the service account, if the pod has one
        (
            {"HOME": "/home/u", **IN_POD},
            ["/sa/token"],
            ServiceAccount("10.0.0.1", "443", SA_DIR),
        ),
        (
            {"HOME": "/home/u", "KUBECONFIG": "/missing", **IN_POD},
            ["/sa/token", "/home/u/.kube/config"],
            ServiceAccount("10.0.0.1", "443", SA_DIR),
        ),
        # nothing usable
        ({"HOME": "/home/u"}, [], None),
        ({"HOME": "/home/u", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}, ["/sa/token"], None),
        (
            {"HOME": "/home/u", **IN_POD},
            [],
            None,
        ),
    ],
)
def test_cluster_access_follows_client_go(
    environ: dict[str, str], files: list[str], expected: KubeconfigFiles | ServiceAccount | None
) -> None:
    assert find_cluster_access(environ, SA_DIR, exists_among(*files)) == expected


def test_no_configuration_is_one_line_naming_the_secret(tmp_path: Path) -> None:
    keys = KubernetesSecretKeys(environ={"HOME": str(tmp_path)}, service_account_dir=tmp_path)
    with pytest.raises(KMSError) as caught:
        keys.create_key("signing/release-key", never_asked)
    assert caught.value.diagnostics() == (
        "k8s://signing/release-key: no Kubernetes configuration: set KUBECONFIG, create "
        "~/.kube/config, or run in a pod with a service account"
    )


def test_an_unreadable_kubeconfig_names_the_file(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("clusters: [unclosed\n")
    keys = KubernetesSecretKeys(environ={"KUBECONFIG": str(kubeconfig)})
    with pytest.raises(KMSError) as caught:
        keys.public_key("signing/release-key", never_asked)
    message = caught.value.diagnostics()
    prefix = f"k8s://signing/release-key: cannot use the kubeconfig {kubeconfig}: "
    assert message.startswith(prefix)
    assert "\n" not in str(caught.value)


def test_a_kubeconfig_without_a_context_is_refused(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\nusers: []\n")
    keys = KubernetesSecretKeys(environ={"KUBECONFIG": str(kubeconfig)})
    with pytest.raises(KMSError, match=r"cannot use the kubeconfig .*current-context"):
        keys.signer("signing/release-key", never_asked)


def test_an_incomplete_service_account_names_its_directory(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("sa-token-value")
    keys = KubernetesSecretKeys(
        environ={"HOME": str(tmp_path), "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                 "KUBERNETES_SERVICE_PORT": "6443"},
        service_account_dir=tmp_path,
    )
    with pytest.raises(KMSError) as caught:
        keys.public_key("signing/release-key", never_asked)
    message = caught.value.diagnostics()
    assert message == (
        f"k8s://signing/release-key: cannot use the service account in {tmp_path}: "
        "Service certification file does not exist."
    )
    assert "sa-token-value" not in message


# --- the Secret ------------------------------------------------------------------------------


def test_the_secret_has_cosigns_three_data_keys() -> None:
    manifest = secret_manifest(LOCATION, b"PRIVATE PEM", b"PUBLIC PEM", b"pass word")
    assert manifest == {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "release-key", "namespace": "signing"},
        "type": "Opaque",
        "data": {
            "cosign.key": base64.b64encode(b"PRIVATE PEM").decode(),
            "cosign.pub": base64.b64encode(b"PUBLIC PEM").decode(),
            "cosign.password": base64.b64encode(b"pass word").decode(),
        },
    }
    json.dumps(manifest)  # the body the client posts


def test_an_empty_password_is_stored_as_an_empty_value() -> None:
    manifest = secret_manifest(LOCATION, b"k", b"p", b"")
    assert manifest["data"]["cosign.password"] == ""
    assert secret_field(LOCATION, manifest["data"], "cosign.password") == b""


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, NO_PUB),
        ({}, NO_PUB),
        ({"cosign.key": "AAAA"}, NO_PUB),
        (
            {"cosign.pub": "not base64!"},
            "k8s://signing/release-key: 'cosign.pub' in secret signing/release-key is not base64",
        ),
    ],
)
def test_missing_or_malformed_data_keys(data: dict[str, str] | None, message: str) -> None:
    with pytest.raises(KMSError) as caught:
        secret_field(LOCATION, data, "cosign.pub")
    assert caught.value.diagnostics() == message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            '{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":'
            '"secrets \\"k\\" is forbidden: User \\"u\\" cannot get resource \\"secrets\\"",'
            '"reason":"Forbidden","details":{"name":"k","kind":"secrets"},"code":403}',
            'secrets "k" is forbidden: User "u" cannot get resource "secrets"',
        ),
        ('{"message": "two\\nlines\\t here"}', "two lines here"),
        ('{"message": "' + "x" * 1000 + '"}', "x" * 300),
        ('{"message": 3}', ""),
        ("[]", ""),
        ("<html>502 Bad Gateway</html>", ""),
        ("", ""),
        (None, ""),
    ],
)
def test_status_message(body: str | None, message: str) -> None:
    assert status_message(body) == message
