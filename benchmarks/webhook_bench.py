"""The admission webhook (``signgate serve``) under load, in one run on this machine.

(a) Warm: POST /validate of a pod with 3 images whose verdicts are cached, against a bare ASGI
    endpoint on the same stack (uvicorn, httptools, uvloop, the same TLS context built by
    :class:`signgate.webhook.server.ReloadingCertificate`) that only parses the review and
    answers allowed with its uid. Target: signgate >= 50% of the bare endpoint's requests/s.
(b) Cold: one pod whose image nobody has verified yet (a new image each run), beside
    ``cosign verify`` (cosign 2, key-based, no transparency log) of the same image as a CLI.
    Target: signgate's median no slower than cosign's.
(c) 200 pods of one unverified image at once, one connection each: registry requests made
    (``signgate_registry_responses_total`` from /metrics, before and after; target: the count of
    one review's verification) and the latency percentiles.
(d) VmRSS of the server process (/proc/PID/status) with 10,000 cached verdicts, filled by
    reviews of 10,000 distinct signed images (target: under 200 MiB).

How the load is made, and why these numbers can be trusted on 2 cores:

- (a) loads each endpoint with Debian's ``hey`` (Go, HTTP/1.1 keep-alive, the same body file
  for every request) at 16 connections: throughput and latency under load. Both servers are
  pinned to CPU 0 and the clients to CPU 1 (``taskset``, ``-cpus 1``), so the load generator
  never takes the server's core; the table shows the server's CPU use during each run (near
  100% means the server, not hey, was the limit). Both endpoints get the same number of
  rounds, alternating which goes first, and the median round is reported. Latency alone (one
  request at a time) is measured with the client below, as hey reports only 0.1 ms steps.
  hey cannot be given a CA: it never verifies server certificates (it sets Go's
  ``InsecureSkipVerify``), so both endpoints are loaded over the same TLS without verification;
  the handshake and the encryption are the same as with it. Before the load the benchmark's own
  client, which does verify against the test CA, checks that each endpoint answers ``allowed``
  with the review's uid.
- (b), (c) and (d) use a small HTTP/1.1 client of the benchmark's own on asyncio streams over
  TLS verified with the test CA (uvloop): a request costs it tens of microseconds, against
  hundreds in the server, so 200 simultaneous requests measure the server, not the client.
  Latency is timed from the request's write to its response's last byte on an established
  connection, as the API server keeps connections to webhooks; the server's own figure
  (``latency_ms`` of each decision in its JSON log) is shown beside it.
- The registry is Debian's docker-registry on loopback, its storage in /dev/shm so that disk
  writes do not pace the filling of (d). The 10,000 images of (d) and their signatures are
  written with raw HTTP requests: an image manifest over blobs its repository shares, and a
  signature image built by signgate's own payload and layout code, signed with the key made by
  ``signgate generate-key-pair``; six requests an image where ``push_image`` and signing make
  sixteen, which would take minutes here.
- Servers run with their defaults (8 s deadline, 300 s verdict TTL, 30 s tag TTL), except the
  server of (d), whose TTLs are an hour so that a check after the fill can show every verdict
  still cached (expired entries would stay in memory anyway until met). Each server logs one
  JSON line per decision to a file, as it would in a cluster.

Other work on this machine shares its 2 cores; the load average at the start and the end is
printed with the tables.

Run from the project root: .venv/bin/python -m benchmarks.webhook_bench
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import re
import resource
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import uvloop
from tests.integration.apiserver_standin import ApiServerStandIn
from tests.integration.registry_servers import (
    free_port,
    issue_server_certificate,
    make_test_ca,
    running_registry,
)
from tests.integration.tools import tool_env

from signgate.digests import compute_digest
from signgate.keys.model import Signer
from signgate.reference import Repository, signature_tag
from signgate.registry import RegistryClient, RegistryOptions
from signgate.registry.images import push_image
from signgate.registry.mediatypes import OCI_MANIFEST
from signgate.signatures.layout import SignatureLayer, config_blob, manifest_bytes
from signgate.signatures.payload import build_payload
from signgate.signatures.store import signature_repository

ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(os.environ.get("SIGNGATE_TOOLS", ROOT / ".tools" / "bin"))
SIGNGATE = Path(sys.executable).with_name("signgate")
COSIGN = TOOLS / "cosign2"
HEY = Path("/usr/bin/hey")
TASKSET = Path("/usr/bin/taskset")
PASSWORD = "benchmark"

READY_BOUND_SECONDS = 60.0
REQUEST_BOUND_SECONDS = 120.0
SERVER_CPU, CLIENT_CPU = 0, 1
FILL_REPOSITORIES = 10
FILL_IMAGES_PER_POD = 10
FILL_PODS_IN_FLIGHT = 8
FILL_CONNECTIONS = 16
MEMORY_CHECKPOINTS = (2_000, 5_000)

T = TypeVar("T")


# A lean HTTP/1.1 client -------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class HttpConnection:
    """One keep-alive HTTP/1.1 connection, TLS when given a context; requests one at a time.

    Enough HTTP for uvicorn's and docker-registry's answers (Content-Length bodies); anything
    else is refused rather than misread.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: str
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._authority = authority

    @classmethod
    async def open(cls, host: str, port: int, tls: ssl.SSLContext | None = None) -> HttpConnection:
        async with asyncio.timeout(REQUEST_BOUND_SECONDS):
            reader, writer = await asyncio.open_connection(host, port, ssl=tls)
        return cls(reader, writer, f"{host}:{port}")

    async def request(
        self, method: str, target: str, body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> HttpResponse:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._authority}",
                 f"Content-Length: {len(body)}"]
        lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        async with asyncio.timeout(REQUEST_BOUND_SECONDS):
            head = await self._reader.readuntil(b"\r\n\r\n")
            status_line, *fields = head.decode("latin-1").split("\r\n")
            response_headers = {}
            for field in fields:
                if field:
                    name, _, value = field.partition(":")
                    response_headers[name.strip().lower()] = value.strip()
            if "transfer-encoding" in response_headers:
                raise RuntimeError(f"{method} {target}: a chunked answer; this client reads none")
            length = 0 if method == "HEAD" else int(response_headers.get("content-length", "0"))
            content = await self._reader.readexactly(length) if length else b""
        return HttpResponse(int(status_line.split(" ", 2)[1]), response_headers, content)

    async def aclose(self) -> None:
        self._writer.close()
        with suppress(OSError, ssl.SSLError, TimeoutError):
            async with asyncio.timeout(5):
                await self._writer.wait_closed()


def run_async(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(work())


# The bare endpoint ------------------------------------------------------------------------------

ADMISSION_VERSION = "admission.k8s.io/v1"


async def bare_endpoint(
    scope: dict[str, Any],
    receive: Callable[[], Coroutine[Any, Any, dict[str, Any]]],
    send: Callable[[dict[str, Any]], Coroutine[Any, Any, None]],
) -> None:
    """Parse the review, answer allowed with its uid; any GET answers 200 (the probe)."""
    if scope["type"] != "http":
        return
    if scope["method"] == "POST":
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        review = json.loads(b"".join(chunks))
        answer = {"apiVersion": ADMISSION_VERSION, "kind": "AdmissionReview",
                  "response": {"uid": review["request"]["uid"], "allowed": True}}
        body = json.dumps(answer, separators=(",", ":")).encode()
    else:
        body = b"ok\n"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def serve_bare(port: int, cert_file: Path, key_file: Path) -> None:
    """The bare endpoint on signgate serve's uvicorn configuration (signgate.webhook.server)."""
    import uvicorn

    from signgate.webhook.server import KEEP_ALIVE_SECONDS, ReloadingCertificate

    certificate = ReloadingCertificate(cert_file, key_file)
    config = uvicorn.Config(
        bare_endpoint,
        host="127.0.0.1",
        port=port,
        loop="none",
        http="httptools",
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        ssl_context_factory=lambda _config, _default: certificate.listener_context,
    )
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(uvicorn.Server(config).serve())


# Server processes -------------------------------------------------------------------------------


@dataclass
class ServerProcess:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_file: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def status_field_kib(self, field: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise RuntimeError(f"no {field} in /proc/{self.pid}/status")

    def rss_mib(self) -> float:
        return self.status_field_kib("VmRSS") / 1024

    def cpu_seconds(self) -> float:
        """User and system time of every thread of the process so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def pin(self, cpus: set[int]) -> None:
        """Run every thread of the process on ``cpus`` only."""
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            with suppress(ProcessLookupError):
                os.sched_setaffinity(int(task.name), cpus)

    def log_size(self) -> int:
        return self.log_file.stat().st_size

    def decisions_since(self, offset: int) -> dict[str, dict[str, Any]]:
        """The decision log lines written after ``offset``, by uid."""
        with self.log_file.open("rb") as stream:
            stream.seek(offset)
            text = stream.read().decode(errors="replace")
        found = {}
        for line in text.splitlines():
            if '"event":"admission"' in line:
                entry = json.loads(line)
                found[entry["uid"]] = entry
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(
    name: str, argv: Sequence[str], port: int, log_file: Path, env: Mapping[str, str],
    probe: str, tls: ssl.SSLContext,
) -> ServerProcess:
    with log_file.open("wb") as log_stream:
        process = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=log_stream, stderr=subprocess.STDOUT,
            env=dict(env), cwd=ROOT,
        )
    server = ServerProcess(name, process, port, log_file)

    async def answers() -> bool:
        try:
            connection = await HttpConnection.open("127.0.0.1", port, tls)
        except OSError:
            return False
        try:
            return (await connection.request("GET", probe)).status == 200
        finally:
            await connection.aclose()

    give_up = time.monotonic() + READY_BOUND_SECONDS
    while not run_async(answers):
        if process.poll() is not None:
            raise SystemExit(f"{name} exited with {process.returncode}: "
                             f"{log_file.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > give_up:
            server.stop()
            raise SystemExit(f"{name} did not answer {probe} within {READY_BOUND_SECONDS:g} s")
        time.sleep(0.05)
    return server


@dataclass(frozen=True)
class Setting:
    """What every server and client of the run shares."""

    work: Path
    registry_host: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    policy_file: Path
    tls: ssl.SSLContext


def start_signgate(setting: Setting, name: str, *extra: str) -> ServerProcess:
    port = free_port()
    argv = [str(SIGNGATE), "serve", "--policy", str(setting.policy_file),
            "--tls-cert", str(setting.cert_file), "--tls-key", str(setting.key_file),
            "--host", "127.0.0.1", "--port", str(port), *extra]
    return start_server(name, argv, port, setting.work / f"{name}.log", tool_env(setting.work),
                        "/readyz", setting.tls)


def start_bare(setting: Setting) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "benchmarks.webhook_bench", "--serve-bare", str(port),
            "--tls-cert", str(setting.cert_file), "--tls-key", str(setting.key_file)]
    return start_server("bare", argv, port, setting.work / "bare.log", tool_env(setting.work),
                        "/healthz", setting.tls)


@contextmanager
def stopped_at_exit(server: ServerProcess) -> Iterator[ServerProcess]:
    try:
        yield server
    finally:
        server.stop()


# Reviews ----------------------------------------------------------------------------------------


def pod_manifest(images: Sequence[str], name: str = "web-7d4b9c6f5-x2k8p") -> dict[str, Any]:
    """A pod as a ReplicaSet creates it, the fields the API server sends filled in."""
    containers = [
        {
            "name": f"c{i}",
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "ports": [{"containerPort": 8080 + i, "protocol": "TCP"}],
            "env": [{"name": f"SETTING_{k}", "value": f"value-{k}"} for k in range(4)],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                          "limits": {"memory": "256Mi"}},
            "volumeMounts": [{"name": "kube-api-access",
                              "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                              "readOnly": True}],
            "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "File",
        }
        for i, image in enumerate(images)
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "generateName": name.rsplit("-", 1)[0] + "-",
            "labels": {"app": "web", "pod-template-hash": "7d4b9c6f5"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                 "name": "web-7d4b9c6f5", "controller": True,
                                 "blockOwnerDeletion": True,
                                 "uid": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"}],
        },
        "spec": {
            "containers": containers,
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "web",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                             "effect": "NoExecute", "tolerationSeconds": 300}],
            "volumes": [{"name": "kube-api-access", "projected": {"sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}]}}],
        },
    }


class Reviews:
    """AdmissionReview bodies as the API server stand-in builds them, each with a fresh uid."""

    def __init__(self, setting: Setting) -> None:
        self._standin = ApiServerStandIn("https://127.0.0.1", setting.ca_file)

    def close(self) -> None:
        self._standin.close()

    def body(self, images: Sequence[str]) -> tuple[str, bytes]:
        review = self._standin.review_for(pod_manifest(images))
        return review["request"]["uid"], json.dumps(review).encode()


JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


async def post_review(
    connection: HttpConnection, uid: str, body: bytes
) -> tuple[float, dict[str, Any]]:
    """Seconds to the whole answer, and the answer's ``response`` (its uid checked)."""
    start = time.perf_counter()
    reply = await connection.request("POST", "/validate?timeout=10s", body, JSON_HEADERS)
    elapsed = time.perf_counter() - start
    if reply.status != 200:
        raise SystemExit(f"/validate answered {reply.status}: {reply.body[:500]!r}")
    response: dict[str, Any] = reply.json()["response"]
    if response.get("uid") != uid:
        raise SystemExit(f"/validate answered uid {response.get('uid')!r}, sent {uid!r}")
    return elapsed, response


def require_allowed(response: Mapping[str, Any], what: str) -> None:
    if response.get("allowed") is not True:
        message = (response.get("status") or {}).get("message", "")
        raise SystemExit(f"{what} was not allowed: {message}")


async def registry_requests(connection: HttpConnection) -> int:
    """The server's ``signgate_registry_responses_total``, every status together."""
    text = (await connection.request("GET", "/metrics")).body.decode()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("signgate_registry_responses_total")))


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))
    return ordered[int(rank) - 1]


# Images -----------------------------------------------------------------------------------------


def push_named_images(host: str, names: Sequence[str]) -> list[str]:
    """One small image per name, tagged; their references."""
    async def push_all() -> list[str]:
        async with RegistryClient(RegistryOptions()) as client:
            references = []
            for name in names:
                repository = Repository(host, f"bench/{name}")
                await push_image(client, repository, "v1", content=f"image {name}".encode())
                references.append(f"{repository}:v1")
            return references

    return run_async(push_all)


async def _upload_blob(connection: HttpConnection, repository: Repository, data: bytes) -> None:
    started = await connection.request("POST", f"/v2/{repository.path}/blobs/uploads/")
    if started.status != 202:
        raise SystemExit(f"blob upload to {repository} answered {started.status}")
    location = urllib.parse.urlsplit(started.headers["location"])
    query = f"{location.query}&" if location.query else ""
    target = f"{location.path}?{query}digest={compute_digest(data)}"
    finished = await connection.request(
        "PUT", target, data, {"Content-Type": "application/octet-stream"}
    )
    if finished.status != 201:
        raise SystemExit(f"blob upload to {repository} answered {finished.status}")


async def _put_manifest(
    connection: HttpConnection, repository: Repository, tag: str, raw: bytes
) -> None:
    reply = await connection.request(
        "PUT", f"/v2/{repository.path}/manifests/{tag}", raw, {"Content-Type": OCI_MANIFEST}
    )
    if reply.status != 201:
        raise SystemExit(f"manifest PUT {repository}:{tag} answered {reply.status}: "
                         f"{reply.body[:300]!r}")


def push_signed_fill(host: str, signer: Signer, count: int) -> list[str]:
    """``count`` distinct images (one small manifest each over shared blobs, told apart by an
    annotation), each signed as ``signgate sign`` signs; their tagged references."""
    async def fill() -> list[str]:
        repositories = [Repository(host, f"fill/app{i}") for i in range(FILL_REPOSITORIES)]
        templates = {}
        async with RegistryClient(RegistryOptions()) as client:
            for repository in repositories:
                digest = await push_image(client, repository, None, content=b"fill layer")
                templates[repository] = (await client.get_manifest(repository, digest)).json()

        async def one(connection: HttpConnection, i: int) -> None:
            repository = repositories[i % FILL_REPOSITORIES]
            manifest = {**templates[repository],
                        "annotations": {"org.signgate.benchmark.index": str(i)}}
            raw = json.dumps(manifest, separators=(",", ":")).encode()
            await _put_manifest(connection, repository, f"f{i}", raw)
            digest = compute_digest(raw)
            payload = build_payload(str(repository), digest)
            layer = SignatureLayer.for_signature(payload, signer.sign(payload))
            config = config_blob([layer])
            signatures = signature_repository(repository)
            await _upload_blob(connection, signatures, payload)
            await _upload_blob(connection, signatures, config)
            await _put_manifest(connection, signatures, signature_tag(digest),
                                manifest_bytes([layer], config))

        indices = iter(range(count))
        registry, _, port = host.partition(":")

        async def worker() -> None:
            connection = await HttpConnection.open(registry, int(port))
            try:
                for i in indices:
                    await one(connection, i)
            finally:
                await connection.aclose()

        await asyncio.gather(*(worker() for _ in range(FILL_CONNECTIONS)))
        return [f"{repositories[i % FILL_REPOSITORIES]}:f{i}" for i in range(count)]

    return run_async(fill)


# (a) warm throughput ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadRun:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    responses: int
    server_cpu_percent: float
    client_cpu_percent: float

    @property
    def per_cpu_second(self) -> float:
        """Requests per second of the server's CPU time: its cost, whatever else ran."""
        return self.requests_per_second / (self.server_cpu_percent / 100)


def hey_run(server: ServerProcess, body_file: Path, concurrency: int, seconds: float,
            pinned: bool) -> LoadRun:
    argv = [str(HEY), "-z", f"{seconds:g}s", "-c", str(concurrency), "-m", "POST",
            "-D", str(body_file), "-T", "application/json", "-disable-compression"]
    if pinned:
        argv = [str(TASKSET), "-c", str(CLIENT_CPU), *argv, "-cpus", "1"]
    argv.append(f"https://127.0.0.1:{server.port}/validate?timeout=10s")
    client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = server.cpu_seconds()
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, check=False,
                            timeout=seconds + 60)
    wall = time.perf_counter() - start
    server_cpu = server.cpu_seconds() - server_before
    client_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"hey failed ({result.returncode}): {result.stderr[-2000:]}")
    report = result.stdout
    statuses = {int(code): int(n) for code, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", report)}
    if set(statuses) != {200}:
        raise SystemExit(f"hey saw statuses other than 200 from {server.name}: {report}")
    errors = report.partition("Error distribution:")[2]
    error_count = sum(int(n) for n in re.findall(r"^\s*\[(\d+)\]", errors, re.MULTILINE))
    # hey -z cancels the requests in flight when the time is up and lists them as errors.
    if error_count > concurrency:
        raise SystemExit(f"hey saw {error_count} errors from {server.name}: {errors[:2000]}")
    total = float(re.search(r"Total:\s+([\d.]+) secs", report).group(1))  # type: ignore[union-attr]
    latencies = {int(p): float(s) for p, s in re.findall(r"(\d+)% in ([\d.]+) secs", report)}
    client_cpu = (client_after.ru_utime + client_after.ru_stime
                  - client_before.ru_utime - client_before.ru_stime)
    return LoadRun(
        requests_per_second=statuses[200] / total,
        p50_ms=latencies[50] * 1000,
        p99_ms=latencies[99] * 1000,
        responses=statuses[200],
        server_cpu_percent=100 * server_cpu / wall,
        client_cpu_percent=100 * client_cpu / wall,
    )


@dataclass(frozen=True)
class SequentialRun:
    """One request at a time on one connection: latency without queueing."""

    p50_ms: float
    p99_ms: float
    requests_per_second: float


def sequential_run(setting: Setting, server: ServerProcess, uid: str, body: bytes,
                   seconds: float, client_cpus: set[int] | None) -> SequentialRun:
    async def loop() -> tuple[list[float], float]:
        connection = await HttpConnection.open("127.0.0.1", server.port, setting.tls)
        latencies = []
        try:
            start = time.perf_counter()
            end = start + seconds
            while time.perf_counter() < end:
                elapsed, _ = await post_review(connection, uid, body)
                latencies.append(elapsed)
            return latencies, time.perf_counter() - start
        finally:
            await connection.aclose()

    every_cpu = os.sched_getaffinity(0)
    if client_cpus is not None:
        os.sched_setaffinity(0, client_cpus)
    try:
        latencies, wall = run_async(loop)
    finally:
        os.sched_setaffinity(0, every_cpu)
    return SequentialRun(percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000,
                         len(latencies) / wall)


@dataclass(frozen=True)
class WarmResult:
    loaded: dict[str, list[LoadRun]]
    alone: dict[str, list[SequentialRun]]
    body_bytes: int
    pinned: bool
    concurrency: int
    seconds: float

    def ratio(self) -> float:
        """signgate's requests/s over the bare endpoint's (medians)."""
        return (median_run(self.loaded["signgate"]).requests_per_second
                / median_run(self.loaded["bare"]).requests_per_second)


def median_run(runs: Sequence[LoadRun]) -> LoadRun:
    """The run of median throughput (an actual run, so its figures belong together)."""
    ordered = sorted(runs, key=lambda r: r.requests_per_second)
    return ordered[(len(ordered) - 1) // 2]


def measure_warm(setting: Setting, signgate: ServerProcess, bare: ServerProcess,
                 images: Sequence[str], rounds: int, seconds: float,
                 concurrency: int) -> WarmResult:
    reviews = Reviews(setting)
    try:
        uid, body = reviews.body(images)
    finally:
        reviews.close()
    body_file = setting.work / "warm-review.json"
    body_file.write_bytes(body)

    async def check() -> None:
        for server in (signgate, bare):
            connection = await HttpConnection.open("127.0.0.1", server.port, setting.tls)
            try:
                for _ in range(2):  # the first verifies and caches, the second is warm
                    _, response = await post_review(connection, uid, body)
                    require_allowed(response, f"the warm pod on {server.name}")
            finally:
                await connection.aclose()

    run_async(check)
    pinned = len(os.sched_getaffinity(0)) >= 2 and TASKSET.exists()
    servers = {"signgate": signgate, "bare": bare}
    if pinned:
        for server in servers.values():
            server.pin({SERVER_CPU})
    loaded: dict[str, list[LoadRun]] = {name: [] for name in servers}
    alone: dict[str, list[SequentialRun]] = {name: [] for name in servers}
    client_cpus = {CLIENT_CPU} if pinned else None
    try:
        for server in servers.values():  # warm-up: connections, caches, allocator
            hey_run(server, body_file, concurrency, 1, pinned)
        for round_number in range(rounds):
            order = list(servers) if round_number % 2 == 0 else list(reversed(servers))
            for name in order:
                progress(f"(a) round {round_number + 1}/{rounds}: {name}")
                loaded[name].append(hey_run(servers[name], body_file, concurrency, seconds,
                                            pinned))
                alone[name].append(sequential_run(setting, servers[name], uid, body,
                                                  seconds / 2, client_cpus))
    finally:
        if pinned:
            every_cpu = os.sched_getaffinity(0)
            for server in servers.values():
                server.pin(every_cpu)
    return WarmResult(loaded, alone, len(body), pinned, concurrency, seconds)


# (b) cold latency -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColdRun:
    signgate_ms: float
    server_ms: float
    registry_requests: int
    cosign_ms: float


def cosign_verify_ms(setting: Setting, reference: str) -> float:
    argv = [str(COSIGN), "verify", "--key", str(setting.work / "cosign.pub"),
            "--insecure-ignore-tlog", "--allow-insecure-registry", reference]
    start = time.perf_counter()
    result = subprocess.run(argv, env=tool_env(setting.work), capture_output=True, text=True,
                            check=False, timeout=120)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"cosign verify {reference} failed: {result.stderr[-2000:]}")
    return elapsed * 1000


def measure_cold(setting: Setting, signgate: ServerProcess,
                 images: Sequence[str]) -> list[ColdRun]:
    reviews = Reviews(setting)
    runs = []
    try:
        for i, image in enumerate(images):
            progress(f"(b) run {i + 1}/{len(images)}")
            uid, body = reviews.body([image])

            async def review_once(
                uid: str = uid, body: bytes = body, image: str = image
            ) -> tuple[float, int]:
                connection = await HttpConnection.open("127.0.0.1", signgate.port, setting.tls)
                try:
                    before = await registry_requests(connection)
                    elapsed, response = await post_review(connection, uid, body)
                    require_allowed(response, f"the cold pod of {image}")
                    return elapsed, await registry_requests(connection) - before
                finally:
                    await connection.aclose()

            offset = signgate.log_size()
            if i % 2:  # alternate who meets the image first
                cosign_ms = cosign_verify_ms(setting, image)
                elapsed, requests = run_async(review_once)
            else:
                elapsed, requests = run_async(review_once)
                cosign_ms = cosign_verify_ms(setting, image)
            server_ms = signgate.decisions_since(offset)[uid]["latency_ms"]
            runs.append(ColdRun(elapsed * 1000, server_ms, requests, cosign_ms))
    finally:
        reviews.close()
    return runs


def cosign_startup_ms(setting: Setting, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([str(COSIGN), "version"], env=tool_env(setting.work), check=True,
                       capture_output=True, timeout=60)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


# (c) a burst of pods of one unverified image ----------------------------------------------------


@dataclass(frozen=True)
class BurstResult:
    pods: int
    allowed: int
    registry_requests: int
    client_ms: list[float]
    server_ms: list[float]
    wall_ms: float


def measure_burst(setting: Setting, signgate: ServerProcess, image: str,
                  pods: int) -> BurstResult:
    reviews = Reviews(setting)
    try:
        bodies = [reviews.body([image]) for _ in range(pods)]
    finally:
        reviews.close()

    async def burst() -> tuple[list[tuple[float, dict[str, Any]]], int, float]:
        connections = await asyncio.gather(
            *(HttpConnection.open("127.0.0.1", signgate.port, setting.tls) for _ in range(pods))
        )
        try:
            for connection in connections:
                if (await connection.request("GET", "/healthz")).status != 200:
                    raise SystemExit("/healthz did not answer 200")
            before = await registry_requests(connections[0])
            start = time.perf_counter()
            answers = await asyncio.gather(
                *(post_review(c, uid, body) for c, (uid, body) in zip(connections, bodies,
                                                                        strict=True))
            )
            wall = time.perf_counter() - start
            return answers, await registry_requests(connections[0]) - before, wall
        finally:
            await asyncio.gather(*(c.aclose() for c in connections))

    offset = signgate.log_size()
    answers, requests, wall = run_async(burst)
    decisions = signgate.decisions_since(offset)
    allowed = sum(1 for _, response in answers if response.get("allowed") is True)
    return BurstResult(
        pods, allowed, requests, [seconds * 1000 for seconds, _ in answers],
        [decisions[uid]["latency_ms"] for uid, _ in bodies], wall * 1000,
    )


# (d) memory with the verdict cache full ---------------------------------------------------------


@dataclass(frozen=True)
class MemoryResult:
    points: list[tuple[int, float]]  # cached verdicts, VmRSS MiB
    fill_push_seconds: float
    fill_review_seconds: float
    recheck_images: int
    recheck_registry_requests: int


def measure_memory(setting: Setting, signgate: ServerProcess, images: Sequence[str],
                   push_seconds: float) -> MemoryResult:
    groups = [images[i:i + FILL_IMAGES_PER_POD] for i in range(0, len(images), FILL_IMAGES_PER_POD)]
    reviews = Reviews(setting)
    try:
        pods = [reviews.body(group) for group in groups]
        # Every tenth pod again afterwards, with new uids: its verdicts must all be cached.
        again = [reviews.body(group) for group in groups[::10]]
    finally:
        reviews.close()
    points = [(0, signgate.rss_mib())]

    async def send(batch: Sequence[tuple[str, bytes]]) -> None:
        queue = iter(batch)

        async def worker() -> None:
            connection = await HttpConnection.open("127.0.0.1", signgate.port, setting.tls)
            try:
                for uid, body in queue:
                    _, response = await post_review(connection, uid, body)
                    require_allowed(response, "a pod of the fill")
            finally:
                await connection.aclose()

        await asyncio.gather(*(worker() for _ in range(FILL_PODS_IN_FLIGHT)))

    start = time.perf_counter()
    done = 0
    checkpoints = [m for m in MEMORY_CHECKPOINTS if m < len(images)] or [len(images) // 2]
    for mark in [*checkpoints, len(images)]:
        progress(f"(d) reviews up to {mark} cached verdicts")
        run_async(functools.partial(send, pods[done // FILL_IMAGES_PER_POD:
                                               -(-mark // FILL_IMAGES_PER_POD)]))
        done = mark
        points.append((mark, signgate.rss_mib()))
    review_seconds = time.perf_counter() - start

    async def recheck() -> int:
        connection = await HttpConnection.open("127.0.0.1", signgate.port, setting.tls)
        try:
            before = await registry_requests(connection)
            await send(again)
            return await registry_requests(connection) - before
        finally:
            await connection.aclose()

    recheck_requests = run_async(recheck)
    return MemoryResult(points, push_seconds, review_seconds,
                        sum(len(group) for group in groups[::10]), recheck_requests)


# Report -----------------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(f"webhook_bench: {message}", file=sys.stderr, flush=True)


def met(condition: bool) -> str:
    return "met" if condition else "NOT met"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


Target = tuple[str, str, str, bool]  # part, measured, target, met


def report_warm(warm: WarmResult) -> Target:
    print(f"\n## (a) warm: POST /validate, a pod of 3 images with cached verdicts "
          f"({warm.body_bytes} byte review)\n")
    rounds = len(warm.loaded["signgate"])
    print(f"Median of {rounds} rounds per endpoint, alternating which goes first. Under load: "
          f"hey, {warm.concurrency} connections, {warm.seconds:g} s a round, over HTTPS "
          "without a certificate check (hey has no CA option; same TLS for both). One at a "
          f"time: the benchmark's own client (CA-verified TLS), {warm.seconds / 2:g} s a round. "
          + ("Servers pinned to CPU 0, clients to CPU 1.\n" if warm.pinned
             else "Not pinned (fewer than 2 CPUs or no taskset).\n"))
    print(f"| endpoint | requests/s (c={warm.concurrency}) | p50 ms | p99 ms | server CPU % | "
          "requests per server CPU-second | hey CPU % | p50 ms (c=1) | p99 ms (c=1) | "
          "requests/s (c=1) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("bare", "signgate"):
        loaded = median_run(warm.loaded[name])
        alone = sorted(warm.alone[name], key=lambda r: r.p50_ms)[(rounds - 1) // 2]
        print(f"| {name} | {loaded.requests_per_second:.0f} | {loaded.p50_ms:.1f} | "
              f"{loaded.p99_ms:.1f} | {loaded.server_cpu_percent:.0f} | "
              f"{loaded.per_cpu_second:.0f} | {loaded.client_cpu_percent:.0f} | "
              f"{alone.p50_ms:.3f} | {alone.p99_ms:.3f} | {alone.requests_per_second:.0f} |")
    each = " / ".join(
        f"{s.requests_per_second / b.requests_per_second:.0%}"
        for s, b in zip(warm.loaded["signgate"], warm.loaded["bare"], strict=True)
    )
    per_cpu = (median_run(warm.loaded["signgate"]).per_cpu_second
               / median_run(warm.loaded["bare"]).per_cpu_second)
    print(f"\nsigngate / bare requests/s: {warm.ratio():.0%} (each round: {each}); "
          f"target >= 50%: {met(warm.ratio() >= 0.5)}. Per server CPU-second, which discounts "
          f"other work on CPU 0: {per_cpu:.0%}. hey reports latency in 0.1 ms steps.")
    return ("(a) warm requests/s, signgate / bare", f"{warm.ratio():.0%}", ">= 50%",
            warm.ratio() >= 0.5)


def report_cold(runs: Sequence[ColdRun], startup_ms: float) -> Target:
    print(f"\n## (b) cold: one pod whose image is not verified yet (a new image each run, "
          f"{len(runs)} runs)\n")
    print("| measurement | median ms | min ms | max ms |")
    print("|---|---:|---:|---:|")
    rows = {
        "signgate: POST /validate, client-observed": [r.signgate_ms for r in runs],
        "signgate: the server's own latency_ms": [r.server_ms for r in runs],
        "cosign 2 verify (CLI, whole process)": [r.cosign_ms for r in runs],
    }
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f} | "
              f"{max(values):.1f} |")
    print(f"| cosign 2 version (CLI start-up alone, for reference) | {startup_ms:.1f} | | |")
    ours = statistics.median(r.signgate_ms for r in runs)
    theirs = statistics.median(r.cosign_ms for r in runs)
    counts = sorted({r.registry_requests for r in runs})
    print(f"\nregistry requests per cold review: {', '.join(map(str, counts))}; "
          f"cosign / signgate: {theirs / ours:.1f}x; target signgate no slower: "
          f"{met(ours <= theirs)}")
    return ("(b) cold review, median", f"{ours:.1f} ms vs cosign 2 verify {theirs:.1f} ms",
            "no slower than cosign", ours <= theirs)


def report_burst(burst: BurstResult, single_review_requests: int) -> Target:
    print(f"\n## (c) {burst.pods} pods of one unverified image at once "
          f"({burst.pods} connections, opened beforehand)\n")
    print("| pods allowed | registry requests | one review's | client p50 ms | client p99 ms | "
          "client max ms | server p99 ms | all answered in ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {burst.allowed}/{burst.pods} | {burst.registry_requests} | "
          f"{single_review_requests} | {percentile(burst.client_ms, 0.5):.1f} | "
          f"{percentile(burst.client_ms, 0.99):.1f} | {max(burst.client_ms):.1f} | "
          f"{percentile(burst.server_ms, 0.99):.1f} | {burst.wall_ms:.1f} |")
    print(f"\ntarget: one verification's worth of registry requests "
          f"({burst.registry_requests} vs {single_review_requests}): "
          f"{met(burst.registry_requests <= single_review_requests)}; all allowed: "
          f"{met(burst.allowed == burst.pods)}")
    return (f"(c) {burst.pods} pods of one new image: registry requests",
            f"{burst.registry_requests} (p99 {percentile(burst.client_ms, 0.99):.0f} ms)",
            f"one review's ({single_review_requests})",
            burst.registry_requests <= single_review_requests and burst.allowed == burst.pods)


def report_memory(memory: MemoryResult, target_verdicts: int) -> Target:
    print("\n## (d) resident memory of the signgate serve process (VmRSS) by cached verdicts\n")
    print("| cached verdicts | VmRSS MiB | MiB per 1000 verdicts (from empty) |")
    print("|---:|---:|---:|")
    empty = memory.points[0][1]
    for verdicts, rss in memory.points:
        slope = f"{(rss - empty) / verdicts * 1000:.2f}" if verdicts else ""
        print(f"| {verdicts} | {rss:.1f} | {slope} |")
    (v1, r1), (v2, r2) = memory.points[-2], memory.points[-1]
    measured = memory.points[-1][0]
    if measured >= target_verdicts:
        at_target, how = r2, "measured"
    else:
        at_target = r2 + (r2 - r1) / (v2 - v1) * (target_verdicts - v2)
        how = f"EXTRAPOLATED linearly from {v1} and {v2}"
    print(f"\nfill: {measured} distinct signed images pushed in {memory.fill_push_seconds:.0f} s, "
          f"reviewed (10 images a pod, {FILL_PODS_IN_FLIGHT} pods in flight) in "
          f"{memory.fill_review_seconds:.0f} s; {memory.recheck_images} of them reviewed again "
          f"made {memory.recheck_registry_requests} registry requests (0: all cached). "
          "Both caches hold an entry per image: the verdict and the tag's resolution.")
    print(f"VmRSS at {target_verdicts} verdicts: {at_target:.1f} MiB ({how}); "
          f"target < 200 MiB: {met(at_target < 200)}")
    return (f"(d) VmRSS with {target_verdicts} cached verdicts", f"{at_target:.1f} MiB ({how})",
            "< 200 MiB", at_target < 200)


def report_targets(targets: Sequence[Target]) -> None:
    print("\n## targets\n")
    print("| part | measured | target | met |")
    print("|---|---|---|---|")
    for part, measured, target, ok in targets:
        print(f"| {part} | {measured} | {target} | {'yes' if ok else 'NO'} |")


# Main -------------------------------------------------------------------------------------------


def check_tools() -> None:
    for tool, package in ((HEY, "Debian's hey"), (COSIGN, "cosign2"), (SIGNGATE, "signgate")):
        if not tool.exists():
            raise SystemExit(f"{tool} not found ({package}); run scripts/setup.sh")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verdicts", type=int, default=10_000,
                        help="cached verdicts for (d); under 10000, VmRSS at 10000 is "
                        "extrapolated from the last two checkpoints (2000, 5000 or half)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (a) per endpoint")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of a round of (a)")
    parser.add_argument("--concurrency", type=int, default=16, help="connections in (a)")
    parser.add_argument("--cold-runs", type=int, default=7, help="runs of (b)")
    parser.add_argument("--pods", type=int, default=200, help="pods at once in (c)")
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--tls-cert", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tls-key", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare is not None:
        serve_bare(args.serve_bare, args.tls_cert, args.tls_key)
        return
    check_tools()
    started = time.perf_counter()
    load_at_start = load_average()
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="signgate-webhook-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None
        )))
        registry = stack.enter_context(running_registry(scratch / "registry"))
        setting = prepare(scratch, registry.host)

        names = ["warm-a", "warm-b", "warm-c", "burst",
                 *(f"cold-{i}" for i in range(args.cold_runs))]
        references = dict(zip(names, push_named_images(registry.host, names), strict=True))
        sign_env = tool_env(setting.work, COSIGN_PASSWORD=PASSWORD)
        subprocess.run([str(SIGNGATE), "sign", "--format", "classic", "--key", "cosign.key",
                        *references.values()],
                       env=sign_env, cwd=setting.work, check=True, capture_output=True)

        progress("(a) starting signgate serve and the bare endpoint")
        signgate = stack.enter_context(stopped_at_exit(start_signgate(setting, "signgate")))
        with stopped_at_exit(start_bare(setting)) as bare:
            warm = measure_warm(setting, signgate, bare,
                                [references[n] for n in ("warm-a", "warm-b", "warm-c")],
                                args.rounds, args.seconds, args.concurrency)
        cold = measure_cold(setting, signgate,
                            [references[f"cold-{i}"] for i in range(args.cold_runs)])
        startup = cosign_startup_ms(setting, args.cold_runs)
        single = int(statistics.median(r.registry_requests for r in cold))
        progress("(c) burst")
        burst = measure_burst(setting, signgate, references["burst"], args.pods)
        signgate.stop()

        progress(f"(d) pushing and signing {args.verdicts} images")
        from signgate.keys.password import fixed_password
        from signgate.keys.refs import load_signer

        signer = load_signer(str(setting.work / "cosign.key"), fixed_password(PASSWORD.encode()))
        push_start = time.perf_counter()
        fill = push_signed_fill(registry.host, signer, args.verdicts)
        push_seconds = time.perf_counter() - push_start
        entries = str(max(10_000, args.verdicts))
        memory_server = stack.enter_context(stopped_at_exit(start_signgate(
            setting, "signgate-memory", "--max-cache-entries", entries,
            "--verdict-ttl", "3600", "--tag-ttl", "3600",
        )))
        memory = measure_memory(setting, memory_server, fill, push_seconds)
        memory_server.stop()

    print("\n# signgate serve benchmark\n")
    print(f"{os.cpu_count()} CPUs; load average at start {load_at_start}, at end "
          f"{load_average()}; Python {sys.version.split()[0]}; total "
          f"{time.perf_counter() - started:.0f} s")
    report_targets([
        report_warm(warm),
        report_cold(cold, startup),
        report_burst(burst, single),
        report_memory(memory, 10_000),
    ])


def prepare(scratch: Path, registry_host: str) -> Setting:
    """Keys (``signgate generate-key-pair``), a CA and serving certificate, the policy."""
    work = scratch / "work"
    work.mkdir()
    env = tool_env(work, COSIGN_PASSWORD=PASSWORD)
    subprocess.run([str(SIGNGATE), "generate-key-pair"], env=env, cwd=work, check=True,
                   capture_output=True)
    ca = make_test_ca(work / "pki")
    certificate = issue_server_certificate(ca, work / "pki")
    policy_file = work / "policy.yaml"
    policy_file.write_text(
        "unmatched: deny\nrules:\n  - name: bench\n"
        f"    images: [\"{registry_host}/**\"]\n    keys: [{work / 'cosign.pub'}]\n"
    )
    tls = ssl.create_default_context(cafile=str(ca.cert_file))
    return Setting(work, registry_host, ca.cert_file, certificate.cert_file,
                   certificate.key_file, policy_file, tls)


if __name__ == "__main__":
    main()
