"""HTTP/1.1 for the registry client: asyncio streams, responses parsed by httptools (llhttp).

httpx's default transport (httpcore over anyio) costs a verify of one image about 26 ms of
imports, and every request hundreds of microseconds of pool and stream bookkeeping, on a machine
whose local registry competes for the same cores. This transport does the little the registry
client needs: keep-alive connections per origin, bounded; bodies framed by Content-Length,
chunked or the connection's close; httpx's timeouts and exceptions. No HTTP/2, no proxies (the
client mounts httpx's own transport where a proxy applies), no request pipelining.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable

import httptools
import httpx

_READ_BYTES = 64 * 1024
# llhttp sets no bound on a response's head; h11 (httpx's default) stops at 64 KiB too.
_MAX_HEAD_BYTES = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_UNSAFE_VALUE = re.compile(rb"[\x00\r\n]")
_Origin = tuple[str, str, int]


class StreamTransport(httpx.AsyncBaseTransport):
    """An HTTP/1.1 connection pool for ``httpx.AsyncClient(transport=...)``.

    ``tls_context()`` gives the context of ``https`` connections (the URL's host is the server
    name), called as one is opened: a run that speaks only plain HTTP never pays for TLS set-up.
    At most ``max_connections`` connections per origin (scheme, host, port): a request beyond
    that waits for a free one, up to the pool timeout. Up to ``max_idle_connections`` per origin
    are kept for reuse, each for ``idle_seconds``.
    """

    def __init__(
        self,
        tls_context: Callable[[], ssl.SSLContext],
        *,
        max_connections: int = 100,
        max_idle_connections: int = 20,
        idle_seconds: float = 30.0,
    ) -> None:
        self._tls_context = tls_context
        self._max_connections = max_connections
        self._max_idle = max_idle_connections
        self._idle_seconds = idle_seconds
        self._pools: dict[_Origin, _Pool] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(
                f"unsupported URL scheme {url.scheme!r}", request=request
            )
        host = url.raw_host.decode("ascii")
        origin = (url.scheme, host, url.port or _DEFAULT_PORTS[url.scheme])
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = _Pool(self._max_connections, self._max_idle)
        timeouts = request.extensions.get("timeout", {})
        await pool.acquire(request, timeouts.get("pool"))
        connection: _Connection | None = None
        try:
            now = asyncio.get_running_loop().time()
            connection = pool.reusable(now - self._idle_seconds)
            if connection is None:
                connection = await self._connect(origin, request, timeouts.get("connect"))
            message = await connection.exchange(request, timeouts)
        except BaseException:
            if connection is not None:
                connection.abort()
            pool.release(None)
            raise
        body = _ResponseBody(pool, connection, message, request, timeouts.get("read"))
        return httpx.Response(
            message.status_code,
            headers=message.headers,
            stream=body,
            extensions={"http_version": message.http_version, "reason_phrase": message.reason},
        )

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        # Lets the aborted transports run connection_lost and close their sockets now, not
        # after the event loop is gone (an unclosed socket warning).
        await asyncio.sleep(0)

    async def _connect(
        self, origin: _Origin, request: httpx.Request, timeout: float | None
    ) -> _Connection:
        scheme, host, port = origin
        tls = self._tls_context() if scheme == "https" else None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=host if tls else None
                )
        except TimeoutError as e:
            raise httpx.ConnectTimeout("timed out connecting", request=request) from e
        except OSError as e:  # ssl.SSLError included: certificate and handshake failures
            raise httpx.ConnectError(str(e) or type(e).__name__, request=request) from e
        return _Connection(reader, writer)


class _Pool:
    """The connections to one origin: a slot per request in flight, idle ones kept for reuse.

    A request takes a slot before it takes a connection, and a connection is opened only when
    none is idle, so an origin never has more than ``max_connections`` open.
    """

    def __init__(self, max_connections: int, max_idle: int) -> None:
        self.slots = asyncio.Semaphore(max_connections)
        self.idle: deque[_Connection] = deque()
        self.max_idle = max_idle
        self.closed = False

    async def acquire(self, request: httpx.Request, timeout: float | None) -> None:
        if not self.slots.locked():
            await self.slots.acquire()
            return
        try:
            async with asyncio.timeout(timeout):
                await self.slots.acquire()
        except TimeoutError as e:
            raise httpx.PoolTimeout("timed out waiting for a connection", request=request) from e

    def reusable(self, expired_before: float) -> _Connection | None:
        """The most recently used idle connection still open; expired ones are closed."""
        while self.idle and self.idle[0].idle_since <= expired_before:
            self.idle.popleft().abort()
        while self.idle:
            connection = self.idle.pop()
            if connection.is_open():
                return connection
            connection.abort()
        return None

    def release(self, connection: _Connection | None) -> None:
        """Give back a request's slot, and its connection if it is fit for another request."""
        if connection is not None:
            if self.closed:
                connection.abort()
            else:
                connection.idle_since = asyncio.get_running_loop().time()
                self.idle.append(connection)
                if len(self.idle) > self.max_idle:
                    self.idle.popleft().abort()
        self.slots.release()

    def close(self) -> None:
        self.closed = True
        while self.idle:
            self.idle.popleft().abort()


class _Connection:
    """One HTTP/1.1 connection: requests written and responses read one at a time."""

    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def is_open(self) -> bool:
        """False when the server closed the connection (or it broke) while it was idle."""
        return not (
            self.reader.at_eof()
            or self.reader.exception() is not None
            or self.writer.transport.is_closing()
        )

    def abort(self) -> None:
        # The socket closes at once; a TLS close_notify is not needed by HTTP/1.1, whose
        # messages carry their own length, and waiting for the peer's would delay a close.
        self.writer.transport.abort()

    async def exchange(
        self, request: httpx.Request, timeouts: dict[str, float | None]
    ) -> _Response:
        """Send ``request`` and read the response up to its headers (and what body came)."""
        # A server that answers an upload before reading all of it (a 413) and resets the
        # connection makes this a WriteError, not its answer: asyncio's StreamReader raises the
        # reset before the data it holds. signgate's uploads (signatures, configs, bundles) fit
        # in the socket buffers, so they are sent whole before any answer.
        await self._send(request, timeouts.get("write"))
        response = _Response(request)
        await self.read_head(response, request, timeouts.get("read"))
        return response

    async def read_head(
        self, response: _Response, request: httpx.Request, timeout: float | None
    ) -> None:
        while not response.headers_complete:
            await self.receive(response, request, timeout)

    async def receive(
        self, response: _Response, request: httpx.Request, timeout: float | None
    ) -> None:
        try:
            async with asyncio.timeout(timeout):
                data = await self.reader.read(_READ_BYTES)
        except TimeoutError as e:
            raise httpx.ReadTimeout("timed out reading the response", request=request) from e
        except OSError as e:
            raise httpx.ReadError(str(e) or type(e).__name__, request=request) from e
        if data:
            response.feed(data)
        else:
            response.end_of_stream()

    async def _send(self, request: httpx.Request, timeout: float | None) -> None:
        head = _request_head(request)
        chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"
        try:
            body: bytes | None = request.content
        except httpx.RequestNotRead:  # a streamed body
            body = None
        try:
            async with asyncio.timeout(timeout):
                if body is not None and not chunked and len(body) <= _READ_BYTES:
                    self.writer.write(head + body)  # one segment for the usual small request
                else:
                    self.writer.write(head)
                    async for part in _parts(request.stream):
                        if part:
                            self.writer.write(_chunk(part) if chunked else part)
                            await self.writer.drain()
                    if chunked:
                        self.writer.write(b"0\r\n\r\n")
                await self.writer.drain()
        except TimeoutError as e:
            raise httpx.WriteTimeout("timed out sending the request", request=request) from e
        except OSError as e:
            raise httpx.WriteError(str(e) or type(e).__name__, request=request) from e


def _request_head(request: httpx.Request) -> bytes:
    method = request.method.encode("ascii")
    if not _TOKEN.fullmatch(method):
        raise httpx.LocalProtocolError(f"invalid method {request.method!r}", request=request)
    lines = [b"%s %s HTTP/1.1\r\n" % (method, request.url.raw_path)]
    for name, value in request.headers.raw:
        # A header value from a registry (a token, a location) must not smuggle in another.
        if not _TOKEN.fullmatch(name) or _UNSAFE_VALUE.search(value):
            raise httpx.LocalProtocolError("invalid request header", request=request)
        lines.append(b"%s: %s\r\n" % (name, value))
    lines.append(b"\r\n")
    return b"".join(lines)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _parts(stream: AsyncIterable[bytes] | Iterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(stream, AsyncIterable):
        async for part in stream:
            yield part
    else:
        for part in stream:
            yield part


class _Response:
    """One response as httptools parses it off the wire: the callbacks and what they build.

    A fresh parser per response, because llhttp cannot be told that a response to HEAD has no
    body, and must not take the next response on the connection as one.
    """

    def __init__(self, request: httpx.Request) -> None:
        self.request = request
        self.head_only = request.method == "HEAD"
        self.status_code = 0
        self.reason = b""
        self.http_version = b"HTTP/1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.headers_complete = False
        self.complete = False
        self.until_close = False  # the body ends when the server closes the connection
        self.keep_alive = True
        self.received = 0  # bytes
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self._parser is None:
            self.keep_alive = False  # bytes after the whole response: not a clean connection
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            raise self._protocol_error("the server switched protocols unasked") from e
        except httptools.HttpParserError as e:
            if not self.complete:
                raise self._protocol_error(f"malformed response: {e}") from e
            self.keep_alive = False
        if self.complete:
            self._parser = None  # also breaks the parser <-> callbacks cycle
        elif not self.headers_complete and self.received > _MAX_HEAD_BYTES:
            raise self._protocol_error("the response's headers are too large")

    def end_of_stream(self) -> None:
        if self.headers_complete and self.until_close and not self.complete:
            self.complete = True
            self.keep_alive = False
            self._parser = None
            return
        if not self.received:
            raise self._protocol_error("the server closed the connection without answering")
        raise self._protocol_error("the server closed the connection mid-response")

    def _protocol_error(self, message: str) -> httpx.RemoteProtocolError:
        self._parser = None
        return httpx.RemoteProtocolError(message, request=self.request)

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.headers_complete:
            self.keep_alive = False  # a second response to one request

    def on_status(self, status: bytes) -> None:
        if not self.headers_complete:
            self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.headers_complete:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if status < 200:  # 1xx: informational, the real response follows
            self.headers, self.reason = [], b""
            return
        if self.headers_complete:
            return
        version = self._parser.get_http_version()
        self.status_code = status
        self.http_version = f"HTTP/{version}".encode("ascii")
        self.headers_complete = True
        connection = b",".join(v for k, v in self.headers if k.lower() == b"connection")
        if version != "1.1" or b"close" in {t.strip() for t in connection.lower().split(b",")}:
            self.keep_alive = False
        if self.head_only or status in (204, 304):
            self.complete = True
            return
        framed = any(
            k.lower() == b"content-length"
            or (k.lower() == b"transfer-encoding" and v.lower().rstrip().endswith(b"chunked"))
            for k, v in self.headers
        )
        self.until_close = not framed

    def on_body(self, body: bytes) -> None:
        if self.complete:
            self.keep_alive = False  # a body where none may be (HEAD, 204, 304)
        elif self.headers_complete:
            self.body.append(body)

    def on_message_complete(self) -> None:
        if self.headers_complete:
            self.complete = True


class _ResponseBody(httpx.AsyncByteStream):
    """The body as it arrives; the connection goes back to the pool when it has all been read
    and the response allows keep-alive, and is closed when the body is abandoned."""

    def __init__(
        self,
        pool: _Pool,
        connection: _Connection,
        response: _Response,
        request: httpx.Request,
        timeout: float | None,
    ) -> None:
        self._pool = pool
        self._connection: _Connection | None = connection
        self._response = response
        self._request = request
        self._timeout = timeout
        if response.complete and not response.body:
            self._finish()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        response = self._response
        while not response.body:
            if response.complete:
                self._finish()
            if self._connection is None:
                raise StopAsyncIteration
            try:
                await self._connection.receive(response, self._request, self._timeout)
            except BaseException:
                self._discard()
                raise
        data = b"".join(response.body) if len(response.body) > 1 else response.body[0]
        response.body.clear()
        if response.complete:
            self._finish()
        return data

    async def aclose(self) -> None:
        self._discard()

    def _finish(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if not self._response.keep_alive:
            connection.abort()
            connection = None
        self._pool.release(connection)

    def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.abort()
            self._pool.release(None)
