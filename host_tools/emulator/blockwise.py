"""CoAP block-wise transfer (RFC 7959) for the emulator's CoAP server, as Californium's BlockwiseLayer does it
with the configuration ThingsBoard gives it (reference §5.1; DefaultCoapServerService.createNetworkConfiguration).

- Block1 (requests): blocks are collected per peer and URI until the last one, answered 2.31 Continue in between;
  the resource sees one request with the whole body, and its answer echoes the last Block1 option. A Size1 over the
  maximum resource body size is answered 4.13 at once, a block out of place or in another Content-Format 4.08.
- Block2 (responses): a body over MAX_MESSAGE_SIZE, or over the block size a request's Block2 option asks for, is
  cut into blocks; the first carries Size2, the following ones are served from the kept response without asking
  the resource again (as long as the transfer lives), a request for a block of a response nobody kept goes to the
  resource and its answer is cropped to that block (4.02 when the block is past its end). A request's Block2 with
  number 0 is always answered with a Block2 option (BLOCKWISE_STRICT_BLOCK2_OPTION).

Transfers live BLOCKWISE_STATUS_LIFETIME seconds after their last block; at most `max_transfers` of each kind and
`max_buffered` bytes of each kind are kept, the oldest given up first, so that garbage cannot grow memory (a
download given up still completes: its later blocks are cropped from the resource's answer each time).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

BLOCK2, BLOCK1, SIZE2, SIZE1 = 23, 27, 28, 60
CONTENT_FORMAT, OBSERVE, URI_PATH, URI_QUERY = 12, 6, 11, 15

CONTINUE, BAD_REQUEST, BAD_OPTION, REQUEST_ENTITY_INCOMPLETE, REQUEST_ENTITY_TOO_LARGE = 0x5F, 0x80, 0x82, 0x88, 0x8D

MAX_MESSAGE_SIZE = 1024
"""Californium MAX_MESSAGE_SIZE as ThingsBoard sets it: a longer response body goes block-wise."""

PREFERRED_SZX = 6
"""PREFERRED_BLOCK_SIZE 1024 (SZX 6): the block size the server uses unless the client asks for a smaller one."""

MAX_RESOURCE_BODY_SIZE = 256 * 1024 * 1024
"""MAX_RESOURCE_BODY_SIZE as ThingsBoard sets it: the largest body a Block1 upload may assemble."""

BLOCKWISE_STATUS_LIFETIME = 300.0
"""Californium's DEFAULT_BLOCKWISE_STATUS_LIFETIME_IN_SECONDS, which ThingsBoard passes on."""


class Answer(NamedTuple):
    """What the block-wise layer answers itself, without the resource: code, payload, options."""

    code: int
    payload: bytes = b""
    options: tuple[tuple[int, bytes], ...] = ()


class BlockError(ValueError):
    """A block option that is not one (more than 3 bytes, or SZX 7, reserved for BERT over TCP)."""


@dataclass(frozen=True)
class Block:
    """A Block1/Block2 option: block number, more flag, size exponent (size = 2 ** (szx + 4))."""

    num: int
    more: bool
    szx: int

    @property
    def size(self) -> int:
        """The block size in bytes."""
        return 1 << (self.szx + 4)

    @property
    def offset(self) -> int:
        """Where the block starts in the body."""
        return self.num * self.size

    @classmethod
    def decode(cls, value: bytes) -> "Block":
        """Parse an option value; BlockError when it is not a valid block option over UDP."""
        if len(value) > 3:
            raise BlockError("block option longer than 3 bytes")
        number = int.from_bytes(value, "big")
        if number & 7 == 7:
            raise BlockError("block size exponent 7 is reserved")
        return cls(number >> 4, bool(number & 8), number & 7)

    def encode(self) -> bytes:
        """The option value in its shortest form."""
        number = self.num << 4 | self.more << 3 | self.szx
        return number.to_bytes((number.bit_length() + 7) // 8, "big")

    def limited(self) -> "Block":
        """The same offset in blocks no larger than the preferred size (getLimitedBlockOption)."""
        if self.szx <= PREFERRED_SZX:
            return self
        return Block(self.offset >> (PREFERRED_SZX + 4), self.more, PREFERRED_SZX)


@dataclass
class _Upload:
    """The body of a Block1 transfer so far."""

    content_format: bytes | None
    capacity: int
    body: bytearray = field(default_factory=bytearray)
    touched: float = 0.0


@dataclass
class _Download:
    """A response (the server's Reply) being fetched block by block."""

    reply: Any
    touched: float = 0.0


def _option(options: list[tuple[int, bytes]], number: int) -> bytes | None:
    return next((v for n, v in options if n == number), None)


def _without(options: list[tuple[int, bytes]], *numbers: int) -> list[tuple[int, bytes]]:
    return [(n, v) for n, v in options if n not in numbers]


def _uint(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


class Blockwise:
    """The block-wise state of one CoAP endpoint: the uploads and downloads in progress, per peer and URI."""

    def __init__(self, max_body: int = MAX_RESOURCE_BODY_SIZE, lifetime: float = BLOCKWISE_STATUS_LIFETIME,
                 max_transfers: int = 500, max_buffered: int = 64 * 1024 * 1024) -> None:
        self.max_body = max_body
        self.lifetime = lifetime
        self.max_transfers = max_transfers
        self.max_buffered = max_buffered
        self._uploads: OrderedDict[tuple, _Upload] = OrderedDict()
        self._downloads: OrderedDict[tuple, _Download] = OrderedDict()

    @staticmethod
    def _key(msg: Any, addr: tuple) -> tuple:
        return addr, tuple(msg.option_values(URI_PATH)), tuple(msg.option_values(URI_QUERY))

    def _expire(self, now: float) -> None:
        for transfers in (self._uploads, self._downloads):
            while transfers and (now - next(iter(transfers.values())).touched > self.lifetime
                                 or len(transfers) > self.max_transfers):
                transfers.popitem(last=False)
        while self._uploads and sum(len(u.body) for u in self._uploads.values()) > self.max_buffered:
            self._uploads.popitem(last=False)
        # A download given up is not lost: its next block goes to the resource again and is cropped from its answer.
        while self._downloads and sum(len(d.reply.payload) for d in self._downloads.values()) > self.max_buffered:
            self._downloads.popitem(last=False)

    # --- requests ------------------------------------------------------------------------------------------------

    def receive(self, msg: Any, addr: tuple) -> Any:
        """The request (coap.Message) to hand to the resource, or the Answer to send instead of asking it.

        The request handed on is `msg` itself, or for the last block of an upload `msg` with the whole body.
        """
        now = time.monotonic()
        self._expire(now)
        try:
            block1 = self._block(msg, BLOCK1)
            block2 = self._block(msg, BLOCK2)
        except BlockError as e:
            return Answer(BAD_OPTION, str(e).encode())
        if block1 is not None:
            return self._upload(msg, addr, block1, now)
        if block2 is not None and block2.num > 0:
            download = self._downloads.get(self._key(msg, addr))
            if download is not None:
                served = self._next_block(self._key(msg, addr), download, block2.limited(), now)
                return Answer(served.code, served.payload, tuple(served.options))
        return msg

    @staticmethod
    def _block(msg: Any, number: int) -> Block | None:
        value = _option(msg.options, number)
        return None if value is None else Block.decode(value)

    def _upload(self, msg: Any, addr: tuple, block: Block, now: float) -> Any:
        size1 = _option(msg.options, SIZE1)
        if size1 is not None and int.from_bytes(size1, "big") > self.max_body:
            return Answer(REQUEST_ENTITY_TOO_LARGE, f"body too large, max. {self.max_body} bytes".encode(),
                          ((SIZE1, _uint(self.max_body)),))
        key = self._key(msg, addr)
        fmt = _option(msg.options, CONTENT_FORMAT)
        upload = self._uploads.get(key)
        if upload is None or (block.offset == 0 and upload.body):
            capacity = self.max_body if size1 is None else int.from_bytes(size1, "big")
            upload = self._uploads[key] = _Upload(fmt, capacity)
        elif upload.content_format != fmt:
            return self._incomplete(key, block, "unexpected Content-Format")
        if block.offset != len(upload.body):
            return self._incomplete(key, block, f"request block1 offset {block.offset} doesn't match the "
                                                      f"current position {len(upload.body)}!")
        if len(upload.body) + len(msg.payload) > upload.capacity:
            self._uploads.pop(key, None)
            return Answer(REQUEST_ENTITY_TOO_LARGE, f"response {len(msg.payload)} exceeds the left buffer "
                                                         f"{upload.capacity - len(upload.body)}".encode())
        upload.body += msg.payload
        upload.touched = now
        self._uploads.move_to_end(key)
        if block.more:
            if len(upload.body) % block.size:
                return self._incomplete(key, block, f"Block1 buffer position {len(upload.body)} doesn't "
                                                          f"align with blocksize {block.size}!")
            self._expire(now)
            return Answer(CONTINUE, options=((BLOCK1, block.limited().encode()),))
        del self._uploads[key]
        # The Block1 option stays: the response acknowledges it (exchange.setBlock1ToAck).
        return replace(msg, options=_without(msg.options, SIZE1), payload=bytes(upload.body))

    def _incomplete(self, key: tuple, block: Block, why: str) -> Answer:
        self._uploads.pop(key, None)
        return Answer(REQUEST_ENTITY_INCOMPLETE, why.encode())

    # --- responses -----------------------------------------------------------------------------------------------

    def respond(self, msg: Any, addr: tuple, reply: Any) -> Any:
        """The resource's `reply` (coap.Reply) to `msg` as it goes on the wire: cut to a block when needed, the
        acknowledged Block1 option added. A reply that sends nothing (code EMPTY) stays as it is."""
        if reply.code == 0:
            return reply
        block1 = _option(msg.options, BLOCK1)
        block2 = self._block(msg, BLOCK2)
        if block2 is not None and block2.num > 0:
            reply = self._crop(reply, block2.limited())
        elif len(reply.payload) > MAX_MESSAGE_SIZE or \
                (block2 is not None and len(reply.payload) > Block(0, False, min(block2.szx, PREFERRED_SZX)).size):
            key = self._key(msg, addr)
            download = _Download(reply, time.monotonic())
            self._downloads[key] = download
            self._downloads.move_to_end(key)
            wanted = block2.limited() if block2 is not None else Block(0, False, PREFERRED_SZX)
            reply = self._next_block(key, download, wanted, download.touched)
        elif block2 is not None:
            reply = replace(reply, options=_without(reply.options, BLOCK2) + [(BLOCK2, Block(0, False,
                                                                                              block2.szx).encode())])
        if block1 is not None:
            reply = replace(reply, options=_without(reply.options, BLOCK1) + [(BLOCK1, block1)])
        return reply

    def _next_block(self, key: tuple, download: _Download, block: Block, now: float) -> Any:
        """Block2BlockwiseStatus.getNextResponseBlock: the block asked for (Size2 on the first one)."""
        body = download.reply.payload
        chunk = body[block.offset:block.offset + block.size]
        more = block.offset + len(chunk) < len(body)
        options = _without(download.reply.options, BLOCK2, SIZE2)
        if block.num == 0:
            options.append((SIZE2, _uint(len(body))))
        else:
            options = _without(options, OBSERVE)
        options.append((BLOCK2, Block(block.num, more, block.szx).encode()))
        download.touched = now
        if more:
            self._downloads.move_to_end(key)
        else:
            self._downloads.pop(key, None)
        self._expire(now)
        return replace(download.reply, payload=chunk, options=options)

    @staticmethod
    def _crop(reply: Any, block: Block) -> Any:
        """A resource's whole answer to a request for one block of it: that block, or 4.02 past the end."""
        if reply.code >= BAD_REQUEST:
            return reply
        if block.offset >= len(reply.payload):
            return replace(reply, code=BAD_OPTION, payload=b"", options=[], observe=None)
        chunk = reply.payload[block.offset:block.offset + block.size]
        more = block.offset + len(chunk) < len(reply.payload)
        return replace(reply, payload=chunk,
                       options=_without(reply.options, BLOCK2) + [(BLOCK2, Block(block.num, more,
                                                                                 block.szx).encode())])
