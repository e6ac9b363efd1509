"""The Helm chart, installed as far as a machine without a cluster allows.

Real helm renders and lints the chart for several sets of values, and every object it renders is
validated against the Kubernetes schemas (kubernetes-validate, offline). Then an installation is
played through: the pod the rendered Deployment describes is started as the kubelet would start
it (the Containerfile's entrypoint with the container's args and env; its volumes laid out from
the rendered and the user's Secrets and ConfigMaps), and an API server stand-in calls it for a
set of manifests exactly as the rendered webhook configurations tell the API server to: through
the Service, verifying the caBundle against the Service's DNS name, only for the rules'
resources and operations and the namespaces the namespaceSelector selects, within
timeoutSeconds. Signed workloads are admitted and pinned, unsigned ones refused, and the
webhook's own namespace and kube-system are never sent.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import secrets
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import httpx
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from signgate.policy import Action, parse_policy
from signgate.reference import Repository
from signgate.registry import RegistryClient
from signgate.registry.images import push_image
from tests.integration.apiserver_standin import (
    RESOURCES,
    ApiServerStandIn,
    WebhookCall,
    apply_json_patch,
)
from tests.integration.helm import helm, render
from tests.integration.openbao_server import OpenBaoServer, running_openbao
from tests.integration.registry_servers import (
    RunningRegistry,
    free_port,
    issue_server_certificate,
    make_test_ca,
)
from tests.integration.test_containerfile import entrypoint
from tests.integration.tools import REPO_ROOT, SIGNGATE, signgate, tool_env

pytestmark = pytest.mark.integration

CHART = REPO_ROOT / "charts" / "signgate"
RELEASE = "signgate"
NAMESPACE = "signgate-system"
FULLNAME = "signgate"  # the release name holds the chart name
PASSWORD = "chart test password"
PAUSE = "registry.k8s.io/pause:3.9"
READY_BOUND_SECONDS = 60.0
MIB = 1 << 20

# Custom resources: no schema in kubernetes-validate; their fields are checked by the tests.
CUSTOM_KINDS = {
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
CLUSTER_SCOPED_KINDS = {"ValidatingWebhookConfiguration", "MutatingWebhookConfiguration",
                        "PriorityClass"}


# Rendering and validating -----------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    """The objects one ``helm template`` rendered."""

    objects: list[dict[str, Any]]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"{len(found)} {kind} objects named {name}: {self.kinds()}"
        return found[0]

    def kinds(self) -> list[str]:
        return sorted(o["kind"] for o in self.objects)

    @property
    def container(self) -> dict[str, Any]:
        (container,) = self.pod_spec["containers"]
        return dict(container)

    @property
    def pod_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.one("Deployment")["spec"]["template"]["spec"]
        return spec

    def arg(self, flag: str) -> str | None:
        for arg in self.container["args"]:
            name, _, value = arg.partition("=")
            if name == flag:
                return str(value)
        return None

    def webhooks(self) -> list[tuple[str, dict[str, Any]]]:
        """("mutating" | "validating", webhook), mutating first, as the API server calls them."""
        found = [("mutating", w) for c in self.all("MutatingWebhookConfiguration")
                 for w in c["webhooks"]]
        return found + [("validating", w) for c in self.all("ValidatingWebhookConfiguration")
                        for w in c["webhooks"]]


@pytest.fixture(scope="module")
def helm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("helm")


def render_chart(home: Path, values: dict[str, Any], namespace: str = NAMESPACE) -> Rendered:
    return Rendered(render(CHART, values, home=home, release=RELEASE, namespace=namespace))


def kubernetes_versions() -> list[str]:
    """The chart's oldest Kubernetes (Chart.yaml's kubeVersion) and the newest with schemas."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    oldest = chart["kubeVersion"].removeprefix(">=").removesuffix("-0")
    newest: str = kubernetes_validate.utils.latest_version()
    return [oldest, newest]


def validate_objects(objects: list[dict[str, Any]], namespace: str = NAMESPACE) -> None:
    """Every object against the Kubernetes schemas (strict: no unknown fields) of each version
    the chart supports; custom resources by their kind."""
    for obj in objects:
        scoped = obj["kind"] in CLUSTER_SCOPED_KINDS
        assert ("namespace" in obj["metadata"]) != scoped, obj["metadata"]
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            assert obj["metadata"]["namespace"] == namespace
            continue
        for version in kubernetes_versions():
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} against Kubernetes "
                            f"{version}: {path}: {e.message}")


VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "cert-manager": {"tls": {"mode": "certManager"},
                     "metrics": {"serviceMonitor": {"enabled": True}}},
    "cert-manager-issuer": {
        "tls": {"mode": "certManager",
                "certManager": {"issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}},
    },
    "everything": {
        "priorityClass": {"create": True},
        "podAntiAffinity": "hard",
        "kubernetesSecretKeys": [{"namespace": "signing", "name": "release-key"},
                                 {"namespace": "signing", "name": "old-key"},
                                 {"namespace": "ci", "name": "ci-key"}],
        "kms": {"env": [{"name": "VAULT_ADDR", "value": "https://vault.example.com:8200"}],
                "existingSecret": "kms-credentials"},
        "publicKeys": {"inline": {"release.pub": "-----BEGIN PUBLIC KEY-----\nAA==\n"
                                                 "-----END PUBLIC KEY-----\n"},
                       "existingConfigMap": "team-keys", "existingSecret": "more-keys"},
        "registry": {"existingDockerConfigSecret": "pull-credentials",
                     "caCert": {"existingConfigMap": "registry-ca"},
                     "insecureRegistries": ["registry.internal:5000"]},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "webhook": {"excludeNamespaces": ["monitoring"]},
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}},
    },
    "minimal": {
        "autoscaling": {"enabled": False},
        "podDisruptionBudget": {"enabled": False},
        "topologySpread": {"enabled": False},
        "webhook": {"mutating": {"enabled": False}, "optOutLabel": {"key": ""}},
        "policy": {"existingConfigMap": "my-policy"},
        "preStopSleepSeconds": 0,
        "tls": {"mode": "existingSecret", "existingSecret": "my-tls",
                "caBundle": "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n"},
    },
}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_and_every_object_valid(helm_home: Path, name: str) -> None:
    values_file = helm_home / f"lint-{name}.yaml"
    values_file.write_text(yaml.safe_dump(VALUE_SETS[name]))
    linted = helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE,
                  "--values", str(values_file), home=helm_home)
    assert "1 chart(s) linted, 0 chart(s) failed" in linted.stdout
    rendered = render_chart(helm_home, VALUE_SETS[name])
    validate_objects(rendered.objects)
    assert "command" not in rendered.container  # the image's ENTRYPOINT runs


def test_validation_catches_what_the_api_server_refuses() -> None:
    broken = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x",
              "namespace": NAMESPACE}, "spec": {"selector": {}, "template": {"spec": {
                  "containers": [{"name": "x", "image": "x", "lifecycle": {"preStop": {
                      "sleep": {"seconds": 5, "second": 5}}}}]}}}}
    with pytest.raises(pytest.fail.Exception, match="Additional properties are not allowed"):
        validate_objects([broken])


# The defaults -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def defaults(helm_home: Path) -> Rendered:
    return render_chart(helm_home, {})


def selector_labels() -> dict[str, str]:
    return {"app.kubernetes.io/name": "signgate", "app.kubernetes.io/instance": RELEASE}


def test_defaults_are_highly_available(defaults: Rendered) -> None:
    deployment = defaults.one("Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert deployment["spec"]["selector"]["matchLabels"] == selector_labels()
    spec = defaults.pod_spec
    (anti_affinity,) = spec["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti_affinity["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert anti_affinity["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector_labels()
    spread = {c["topologyKey"]: c for c in spec["topologySpreadConstraints"]}
    assert set(spread) == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in spread.values():
        assert constraint["maxSkew"] == 1
        assert constraint["labelSelector"]["matchLabels"] == selector_labels()
    budget = defaults.one("PodDisruptionBudget")
    assert budget["spec"] == {"maxUnavailable": 1,
                              "selector": {"matchLabels": selector_labels()}}
    autoscaler = defaults.one("HorizontalPodAutoscaler")["spec"]
    assert autoscaler["minReplicas"] == 3
    assert autoscaler["maxReplicas"] >= 3
    assert autoscaler["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                            "name": FULLNAME}
    assert autoscaler["metrics"][0]["resource"]["name"] == "cpu"
    assert defaults.container["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}}
    assert "priorityClassName" not in spec
    assert defaults.all("PriorityClass") == []


def test_defaults_terminate_gracefully(defaults: Rendered) -> None:
    (webhook_timeout,) = {w["timeoutSeconds"] for _, w in defaults.webhooks()}
    sleep = defaults.container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert sleep > 0
    grace = defaults.pod_spec["terminationGracePeriodSeconds"]
    assert grace > sleep + webhook_timeout
    shutdown_grace = float(defaults.arg("--shutdown-grace") or 0)
    assert shutdown_grace >= webhook_timeout
    assert grace > sleep + shutdown_grace


def test_defaults_probe_over_https(defaults: Rendered) -> None:
    container = defaults.container
    liveness, readiness = container["livenessProbe"], container["readinessProbe"]
    assert liveness["httpGet"] == {"path": "/healthz", "port": "https", "scheme": "HTTPS"}
    assert liveness["periodSeconds"] == 30
    assert readiness["httpGet"] == {"path": "/readyz", "port": "https", "scheme": "HTTPS"}
    assert container["ports"] == [{"name": "https", "containerPort": 8443, "protocol": "TCP"}]


def test_defaults_are_locked_down(defaults: Rendered) -> None:
    spec = defaults.pod_spec
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert defaults.container["securityContext"] == {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    # No API access at all: no token, no Role.
    assert spec["automountServiceAccountToken"] is False
    account = defaults.one("ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    assert [k for k in defaults.kinds() if "Role" in k] == []
    writable = [m["mountPath"] for m in defaults.container["volumeMounts"]
                if not m.get("readOnly")]
    assert writable == ["/tmp"]


WORKLOAD_RESOURCES = {
    ("", "pods"), ("", "pods/ephemeralcontainers"), ("", "replicationcontrollers"),
    ("apps", "deployments"), ("apps", "replicasets"), ("apps", "statefulsets"),
    ("apps", "daemonsets"), ("batch", "jobs"), ("batch", "cronjobs"),
}


def test_defaults_webhook_configurations(defaults: Rendered) -> None:
    kinds = [kind for kind, _ in defaults.webhooks()]
    assert kinds == ["mutating", "validating"]
    for kind, webhook in defaults.webhooks():
        assert webhook["failurePolicy"] == "Fail"
        assert webhook["sideEffects"] == "None"
        assert webhook["admissionReviewVersions"] == ["v1"]
        assert webhook["timeoutSeconds"] == 10  # --deadline 8, plus 2 for network and TLS
        assert defaults.arg("--deadline") == "8"
        assert webhook["clientConfig"]["service"] == {
            "name": FULLNAME, "namespace": NAMESPACE, "port": 443,
            "path": "/mutate" if kind == "mutating" else "/validate",
        }
        covered = {(group, resource) for rule in webhook["rules"]
                   for group in rule["apiGroups"] for resource in rule["resources"]}
        assert covered == WORKLOAD_RESOURCES
        assert {op for rule in webhook["rules"] for op in rule["operations"]} == {
            "CREATE", "UPDATE"}
        assert webhook["namespaceSelector"] == {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
             "values": [NAMESPACE, "kube-system"]},
            {"key": "signgate.dev/admission", "operator": "NotIn", "values": ["disabled"]},
        ]}
    (mutating,) = [w for kind, w in defaults.webhooks() if kind == "mutating"]
    assert mutating["reinvocationPolicy"] == "IfNeeded"


def test_defaults_generate_a_ca_and_a_serving_certificate(defaults: Rendered) -> None:
    secret = defaults.one("Secret", f"{FULLNAME}-tls")
    assert secret["type"] == "kubernetes.io/tls"
    ca_pem = base64.b64decode(secret["data"]["ca.crt"])
    for _, webhook in defaults.webhooks():
        assert base64.b64decode(webhook["clientConfig"]["caBundle"]) == ca_pem
    ca = x509.load_pem_x509_certificate(ca_pem)
    serving = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    serving.verify_directly_issued_by(ca)
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"{FULLNAME}.{NAMESPACE}.svc" in names.get_values_for_type(x509.DNSName)
    key = serialization.load_pem_private_key(base64.b64decode(secret["data"]["tls.key"]), None)
    assert key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == serving.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    tls_volume = next(v for v in defaults.pod_spec["volumes"] if v["name"] == "tls")
    assert tls_volume["secret"]["secretName"] == secret["metadata"]["name"]


def test_generated_certificate_is_looked_up_before_one_is_made() -> None:
    # `helm template` has no cluster to look the Secret up in, so only the template can show
    # that an upgrade reuses the certificate an install made.
    template = (CHART / "templates" / "webhookconfigurations.yaml").read_text()
    lookup = template.index('lookup "v1" "Secret" .Release.Namespace $secretName')
    assert lookup < template.index("genCA")


def test_default_policy_fails_closed(defaults: Rendered) -> None:
    text = defaults.one("ConfigMap", f"{FULLNAME}-policy")["data"]["policy.yaml"]
    policy = parse_policy(text)
    assert policy.unmatched is Action.DENY
    assert not policy.key_references()  # no key it cannot have yet: the pods become ready


def test_policy_text_is_kept_and_a_change_rolls_the_pods(helm_home: Path,
                                                         defaults: Rendered) -> None:
    text = ("# Reviewed by the platform team.\nunmatched: deny\nrules:\n"
            "  - name: ours\n    images: [\"registry.example.com/**\"]\n"
            "    keys: [/etc/signgate/keys/release.pub]\n")
    rendered = render_chart(helm_home, {"policy": {"content": text}})
    assert rendered.one("ConfigMap", f"{FULLNAME}-policy")["data"]["policy.yaml"] == text
    parse_policy(text)

    def checksum(chart: Rendered) -> str:
        annotations = chart.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
        value: str = annotations["checksum/policy"]
        return value

    assert checksum(rendered) != checksum(defaults)


# Other values -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("deadline", "timeout"), [(5, 7), (8.5, 11), (28, 30)])
def test_webhook_timeout_follows_the_server_deadline(
    helm_home: Path, deadline: float, timeout: int
) -> None:
    rendered = render_chart(helm_home, {"server": {"deadlineSeconds": deadline},
                                        "terminationGracePeriodSeconds": 60})
    assert {w["timeoutSeconds"] for _, w in rendered.webhooks()} == {timeout}
    assert float(rendered.arg("--deadline") or 0) == deadline
    assert rendered.arg("--shutdown-grace") == str(timeout)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"server": {"deadlineSeconds": 29}}, "the API server allows at most 30"),
        ({"terminationGracePeriodSeconds": 15},
         "terminationGracePeriodSeconds 15 must exceed preStopSleepSeconds + the webhook "
         "timeout (15)"),
        ({"tls": {"mode": "selfsigned"}}, 'tls.mode "selfsigned"'),
        ({"tls": {"mode": "existingSecret", "existingSecret": "x"}}, "tls.caBundle"),
        ({"webhook": {"failurePolicy": "Never"}}, "webhook.failurePolicy"),
        ({"policy": {"content": None}}, "set policy.content or policy.existingConfigMap"),
        ({"replicas": 5}, "additional properties 'replicas' not allowed"),
        ({"server": {"deadlineSeconds": 0}}, "at '/server/deadlineSeconds'"),
        ({"affinity": {"podAntiAffinity": {}}}, "additional properties 'podAntiAffinity'"),
    ],
)
def test_unsafe_values_are_refused(helm_home: Path, values: dict[str, Any],
                                   message: str) -> None:
    values_file = helm_home / "refused.yaml"
    values_file.write_text(yaml.safe_dump(values))
    result = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                  "--values", str(values_file), home=helm_home, check=False)
    assert result.returncode != 0
    assert message in result.stderr


def test_cert_manager_issues_and_injects(helm_home: Path) -> None:
    rendered = render_chart(helm_home, VALUE_SETS["cert-manager"])
    assert [s["metadata"]["name"] for s in rendered.all("Secret")] == []
    certificates = {c["metadata"]["name"]: c["spec"] for c in rendered.all("Certificate")}
    issuers = {i["metadata"]["name"]: i["spec"] for i in rendered.all("Issuer")}
    serving = certificates[f"{FULLNAME}-tls"]
    ca = certificates[f"{FULLNAME}-ca"]
    # A long-lived CA of the release's own issues the serving certificate: renewals of the
    # serving certificate leave the caBundle unchanged.
    assert ca["isCA"] is True
    assert issuers[ca["issuerRef"]["name"]] == {"selfSigned": {}}
    assert issuers[serving["issuerRef"]["name"]] == {"ca": {"secretName": ca["secretName"]}}
    assert f"{FULLNAME}.{NAMESPACE}.svc" in serving["dnsNames"]
    tls_volume = next(v for v in rendered.pod_spec["volumes"] if v["name"] == "tls")
    assert tls_volume["secret"]["secretName"] == serving["secretName"]
    for configuration in (rendered.one("ValidatingWebhookConfiguration"),
                          rendered.one("MutatingWebhookConfiguration")):
        assert configuration["metadata"]["annotations"] == {
            "cert-manager.io/inject-ca-from": f"{NAMESPACE}/{FULLNAME}-tls"}
        assert "caBundle" not in configuration["webhooks"][0]["clientConfig"]
    monitor = rendered.one("ServiceMonitor")["spec"]
    (endpoint,) = monitor["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["port"] == rendered.one("Service")["spec"]["ports"][0]["name"]
    assert endpoint["tlsConfig"] == {
        "serverName": f"{FULLNAME}.{NAMESPACE}.svc",
        "ca": {"secret": {"name": serving["secretName"], "key": "ca.crt"}},
    }

    own = render_chart(helm_home, VALUE_SETS["cert-manager-issuer"])
    assert own.all("Issuer") == []
    assert own.one("Certificate")["spec"]["issuerRef"] == {
        "name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}


def test_every_option_wires_through(helm_home: Path) -> None:
    rendered = render_chart(helm_home, VALUE_SETS["everything"])
    spec, container = rendered.pod_spec, rendered.container
    assert spec["priorityClassName"] == rendered.one("PriorityClass")["metadata"]["name"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" in spec["affinity"]["podAntiAffinity"]
    # Least privilege: get on exactly the named Secrets, in their namespaces.
    roles = {r["metadata"]["namespace"]: r["rules"] for r in rendered.all("Role")}
    assert roles == {
        "signing": [{"apiGroups": [""], "resources": ["secrets"],
                     "resourceNames": ["release-key", "old-key"], "verbs": ["get"]}],
        "ci": [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["ci-key"],
                "verbs": ["get"]}],
    }
    for binding in rendered.all("RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME,
                                        "namespace": NAMESPACE}]
    assert rendered.all("ClusterRole") == []
    assert spec["automountServiceAccountToken"] is True
    assert rendered.one("ServiceAccount")["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}
    assert {"name": "VAULT_ADDR", "value": "https://vault.example.com:8200"} in container["env"]
    assert container["envFrom"] == [{"secretRef": {"name": "kms-credentials"}}]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["public-keys"]["projected"]["sources"] == [
        {"configMap": {"name": f"{FULLNAME}-public-keys"}},
        {"configMap": {"name": "team-keys"}},
        {"secret": {"name": "more-keys"}},
    ]
    assert volumes["docker-config"]["secret"] == {
        "secretName": "pull-credentials",
        "items": [{"key": ".dockerconfigjson", "path": "config.json"}]}
    assert rendered.arg("--docker-config") == "/etc/signgate/docker"
    assert rendered.arg("--registry-cacert") == "/etc/signgate/registry-ca/ca.crt"
    assert rendered.arg("--allow-insecure-registry") == "registry.internal:5000"
    assert rendered.one("ConfigMap", f"{FULLNAME}-public-keys")["data"] == {
        "release.pub": "-----BEGIN PUBLIC KEY-----\nAA==\n-----END PUBLIC KEY-----\n"}
    assert rendered.one("ServiceMonitor")["metadata"]["labels"]["release"] == "prometheus"
    for _, webhook in rendered.webhooks():
        (names,) = [e["values"] for e in webhook["namespaceSelector"]["matchExpressions"]
                    if e["key"] == "kubernetes.io/metadata.name"]
        assert names == [NAMESPACE, "kube-system", "monitoring"]


def test_minimal_values(helm_home: Path) -> None:
    rendered = render_chart(helm_home, VALUE_SETS["minimal"])
    kinds = rendered.kinds()
    for absent in ("HorizontalPodAutoscaler", "PodDisruptionBudget",
                   "MutatingWebhookConfiguration", "ConfigMap", "Secret"):
        assert absent not in kinds
    volumes = {v["name"]: v for v in rendered.pod_spec["volumes"]}
    assert volumes["policy"]["configMap"]["name"] == "my-policy"
    assert volumes["tls"]["secret"]["secretName"] == "my-tls"
    assert "lifecycle" not in rendered.container
    assert "topologySpreadConstraints" not in rendered.pod_spec
    webhook = rendered.one("ValidatingWebhookConfiguration")["webhooks"][0]
    assert base64.b64decode(webhook["clientConfig"]["caBundle"]).startswith(b"-----BEGIN")
    # The release namespace and kube-system stay excluded whatever the values say.
    assert webhook["namespaceSelector"] == {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
         "values": [NAMESPACE, "kube-system"]}]}


def test_the_release_namespace_is_excluded_wherever_it_is(helm_home: Path) -> None:
    rendered = render_chart(helm_home, {}, namespace="security")
    for _, webhook in rendered.webhooks():
        assert webhook["namespaceSelector"]["matchExpressions"][0]["values"] == [
            "security", "kube-system"]
        assert webhook["clientConfig"]["service"]["namespace"] == "security"


# The API server's view: which requests go to which webhook -------------------------------------


def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A metav1.LabelSelector against labels; an empty selector selects everything."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        holds = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not holds:
            return False
    return True


def _matches(allowed: list[str], value: str) -> bool:
    return "*" in allowed or value in allowed


def _resource_matches(allowed: list[str], resource: str, sub_resource: str) -> bool:
    wanted = f"{resource}/{sub_resource}" if sub_resource else resource
    for entry in allowed:
        entry_resource, _, entry_sub = entry.partition("/")
        if entry == wanted or entry == "*/*":
            return True
        if not sub_resource and entry == "*":
            return True
        if sub_resource and entry_sub in ("*", sub_resource) and entry_resource in (
                "*", resource):
            return True
    return False


@dataclass(frozen=True)
class Request:
    """What the API server matches a webhook's rules and selectors against."""

    namespace_labels: Mapping[str, str]
    group: str = ""
    version: str = "v1"
    resource: str = "pods"
    sub_resource: str = ""
    operation: str = "CREATE"
    object_labels: Mapping[str, str] = field(default_factory=dict)


def webhook_applies(webhook: Mapping[str, Any], request: Request) -> bool:
    """Whether the API server calls ``webhook`` for ``request`` (rules, namespaceSelector,
    objectSelector), as k8s.io/apiserver/pkg/admission/plugin/webhook/predicates does."""
    ruled = any(
        _matches(rule["operations"], request.operation)
        and _matches(rule["apiGroups"], request.group)
        and _matches(rule["apiVersions"], request.version)
        and _resource_matches(rule["resources"], request.resource, request.sub_resource)
        and rule.get("scope", "*") in ("*", "Namespaced")
        for rule in webhook["rules"]
    )
    return (ruled
            and selector_matches(webhook.get("namespaceSelector") or {}, request.namespace_labels)
            and selector_matches(webhook.get("objectSelector") or {}, request.object_labels))


def test_the_request_matcher_reads_selectors_as_the_api_server(defaults: Rendered) -> None:
    (_, webhook), _ = defaults.webhooks()
    team = Request({"kubernetes.io/metadata.name": "team-a"})
    assert webhook_applies(webhook, team)
    for labels in ({"kubernetes.io/metadata.name": NAMESPACE},
                   {"kubernetes.io/metadata.name": "kube-system"},
                   {**team.namespace_labels, "signgate.dev/admission": "disabled"}):
        assert not webhook_applies(webhook, replace(team, namespace_labels=labels))
    opted_in = {**team.namespace_labels, "signgate.dev/admission": "on"}
    assert webhook_applies(webhook, replace(team, namespace_labels=opted_in))
    for changed in (replace(team, operation="DELETE"), replace(team, resource="configmaps"),
                    replace(team, sub_resource="status"), replace(team, sub_resource="exec"),
                    replace(team, group="apps")):
        assert not webhook_applies(webhook, changed)
    assert webhook_applies(webhook, replace(team, sub_resource="ephemeralcontainers",
                                            operation="UPDATE"))
    assert webhook_applies(webhook, replace(team, group="batch", resource="cronjobs"))


# An installation, played through ----------------------------------------------------------------


@dataclass(kw_only=True)
class ServiceStandIn(ApiServerStandIn):
    """The API server calling the webhook's Service: the connection goes to the pod's port here,
    but the certificate is verified for the Service's DNS name, as the API server verifies it
    (https://NAME.NAMESPACE.svc:PORT)."""

    server_name: str

    def __post_init__(self) -> None:
        super().__post_init__()
        self._client.event_hooks = {"request": [self._name_the_service]}

    def _name_the_service(self, request: httpx.Request) -> None:
        request.extensions["sni_hostname"] = self.server_name


@dataclass
class Outcome:
    """What the admission chain did with one request."""

    calls: list[WebhookCall]
    allowed: bool
    admitted: dict[str, Any] | None

    @property
    def message(self) -> str:
        return self.calls[-1].message if self.calls else ""


@dataclass
class Cluster:
    """The API server's admission chain for the rendered webhook configurations."""

    rendered: Rendered
    standin: ServiceStandIn
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)

    def labels_of(self, namespace: str) -> dict[str, str]:
        # The API server sets this label on every namespace (Kubernetes 1.21+).
        return {**self.namespace_labels.get(namespace, {}),
                "kubernetes.io/metadata.name": namespace}

    def admit(self, manifest: Mapping[str, Any], namespace: str, operation: str = "CREATE",
              *, old: Mapping[str, Any] | None = None, sub_resource: str = "") -> Outcome:
        group, _, version = manifest["apiVersion"].rpartition("/")
        resource = RESOURCES[manifest["kind"]][1]
        obj: dict[str, Any] = json.loads(json.dumps(manifest))
        calls: list[WebhookCall] = []
        for kind, webhook in self.rendered.webhooks():
            request = Request(self.labels_of(namespace), group, version, resource, sub_resource,
                              operation, (obj.get("metadata") or {}).get("labels") or {})
            if not webhook_applies(webhook, request):
                continue
            assert webhook["timeoutSeconds"] == self.standin.timeout_seconds
            review = self.standin.review_for(obj, operation, old=old, sub_resource=sub_resource,
                                             namespace=namespace)
            call = self.standin.call(webhook["clientConfig"]["service"]["path"], review,
                                     mutating=kind == "mutating")
            calls.append(call)
            if not call.allowed:
                return Outcome(calls, False, None)
            if kind == "mutating":
                obj = apply_json_patch(review["request"]["object"], call.patch or [])
        return Outcome(calls, True, obj)

    def direct(self, manifest: Mapping[str, Any], namespace: str) -> WebhookCall:
        """What the validating webhook would answer if the request were sent (the API server
        does not send it: this shows that the selector, not the policy, admits it)."""
        return self.standin.validate(manifest, namespace=namespace)


@dataclass(frozen=True)
class Images:
    registry: RunningRegistry
    signed: str
    signed_digest: str
    unsigned: str
    public_key_pem: str
    home: Path


@dataclass(frozen=True)
class Vault:
    server: OpenBaoServer
    key_name: str
    reader_token: str


def push(registry: RunningRegistry, repository: str, content: bytes) -> str:
    async def pushed() -> str:
        async with RegistryClient(registry.options()) as client:
            return await push_image(client, Repository(registry.host, repository), "v1",
                                    content=content)

    return anyio.run(pushed)


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vault]:
    with running_openbao(tmp_path_factory.mktemp("chart-openbao")) as server:
        server.enable_transit("transit")
        name = "team-release"
        server.create_transit_key("transit", name, "ecdsa-p256")
        reader = server.token_with_policy(
            "signgate-webhook", f'path "transit/keys/{name}" {{ capabilities = ["read"] }}')
        yield Vault(server, name, reader)


@pytest.fixture(scope="module")
def images(basic_auth_registry: RunningRegistry, vault: Vault,
           tmp_path_factory: pytest.TempPathFactory) -> Images:
    """In a registry behind Basic auth: ``signed`` signed by a key file and by the Transit key,
    ``unsigned`` not signed."""
    home = tmp_path_factory.mktemp("chart-images")
    suffix = secrets.token_hex(3)
    signed_repository, unsigned_repository = f"team/app-{suffix}", f"team/tool-{suffix}"
    signed_digest = push(basic_auth_registry, signed_repository, f"app {suffix}".encode())
    push(basic_auth_registry, unsigned_repository, f"tool {suffix}".encode())
    signed = f"{basic_auth_registry.host}/{signed_repository}:v1"
    assert basic_auth_registry.password is not None
    env = tool_env(home, COSIGN_PASSWORD=PASSWORD, VAULT_ADDR=vault.server.address,
                   VAULT_TOKEN=vault.server.root_token,
                   SIGNGATE_REGISTRY_PASSWORD=basic_auth_registry.password)
    signgate("generate-key-pair", env=env, cwd=home)
    for key in ("cosign.key", f"hashivault://{vault.key_name}"):
        signgate("sign", "--key", key, "--registry-username", str(basic_auth_registry.username),
                 signed, env=env, cwd=home)
    return Images(basic_auth_registry, signed, signed_digest,
                  f"{basic_auth_registry.host}/{unsigned_repository}:v1",
                  (home / "cosign.pub").read_text(), home)


def secret(name: str, data: Mapping[str, str], secret_type: str = "Opaque") -> dict[str, Any]:
    """A Secret as ``kubectl create secret`` makes it."""
    return {"apiVersion": "v1", "kind": "Secret", "type": secret_type,
            "metadata": {"name": name, "namespace": NAMESPACE},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def docker_config_secret(registry: RunningRegistry) -> dict[str, Any]:
    auth = base64.b64encode(f"{registry.username}:{registry.password}".encode()).decode()
    config = json.dumps({"auths": {registry.host: {"auth": auth}}})
    return secret("registry-credentials", {".dockerconfigjson": config},
                  "kubernetes.io/dockerconfigjson")


def policy(images: Images, key: str) -> dict[str, Any]:
    return {"unmatched": "deny", "rules": [
        {"name": "kubernetes", "images": ["registry.k8s.io/**"], "action": "allow"},
        {"name": "team", "images": [f"{images.registry.host}/team/**"], "keys": [key]},
    ]}


@dataclass(frozen=True)
class Installation:
    """What a user installs: the values, and the Secrets created beforehand."""

    values: dict[str, Any]
    user_objects: list[dict[str, Any]]


def key_files_installation(images: Images) -> Installation:
    """Chart-made TLS; the public key from the user's Secret; registry credentials from the
    user's dockerconfigjson Secret."""
    return Installation(
        values={
            "policy": {"content": policy(images, "/etc/signgate/keys/team.pub")},
            "publicKeys": {"existingSecret": "team-keys"},
            "registry": {"existingDockerConfigSecret": "registry-credentials"},
        },
        user_objects=[secret("team-keys", {"team.pub": images.public_key_pem}),
                      docker_config_secret(images.registry)],
    )


def kms_installation(images: Images, vault: Vault, workdir: Path) -> Installation:
    """The user's own TLS Secret and CA; the key in OpenBao Transit, its address in env and the
    webhook's read-only token from the user's Secret."""
    ca = make_test_ca(workdir / "pki", "user's cluster CA")
    names = tuple(f"{FULLNAME}.{NAMESPACE}{suffix}" for suffix in ("", ".svc"))
    certificate = issue_server_certificate(ca, workdir / "pki", names, stem="webhook")
    return Installation(
        values={
            "policy": {"content": policy(images, f"openbao://{vault.key_name}")},
            "kms": {"env": [{"name": "BAO_ADDR", "value": vault.server.address}],
                    "existingSecret": "openbao-credentials"},
            "registry": {"existingDockerConfigSecret": "registry-credentials"},
            "tls": {"mode": "existingSecret", "existingSecret": "webhook-tls",
                    "caBundle": ca.cert_file.read_text()},
            "server": {"deadlineSeconds": 5},
        },
        user_objects=[
            secret("openbao-credentials", {"BAO_TOKEN": vault.reader_token}),
            docker_config_secret(images.registry),
            secret("webhook-tls", {"tls.crt": certificate.cert_file.read_text(),
                                   "tls.key": certificate.key_file.read_text()},
                   "kubernetes.io/tls"),
        ],
    )


class Pod:
    """The container the rendered Deployment describes, started as the kubelet starts it, with
    three differences that a pod's own network namespace and mounts make invisible: volumes
    are laid out under ``root`` (and absolute paths in args, env and the policy's key files are
    read there), the port is a free one, and it listens on 127.0.0.1."""

    def __init__(self, rendered: Rendered, user_objects: list[dict[str, Any]],
                 workdir: Path) -> None:
        self.rendered = rendered
        self.objects = rendered.objects + user_objects
        self.root = workdir / "root"
        self.log_file = workdir / "webhook.log"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def find(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name
                 and o["metadata"].get("namespace") == NAMESPACE]
        assert len(found) == 1, f"no {kind} {name} in {NAMESPACE}: the pod could not start"
        return found[0]

    def files_of(self, kind: str, name: str) -> dict[str, bytes]:
        obj = self.find(kind, name)
        if kind == "Secret":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        return {k: v.encode() for k, v in (obj.get("data") or {}).items()}

    def local(self, container_path: str) -> Path:
        return self.root / container_path.lstrip("/")

    def lay_out_volumes(self) -> None:
        volumes = {v["name"]: v for v in self.rendered.pod_spec["volumes"]}
        for mount in self.rendered.container["volumeMounts"]:
            volume = volumes[mount["name"]]
            directory = self.local(mount["mountPath"])
            directory.mkdir(parents=True)
            files: dict[str, bytes] = {}
            items: list[dict[str, str]] | None = None
            if "secret" in volume:
                files = self.files_of("Secret", volume["secret"]["secretName"])
                items = volume["secret"].get("items")
            elif "configMap" in volume:
                files = self.files_of("ConfigMap", volume["configMap"]["name"])
                items = volume["configMap"].get("items")
            elif "projected" in volume:
                for source in volume["projected"]["sources"]:
                    kind = "Secret" if "secret" in source else "ConfigMap"
                    files.update(self.files_of(kind, source[kind[0].lower() + kind[1:]]["name"]))
            else:
                assert set(volume) == {"name", "emptyDir"}, volume
            if items is not None:
                files = {item["path"]: files[item["key"]] for item in items}
            for path, content in files.items():
                (directory / path).write_bytes(content)

    def argv(self) -> list[str]:
        command, *arguments = entrypoint()
        assert command == SIGNGATE.name  # on the image's PATH; here the venv's console script
        argv = [str(SIGNGATE), *arguments]
        for arg in self.rendered.container["args"]:
            flag, equals, value = arg.partition("=")
            assert equals, f"{arg}: the chart passes --flag=value"
            if flag == "--port":
                value = str(self.port)
            elif value.startswith("/"):
                value = str(self.local(value))
            argv.append(f"{flag}={value}")
        return [*argv, "--host=127.0.0.1"]

    def environment(self) -> dict[str, str]:
        env = {"PATH": f"{SIGNGATE.parent}:/usr/bin:/bin"}
        for variable in self.rendered.container.get("env", []):
            value = variable["value"]
            env[variable["name"]] = str(self.local(value)) if value.startswith("/") else value
        for source in self.rendered.container.get("envFrom", []):
            env.update({k: v.decode() for k, v in
                        self.files_of("Secret", source["secretRef"]["name"]).items()})
        return env

    def read_policy_keys_from_the_root(self) -> None:
        policy_file = self.local(self.rendered.arg("--policy") or "")
        document = yaml.safe_load(policy_file.read_text())
        for rule in document["rules"]:
            rule["keys"] = [str(self.local(k)) if k.startswith("/") else k
                            for k in rule.get("keys", [])]
            if not rule["keys"]:
                del rule["keys"]
        policy_file.write_text(yaml.safe_dump(document))

    def start(self) -> None:
        self.lay_out_volumes()
        self.read_policy_keys_from_the_root()
        with self.log_file.open("wb") as log:
            self.process = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.environment(), cwd=self.local("/tmp"),
            )

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        give_up = time.monotonic() + READY_BOUND_SECONDS
        while not condition():
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"signgate serve exited {self.process.returncode} while waiting for "
                            f"{what}: {self.log_file.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > give_up:
                pytest.fail(f"gave up waiting for {what}: {self.log_file.read_text()[-3000:]}")
            time.sleep(0.05)

    def peak_memory_bytes(self) -> int:
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        (line,) = [line for line in status.splitlines() if line.startswith("VmHWM:")]
        return int(line.split()[1]) * 1024

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def probe_answers(pod: Pod, probe: Mapping[str, Any], context: ssl.SSLContext,
                  server_name: str) -> bool:
    """A kubelet probe of the container's named port (over TLS, here verified as well)."""
    get = probe["httpGet"]
    (port,) = [p for p in pod.rendered.container["ports"] if p["name"] == get["port"]]
    assert port["containerPort"] == int(pod.rendered.arg("--port") or 0)
    try:
        with httpx.Client(verify=context, timeout=5.0) as client:
            reply = client.get(f"{get['scheme'].lower()}://127.0.0.1:{pod.port}{get['path']}",
                               extensions={"sni_hostname": server_name})
    except httpx.TransportError:
        return False
    return reply.status_code == 200


@contextmanager
def installed(helm_home: Path, installation: Installation, workdir: Path
              ) -> Iterator[tuple[Cluster, Pod]]:
    """Render, validate, start the pod, and hand over the cluster's admission chain."""
    rendered = render_chart(helm_home, installation.values)
    validate_objects(rendered.objects + installation.user_objects)
    webhooks = rendered.webhooks()
    (timeout,) = {w["timeoutSeconds"] for _, w in webhooks}
    assert timeout == math.ceil(float(rendered.arg("--deadline") or 0)) + 2
    services = {json.dumps({k: v for k, v in w["clientConfig"]["service"].items() if k != "path"},
                           sort_keys=True) for _, w in webhooks}
    (service_json,) = services
    service_ref = json.loads(service_json)
    service = rendered.one("Service", service_ref["name"])
    assert service["metadata"]["namespace"] == service_ref["namespace"] == NAMESPACE
    assert service["spec"]["selector"] == rendered.one("Deployment")["spec"]["template"][
        "metadata"]["labels"]
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == service_ref["port"]]
    (container_port,) = [p for p in rendered.container["ports"]
                         if p["name"] == service_port["targetPort"]]
    assert container_port["containerPort"] == int(rendered.arg("--port") or 0)
    server_name = f"{service_ref['name']}.{service_ref['namespace']}.svc"
    ca_pems = {base64.b64decode(w["clientConfig"]["caBundle"]) for _, w in webhooks}
    (ca_pem,) = ca_pems
    ca_file = workdir / "caBundle.pem"
    workdir.mkdir(parents=True, exist_ok=True)
    ca_file.write_bytes(ca_pem)
    context = ssl.create_default_context(cafile=str(ca_file))

    pod = Pod(rendered, installation.user_objects, workdir)
    pod.start()
    try:
        for probe in ("livenessProbe", "readinessProbe"):
            passes = functools.partial(probe_answers, pod, rendered.container[probe], context,
                                       server_name)
            pod.wait_until(passes, f"the {probe} to pass")
        standin = ServiceStandIn(base_url=f"https://127.0.0.1:{pod.port}", ca_bundle=ca_file,
                                 timeout_seconds=timeout, server_name=server_name)
        try:
            yield Cluster(rendered, standin, {"sandbox": {"signgate.dev/admission": "disabled"}}
                          ), pod
        finally:
            standin.close()
    finally:
        status = pod.stop()
    # SIGTERM finishes the reviews in flight and exits cleanly, within the pod's grace period.
    assert status == 0, pod.log_file.read_text()[-3000:]


def workload(kind: str, *images: str, name: str = "web") -> dict[str, Any]:
    containers = [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]
    labels = {"app": name}
    if kind == "Pod":
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
                "spec": {"containers": containers}}
    template: dict[str, Any] = {"metadata": {"labels": labels}, "spec": {"containers": containers}}
    group = RESOURCES[kind][0]
    api_version = f"{group}/v1" if group else "v1"
    spec: dict[str, Any]
    if kind in ("Job", "CronJob"):
        template["spec"]["restartPolicy"] = "Never"
        spec = {"template": template}
        if kind == "CronJob":
            spec = {"schedule": "*/5 * * * *", "jobTemplate": {"spec": spec}}
    elif kind == "ReplicationController":
        spec = {"selector": labels, "template": template}
    else:
        spec = {"selector": {"matchLabels": labels}, "template": template}
        if kind == "StatefulSet":
            spec["serviceName"] = name
    return {"apiVersion": api_version, "kind": kind, "metadata": {"name": name}, "spec": spec}


def images_of(obj: Mapping[str, Any]) -> list[str]:
    spec = obj["spec"]
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]["template"]["spec"]
    elif obj["kind"] != "Pod":
        spec = spec["template"]["spec"]
    return [c["image"] for c in spec["containers"] + spec.get("ephemeralContainers", [])]


def play_admissions(cluster: Cluster, images: Images) -> None:
    """The same requests against any installation; the policy trusts the key that signed
    ``images.signed``."""
    pinned = f"{images.signed}@{images.signed_digest}"
    mutating = bool(cluster.rendered.all("MutatingWebhookConfiguration"))
    for kind in RESOURCES:
        manifest = workload(kind, PAUSE, images.signed)
        validate_objects([manifest | {"metadata": {"name": "web", "namespace": "team-a"}}])
        admitted = cluster.admit(manifest, "team-a")
        assert admitted.allowed, admitted.message
        assert len(admitted.calls) == (2 if mutating else 1)
        assert admitted.admitted is not None
        assert images_of(admitted.admitted) == [PAUSE, pinned if mutating else images.signed]
        refused = cluster.admit(workload(kind, images.signed, images.unsigned), "team-a")
        assert not refused.allowed
        assert refused.message.startswith(f"image {images.unsigned!r} of container 'c1': "
                                          "rule 'team'"), refused.message
        # An UPDATE is reviewed as well; a DELETE is not sent.
        updated = cluster.admit(workload(kind, images.unsigned), "team-a", "UPDATE",
                                old=manifest)
        assert not updated.allowed
        assert updated.calls

    # A debugging container added to a running pod goes through the subresource.
    running = workload("Pod", images.signed)
    debugged = workload("Pod", images.signed)
    debugged["spec"]["ephemeralContainers"] = [{"name": "debug", "image": images.unsigned}]
    refused = cluster.admit(debugged, "team-a", "UPDATE", old=running,
                            sub_resource="ephemeralcontainers")
    assert not refused.allowed
    assert "ephemeral container 'debug'" in refused.message

    # Never sent: kube-system, the webhook's own namespace, a namespace that opted out. Sent
    # anyway, the same requests would be refused: the selector, not the policy, lets them in.
    unsigned_pod = workload("Pod", images.unsigned)
    for namespace in ("kube-system", NAMESPACE, "sandbox"):
        outcome = cluster.admit(unsigned_pod, namespace)
        assert (outcome.allowed, outcome.calls) == (True, [])
        assert not cluster.direct(unsigned_pod, namespace).allowed

    # The webhook's own Deployment, its ReplicaSet and its pods are never sent either: the
    # webhook cannot block its own start, even when none of its replicas runs.
    own = cluster.rendered.one("Deployment")
    replica_set = {"apiVersion": "apps/v1", "kind": "ReplicaSet",
                   "metadata": {"name": f"{FULLNAME}-5d8f7c6b9"}, "spec": own["spec"]}
    own_pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": f"{FULLNAME}-5d8f7c6b9-x2x4z",
                            "labels": own["spec"]["template"]["metadata"]["labels"]},
               "spec": own["spec"]["template"]["spec"]}
    for manifest in (own, replica_set, own_pod):
        outcome = cluster.admit(manifest, NAMESPACE)
        assert (outcome.allowed, outcome.calls) == (True, [])
        assert not cluster.direct(manifest, NAMESPACE).allowed


def assert_within_memory_limit(cluster: Cluster, pod: Pod) -> None:
    """The chart's memory limit holds the server's peak after a round of reviews (about 50 MiB
    when this was written)."""
    limit = cluster.rendered.container["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    peak = pod.peak_memory_bytes()
    assert peak < int(limit[:-2]) * MIB, f"peak RSS {peak / MIB:.0f} MiB over {limit}"


def test_install_with_key_files_and_chart_made_tls(
    helm_home: Path, images: Images, tmp_path: Path
) -> None:
    installation = key_files_installation(images)
    with installed(helm_home, installation, tmp_path) as (cluster, pod):
        play_admissions(cluster, images)
        assert_within_memory_limit(cluster, pod)
    log = pod.log_file.read_text()
    assert str(images.registry.password) not in log


def test_install_with_a_kms_key_and_the_users_tls_secret(
    helm_home: Path, images: Images, vault: Vault, tmp_path: Path
) -> None:
    installation = kms_installation(images, vault, tmp_path / "user")
    with installed(helm_home, installation, tmp_path / "install") as (cluster, pod):
        assert cluster.standin.timeout_seconds == 7  # deadline 5 + 2
        play_admissions(cluster, images)
        assert_within_memory_limit(cluster, pod)
    log = pod.log_file.read_text()
    assert vault.reader_token not in log
