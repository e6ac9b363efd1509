"""Session-scoped real servers for the integration tests; each starts only when first used."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.registry_servers import (
    RunningRegistry,
    issue_server_certificate,
    make_test_ca,
    running_registry,
)
from tests.integration.token_server import TokenServer
from tests.integration.tools import tool_path

TEST_USERNAME = "signgate-user"
TEST_PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """Plain HTTP registry on 127.0.0.1, no auth."""
    with running_registry(tmp_path_factory.mktemp("registry")) as running:
        yield running


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """HTTPS registry on 127.0.0.1 with a certificate from a test CA (``ca_file``)."""
    workdir = tmp_path_factory.mktemp("tls-registry")
    ca = make_test_ca(workdir / "pki")
    certificate = issue_server_certificate(ca, workdir / "pki")
    with running_registry(workdir, tls=certificate, ca_file=ca.cert_file) as running:
        yield running


@pytest.fixture(scope="session")
def basic_auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """Plain HTTP registry on 127.0.0.1 behind htpasswd (bcrypt) Basic auth."""
    workdir = tmp_path_factory.mktemp("basic-auth-registry")
    with running_registry(workdir, htpasswd=(TEST_USERNAME, TEST_PASSWORD)) as running:
        yield running


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    """The Bearer token server behind ``token_registry``; ``.requests`` records each ask."""
    server = TokenServer(
        tmp_path_factory.mktemp("token-server"),
        users={TEST_USERNAME: TEST_PASSWORD},
        identity_tokens={"signgate-identity-token": TEST_USERNAME},
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer
) -> Iterator[RunningRegistry]:
    """Plain HTTP registry on 127.0.0.1 with Bearer token auth from ``token_server``."""
    workdir = tmp_path_factory.mktemp("token-registry")
    with running_registry(
        workdir,
        token_auth=token_server.registry_auth_config(),
        username=TEST_USERNAME,
        password=TEST_PASSWORD,
    ) as running:
        yield running


@pytest.fixture(scope="session")
def cosign_binaries() -> dict[str, Path]:
    """The real cosign CLIs: "cosign2" and "cosign3" from $SIGNGATE_TOOLS (default .tools/bin)."""
    return {name: tool_path(name) for name in ("cosign2", "cosign3")}
