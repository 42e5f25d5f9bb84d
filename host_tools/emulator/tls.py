"""TLS for the MQTT listener with pyOpenSSL, so that any client certificate completes the handshake.

ThingsBoard's MQTTS listener asks for a client certificate (`setWantClientAuth`) and its trust manager accepts any
(`MqttSslHandlerProvider.ThingsboardMqttX509TrustManager.checkClientTrusted` catches its own lookup failure): an
unknown certificate is refused at CONNACK, not in the handshake. Python's `ssl` module cannot accept a
certificate it cannot verify, so the handshake runs in pyOpenSSL with a verify callback that accepts every
certificate, on memory BIOs under an asyncio protocol. The one chain ThingsBoard refuses in the handshake, a
certificate not signed by the next one in the chain the client sent (`validateCertificateChain`), is refused
right after it here.

After the handshake the session sees an ordinary `asyncio.StreamReader`/`StreamWriter` pair whose
`get_extra_info("client_certificate")` is the DER of the client's certificate, or None.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
_RECORD = 16384
_STREAM_LIMIT = 1 << 16

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def server_context(cert_file: str, key_file: str) -> SSL.Context:
    """A TLS 1.2/1.3 server context that asks for a client certificate and accepts whatever the client sends."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.use_certificate_chain_file(cert_file)
    ctx.use_privatekey_file(key_file)
    ctx.check_privatekey()
    ctx.set_verify(SSL.VERIFY_PEER, _accept_any)
    return ctx


def _accept_any(_conn: SSL.Connection, _cert: crypto.X509, _errno: int, _depth: int, _ok: int) -> bool:
    return True


def _chain_is_signed(chain: list[x509.Certificate]) -> bool:
    """Each certificate signed by the next one (ThingsBoard's validateCertificateChain); a single one always is."""
    for cert, issuer in zip(chain, chain[1:], strict=False):
        try:
            cert.verify_directly_issued_by(issuer)
        except (InvalidSignature, ValueError, TypeError):  # a bad signature, another issuer name, a key type
            return False
    return True


class _TlsTransport(asyncio.Transport):
    """The plaintext side of a TLS connection, as the StreamReaderProtocol above it sees a transport."""

    def __init__(self, tls: "TlsServerProtocol") -> None:
        super().__init__()
        self._tls = tls

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "client_certificate":
            return self._tls.client_certificate
        return self._tls.raw.get_extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._tls.send(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self._tls.raw.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._tls.raw.set_write_buffer_limits(high, low)

    def is_closing(self) -> bool:
        return self._tls.raw.is_closing()

    def close(self) -> None:
        self._tls.close()

    def abort(self) -> None:
        self._tls.raw.abort()

    def pause_reading(self) -> None:
        self._tls.raw.pause_reading()

    def resume_reading(self) -> None:
        self._tls.raw.resume_reading()

    def is_reading(self) -> bool:
        return self._tls.raw.is_reading()


class TlsServerProtocol(asyncio.Protocol):
    """One accepted TCP connection: the TLS handshake, then records in and out for a StreamReaderProtocol."""

    def __init__(self, context: SSL.Context, handler: Handler) -> None:
        self._context = context
        self._handler = handler
        self.raw: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self._conn: SSL.Connection | None = None
        self._app: asyncio.StreamReaderProtocol | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.client_certificate: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport  # type: ignore[assignment]
        self._conn = SSL.Connection(self._context, None)
        self._conn.set_accept_state()
        self._timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, self._handshake_timeout)

    def _handshake_timeout(self) -> None:
        log.info("mqtts %s: no TLS handshake within %.0f s, closing", self._peer(), HANDSHAKE_TIMEOUT)
        self.raw.abort()

    def _peer(self) -> str:
        return "%s:%s" % (self.raw.get_extra_info("peername") or ("?", "?"))[:2]

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        assert conn is not None
        conn.bio_write(data)
        try:
            if self._app is None:
                conn.do_handshake()
                if not self._handshake_done():
                    return
            while True:
                chunk = conn.recv(_RECORD)
                if not chunk:
                    break
                self._app.data_received(chunk)  # type: ignore[union-attr]
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:  # the client's close_notify
            self._flush()
            if self._app is not None:
                self._app.eof_received()
            self.raw.close()
            return
        except SSL.Error as e:
            log.info("mqtts %s: TLS failed (%s), closing", self._peer(), e)
            self._flush()
            self.raw.abort()
            return
        self._flush()

    def _handshake_done(self) -> bool:
        """Hand the connection to the MQTT session, unless its certificate chain is one ThingsBoard refuses."""
        conn = self._conn
        assert conn is not None
        if self._timer is not None:
            self._timer.cancel()
        peer = conn.get_peer_certificate(as_cryptography=True)
        if peer is not None:
            # On a server OpenSSL's peer chain leaves out the client's own certificate.
            chain = [peer, *(conn.get_peer_cert_chain(as_cryptography=True) or [])]
            if not _chain_is_signed(chain):
                log.info("mqtts %s: a certificate in the client's chain is not signed by the next one, closing",
                         self._peer())
                self._flush()
                self.raw.abort()
                return False
            self.client_certificate = peer.public_bytes(Encoding.DER)
        reader = asyncio.StreamReader(limit=_STREAM_LIMIT)
        self._app = asyncio.StreamReaderProtocol(reader, self._handler)
        self._app.connection_made(_TlsTransport(self))
        return True

    def send(self, data: bytes) -> None:
        """Encrypt application data and queue the records on the TCP transport."""
        conn = self._conn
        if conn is None or self.raw.is_closing():
            return
        view = memoryview(data)
        try:
            while view:
                sent = conn.send(view[:_RECORD])
                view = view[sent:]
        except SSL.Error as e:
            log.info("mqtts %s: TLS write failed (%s), closing", self._peer(), e)
            self.raw.abort()
            return
        self._flush()

    def close(self) -> None:
        """Send close_notify after what is queued, then close the TCP connection."""
        if self._conn is not None and not self.raw.is_closing():
            try:
                self._conn.shutdown()
            except SSL.Error:
                pass
            self._flush()
        self.raw.close()

    def _flush(self) -> None:
        conn = self._conn
        assert conn is not None
        while True:
            try:
                data = conn.bio_read(65536)
            except SSL.WantReadError:
                return
            if not data:
                return
            self.raw.write(data)

    def eof_received(self) -> bool | None:
        if self._app is not None:
            return self._app.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._app is not None:
            self._app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()
