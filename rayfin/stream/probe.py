"""A synchronous Kafka liveness probe.

An open TCP port only proves that something listens; a Kafka ``ApiVersions`` round trip
proves that a broker speaks the protocol. This is the cheapest request every Kafka
broker (and tansu) must answer, and it needs no client library or event loop.
"""

from __future__ import annotations

import itertools
import socket
import struct

_API_VERSIONS = 18
_correlation_ids = itertools.count(1)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed mid-response")
        chunks += chunk
    return bytes(chunks)


def kafka_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a Kafka broker at ``host:port`` answers an ApiVersions (v0) request."""
    correlation_id = next(_correlation_ids) & 0x7FFFFFFF
    client_id = b"rayfin-probe"
    # Request header v1: api_key, api_version, correlation_id, client_id (int16-prefixed).
    body = struct.pack(">hhih", _API_VERSIONS, 0, correlation_id, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack(">i", len(body)) + body)
            (size,) = struct.unpack(">i", _recv_exact(sock, 4))
            if size < 6:
                return False
            payload = _recv_exact(sock, size)
    except (OSError, ConnectionError):
        return False
    got_id, error_code = struct.unpack(">ih", payload[:6])
    return got_id == correlation_id and error_code == 0
