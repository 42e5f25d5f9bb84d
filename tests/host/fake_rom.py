"""A fake ESP32-family ROM serial bootloader over TCP, for driving real esptool without hardware.

It speaks the documented serial protocol (SLIP frames; request = direction 0, opcode, u16 length, u32 checksum,
data; response = direction 1, opcode, u16 length, u32 value, data + status bytes) well enough for esptool's
`write-flash`, `read-flash`, `read-mac` and `erase-flash` with `--port socket://127.0.0.1:P --before no-reset`.
After a stub upload (MEM_BEGIN/DATA/END with an entry point) it greets with "OHAI" and answers as the flasher
stub does (2 status bytes, binary MD5, ERASE_FLASH/ERASE_REGION), so both `--no-stub` and the default stub path
work. The flash is a bytearray with NOR semantics: erase sets 0xFF, a write can only clear bits.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
import zlib
from dataclasses import dataclass, field

SECTOR = 0x1000
_END, _ESC, _ESC_END, _ESC_ESC = 0xC0, 0xDB, 0xDC, 0xDD

# Opcodes of the serial protocol.
FLASH_BEGIN, FLASH_DATA, FLASH_END = 0x02, 0x03, 0x04
MEM_BEGIN, MEM_END, MEM_DATA = 0x05, 0x06, 0x07
SYNC, WRITE_REG, READ_REG = 0x08, 0x09, 0x0A
SPI_SET_PARAMS, SPI_ATTACH, READ_FLASH_SLOW, CHANGE_BAUDRATE = 0x0B, 0x0D, 0x0E, 0x0F
FLASH_DEFL_BEGIN, FLASH_DEFL_DATA, FLASH_DEFL_END = 0x10, 0x11, 0x12
SPI_FLASH_MD5, GET_SECURITY_INFO = 0x13, 0x14
ERASE_FLASH, ERASE_REGION = 0xD0, 0xD1
WRITING = frozenset({FLASH_BEGIN, FLASH_DATA, FLASH_DEFL_BEGIN, FLASH_DEFL_DATA, ERASE_FLASH, ERASE_REGION})

_INVALID_COMMAND = 0x05
_BAD_CHECKSUM = 0x07


@dataclass(frozen=True)
class Chip:
    """What esptool reads to recognise a chip: magic register or security-info chip id, and the MAC's place."""

    name: str
    magic: int | None          # value at 0x40001000 for chips identified by magic (ESP32)
    chip_id: int | None        # chip id in GET_SECURITY_INFO for later chips
    mac_regs: tuple[int, int]  # (register with the low 4 MAC bytes, register with the high 2 bytes)
    uart_clkdiv_reg: int
    spi_w0_reg: int            # SPI data register where a flash command's answer (the JEDEC id) appears


CHIPS: dict[str, Chip] = {
    # ESP32: MAC in efuse words 1 (low 4 bytes) and 2 (top 2 bytes + CRC) at 0x3FF5A000.
    "esp32": Chip("esp32", 0x00F01D83, None, (0x3FF5A004, 0x3FF5A008), 0x3FF40014, 0x3FF42080),
    "esp32s3": Chip("esp32s3", None, 9, (0x60007044, 0x60007048), 0x60000014, 0x60002058),
    "esp32c3": Chip("esp32c3", None, 5, (0x60008844, 0x60008848), 0x60000014, 0x60002058),
}


def slip_encode(packet: bytes) -> bytes:
    """Frame `packet` as SLIP."""
    body = packet.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc")
    return b"\xc0" + body + b"\xc0"


def checksum(data: bytes) -> int:
    """The ROM's data checksum: XOR of all bytes, seeded with 0xEF."""
    state = 0xEF
    for b in data:
        state ^= b
    return state


@dataclass
class FakeRom:
    """A fake bootloader listening on 127.0.0.1:<free port>; `start()` it, `stop()` it, inspect `flash`."""

    chip: str = "esp32"
    mac: bytes = bytes.fromhex("246f28a1b2c3")
    flash_size: int = 4 * 1024 * 1024
    flash: bytearray = field(init=False)
    opcodes: list[int] = field(init=False, default_factory=list)
    connections: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.chip not in CHIPS:
            raise ValueError(f"fake ROM: unknown chip {self.chip!r}; known: {', '.join(CHIPS)}")
        if len(self.mac) != 6:
            raise ValueError("fake ROM: mac must be 6 bytes")
        self.flash = bytearray(b"\xff" * self.flash_size)
        self.spec = CHIPS[self.chip]
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> "FakeRom":
        """Listen on a free port and serve connections one after another in a daemon thread."""
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._thread = threading.Thread(target=self._serve, name="fake-rom", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()

    @property
    def port(self) -> int:
        assert self._listener is not None, "fake ROM not started"
        return self._listener.getsockname()[1]

    @property
    def url(self) -> str:
        """The pyserial URL esptool opens."""
        return f"socket://127.0.0.1:{self.port}"

    def wrote_flash(self) -> bool:
        """True once any command that changes the flash was received."""
        return any(op in WRITING for op in self.opcodes)

    # -- serving --------------------------------------------------------------------------------------------
    def _serve(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            with conn:
                conn.settimeout(0.1)
                _Session(self, conn).run()

    def registers(self) -> dict[int, int]:
        lo = int.from_bytes(self.mac[2:6], "big")
        hi = int.from_bytes(self.mac[0:2], "big")
        regs = {self.spec.mac_regs[0]: lo, self.spec.mac_regs[1]: hi,
                # 40 MHz crystal at 115200 baud: divider = 40e6 / 115200
                self.spec.uart_clkdiv_reg: 40_000_000 // 115200,
                # JEDEC id of a 4 MB Winbond W25Q32 (manufacturer 0xEF, device 0x4016), as RDID returns it
                self.spec.spi_w0_reg: 0x1640EF}
        if self.spec.magic is not None:
            regs[0x40001000] = self.spec.magic
        return regs


class _Session:
    """One TCP connection: a chip freshly in its ROM bootloader."""

    def __init__(self, rom: FakeRom, conn: socket.socket) -> None:
        self.rom = rom
        self.conn = conn
        self.stub = False
        self.regs = rom.registers()
        self.write_at = 0
        self.block_size = 0
        self.inflate: zlib._Decompress | None = None

    def run(self) -> None:
        for packet in self._packets():
            if len(packet) < 8 or packet[0] != 0:
                continue
            op, size, chk = struct.unpack_from("<BHI", packet, 1)
            data = packet[8:8 + size]
            self.rom.opcodes.append(op)
            self._dispatch(op, data, chk)

    def _packets(self):
        frame = bytearray()
        in_frame = escaped = False
        while not self.rom._stopping.is_set():
            try:
                chunk = self.conn.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not chunk:
                return
            for b in chunk:
                if not in_frame:
                    if b == _END:
                        in_frame, frame = True, bytearray()
                    continue
                if escaped:
                    frame.append(_END if b == _ESC_END else _ESC if b == _ESC_ESC else b)
                    escaped = False
                elif b == _ESC:
                    escaped = True
                elif b == _END:
                    if frame:
                        yield bytes(frame)
                        in_frame = False
                    # an empty frame means back-to-back delimiters: stay in frame
                else:
                    frame.append(b)

    def _send(self, op: int, value: int = 0, data: bytes = b"", error: int = 0) -> None:
        status = bytes([1 if error else 0, error]) + (b"" if self.stub else b"\x00\x00")
        body = data + status
        self.conn.sendall(slip_encode(struct.pack("<BBHI", 1, op, len(body), value) + body))

    def _erase(self, start: int, length: int) -> None:
        end = min(len(self.rom.flash), -(-(start + length) // SECTOR) * SECTOR)
        start -= start % SECTOR
        self.rom.flash[start:end] = b"\xff" * (end - start)

    def _program(self, payload: bytes) -> bool:
        """NOR-program `payload` at the write pointer; False if it would run past the end of the flash."""
        flash = self.rom.flash
        if self.write_at + len(payload) > len(flash):
            return False
        for i, b in enumerate(payload):
            flash[self.write_at + i] &= b
        self.write_at += len(payload)
        return True

    def _dispatch(self, op: int, data: bytes, chk: int) -> None:
        """Answer one request."""
        if op == SYNC:
            for _ in range(8):
                self._send(op, 0 if self.stub else 0x20120707)
        elif op == READ_REG:
            (addr,) = struct.unpack_from("<I", data)
            self._send(op, self.regs.get(addr, 0))
        elif op in (WRITE_REG, SPI_SET_PARAMS, SPI_ATTACH, CHANGE_BAUDRATE, MEM_BEGIN, MEM_DATA,
                    FLASH_END, FLASH_DEFL_END):
            self._send(op)
        elif op == MEM_END:
            self._send(op)
            no_entry, entry = struct.unpack_from("<II", data)
            if not no_entry and entry:
                self.stub = True
                self.conn.sendall(slip_encode(b"OHAI"))
        elif op in (FLASH_BEGIN, FLASH_DEFL_BEGIN):
            size, _blocks, self.block_size, offset = struct.unpack_from("<IIII", data)
            if offset + size > len(self.rom.flash):
                self._send(op, error=0x01)
                return
            self._erase(offset, size)
            self.write_at = offset
            self.inflate = zlib.decompressobj() if op == FLASH_DEFL_BEGIN else None
            self._send(op)
        elif op in (FLASH_DATA, FLASH_DEFL_DATA):
            length = struct.unpack_from("<I", data)[0]
            payload = data[16:16 + length]
            if checksum(payload) != chk:
                self._send(op, error=_BAD_CHECKSUM)
                return
            if self.inflate is not None:
                payload = self.inflate.decompress(payload)
            self._send(op, error=0 if self._program(payload) else 0x01)
        elif op == SPI_FLASH_MD5:
            addr, size = struct.unpack_from("<II", data)
            digest = hashlib.md5(self.rom.flash[addr:addr + size]).digest()
            self._send(op, data=digest if self.stub else digest.hex().encode())
        elif op == READ_FLASH_SLOW and not self.stub:
            addr, size = struct.unpack_from("<II", data)
            self._send(op, data=bytes(self.rom.flash[addr:addr + size]).ljust(64, b"\xff"))
        elif op == GET_SECURITY_INFO and self.rom.spec.chip_id is not None:
            self._send(op, data=struct.pack("<IB7xII", 0, 0, self.rom.spec.chip_id, 0))
        elif op == ERASE_FLASH and self.stub:
            self._erase(0, len(self.rom.flash))
            self._send(op)
        elif op == ERASE_REGION and self.stub:
            offset, size = struct.unpack_from("<II", data)
            self._erase(offset, size)
            self._send(op)
        else:
            self._send(op, error=_INVALID_COMMAND)


def build_image(chip: str, path, payload_size: int = 24 * 1024, seed: int = 1) -> bytes:
    """Write a syntactically valid firmware image for `chip` with esptool's own image classes; return its bytes."""
    import random

    from esptool.bin_image import ELFSection, ESP32C3FirmwareImage, ESP32FirmwareImage, ESP32S3FirmwareImage

    classes = {"esp32": ESP32FirmwareImage, "esp32s3": ESP32S3FirmwareImage, "esp32c3": ESP32C3FirmwareImage}
    rnd = random.Random(seed)
    # Half noise, half a repeating pattern: both the raw and the deflate paths get real work.
    noise = bytes(rnd.getrandbits(8) for _ in range(payload_size // 2))
    image = classes[chip]()
    image.entrypoint = 0x40080000
    image.segments = [ELFSection(b".iram0.text", 0x40080000, noise + b"tbfleet!" * (payload_size // 16), 0)]
    image.save(str(path))
    with open(path, "rb") as f:
        return f.read()
