"""Real registries for the tests: Debian's docker-registry (distribution 2.8) as child processes.

Each runs on a free 127.0.0.1 port with its storage in a temporary directory; plain HTTP,
TLS with a test CA, htpasswd Basic auth, or Bearer tokens from :mod:`token_server`.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from signgate.reference import Repository
from signgate.registry.client import RegistryOptions

REGISTRY_BINARY = Path("/usr/bin/docker-registry")
HTPASSWD_BINARY = Path("/usr/bin/htpasswd")
READY_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class RunningRegistry:
    """A registry the tests may use: ``host`` is host:port, ``url`` its base URL."""

    host: str
    url: str
    storage: Path
    ca_file: Path | None
    username: str | None
    password: str | None

    def repository(self, path: str) -> Repository:
        return Repository(self.host, path)

    def options(self, **overrides: Any) -> RegistryOptions:
        """Client options that reach this registry: its CA and credentials, if any."""
        options = RegistryOptions(
            ca_bundle=self.ca_file, username=self.username, password=self.password
        )
        return replace(options, **overrides)


@dataclass(frozen=True)
class CertificateAuthority:
    cert_file: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class ServerCertificate:
    cert_file: Path
    key_file: Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity() -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)


def make_test_ca(directory: Path, name: str = "signgate test CA") -> CertificateAuthority:
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file = directory / "ca.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CertificateAuthority(cert_file, cert, key)


def issue_server_certificate(
    ca: CertificateAuthority,
    directory: Path,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    stem: str = "server",
) -> ServerCertificate:
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    not_before, not_after = _validity()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    cert_file = directory / f"{stem}.pem"
    key_file = directory / f"{stem}-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ServerCertificate(cert_file, key_file)


def write_htpasswd(path: Path, username: str, password: str) -> None:
    if not HTPASSWD_BINARY.exists():
        pytest.fail(f"{HTPASSWD_BINARY} is missing: install Debian's apache2-utils")
    line = subprocess.run(
        [str(HTPASSWD_BINARY), "-Bbn", username, password],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    path.write_text(line + "\n")


def _wait_until_ready(
    process: subprocess.Popen[bytes], url: str, ca_file: Path | None, log: Path
) -> None:
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    with httpx.Client(verify=context or True, timeout=2.0) as probe:
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"docker-registry exited with status {process.returncode}: "
                    f"{log.read_text(errors='replace')[-2000:]}"
                )
            try:
                probe.get(f"{url}/v2/")
                return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"docker-registry at {url} did not answer within {READY_TIMEOUT_SECONDS}s"
                )
            time.sleep(0.05)


@contextmanager
def running_registry(
    workdir: Path,
    *,
    tls: ServerCertificate | None = None,
    ca_file: Path | None = None,
    htpasswd: tuple[str, str] | None = None,
    token_auth: dict[str, str] | None = None,
    username: str | None = None,
    password: str | None = None,
) -> Iterator[RunningRegistry]:
    """Start ``docker-registry serve`` on a free port; stop it on exit.

    ``token_auth`` is distribution's ``auth.token`` section (realm, service, issuer,
    rootcertbundle).
    """
    if not REGISTRY_BINARY.exists():
        pytest.fail(
            f"{REGISTRY_BINARY} is missing: install Debian's docker-registry package "
            "(the registry tests need a real registry)"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "storage"
    storage.mkdir(exist_ok=True)
    port = free_port()
    host = f"127.0.0.1:{port}"
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
            # As in Debian's default config.yml: the registry caches blob descriptors in memory.
            "cache": {"blobdescriptor": "inmemory"},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": host, "secret": "signgate-test-secret"},
    }
    if tls is not None:
        config["http"]["tls"] = {"certificate": str(tls.cert_file), "key": str(tls.key_file)}
    if htpasswd is not None:
        htpasswd_file = workdir / "htpasswd"
        write_htpasswd(htpasswd_file, *htpasswd)
        config["auth"] = {"htpasswd": {"realm": "signgate-test", "path": str(htpasswd_file)}}
        username, password = htpasswd
    if token_auth is not None:
        config["auth"] = {"token": token_auth}
    # JSON is YAML: no YAML library needed to write the config.
    config_file = workdir / "config.yml"
    config_file.write_text(json.dumps(config, indent=2))
    log = workdir / "registry.log"
    scheme = "https" if tls is not None else "http"
    url = f"{scheme}://{host}"
    with log.open("wb") as log_stream:
        process = subprocess.Popen(
            [str(REGISTRY_BINARY), "serve", str(config_file)],
            stdin=subprocess.DEVNULL,
            stdout=log_stream,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_ready(process, url, ca_file, log)
        yield RunningRegistry(host, url, storage, ca_file, username, password)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
