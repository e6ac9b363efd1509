"""``signgate serve``'s shell: the webhook application on uvicorn (httptools, uvloop) over TLS.

- The serving certificate and key are reloaded when their files change (cert-manager and
  Kubernetes Secret volumes replace them in place); a pair that does not load keeps the old one
  and logs an error.
- SIGTERM stops accepting connections and finishes the reviews in flight (up to
  ``shutdown_grace_seconds``), then the process exits 0.
- The policy file is reloaded when it changes; a policy that does not parse, or whose keys do
  not load, is logged and the one in force kept.
- Every log line, uvicorn's included, is one JSON object on stderr; each decision is one line
  (:func:`signgate.webhook.app.decision_line`).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hashlib
import logging
import math
import os
import signal
import ssl
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from signgate.errors import PolicyError, UsageError
from signgate.webhook.app import WebhookApp
from signgate.webhook.logs import json_line, log_time

if TYPE_CHECKING:
    import uvicorn

    from signgate.policy import Policy
    from signgate.registry import RegistryOptions
    from signgate.webhook.controller import AdmissionController, ControllerSettings
    from signgate.webhook.metrics import WebhookMetrics

log = logging.getLogger("signgate.webhook.server")

# Longer than the API server's idle connection timeout (90 s, Go's http.Transport as
# k8s.io/apimachinery configures it), so that the client, never the server, closes an idle
# connection: a review POSTed on a connection the server has just closed is not retried, and
# fails the admission.
KEEP_ALIVE_SECONDS = 120

_FileState = tuple[int, int, int, int] | None  # (device, inode, size, mtime_ns); None if missing


def _file_state(path: Path) -> _FileState:
    try:
        stat = path.stat()  # follows symlinks: a Secret volume swaps its ..data link
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(
            f"cannot use the TLS certificate {cert_file} with the key {key_file}: "
            f"{_pair_problem(cert_file, key_file, e)}"
        ) from e
    return context


def _pair_problem(cert_file: Path, key_file: Path, error: OSError) -> str:
    """Why OpenSSL refused the pair, in words (it says only "PEM lib" for most problems)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if isinstance(error, ssl.SSLError) and error.reason == "KEY_VALUES_MISMATCH":
        return "the key is not the certificate's key"
    try:
        cert_pem, key_pem = cert_file.read_bytes(), key_file.read_bytes()
    except OSError as e:
        return f"{e.filename}: {e.strerror}"
    try:
        x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        return "the certificate file holds no PEM certificate"
    try:
        serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return "the key file holds no unencrypted PEM private key"
    return error.strerror or str(error)


@dataclass(frozen=True)
class PolicyFile:
    """A policy as read from its file, with the SHA-256 of the file (``/metrics`` shows which
    policy each replica serves) and the file's state before it was read."""

    path: Path
    policy: Policy
    sha256: str
    state: _FileState


def read_policy_file(path: Path) -> PolicyFile:
    """Read and validate the policy at ``path``; raise :class:`PolicyError` naming the line."""
    from signgate.policy import load_policy

    # Taken before reading: a file replaced while it is read is read again at the next look.
    state = _file_state(path)
    policy = load_policy(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PolicyError(f"{path}: cannot read the policy: {e.strerror or e}") from e
    return PolicyFile(path, policy, hashlib.sha256(data).hexdigest(), state)


class ReloadingPolicy:
    """The policy file, read again when it changes (a ConfigMap volume swaps its ``..data``
    link), so that a rotation's "trust both" and "retire OLD" reach a running webhook.

    A new policy is served only once it parses and every key it names has loaded; otherwise
    the error is logged and the policy in force stays (a broken edit must not open the
    cluster, and a policy trusting OLD and NEW must not give way to one trusting neither). A
    policy whose keys failed is tried again at the next look; one that does not parse, once
    its file changes again.
    """

    def __init__(
        self, current: PolicyFile, controller: AdmissionController, metrics: WebhookMetrics
    ) -> None:
        self.path = current.path
        self.sha256 = current.sha256
        self.last_error: str | None = None
        self._state = current.state
        self._controller = controller
        self._metrics = metrics
        metrics.policy_in_force(current.sha256)

    async def reload_if_changed(self) -> bool:
        """True when a new policy is now served."""
        state = _file_state(self.path)
        if state == self._state:
            return False
        try:
            new = read_policy_file(self.path)
        except PolicyError as e:
            self._state = state
            return self._kept(e.diagnostics())
        if new.sha256 == self.sha256:
            self._state = new.state
            return False
        problems = await self._controller.replace_policy(new.policy)
        if problems:
            return self._kept("; ".join(problems))
        self._state = new.state
        self.sha256 = new.sha256
        self.last_error = None
        self._metrics.policy_in_force(new.sha256)
        log.info(
            "serving the new policy from %s", self.path,
            extra={"fields": {"policy_sha256": new.sha256}},
        )
        return True

    def _kept(self, reason: str) -> bool:
        self.last_error = reason
        log.error("kept the policy in force (sha256 %s): %s", self.sha256, reason)
        return False

    async def watch(self, interval_seconds: float) -> None:
        """Look at the file every ``interval_seconds`` until cancelled."""
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                await self.reload_if_changed()
            except Exception:
                log.exception("reloading the policy failed; the policy in force stays")


class ReloadingCertificate:
    """The serving certificate and key, re-read when either file changes.

    The listener's SSLContext stays the one uvicorn was given. Each reload builds a new context
    from the files, and the listener's ``sni_callback`` (which OpenSSL calls on every
    handshake, with or without SNI) hands each new connection the newest context. A fresh
    context, rather than ``load_cert_chain`` into the live one, because a pair that fails to
    load there leaves the live context with the new certificate and no key: every handshake
    after it would fail.
    """

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self._state = self._files_state()
        self.listener_context = _server_context(cert_file, key_file)
        self.listener_context.sni_callback = self._select_context
        self._current = self.listener_context
        self.last_error: str | None = None

    def _files_state(self) -> tuple[_FileState, _FileState]:
        return _file_state(self.cert_file), _file_state(self.key_file)

    def _select_context(
        self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext
    ) -> None:
        if self._current is not context:
            connection.context = self._current

    def reload_if_changed(self) -> bool:
        """Load the pair again if a file changed since the last look; True when a new pair
        now serves. A pair that does not load is logged and the old one kept."""
        state = self._files_state()
        if state == self._state:
            return False
        # Remembered before reading: a file replaced while we read it is read again next time.
        self._state = state
        try:
            context = _server_context(self.cert_file, self.key_file)
        except UsageError as e:
            self.last_error = e.diagnostics()
            log.error("kept the previous TLS certificate: %s", self.last_error)
            return False
        context.sni_callback = self._select_context
        self._current = context
        self.last_error = None
        log.info("loaded the new TLS certificate from %s", self.cert_file)
        return True

    async def watch(self, interval_seconds: float) -> None:
        """Check the files every ``interval_seconds`` until cancelled."""
        while True:
            await asyncio.sleep(interval_seconds)
            self.reload_if_changed()

    def readiness_problems(self) -> list[str]:
        """The listener always has a loaded pair (the process does not start without one), so
        a failed reload is logged, not a readiness problem: the old pair still serves."""
        return []


@dataclass(frozen=True)
class ServeSettings:
    """What ``signgate serve`` was asked to do."""

    policy: PolicyFile
    registry: RegistryOptions
    controller: ControllerSettings
    tls_cert: Path
    tls_key: Path
    host: str = "0.0.0.0"  # noqa: S104 - a webhook serves the cluster network
    port: int = 8443
    tls_reload_seconds: float = 5.0
    policy_reload_seconds: float = 5.0
    shutdown_grace_seconds: float = 15.0
    log_level: str = "info"


def serve(settings: ServeSettings) -> None:
    """Serve the webhook until SIGTERM or SIGINT; return after the reviews in flight finish."""
    import uvicorn
    import uvloop

    from signgate.webhook.controller import AdmissionController
    from signgate.webhook.metrics import WebhookMetrics

    log_handler = configure_logging(settings.log_level)
    certificate = ReloadingCertificate(settings.tls_cert, settings.tls_key)
    metrics = WebhookMetrics()
    controller = AdmissionController(
        settings.policy.policy, settings.registry, settings.controller, metrics=metrics
    )
    policy = ReloadingPolicy(settings.policy, controller, metrics)
    app = WebhookApp(
        controller, metrics, readiness=certificate.readiness_problems,
        write_decision=DirectLines(log_handler),
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="none",  # the loop is ours: uvloop, below
        http="httptools",
        lifespan="off",
        log_config=None,  # configure_logging's JSON lines
        access_log=False,  # one line per decision instead; probes would drown it
        server_header=False,
        proxy_headers=False,  # the API server calls directly; no proxy to trust
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        ssl_context_factory=lambda _config, _default: certificate.listener_context,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_seconds),
    )
    server = uvicorn.Server(config)

    def stop(signum: int, frame: FrameType | None) -> None:
        server.should_exit = True

    # uvicorn installs its own handlers while it serves and, once it has shut down, raises the
    # signal it caught again with the previous handlers: these, which exit cleanly (status 0)
    # where Python's defaults would kill the process or raise KeyboardInterrupt.
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_run(
                server, controller,
                certificate.watch(settings.tls_reload_seconds),
                policy.watch(settings.policy_reload_seconds),
            ))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


async def _run(
    server: uvicorn.Server,
    controller: AdmissionController,
    *watches: Coroutine[Any, Any, None],
) -> None:
    """Serve until ``server`` is told to exit; raise what made the controller fail to start
    (it then stops the server) once the server has stopped."""
    loop = type(asyncio.get_running_loop()).__module__.partition(".")[0]
    log.info("signgate webhook starting", extra={"fields": {"pid": os.getpid(), "loop": loop}})
    # The listener opens while the keys load: /healthz answers, /readyz says why not yet.
    starting = asyncio.create_task(controller.start())
    starting.add_done_callback(functools.partial(_stop_unless_started, server))
    # Everything imported and built so far lives as long as the process: out of the collector's
    # way, every full collection while serving walks only what reviews allocate.
    gc.freeze()
    watching = [asyncio.create_task(watch) for watch in watches]
    try:
        await server.serve()
    finally:
        starting.cancel()
        for task in watching:
            task.cancel()
        outcomes = await asyncio.gather(starting, *watching, return_exceptions=True)
        await controller.aclose()
    log.info("signgate webhook stopped")
    if isinstance(outcomes[0], Exception):
        raise outcomes[0]


def _stop_unless_started(server: uvicorn.Server, starting: asyncio.Task[None]) -> None:
    if not starting.cancelled() and starting.exception() is not None:
        log.error("the admission controller could not start; stopping")
        server.should_exit = True


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line (:mod:`signgate.webhook.logs`): time, level, logger, message,
    the record's ``fields``, its ``fields_json`` (members serialised already), and the
    traceback of an exception. A record carrying a whole ``json_line`` (a decision, built by the
    application) is written as it is."""

    def format(self, record: logging.LogRecord) -> str:
        whole = getattr(record, "json_line", None)
        if isinstance(whole, str):
            return whole
        entry: dict[str, Any] = {
            "time": log_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        members = getattr(record, "fields_json", None)
        return json_line(entry, members if isinstance(members, str) else "")


class DirectLines:
    """Writes decision lines straight to the log handler's stream, under the handler's lock
    (so they never interleave with other records), when the decision logger is enabled for
    INFO: the logging module's record and handler cost more than a cached decision."""

    def __init__(self, handler: logging.StreamHandler[Any]) -> None:
        self._handler = handler

    def __call__(self, line: str) -> None:
        handler = self._handler
        handler.acquire()
        try:
            handler.stream.write(line + "\n")
            handler.flush()
        except (OSError, ValueError):
            pass  # as logging does: a log that cannot be written never fails a review
        finally:
            handler.release()


def configure_logging(level: str = "info") -> logging.StreamHandler[Any]:
    """Send every logger's records, as JSON lines, to stderr; the handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The JSON lines show none of these record attributes; finding them costs each decision's
    # log line more than formatting it (https://docs.python.org/3/howto/logging.html#optimization).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # A line for each registry request would bury the decisions; failures reach the decisions.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
    return handler
