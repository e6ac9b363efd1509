"""``signgate serve`` as a child process over real TLS, called by the API server stand-in, against
a real docker-registry holding images signed by signgate."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from cryptography import x509

from signgate.keys import load_public_key
from signgate.registry import RegistryClient, RegistryOptions
from signgate.registry.images import push_image
from tests.integration.apiserver_standin import (
    ApiServerStandIn,
    WebhookCall,
    WebhookCallFailed,
    apply_json_patch,
)
from tests.integration.registry_servers import (
    CertificateAuthority,
    RunningRegistry,
    ServerCertificate,
    free_port,
    issue_server_certificate,
    make_test_ca,
)
from tests.integration.tools import SIGNGATE, signgate, tool_env

pytestmark = pytest.mark.integration

PASSWORD = "webhook test password"
STARTUP_BOUND_SECONDS = 60.0
PAUSE = "registry.k8s.io/pause:3.9"


# The server as a child process ------------------------------------------------------------


@dataclass
class WebhookProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_file: Path
    ca_file: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def log_lines(self) -> list[dict[str, Any]]:
        """Every line the server wrote, each parsed as the JSON object it must be."""
        text = self.log_file.read_text(errors="replace")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def decision(self, uid: str) -> dict[str, Any]:
        (line,) = [e for e in self.log_lines() if e.get("event") == "admission"
                   and e.get("uid") == uid]
        return line

    def standin(self, **options: Any) -> ApiServerStandIn:
        return ApiServerStandIn(self.url, self.ca_file, **options)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_until(condition: Callable[[], bool], what: str, process: WebhookProcess | None = None,
               bound_seconds: float = STARTUP_BOUND_SECONDS) -> None:
    """Poll ``condition`` until it holds; fail after a generous bound (not a timing claim)."""
    give_up = time.monotonic() + bound_seconds
    while not condition():
        if process is not None and process.process.poll() is not None:
            pytest.fail(
                f"signgate serve exited with {process.process.returncode} while waiting for "
                f"{what}: {process.log_file.read_text(errors='replace')[-3000:]}"
            )
        if time.monotonic() > give_up:
            pytest.fail(f"gave up waiting for {what} after {bound_seconds}s")
        time.sleep(0.05)


def probe(url: str, ca_file: Path) -> httpx.Response | None:
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca_file)),
                          timeout=5.0) as client:
            return client.get(url)
    except httpx.TransportError:
        return None


@contextmanager
def running_webhook(
    workdir: Path,
    policy_file: Path,
    certificate: ServerCertificate,
    ca_file: Path,
    *extra_args: str,
    ready: bool = True,
) -> Iterator[WebhookProcess]:
    """``signgate serve`` on a free port; waits for /readyz (``ready``) or /healthz."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_file = workdir / "webhook.log"
    argv = [
        str(SIGNGATE), "serve",
        "--policy", str(policy_file),
        "--tls-cert", str(certificate.cert_file),
        "--tls-key", str(certificate.key_file),
        "--host", "127.0.0.1",
        "--port", str(port),
        *extra_args,
    ]
    with log_file.open("wb") as log_stream:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_stream, stderr=subprocess.STDOUT,
            env=tool_env(workdir),
        )
    webhook = WebhookProcess(process, port, log_file, ca_file)
    try:
        path = "/readyz" if ready else "/healthz"

        def answers() -> bool:
            reply = probe(webhook.url + path, ca_file)
            return reply is not None and reply.status_code == 200

        wait_until(answers, f"{path} of signgate serve", webhook)
        yield webhook
    finally:
        webhook.stop()


# Images, keys and the policy ---------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """Images in a real registry: ``app`` and ``debug`` signed by ``cosign.pub``; ``unsigned``
    not signed; ``foreign`` signed by another key."""

    registry: RunningRegistry
    home: Path
    ca: CertificateAuthority
    certificate: ServerCertificate
    policy_file: Path
    app: str
    app_digest: str
    debug: str
    debug_digest: str
    unsigned: str
    foreign: str

    def policy(self, path: Path, *rules: str, unmatched: str = "deny") -> Path:
        path.write_text(f"unmatched: {unmatched}\nrules:\n" + "".join(rules))
        return path


def team_rule(host: str, key: Path) -> str:
    return (
        "  - name: team\n"
        f"    images: [\"{host}/team/**\"]\n"
        f"    keys: [{key}]\n"
    )


PLATFORM_RULE = "  - name: platform\n    images: [\"registry.k8s.io/**\"]\n    action: allow\n"


def push(registry: RunningRegistry, repository: str, tag: str, content: bytes) -> str:
    async def run() -> str:
        async with RegistryClient(RegistryOptions()) as client:
            return await push_image(client, registry.repository(repository), tag,
                                    content=content)

    return anyio.run(run)


@pytest.fixture(scope="module")
def world(registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory) -> World:
    home = tmp_path_factory.mktemp("webhook-world")
    env = tool_env(home, COSIGN_PASSWORD=PASSWORD)
    signgate("generate-key-pair", env=env, cwd=home)
    other = home / "other"
    other.mkdir()
    signgate("generate-key-pair", env=env, cwd=other)
    suffix = home.name.lower()
    images = {}
    for name in ("app", "debug", "unsigned", "foreign"):
        repository = f"team/{name}-{suffix}"
        digest = push(registry, repository, "v1", f"{name} {suffix}".encode())
        images[name] = (f"{registry.host}/{repository}:v1", digest)
    signgate("sign", "--key", "cosign.key", images["app"][0], images["debug"][0],
             env=env, cwd=home)
    signgate("sign", "--key", str(other / "cosign.key"), images["foreign"][0], env=env, cwd=home)
    ca = make_test_ca(home / "pki")
    certificate = issue_server_certificate(ca, home / "pki")
    policy_file = home / "policy.yaml"
    policy_file.write_text(
        "unmatched: deny\nrules:\n" + PLATFORM_RULE + team_rule(registry.host, home / "cosign.pub")
    )
    return World(
        registry, home, ca, certificate, policy_file,
        app=images["app"][0], app_digest=images["app"][1],
        debug=images["debug"][0], debug_digest=images["debug"][1],
        unsigned=images["unsigned"][0], foreign=images["foreign"][0],
    )


@pytest.fixture(scope="module")
def webhook(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebhookProcess]:
    with running_webhook(
        tmp_path_factory.mktemp("webhook"), world.policy_file, world.certificate,
        world.ca.cert_file, "--deadline", "20",
    ) as running:
        yield running


@pytest.fixture
def apiserver(webhook: WebhookProcess) -> Iterator[ApiServerStandIn]:
    with webhook.standin(timeout_seconds=30) as standin:
        yield standin


# Workloads ------------------------------------------------------------------------------------

LABELS = {"app": "web"}


def pod_spec(*images: str) -> dict[str, Any]:
    return {"containers": [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]}


def pod(*images: str, name: str = "web") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": pod_spec(*images)}


def workload(kind: str, *images: str) -> dict[str, Any]:
    """A minimal valid manifest of ``kind`` whose pod runs ``images``."""
    if kind == "Pod":
        return pod(*images)
    template = {"metadata": {"labels": LABELS}, "spec": pod_spec(*images)}
    metadata = {"name": "web"}
    if kind in ("Job", "CronJob"):
        template["spec"]["restartPolicy"] = "Never"
        job_spec = {"template": template}
        if kind == "Job":
            return {"apiVersion": "batch/v1", "kind": kind, "metadata": metadata, "spec": job_spec}
        return {"apiVersion": "batch/v1", "kind": kind, "metadata": metadata,
                "spec": {"schedule": "*/5 * * * *", "jobTemplate": {"spec": job_spec}}}
    if kind == "ReplicationController":
        return {"apiVersion": "v1", "kind": kind, "metadata": metadata,
                "spec": {"replicas": 2, "selector": LABELS, "template": template}}
    spec: dict[str, Any] = {"selector": {"matchLabels": LABELS}, "template": template}
    if kind == "StatefulSet":
        spec["serviceName"] = "web"
    if kind != "DaemonSet":
        spec["replicas"] = 3
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": metadata, "spec": spec}


POD_SPEC_POINTER = {
    "Pod": "/spec",
    "CronJob": "/spec/jobTemplate/spec/template/spec",
}
KINDS = ["Pod", "Deployment", "ReplicaSet", "StatefulSet", "DaemonSet", "Job", "CronJob",
         "ReplicationController"]


def image_at(obj: dict[str, Any], pointer: str) -> Any:
    value: Any = obj
    for segment in pointer.strip("/").split("/"):
        value = value[int(segment)] if isinstance(value, list) else value[segment]
    return value


def without_uid(call: WebhookCall) -> dict[str, Any]:
    return {k: v for k, v in call.response.items() if k != "uid"}


# Admission ------------------------------------------------------------------------------------


def test_a_signed_pod_is_allowed(apiserver: ApiServerStandIn, world: World,
                                 webhook: WebhookProcess) -> None:
    call = apiserver.validate(pod(world.app, PAUSE))
    assert call.allowed, call.message
    assert call.patch is None
    line = webhook.decision(call.uid)
    assert line["verdict"] == "allowed"
    assert line["images"][0]["digest"] == world.app_digest


def test_an_unsigned_pod_is_denied_naming_the_image_and_why(
    apiserver: ApiServerStandIn, world: World
) -> None:
    for call in (apiserver.validate(pod(world.app, world.unsigned)),
                 apiserver.mutate(pod(world.app, world.unsigned))):
        assert not call.allowed
        assert call.patch is None
        assert call.response["status"]["code"] == 403
        assert call.message.startswith(f"image {world.unsigned!r} of container 'c1': rule 'team'")
        assert world.app not in call.message


def test_a_pod_signed_by_another_key_is_denied(apiserver: ApiServerStandIn, world: World) -> None:
    call = apiserver.validate(pod(world.foreign))
    assert not call.allowed
    assert call.message.startswith(f"image {world.foreign!r} of container 'c0': rule 'team'")


def test_mutate_pins_the_tag_to_the_verified_digest(
    apiserver: ApiServerStandIn, world: World
) -> None:
    admission = apiserver.admit(pod(world.app, PAUSE))
    assert admission.mutating.patch == [
        {"op": "replace", "path": "/spec/containers/0/image",
         "value": f"{world.app}@{world.app_digest}"}
    ]
    assert admission.admitted_object is not None
    containers = admission.admitted_object["spec"]["containers"]
    assert [c["image"] for c in containers] == [f"{world.app}@{world.app_digest}", PAUSE]
    # The validating webhook admits the pinned object, and has nothing left to pin.
    assert admission.allowed
    pinned_again = apiserver.mutate(admission.admitted_object)
    assert pinned_again.allowed
    assert pinned_again.patch is None


@pytest.mark.parametrize("kind", KINDS)
def test_each_workload_kind_is_verified_and_pinned(
    apiserver: ApiServerStandIn, world: World, kind: str
) -> None:
    admission = apiserver.admit(workload(kind, PAUSE, world.app))
    pointer = POD_SPEC_POINTER.get(kind, "/spec/template/spec") + "/containers/1/image"
    assert admission.mutating.patch == [
        {"op": "replace", "path": pointer, "value": f"{world.app}@{world.app_digest}"}
    ]
    assert admission.allowed
    assert admission.admitted_object is not None
    assert image_at(admission.admitted_object, pointer) == f"{world.app}@{world.app_digest}"
    denied = apiserver.validate(workload(kind, world.app, world.unsigned))
    assert not denied.allowed
    assert world.unsigned in denied.message


def test_ephemeral_containers_subresource(apiserver: ApiServerStandIn, world: World) -> None:
    running = pod(world.app)

    def with_debugger(image: str) -> dict[str, Any]:
        debugged = pod(world.app)
        debugged["spec"]["ephemeralContainers"] = [{"name": "debugger", "image": image}]
        return debugged

    refused = apiserver.validate(with_debugger(world.unsigned), "UPDATE", old=running,
                                 sub_resource="ephemeralcontainers")
    assert not refused.allowed
    assert refused.message.startswith(
        f"image {world.unsigned!r} of ephemeral container 'debugger': rule 'team'"
    )
    admission = apiserver.admit(with_debugger(world.debug), "UPDATE", old=running,
                                sub_resource="ephemeralcontainers")
    assert admission.allowed
    assert admission.mutating.patch == [
        {"op": "replace", "path": "/spec/ephemeralContainers/0/image",
         "value": f"{world.debug}@{world.debug_digest}"}
    ]


def test_delete_is_allowed(apiserver: ApiServerStandIn, world: World,
                           webhook: WebhookProcess) -> None:
    call = apiserver.validate(workload("Deployment", world.unsigned), "DELETE")
    assert call.allowed
    assert call.review["request"]["object"] is None
    assert webhook.decision(call.uid)["operation"] == "DELETE"


def test_dry_run_gets_the_same_answer(apiserver: ApiServerStandIn, world: World,
                                      webhook: WebhookProcess) -> None:
    for manifest in (pod(world.app), pod(world.app, world.unsigned)):
        for send in (apiserver.validate, apiserver.mutate):
            real = send(manifest)
            dry = send(manifest, dry_run=True)
            assert dry.review["request"]["dryRun"] is True
            assert without_uid(dry) == without_uid(real)
            assert webhook.decision(dry.uid)["dry_run"] is True


def test_one_json_log_line_per_decision(apiserver: ApiServerStandIn, world: World,
                                        webhook: WebhookProcess) -> None:
    call = apiserver.mutate(workload("Deployment", world.app, world.unsigned))
    line = webhook.decision(call.uid)
    assert line["level"] == "info"
    assert line["logger"] == "signgate.webhook.decisions"
    assert {k: line[k] for k in ("namespace", "kind", "name", "operation", "verdict", "rules",
                                 "dry_run", "endpoint")} == {
        "namespace": "default", "kind": "Deployment", "name": "web", "operation": "CREATE",
        "verdict": "denied", "rules": ["team"], "dry_run": False, "endpoint": "mutate",
    }
    assert line["reason"] == call.message
    assert [(i["image"], i["digest"] is not None, i["verdict"]) for i in line["images"]] == [
        (world.app, True, "allowed"), (world.unsigned, True, "denied")
    ]
    assert line["images"][0]["digest"] == world.app_digest
    assert isinstance(line["latency_ms"], float)
    assert PASSWORD not in webhook.log_file.read_text()


# Malformed input and the other endpoints --------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{\"apiVersion\": ", "the body is not JSON: "),
        (json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
                     "request": {"uid": "x"}}).encode(),
         "apiVersion: 'admission.k8s.io/v1beta1' is not 'admission.k8s.io/v1'"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                     "request": {"operation": "CREATE", "kind": {"kind": "Pod"}}}).encode(),
         "request.uid: missing"),
        (b" " * (5 << 20), "the body is 5242880 bytes, over the 4194304 byte bound"),
    ],
    ids=["not-json", "wrong-api-version", "no-uid", "oversize"],
)
def test_malformed_bodies_get_400_and_the_server_goes_on(
    apiserver: ApiServerStandIn, world: World, body: bytes, reason: str
) -> None:
    for path in ("/validate", "/mutate"):
        reply = apiserver.post_raw(path, body, {"Content-Type": "application/json"})
        assert reply.status_code == 400
        assert reply.text.startswith(f"malformed AdmissionReview: {reason}")
    assert apiserver.get("/healthz").status_code == 200
    assert apiserver.validate(pod(world.app)).allowed


def test_an_oversize_body_without_a_length_is_refused_while_it_streams(
    apiserver: ApiServerStandIn,
) -> None:
    chunks = (b" " * (1 << 20) for _ in range(6))
    reply = apiserver.post_raw("/validate", chunks, {"Content-Type": "application/json"})
    assert reply.status_code == 400
    assert reply.text == "malformed AdmissionReview: the body is over the 4194304 byte bound\n"
    assert apiserver.get("/healthz").status_code == 200


def test_wrong_methods_and_paths(apiserver: ApiServerStandIn) -> None:
    assert apiserver.get("/validate").status_code == 405
    assert apiserver.get("/mutate").headers["allow"] == "POST"
    assert apiserver.post_raw("/healthz", b"").status_code == 405
    assert apiserver.get("/").status_code == 404
    assert apiserver.get("/apis/admission").status_code == 404


def test_probes_and_metrics(apiserver: ApiServerStandIn, world: World) -> None:
    apiserver.validate(pod(world.app))
    apiserver.validate(pod(world.unsigned))
    health = apiserver.get("/healthz")
    assert (health.status_code, health.text) == (200, "ok\n")
    ready = apiserver.get("/readyz")
    assert (ready.status_code, ready.text) == (200, "ready\n")
    metrics = apiserver.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain; version=")

    def value(pattern: str) -> float:
        match = re.search(rf"^{pattern} (\S+)$", metrics.text, re.MULTILINE)
        assert match is not None, f"{pattern} not in {metrics.text}"
        return float(match[1])

    assert value(r'signgate_admissions_total\{result="allowed"\}') >= 1
    assert value(r'signgate_admissions_total\{result="denied"\}') >= 1
    assert value(r"signgate_admission_duration_seconds_count") >= 2
    assert value(r'signgate_registry_responses_total\{status="200"\}') >= 1
    assert "signgate_cache_lookups_total" in metrics.text


def test_every_log_line_is_json(webhook: WebhookProcess) -> None:
    lines = webhook.log_lines()
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert lines[0]["message"] == "signgate webhook starting"
    assert lines[0]["loop"] == "uvloop"


def test_unready_while_a_key_cannot_be_loaded(world: World, tmp_path: Path) -> None:
    missing = "env://SIGNGATE_WEBHOOK_TEST_MISSING_KEY"
    policy = world.policy(
        tmp_path / "policy.yaml",
        f"  - name: team\n    images: [\"{world.registry.host}/team/**\"]\n"
        f"    keys: [{missing}]\n",
    )
    with running_webhook(tmp_path / "server", policy, world.certificate, world.ca.cert_file,
                         ready=False) as webhook, webhook.standin() as apiserver:

        def names_the_key() -> bool:
            return missing in apiserver.get("/readyz").text

        wait_until(names_the_key, "/readyz to name the key", webhook)
        ready = apiserver.get("/readyz")
        assert ready.status_code == 503
        assert ready.text.startswith("not ready: ")
        assert apiserver.get("/healthz").status_code == 200
        call = apiserver.validate(pod(world.app))
        assert not call.allowed


def test_bad_start_up_input_stops_with_a_message(world: World, tmp_path: Path) -> None:
    bad_policy = tmp_path / "bad.yaml"
    bad_policy.write_text("rules:\n  - name: x\n    images: [\"a/**\"]\n    threshold: 2\n")
    other = issue_server_certificate(world.ca, tmp_path, stem="other")
    common = ["serve", "--host", "127.0.0.1", "--port", str(free_port())]
    result = signgate(*common, "--policy", str(bad_policy),
                      "--tls-cert", str(world.certificate.cert_file),
                      "--tls-key", str(world.certificate.key_file),
                      env=tool_env(tmp_path), check=False)
    assert result.returncode != 0
    assert result.stderr.startswith(f"signgate: {bad_policy}")
    mismatched = signgate(*common, "--policy", str(world.policy_file),
                          "--tls-cert", str(world.certificate.cert_file),
                          "--tls-key", str(other.key_file),
                          env=tool_env(tmp_path), check=False)
    assert mismatched.returncode == 2
    assert mismatched.stderr.startswith(
        f"signgate: cannot use the TLS certificate {world.certificate.cert_file}"
    )


# TLS reload -----------------------------------------------------------------------------------


class SecretVolume:
    """Files laid out as the kubelet mounts a Secret: ``tls.crt`` -> ``..data/tls.crt``, and
    an update swaps the ``..data`` link in one rename."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.generation = 0
        directory.mkdir(parents=True)
        (directory / "tls.crt").symlink_to("..data/tls.crt")
        (directory / "tls.key").symlink_to("..data/tls.key")

    @property
    def certificate(self) -> ServerCertificate:
        return ServerCertificate(self.directory / "tls.crt", self.directory / "tls.key")

    def publish(self, cert_pem: bytes, key_pem: bytes) -> None:
        self.generation += 1
        version = self.directory / f"..generation_{self.generation}"
        version.mkdir()
        (version / "tls.crt").write_bytes(cert_pem)
        (version / "tls.key").write_bytes(key_pem)
        link = self.directory / "..data_tmp"
        link.symlink_to(version.name)
        os.replace(link, self.directory / "..data")


def served_certificate(port: int, ca_file: Path) -> x509.Certificate:
    """The certificate a new TLS connection is given, verified against the CA."""
    context = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def dns_names(certificate: x509.Certificate) -> list[str]:
    extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return extension.value.get_values_for_type(x509.DNSName)


def test_certificate_files_are_reloaded_when_they_change(world: World, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    first = issue_server_certificate(world.ca, pki, stem="first")
    second = issue_server_certificate(world.ca, pki, ("127.0.0.1", "localhost",
                                                      "signgate-webhook.reloaded.test"),
                                      stem="second")
    third = issue_server_certificate(world.ca, pki, stem="third")
    volume = SecretVolume(tmp_path / "secret")
    volume.publish(first.cert_file.read_bytes(), first.key_file.read_bytes())
    with running_webhook(tmp_path / "server", world.policy_file, volume.certificate,
                         world.ca.cert_file, "--tls-reload-interval", "0.1") as webhook:
        initial = served_certificate(webhook.port, world.ca.cert_file)
        assert initial == x509.load_pem_x509_certificate(first.cert_file.read_bytes())

        with webhook.standin() as apiserver:
            kept_alive = apiserver.validate(pod(world.app))  # opens a connection kept alive
            assert kept_alive.allowed

            volume.publish(second.cert_file.read_bytes(), second.key_file.read_bytes())
            second_cert = x509.load_pem_x509_certificate(second.cert_file.read_bytes())

            def serves_second() -> bool:
                return served_certificate(webhook.port, world.ca.cert_file) == second_cert

            wait_until(serves_second, "the new certificate on a new connection", webhook)
            assert "signgate-webhook.reloaded.test" in dns_names(
                served_certificate(webhook.port, world.ca.cert_file)
            )
            assert apiserver.validate(pod(world.app)).allowed

            # A certificate whose key is not the key: logged, and the previous pair serves on.
            def refusals() -> int:
                return sum("kept the previous TLS certificate" in line["message"]
                           for line in webhook.log_lines())

            before = refusals()
            volume.publish(third.cert_file.read_bytes(), second.key_file.read_bytes())
            wait_until(lambda: refusals() > before, "the refused pair in the log", webhook)
            (refusal,) = [line for line in webhook.log_lines()
                          if "kept the previous TLS certificate" in line["message"]][before:]
            assert refusal["level"] == "error"
            assert served_certificate(webhook.port, world.ca.cert_file) == second_cert
            assert apiserver.get("/readyz").status_code == 200
            assert apiserver.validate(pod(world.app)).allowed


class ConfigMapVolume:
    """``policy.yaml`` laid out as the kubelet mounts a ConfigMap: a link into ``..data``, and
    an update swaps the ``..data`` link in one rename (as :class:`SecretVolume` does)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.generation = 0
        directory.mkdir(parents=True)
        (directory / "policy.yaml").symlink_to("..data/policy.yaml")

    @property
    def policy_file(self) -> Path:
        return self.directory / "policy.yaml"

    def publish(self, text: str) -> str:
        """Publish ``text``; its SHA-256, as the webhook's metrics name the policy in force."""
        self.generation += 1
        version = self.directory / f"..generation_{self.generation}"
        version.mkdir()
        (version / "policy.yaml").write_text(text)
        link = self.directory / "..data_tmp"
        link.symlink_to(version.name)
        os.replace(link, self.directory / "..data")
        return hashlib.sha256(text.encode()).hexdigest()


def policy_in_force(apiserver: ApiServerStandIn) -> str | None:
    """The SHA-256 that ``/metrics`` says the served policy's file has."""
    found = re.findall(r'^signgate_policy_info\{sha256="([0-9a-f]{64})"\} 1\.0$',
                       apiserver.get("/metrics").text, re.MULTILINE)
    assert len(found) <= 1
    return found[0] if found else None


def trusted_keys(apiserver: ApiServerStandIn) -> set[str]:
    """The key ids ``/metrics`` says some rule verifies with."""
    return set(re.findall(r'^signgate_trusted_key_info\{key_id="([0-9a-f]{64})"\} 1\.0$',
                          apiserver.get("/metrics").text, re.MULTILINE))


def test_the_policy_file_is_reloaded_when_it_changes(world: World, tmp_path: Path) -> None:
    """As a rotation changes it: trust another key too, then only that key. A policy that does
    not parse, or names a key that does not load, is logged and the policy in force kept."""
    other_key = world.home / "other" / "cosign.pub"
    volume = ConfigMapVolume(tmp_path / "configmap")
    only_other = volume.publish(
        "unmatched: deny\nrules:\n" + team_rule(world.registry.host, other_key)
    )
    with running_webhook(tmp_path / "server", volume.policy_file, world.certificate,
                         world.ca.cert_file, "--policy-reload-interval", "0.1") as webhook, \
            webhook.standin() as apiserver:
        assert policy_in_force(apiserver) == only_other
        other_id = load_public_key(str(other_key)).key_id
        our_id = load_public_key(str(world.home / "cosign.pub")).key_id
        assert trusted_keys(apiserver) == {other_id}
        assert not apiserver.validate(pod(world.app)).allowed
        assert apiserver.validate(pod(world.foreign)).allowed

        both = volume.publish(
            "unmatched: deny\nrules:\n  - name: team\n"
            f"    images: [\"{world.registry.host}/team/**\"]\n"
            f"    keys: [{other_key}, {world.home / 'cosign.pub'}]\n"
        )
        wait_until(lambda: policy_in_force(apiserver) == both, "the new policy", webhook)
        assert trusted_keys(apiserver) == {other_id, our_id}
        assert apiserver.validate(pod(world.app)).allowed
        assert apiserver.validate(pod(world.foreign)).allowed

        def kept(reason: str) -> bool:
            return any("kept the policy in force" in line["message"] and reason in line["message"]
                       for line in webhook.log_lines())

        volume.publish("unmatched: deny\nrules:\n  - name: [broken\n")
        wait_until(lambda: kept("policy.yaml:"), "the refused policy in the log", webhook)
        assert policy_in_force(apiserver) == both
        assert apiserver.validate(pod(world.app)).allowed

        # A key file that is not there yet: kept until it appears, then served without any
        # further change to the policy file.
        late_key = tmp_path / "keys" / "late.pub"
        only_late = volume.publish(
            "unmatched: deny\nrules:\n" + team_rule(world.registry.host, late_key)
        )
        wait_until(lambda: kept(str(late_key)), "the unloadable key in the log", webhook)
        assert policy_in_force(apiserver) == both
        assert apiserver.validate(pod(world.app)).allowed
        late_key.parent.mkdir()
        late_key.write_bytes(other_key.read_bytes())
        wait_until(lambda: policy_in_force(apiserver) == only_late, "the late key's policy",
                   webhook)
        assert trusted_keys(apiserver) == {other_id}
        assert not apiserver.validate(pod(world.app)).allowed
        assert apiserver.validate(pod(world.foreign)).allowed
        assert apiserver.get("/readyz").status_code == 200


# Graceful shutdown ----------------------------------------------------------------------------


class GatedRelay:
    """A TCP relay to a registry that holds every connection until :meth:`open`: a registry
    request the webhook makes stays in flight for as long as the test wants."""

    def __init__(self, target_host: str) -> None:
        host, port = target_host.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.connected = threading.Event()
        self.gate = threading.Event()
        self.stopped = threading.Event()
        self.threads: list[threading.Thread] = []
        self._spawn(self._accept)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connected.set()
            self._spawn(self._relay, client)

    def _relay(self, client: socket.socket) -> None:
        with client:
            self.gate.wait()
            if self.stopped.is_set():
                return
            with socket.create_connection(self.target) as upstream:
                forward = threading.Thread(target=self._pipe, args=(client, upstream))
                forward.start()
                self._pipe(upstream, client)
                forward.join()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def open(self) -> None:
        self.gate.set()

    def close(self) -> None:
        self.stopped.set()
        self.gate.set()
        for thread in self.threads:
            thread.join(timeout=30)
        self.listener.close()


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return True
    except OSError:
        return False


def test_sigterm_finishes_the_review_in_flight(world: World, tmp_path: Path) -> None:
    relay = GatedRelay(world.registry.host)
    try:
        relayed = f"127.0.0.1:{relay.port}"
        repository = world.app.removeprefix(f"{world.registry.host}/")
        image = f"{relayed}/{repository}"
        policy = world.policy(tmp_path / "policy.yaml",
                              team_rule(relayed, world.home / "cosign.pub"))
        with running_webhook(tmp_path / "server", policy, world.certificate, world.ca.cert_file,
                             "--deadline", "120", "--shutdown-grace", "120") as webhook, \
                webhook.standin(timeout_seconds=150) as apiserver, \
                concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(apiserver.validate, pod(image))
            wait_until(relay.connected.is_set, "the webhook's registry request", webhook)
            webhook.process.send_signal(signal.SIGTERM)
            wait_until(lambda: not accepts_connections(webhook.port),
                       "the webhook to stop accepting connections")
            with pytest.raises(WebhookCallFailed):
                apiserver.validate(pod(world.app))  # a new review finds the door shut
            # uvicorn's own words once it waits for the connections still answering: the
            # review stays held until the server is past its first look at them.
            wait_until(lambda: any(line["message"].startswith("Waiting for connections to close")
                                   for line in webhook.log_lines()),
                       "the server to wait for the review in flight", webhook)
            relay.open()
            call = in_flight.result(timeout=150)
            assert call.allowed, call.message
            assert webhook.process.wait(timeout=150) == 0
            assert webhook.decision(call.uid)["images"][0]["digest"] == world.app_digest
            messages = [line["message"] for line in webhook.log_lines()]
            assert messages[-1] == "signgate webhook stopped"
    finally:
        relay.close()


def test_the_stand_in_applies_patches_as_rfc_6902_says() -> None:
    document: dict[str, Any] = {
        "spec": {"containers": [{"image": "a"}, {"image": "b"}], "x~/y": 1}
    }
    patched = apply_json_patch(document, [
        {"op": "test", "path": "/spec/containers/1/image", "value": "b"},
        {"op": "replace", "path": "/spec/containers/0/image", "value": "a@sha256:1"},
        {"op": "add", "path": "/spec/containers/-", "value": {"image": "c"}},
        {"op": "remove", "path": "/spec/x~0~1y"},
    ])
    assert patched == {"spec": {"containers": [{"image": "a@sha256:1"}, {"image": "b"},
                                               {"image": "c"}]}}
    assert document["spec"]["containers"][0]["image"] == "a"
    with pytest.raises(WebhookCallFailed):
        apply_json_patch(document, [{"op": "replace", "path": "/spec/nope", "value": 1}])
