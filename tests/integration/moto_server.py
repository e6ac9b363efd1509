"""The real ``moto_server`` (PyPI ``moto[server]``) as a child process: AWS KMS on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.registry_servers import ServerCertificate, free_port

MOTO_SERVER = Path(sys.executable).with_name("moto_server")
READY_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class RunningMoto:
    """A moto server: ``host`` is 127.0.0.1:PORT, ``url`` its base URL."""

    host: str
    url: str
    log: Path


@contextmanager
def running_moto(
    workdir: Path,
    *,
    tls: ServerCertificate | None = None,
    no_auth_actions: int | None = None,
) -> Iterator[RunningMoto]:
    """Start ``moto_server`` on a free port; stop it on exit.

    ``no_auth_actions`` turns on moto's IAM checks after that many requests (its
    ``INITIAL_NO_AUTH_ACTION_COUNT``): then only access keys made through its IAM API are
    accepted, and their policies apply.
    """
    if not os.access(MOTO_SERVER, os.X_OK):
        pytest.fail(f"{MOTO_SERVER} is missing: install signgate[dev] (moto[server])")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)]
    if tls is not None:
        argv += ["-c", str(tls.cert_file), "-k", str(tls.key_file)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
    if no_auth_actions is not None:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(no_auth_actions)
    log = workdir / "moto.log"
    host = f"127.0.0.1:{port}"
    url = f"{'https' if tls is not None else 'http'}://{host}"
    with log.open("wb") as log_stream:
        process = subprocess.Popen(argv, stdout=log_stream, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_until_listening(process, port, log)
        yield RunningMoto(host, url, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    # A TCP connect, not a request: with IAM checks on, every request counts towards
    # INITIAL_NO_AUTH_ACTION_COUNT.
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while True:
        if process.poll() is not None:
            pytest.fail(
                f"moto_server exited with status {process.returncode}: "
                f"{log.read_text(errors='replace')[-2000:]}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(
                f"moto_server on port {port} did not listen within {READY_TIMEOUT_SECONDS}s"
            )
        time.sleep(0.05)
