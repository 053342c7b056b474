#!/usr/bin/env python3
"""py-broker: a minimal LLM broker in Python (standard library only, asyncio).

It exists so brokerprobe's end-to-end tests can show that socket-only mode (eBPF
tracepoints on the broker's TCP sockets, no markers) works for a broker that is
not written in Rust. Clients POST /v1/chat/completions over HTTP/1.1 keep-alive;
each request is forwarded to one upstream over a pool of keep-alive connections,
and chunked (SSE) upstream responses are relayed to the client chunk by chunk.
"""
import argparse
import asyncio
import json
import logging
import signal
import socket
import sys
from http import HTTPStatus
from urllib.parse import urlsplit

log = logging.getLogger("py-broker")
HEAD_LIMIT = 64 * 1024  # StreamReader limit: longest head or chunk-size line accepted
MAX_BODY = 16 * 1024 * 1024
CONNECT_TIMEOUT = 10.0
# What a broken or vanished upstream can raise while we talk to it.
UPSTREAM_ERRORS = (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError)


class BadRequest(ValueError):
    """Malformed HTTP; `status` is what a client gets back for it."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


class ClientGone(Exception):
    """The inbound client disconnected; kept apart from upstream failures."""


def set_nodelay(writer):
    # asyncio already does this for TCP transports; explicit because small SSE
    # chunks must not wait for delayed ACKs (Nagle), which would skew timings.
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def read_head(reader):
    """Read one HTTP head: (start line, {lowercase name: value}), or None on clean EOF."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise BadRequest("connection closed inside a head") from e
    except asyncio.LimitOverrunError as e:
        raise BadRequest("head too large") from e
    lines = raw.decode("latin-1").split("\r\n")[:-2]
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(f"bad header line {line!r}")
        headers[name.lower()] = value.strip()
    return lines[0], headers


def content_length(headers):
    value = headers.get("content-length", "0")
    if not (value.isascii() and value.isdigit()):
        raise BadRequest(f"bad content-length {value!r}")
    return int(value)


def head(status, headers, reason=None):
    lines = [f"HTTP/1.1 {status} {reason or HTTPStatus(status).phrase}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def send(writer, data):
    """Write to the client; a dropped client raises ClientGone."""
    try:
        writer.write(data)
        await writer.drain()
    except ConnectionError as e:
        raise ClientGone() from e


async def respond(writer, status, body, content_type, extra):
    headers = {"Content-Type": content_type, "Content-Length": len(body), **extra}
    await send(writer, head(status, headers) + body)


async def respond_error(writer, status, message, kind, extra):
    body = json.dumps({"error": {"message": message, "type": kind}}).encode()
    await respond(writer, status, body, "application/json", extra)


async def bad_gateway(writer, error, extra):
    log.error("upstream failed: %r", error)
    await respond_error(writer, 502, f"upstream: {error!r}", "upstream_unreachable", extra)


class UpstreamPool:
    """Keep-alive connections to the upstream: reuse idle ones, open at most `size`."""

    def __init__(self, url, size):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"--upstream must be http://HOST:PORT, got {url!r}")
        if size < 1:
            raise ValueError("--pool-size must be at least 1")
        self.host, self.port, self.netloc = parts.hostname, parts.port or 80, parts.netloc
        self.path = parts.path.rstrip("/") + "/v1/chat/completions"
        self.idle = []  # LIFO, so the most recently used (warmest) connection goes first
        self.slots = asyncio.Semaphore(size)  # connections in use; idle + in use <= size

    async def acquire(self):
        """Return (reader, writer, reused), waiting while all `size` connections are busy."""
        await self.slots.acquire()
        while self.idle:
            reader, writer = self.idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer, True
            writer.close()  # the upstream closed it while it sat idle
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), CONNECT_TIMEOUT)
        except BaseException:
            self.slots.release()
            raise
        set_nodelay(writer)
        return reader, writer, False

    def release(self, reader, writer, reusable):
        """Give a connection back; only one whose response was read completely is kept."""
        if reusable and not reader.at_eof() and not writer.is_closing():
            self.idle.append((reader, writer))
        else:
            writer.close()
        self.slots.release()

    def request(self, headers, body):
        """The upstream request bytes for a client request's headers and body."""
        lines = [f"POST {self.path} HTTP/1.1", f"Host: {self.netloc}",
                 f"Content-Type: {headers.get('content-type', 'application/json')}",
                 f"Authorization: {headers.get('authorization', 'Bearer py-broker-key')}"]
        if "x-request-id" in headers:
            lines.append(f"X-Request-Id: {headers['x-request-id']}")
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    async def exchange(self, request):
        """Send `request`; return (reader, writer, version, status, reason, headers) with
        the connection still held. A reused connection that the upstream closed just
        before we used it is retried on another one, as HTTP clients commonly do."""
        while True:
            reader, writer, reused = await self.acquire()
            try:
                writer.write(request)
                await writer.drain()
                got = await read_head(reader)
                if got is not None:
                    version, status, reason = (got[0].split(" ", 2) + [""])[:3]
                    if not version.startswith("HTTP/1.") or not status.isdigit():
                        raise BadRequest(f"bad upstream status line {got[0]!r}")
                    return reader, writer, version, int(status), reason, got[1]
            except ConnectionError:
                got = None  # handled like a close without a response, below
            except BaseException:
                self.release(reader, writer, False)
                raise
            self.release(reader, writer, False)
            if not reused:
                raise ConnectionError("upstream closed the connection without responding")


async def relay_chunks(up_reader, writer):
    """Copy a chunked upstream body to the client, each chunk as soon as it is read."""
    while True:
        size_line = await up_reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)  # drop chunk extensions
        if size == 0:  # (a negative size makes readexactly raise ValueError)
            break
        data = await up_reader.readexactly(size)
        if await up_reader.readexactly(2) != b"\r\n":
            raise ValueError("chunk data not followed by CRLF")
        await send(writer, b"%x\r\n%s\r\n" % (size, data))
    while await up_reader.readuntil(b"\r\n") != b"\r\n":
        pass  # trailers: read so the connection can be reused, not forwarded


async def proxy(writer, pool, headers, body, extra):
    """Forward one chat request; return False if the client connection must close."""
    try:
        up_reader, up_writer, version, status, reason, up_headers = \
            await pool.exchange(pool.request(headers, body))
    except UPSTREAM_ERRORS as e:
        await bad_gateway(writer, e, extra)
        return True
    ctype = up_headers.get("content-type")
    out = {"Content-Type": ctype, **extra} if ctype else dict(extra)
    reusable, head_sent = False, False
    keep = version == "HTTP/1.1" and up_headers.get("connection", "").lower() != "close"
    try:
        if "chunked" in up_headers.get("transfer-encoding", "").lower():
            await send(writer, head(status, {**out, "Transfer-Encoding": "chunked"}, reason))
            head_sent = True
            await relay_chunks(up_reader, writer)
            reusable = keep  # upstream body fully read, whatever the client does now
            await send(writer, b"0\r\n\r\n")
        else:
            if "content-length" in up_headers:
                data = await up_reader.readexactly(content_length(up_headers))
            else:  # delimited by close: the connection cannot be reused
                data, keep = await up_reader.read(), False
            reusable = keep
            await send(writer, head(status, {**out, "Content-Length": len(data)}, reason) + data)
        return True
    except UPSTREAM_ERRORS as e:
        if head_sent:  # closing without the terminator tells the client it was cut short
            log.error("upstream failed mid-stream: %r", e)
            return False
        await bad_gateway(writer, e, extra)
        return True
    finally:  # on ClientGone or cancellation `reusable` may be False: the conn is closed
        pool.release(up_reader, up_writer, reusable)


async def handle_one(reader, writer, pool):
    """Serve one request on a client connection; return whether to keep it open."""
    try:
        got = await read_head(reader)
        if got is None:
            return False
        parts = got[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise BadRequest(f"bad request line {got[0]!r}")
        (method, target, version), headers = parts, got[1]
        if "transfer-encoding" in headers:
            raise BadRequest("chunked request bodies are not supported", 411)
        length = content_length(headers)
        if length > MAX_BODY:
            raise BadRequest("request body too large", 413)
        if headers.get("expect", "").lower() == "100-continue":
            await send(writer, b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits for this
        body = await reader.readexactly(length)
    except (BadRequest, asyncio.IncompleteReadError) as e:
        await respond_error(writer, getattr(e, "status", 400), str(e), "invalid_request_error",
                            {"Connection": "close"})
        return False
    keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    extra = {"X-Request-Id": headers["x-request-id"]} if "x-request-id" in headers else {}
    if not keep:
        extra["Connection"] = "close"
    path = target.split("?", 1)[0]
    routes = {"/health": "GET", "/v1/chat/completions": "POST"}
    if path not in routes:
        await respond_error(writer, 404, f"no route for {path}", "not_found", extra)
    elif method != routes[path]:
        await respond_error(writer, 405, f"use {routes[path]} for {path}", "method_not_allowed",
                            extra)
    elif path == "/health":
        await respond(writer, 200, b"ok", "text/plain", extra)
    else:
        keep = await proxy(writer, pool, headers, body, extra) and keep
    return keep


async def serve_client(reader, writer, pool):
    set_nodelay(writer)
    try:
        while await handle_one(reader, writer, pool):
            pass
    except (ClientGone, ConnectionError):
        pass  # the client went away; nothing to answer
    except asyncio.CancelledError:
        pass  # shutdown; re-raising makes Python 3.11's start_server log a traceback
    except Exception:
        log.exception("client connection failed")
    finally:
        writer.close()


async def main(args):
    pool = UpstreamPool(args.upstream, args.pool_size)
    host, _, port = args.listen.rpartition(":")
    server = await asyncio.start_server(lambda r, w: serve_client(r, w, pool),
                                        host.strip("[]") or None, int(port), limit=HEAD_LIMIT)
    ip, port = server.sockets[0].getsockname()[:2]
    print(f"listening on {f'[{ip}]' if ':' in ip else ip}:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()  # asyncio.run then cancels the connection tasks, closing their sockets


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="IP:PORT to listen on (port 0 = any)")
    parser.add_argument("--upstream", required=True, help="http://HOST:PORT of the provider")
    parser.add_argument("--pool-size", type=int, default=64, help="max upstream connections")
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="py-broker: %(message)s")
    try:
        asyncio.run(main(parser.parse_args()))
    except ValueError as e:
        sys.exit(f"py-broker: {e}")
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed
        pass
