"""The server shell's parts without a server: the reloading serving certificate (real TLS
handshakes over a socket pair) and the JSON log lines."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import socket
import ssl
import sys
import threading
from pathlib import Path

import pytest
import uvicorn
from cryptography import x509

from signgate.errors import UsageError
from signgate.webhook.app import WebhookApp
from signgate.webhook.decision import AdmissionDecision
from signgate.webhook.review import AdmissionReview
from signgate.webhook.server import DirectLines, JsonLogFormatter, ReloadingCertificate, _run
from tests.integration.registry_servers import (
    CertificateAuthority,
    ServerCertificate,
    issue_server_certificate,
    make_test_ca,
)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return make_test_ca(tmp_path / "ca")


def serial_of(certificate: ServerCertificate) -> int:
    return x509.load_pem_x509_certificate(certificate.cert_file.read_bytes()).serial_number


def served_serial(context: ssl.SSLContext, ca: CertificateAuthority, host: str) -> int:
    """The serial of the certificate a client verifying against ``ca`` is served."""
    server_end, client_end = socket.socketpair()
    failures: list[BaseException] = []

    def serve() -> None:
        try:
            with context.wrap_socket(server_end, server_side=True) as tls:
                tls.recv(1)
        except (OSError, ssl.SSLError) as e:
            failures.append(e)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        client = ssl.create_default_context(cafile=str(ca.cert_file))
        with client.wrap_socket(client_end, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
            tls.send(b"x")
    finally:
        thread.join()
        server_end.close()
        client_end.close()
    assert not failures, failures
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def publish(source: ServerCertificate, target: ServerCertificate) -> None:
    """Replace the target files by renames, as an atomic writer would."""
    for src, dst in ((source.cert_file, target.cert_file), (source.key_file, target.key_file)):
        staged = dst.with_suffix(".staged")
        staged.write_bytes(src.read_bytes())
        os.replace(staged, dst)


@pytest.fixture
def pairs(ca: CertificateAuthority, tmp_path: Path) -> list[ServerCertificate]:
    issued = tmp_path / "issued"
    issued.mkdir()
    return [issue_server_certificate(ca, issued, stem=f"pair{i}") for i in range(3)]


@pytest.fixture
def live(tmp_path: Path, pairs: list[ServerCertificate]) -> ServerCertificate:
    live = ServerCertificate(tmp_path / "tls.crt", tmp_path / "tls.key")
    publish(pairs[0], live)
    return live


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"], ids=["sni", "no-sni"])
def test_a_changed_pair_serves_new_handshakes(
    ca: CertificateAuthority, pairs: list[ServerCertificate], live: ServerCertificate, host: str
) -> None:
    certificate = ReloadingCertificate(live.cert_file, live.key_file)
    listener = certificate.listener_context
    assert served_serial(listener, ca, host) == serial_of(pairs[0])
    assert certificate.reload_if_changed() is False
    publish(pairs[1], live)
    assert certificate.reload_if_changed() is True
    assert certificate.listener_context is listener  # the one uvicorn listens with
    assert served_serial(listener, ca, host) == serial_of(pairs[1])
    assert certificate.reload_if_changed() is False


def test_a_pair_that_does_not_load_keeps_the_previous_one(
    ca: CertificateAuthority, pairs: list[ServerCertificate], live: ServerCertificate,
    caplog: pytest.LogCaptureFixture,
) -> None:
    certificate = ReloadingCertificate(live.cert_file, live.key_file)
    publish(pairs[1], live)
    assert certificate.reload_if_changed() is True
    mismatched = ServerCertificate(pairs[2].cert_file, pairs[0].key_file)
    publish(mismatched, live)
    assert certificate.reload_if_changed() is False
    assert certificate.last_error == (
        f"cannot use the TLS certificate {live.cert_file} with the key {live.key_file}: "
        "the key is not the certificate's key"
    )
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage() == f"kept the previous TLS certificate: {certificate.last_error}"
    assert served_serial(certificate.listener_context, ca, "localhost") == serial_of(pairs[1])
    assert certificate.reload_if_changed() is False  # logged once per change, not per look
    assert len(caplog.records) == 1
    # A missing file is another change that keeps the pair; its return is the next change.
    live.key_file.unlink()
    assert certificate.reload_if_changed() is False
    assert certificate.last_error is not None
    assert certificate.last_error.endswith(f"{live.key_file}: No such file or directory")
    publish(pairs[2], live)
    assert certificate.reload_if_changed() is True
    assert certificate.last_error is None
    assert served_serial(certificate.listener_context, ca, "localhost") == serial_of(pairs[2])
    assert certificate.readiness_problems() == []


def test_the_process_does_not_start_without_a_pair(
    tmp_path: Path, pairs: list[ServerCertificate]
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        (garbage, pairs[0].key_file, "the certificate file holds no PEM certificate"),
        (pairs[0].cert_file, garbage, "the key file holds no unencrypted PEM private key"),
        (pairs[0].cert_file, pairs[1].key_file, "the key is not the certificate's key"),
    ]
    for cert_file, key_file, problem in cases:
        with pytest.raises(UsageError) as caught:
            ReloadingCertificate(cert_file, key_file)
        assert caught.value.diagnostics() == (
            f"cannot use the TLS certificate {cert_file} with the key {key_file}: {problem}"
        )


def test_log_records_are_one_json_line_with_their_fields() -> None:
    formatter = JsonLogFormatter()
    record = logging.LogRecord(
        "signgate.webhook.decisions", logging.INFO, __file__, 1, "admission %s", ("denied",),
        None,
    )
    record.fields = {"uid": "u-1", "images": [{"image": "a\nb", "digest": None}]}
    line = formatter.format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry.pop("time").endswith("+00:00")
    assert entry == {
        "level": "info",
        "logger": "signgate.webhook.decisions",
        "message": "admission denied",
        "uid": "u-1",
        "images": [{"image": "a\nb", "digest": None}],
    }
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        failed = logging.LogRecord(
            "signgate.webhook", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    entry = json.loads(formatter.format(failed))
    assert entry["level"] == "error"
    assert entry["traceback"].startswith("Traceback (most recent call last):")
    assert entry["traceback"].endswith("RuntimeError: boom")


class UnstartableController:
    """A controller whose start fails, as a registry client that cannot be built would."""

    def __init__(self) -> None:
        self.closed = False

    @property
    def ready(self) -> bool:
        return False

    def readiness_problems(self) -> list[str]:
        return ["the admission controller has not started"]

    async def start(self) -> None:
        raise UsageError("cannot reach the registries: the CA bundle is unusable")

    def known_decision(self, review: AdmissionReview) -> AdmissionDecision | None:
        raise AssertionError("no review expected")

    async def review(self, review: AdmissionReview) -> AdmissionDecision:
        raise AssertionError("no review expected")

    async def aclose(self) -> None:
        self.closed = True


def test_a_controller_that_cannot_start_stops_the_server(live: ServerCertificate) -> None:
    class NoMetrics:
        def render(self) -> tuple[bytes, str]:
            return b"", "text/plain"

    controller = UnstartableController()
    certificate = ReloadingCertificate(live.cert_file, live.key_file)
    config = uvicorn.Config(
        WebhookApp(controller, NoMetrics()), host="127.0.0.1", port=0, loop="none",
        lifespan="off", log_config=None,
        ssl_context_factory=lambda _config, _default: certificate.listener_context,
    )
    server = uvicorn.Server(config)
    with pytest.raises(UsageError, match="the CA bundle is unusable"):
        asyncio.run(_run(server, controller, certificate.watch(60.0)))  # type: ignore[arg-type]
    assert server.started
    assert controller.closed


def test_decision_lines_go_to_the_handlers_stream_whole_and_a_broken_stream_is_survived() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter())
    write = DirectLines(handler)
    write('{"a":1}')
    handler.handle(logging.makeLogRecord({"msg": "between", "name": "x", "levelname": "INFO"}))
    write('{"b":2}')
    lines = stream.getvalue().splitlines()
    assert lines[0] == '{"a":1}'
    assert json.loads(lines[1])["message"] == "between"
    assert lines[2] == '{"b":2}'
    stream.close()
    write('{"c":3}')  # a closed stream: nothing raised into the review
