"""StreamTransport against small HTTP/1.1 servers on loopback that misbehave on demand.

Each server is an asyncio server in the test's own event loop, answering as the test scripts
it; the real registry is exercised through the registry client's integration tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from signgate.errors import TLSFailure, Unreachable
from signgate.reference import Repository
from signgate.registry.client import RegistryClient, RegistryOptions
from signgate.registry.errors import error_for_transport
from signgate.registry.transport import StreamTransport
from tests.integration.registry_servers import (
    free_port,
    issue_server_certificate,
    make_test_ca,
)

pytestmark = pytest.mark.anyio

DEFAULT_TIMEOUT = httpx.Timeout(5.0)


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """One request off the connection (Content-Length or chunked body); None at its end."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    request_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
    method, target, _ = request_line.split(" ")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = b""
    if headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            body += (await reader.readexactly(size + 2))[:-2]
            if size == 0:
                break
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    return Request(method, target, headers, body)


def reply(body: bytes = b"", status: str = "200 OK", *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


Answer = Callable[[Request, asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


class ScriptedServer:
    """An HTTP/1.1 server on 127.0.0.1; ``answer(request, reader, writer, connection_number)``
    writes the reply and returns False to close the connection."""

    def __init__(self, answer: Answer, tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.tls = tls
        self.requests: list[Request] = []
        self.connections = 0
        self.open_connections = 0
        self.most_open_connections = 0
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def __aenter__(self) -> ScriptedServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self.server.wait_closed()
        await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self.open_connections += 1
        self.most_open_connections = max(self.most_open_connections, self.open_connections)
        self._writers.add(writer)
        try:
            while (request := await read_request(reader)) is not None:
                self.requests.append(request)
                if not await self.answer(request, reader, writer, number):
                    break
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_connections -= 1
            self._writers.discard(writer)
            writer.transport.abort()


def answering(*replies: bytes, keep_alive: bool = True) -> Answer:
    """Answers the n-th request (of all connections) with ``replies[n]``, the last one after."""
    count = 0

    async def answer(
        request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> bool:
        nonlocal count
        writer.write(replies[min(count, len(replies) - 1)])
        count += 1
        return keep_alive

    return answer


@pytest.fixture
async def transport() -> AsyncIterator[StreamTransport]:
    transport = StreamTransport(ssl.create_default_context)
    yield transport
    await transport.aclose()


async def fetch(
    transport: httpx.AsyncBaseTransport,
    url: str,
    method: str = "GET",
    *,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: httpx.Timeout = DEFAULT_TIMEOUT,
) -> httpx.Response:
    async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
        return await client.request(method, url, content=content, headers=headers)


async def test_content_length_responses_share_one_connection(
    transport: StreamTransport,
) -> None:
    async with (
        ScriptedServer(answering(reply(b"first"), reply(b"second"))) as server,
        httpx.AsyncClient(transport=transport) as client,
    ):
        assert (await client.get(server.url + "/a?x=1")).content == b"first"
        assert (await client.get(server.url + "/b")).content == b"second"
    assert [r.target for r in server.requests] == ["/a?x=1", "/b"]
    assert server.requests[0].headers["host"] == f"127.0.0.1:{server.port}"
    assert server.connections == 1


async def test_chunked_response_arriving_in_pieces(transport: StreamTransport) -> None:
    async def answer(
        request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"5\r\nhello\r\n", b"6\r\n world\r\n", b"0\r\n", b"\r\n"):
            await writer.drain()
            await asyncio.sleep(0)
            writer.write(piece)
        return True

    async with ScriptedServer(answer) as server, httpx.AsyncClient(transport=transport) as client:
        for _ in range(2):
            response = await client.get(server.url)
            assert response.content == b"hello world"
    assert server.connections == 1


async def test_close_delimited_response_ends_with_the_connection(
    transport: StreamTransport,
) -> None:
    unframed = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"
    async with (
        ScriptedServer(answering(unframed, keep_alive=False)) as server,
        httpx.AsyncClient(transport=transport) as client,
    ):
        for _ in range(2):
            assert (await client.get(server.url)).content == b"until the end"
    assert server.connections == 2


@pytest.mark.parametrize(
    "response",
    [
        reply(b"closing", "200 OK", "Connection: close"),
        b"HTTP/1.0 200 OK\r\nContent-Length: 7\r\n\r\nclosing",
    ],
    ids=["connection-close", "http-1.0"],
)
async def test_responses_that_end_the_connection_are_not_reused(
    transport: StreamTransport, response: bytes
) -> None:
    async with (
        ScriptedServer(answering(response)) as server,
        httpx.AsyncClient(transport=transport) as client,
    ):
        for _ in range(2):
            assert (await client.get(server.url)).content == b"closing"
    assert server.connections == 2


@pytest.mark.parametrize(
    ("method", "response"),
    [
        ("HEAD", reply(b"", "200 OK").replace(b"Content-Length: 0", b"Content-Length: 1234")),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n"),
    ],
    ids=["head", "204", "304"],
)
async def test_responses_without_a_body(
    transport: StreamTransport, method: str, response: bytes
) -> None:
    async with (
        ScriptedServer(answering(response, reply(b"next"))) as server,
        httpx.AsyncClient(transport=transport) as client,
    ):
        first = await client.request(method, server.url)
        assert first.content == b""
        assert (await client.get(server.url)).content == b"next"
    assert first.headers.get("content-length") in (None, "1234", "99")
    assert server.connections == 1


async def test_informational_responses_are_skipped(transport: StreamTransport) -> None:
    informational = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    async with ScriptedServer(answering(informational + reply(b"final", "201 Created"))) as server:
        response = await fetch(transport, server.url)
    assert (response.status_code, response.content) == (201, b"final")
    assert "link" not in response.headers
    assert response.reason_phrase == "Created"


async def test_server_closing_an_idle_connection_gets_a_fresh_one(
    transport: StreamTransport,
) -> None:
    closed = asyncio.Event()

    async def answer(
        request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> bool:
        writer.write(reply(f"connection {n}".encode()))
        if n == 1:
            await writer.drain()
            writer.close()
            await writer.wait_closed()
            closed.set()
        return n != 1

    async with (
        ScriptedServer(answer) as server,
        httpx.AsyncClient(transport=transport) as client,
    ):
        assert (await client.get(server.url)).content == b"connection 1"
        await closed.wait()
        for _ in range(3):  # the client's event loop sees the end of the stream
            await asyncio.sleep(0)
        assert (await client.get(server.url)).content == b"connection 2"
    assert server.connections == 2


def closing_unanswered_on_reuse(body: Callable[[Request], bytes]) -> Answer:
    """Answers the first request of each connection; closes, unanswered, on a second one:
    the race of a request sent just as the server's keep-alive timeout closes the connection."""
    answered: set[int] = set()

    async def answer(
        request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> bool:
        if n in answered:
            return False
        answered.add(n)
        writer.write(reply(body(request)))
        return True

    return answer


async def test_reused_connection_closed_before_answering_is_a_remote_protocol_error(
    transport: StreamTransport,
) -> None:
    async with (
        ScriptedServer(closing_unanswered_on_reuse(lambda r: b"ok")) as server,
        httpx.AsyncClient(transport=transport) as client,
    ):
        assert (await client.get(server.url)).content == b"ok"
        with pytest.raises(httpx.RemoteProtocolError, match="closed the connection without"):
            await client.get(server.url)


async def test_registry_client_retries_a_read_the_server_dropped(
    transport: StreamTransport,
) -> None:
    manifest = json.dumps({"schemaVersion": 2, "layers": []}).encode()
    answer = closing_unanswered_on_reuse(lambda r: manifest if "manifests" in r.target else b"{}")
    async with ScriptedServer(answer) as server:
        options = RegistryOptions(transport=transport, retry_backoff_seconds=0)
        async with RegistryClient(options) as client:
            repository = Repository(f"127.0.0.1:{server.port}", "demo")
            fetched = await client.get_manifest(repository, "v1")
    assert fetched.raw == manifest
    assert [r.target for r in server.requests] == ["/v2/", *["/v2/demo/manifests/v1"] * 2]
    assert server.connections == 2


async def test_garbage_is_a_remote_protocol_error(transport: StreamTransport) -> None:
    async with ScriptedServer(answering(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")) as server:
        with pytest.raises(httpx.RemoteProtocolError, match="malformed response") as raised:
            await fetch(transport, server.url)
    assert raised.value.request.url == server.url


async def test_truncated_body_is_a_remote_protocol_error(transport: StreamTransport) -> None:
    truncated = reply(b"0123456789")[:-4]
    async with ScriptedServer(answering(truncated, keep_alive=False)) as server:
        with pytest.raises(httpx.RemoteProtocolError, match="mid-response"):
            await fetch(transport, server.url)


async def test_server_that_never_answers_is_a_read_timeout(transport: StreamTransport) -> None:
    async def silent(
        request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> bool:
        await reader.read()  # until the client gives up
        return False

    async with ScriptedServer(silent) as server:
        with pytest.raises(httpx.ReadTimeout):
            await fetch(transport, server.url, timeout=httpx.Timeout(5.0, read=0.05))


async def test_refused_connection_is_a_connect_error(transport: StreamTransport) -> None:
    url = f"http://127.0.0.1:{free_port()}/v2/"
    with pytest.raises(httpx.ConnectError) as raised:
        await fetch(transport, url)
    assert isinstance(raised.value.__cause__, ConnectionRefusedError)
    host = url.split("/")[2]
    error = error_for_transport(raised.value, host)
    assert isinstance(error, Unreachable)
    assert str(error) == f"cannot connect to registry {host}: connection refused"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ssl.SSLContext]:
    directory = tmp_path_factory.mktemp("transport-pki")
    ca = make_test_ca(directory)
    certificate = issue_server_certificate(ca, directory)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certificate.cert_file, certificate.key_file)
    return ca.cert_file, server


async def test_tls_with_the_servers_ca(tls_files: tuple[Path, ssl.SSLContext]) -> None:
    ca_file, server_tls = tls_files
    transport = StreamTransport(lambda: ssl.create_default_context(cafile=str(ca_file)))
    async with (
        ScriptedServer(answering(reply(b"secret")), tls=server_tls) as server,
        httpx.AsyncClient(transport=transport) as client,
    ):
        for _ in range(2):
            assert (await client.get(server.url)).content == b"secret"
    assert server.connections == 1


async def test_tls_with_another_ca_is_a_certificate_error(
    tls_files: tuple[Path, ssl.SSLContext], tmp_path: Path
) -> None:
    _, server_tls = tls_files
    other_ca = make_test_ca(tmp_path, "another CA")
    transport = StreamTransport(lambda: ssl.create_default_context(cafile=str(other_ca.cert_file)))
    async with ScriptedServer(answering(reply(b"secret")), tls=server_tls) as server:
        with pytest.raises(httpx.ConnectError) as raised:
            await fetch(transport, server.url)
    assert isinstance(raised.value.__cause__, ssl.SSLCertVerificationError)
    host = f"127.0.0.1:{server.port}"
    error = error_for_transport(raised.value, host)
    assert isinstance(error, TLSFailure)
    assert str(error) == (
        f"TLS certificate of registry {host} could not be verified: unable to get local issuer "
        "certificate; pass --allow-insecure-registry only if you trust the network"
    )


async def test_concurrent_requests_wait_for_the_pools_connections() -> None:
    transport = StreamTransport(ssl.create_default_context, max_connections=2)

    async def answer(
        request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> bool:
        await asyncio.sleep(0)
        writer.write(reply(request.target.encode()))
        return True

    async with ScriptedServer(answer) as server, httpx.AsyncClient(transport=transport) as client:
        responses = await asyncio.gather(*(client.get(f"{server.url}/{i}") for i in range(20)))
    assert [r.content for r in responses] == [f"/{i}".encode() for i in range(20)]
    assert server.most_open_connections == 2
    assert server.connections == 2


async def test_pool_timeout_when_every_connection_is_busy() -> None:
    transport = StreamTransport(ssl.create_default_context, max_connections=1)
    async with (
        ScriptedServer(answering(reply(b"x" * 100))) as server,
        httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5.0, pool=0.05)) as client,
    ):
        async with client.stream("GET", server.url) as held:
            with pytest.raises(httpx.PoolTimeout):
                await client.get(server.url)
            assert await held.aread() == b"x" * 100
        assert (await client.get(server.url)).content == b"x" * 100
    assert server.connections == 1


async def test_abandoned_body_closes_its_connection(transport: StreamTransport) -> None:
    closed_by_client = asyncio.Event()

    async def answer(
        request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> bool:
        if n > 1:
            writer.write(reply(b"whole"))
            return True
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        if await reader.read() == b"":
            closed_by_client.set()
        return False

    async with ScriptedServer(answer) as server, httpx.AsyncClient(transport=transport) as client:
        async with client.stream("GET", server.url) as response:
            async for chunk in response.aiter_raw():
                assert chunk
                break
        await closed_by_client.wait()
        assert (await client.get(server.url)).content == b"whole"
    assert server.connections == 2


@pytest.mark.parametrize("asynchronous", [True, False])
async def test_streamed_request_body_is_sent_chunked(
    transport: StreamTransport, asynchronous: bool
) -> None:
    parts = [b"first,", b"", b"second"]

    async def async_parts() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    async with ScriptedServer(answering(reply(b"stored", "201 Created"))) as server:
        content = async_parts() if asynchronous else iter(parts)
        request = httpx.Request("PUT", server.url + "/upload", content=content)
        response = await transport.handle_async_request(request)
        assert await response.aread() == b"stored"
    assert server.requests[0].headers["transfer-encoding"] == "chunked"
    assert server.requests[0].body == b"first,second"


async def test_bytes_request_body_has_a_content_length(transport: StreamTransport) -> None:
    body = bytes(range(256)) * 1024  # larger than one read
    async with ScriptedServer(answering(reply(b"ok"))) as server:
        assert (await fetch(transport, server.url, "PATCH", content=body)).content == b"ok"
    assert server.requests[0].headers["content-length"] == str(len(body))
    assert server.requests[0].body == body


async def test_header_that_would_smuggle_another_is_refused(transport: StreamTransport) -> None:
    async with ScriptedServer(answering(reply(b"ok"))) as server:
        with pytest.raises(httpx.LocalProtocolError):
            await fetch(transport, server.url, headers={"Authorization": "x\r\nX-Evil: 1"})
    assert server.requests == []


async def test_endless_response_headers_are_refused(transport: StreamTransport) -> None:
    async def answer(
        request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(10_000):
            writer.write(b"X-Filler-%d: %s\r\n" % (i, b"x" * 64))
            await writer.drain()
        return False

    async with ScriptedServer(answer) as server:
        with pytest.raises(httpx.RemoteProtocolError, match="headers are too large"):
            await fetch(transport, server.url)


# --- the registry client's choice of transport -----------------------------------------------

PROXY_VARIABLES = [
    name
    for base in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    for name in (base, base.upper())
]


@pytest.mark.parametrize("no_proxy", ["", "127.0.0.1"])
async def test_environment_proxy_is_used_unless_no_proxy_names_the_registry(
    monkeypatch: pytest.MonkeyPatch, no_proxy: str
) -> None:
    registry = f"127.0.0.1:{free_port()}"  # nothing listens there: only the proxy answers
    manifest = json.dumps({"schemaVersion": 2, "layers": []}).encode()

    async def answer_as_the_registry(
        request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> bool:
        writer.write(reply(manifest if "/manifests/" in request.target else b"{}"))
        return True

    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    async with ScriptedServer(answer_as_the_registry) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", no_proxy)
        async with RegistryClient(RegistryOptions(max_retries=0)) as client:
            if no_proxy:
                with pytest.raises(Unreachable):
                    await client.get_manifest(Repository(registry, "demo"), "v1")
            else:
                assert (await client.get_manifest(Repository(registry, "demo"), "v1")).raw == (
                    manifest
                )
    proxied = (
        [] if no_proxy else [f"http://{registry}/v2/", f"http://{registry}/v2/demo/manifests/v1"]
    )
    assert [r.target for r in proxy.requests] == proxied


async def test_plain_http_registry_redirecting_blobs_to_https_storage(
    tls_files: tuple[Path, ssl.SSLContext],
) -> None:
    """The redirect's TLS is verified with the trust the options give, though the registry
    itself is reached over plain HTTP."""
    ca_file, server_tls = tls_files
    blob = b"stored elsewhere"
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    async with ScriptedServer(answering(reply(blob)), tls=server_tls) as storage:

        async def redirect_blobs(
            request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
        ) -> bool:
            if "/blobs/" not in request.target:
                writer.write(reply(b"{}"))
            else:
                writer.write(reply(b"", "307 Temporary Redirect", f"Location: {storage.url}/b"))
            return True

        async with ScriptedServer(redirect_blobs) as registry:
            repository = Repository(f"127.0.0.1:{registry.port}", "demo")
            async with RegistryClient(RegistryOptions(ca_bundle=ca_file)) as client:
                assert await client.get_blob(repository, digest) == blob
    assert [r.target for r in storage.requests] == ["/b"]


@pytest.mark.parametrize(
    ("idle_seconds", "max_idle_connections"), [(0.0, 20), (30.0, 0)], ids=["expired", "no-idle"]
)
async def test_idle_connections_beyond_the_limits_are_not_reused(
    idle_seconds: float, max_idle_connections: int
) -> None:
    transport = StreamTransport(
        ssl.create_default_context,
        idle_seconds=idle_seconds,
        max_idle_connections=max_idle_connections,
    )
    async with (
        ScriptedServer(answering(reply(b"ok"))) as server,
        httpx.AsyncClient(transport=transport) as client,
    ):
        for _ in range(3):
            assert (await client.get(server.url)).content == b"ok"
    assert server.connections == 3

