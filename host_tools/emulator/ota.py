"""OTA packages as ThingsBoard defines them: types, checksum algorithms, attribute and telemetry key names.

Pure functions and data only; the storage and the effects of assigning a package live in `state.EmulatorState`.
The facts (and the ThingsBoard source files they come from) are in docs/thingsboard-notes.md, "OTA packages".
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import mmh3

FIRMWARE = "FIRMWARE"
SOFTWARE = "SOFTWARE"
TYPES = (FIRMWARE, SOFTWARE)

PREFIX = {FIRMWARE: "fw", SOFTWARE: "sw"}
"""OtaPackageType.keyPrefix: the prefix of the attribute, telemetry and MQTT topic names."""

# OtaPackageKey, in its declaration order: every shared attribute an unassignment deletes.
ATTRIBUTE_KEYS = ("title", "version", "ts", "state", "size", "checksum", "checksum_algorithm", "url", "tag")

# OtaPackageUpdateStatus: what the server writes (QUEUED, INITIATED) and what devices report afterwards.
STATES = ("QUEUED", "INITIATED", "DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING", "UPDATED", "FAILED")

MAX_NAME_LENGTH = 255
"""BaseOtaPackageDataValidator: title and version are at most 255 characters."""


def _hex_digest(name: str) -> Callable[[bytes], str]:
    return lambda data: hashlib.new(name, data).hexdigest()


# Guava's HashFunction.hashBytes(data).toString() (BaseOtaPackageService.generateChecksum): lowercase hex of
# HashCode.asBytes(). A 32-bit HashCode (CRC32, MURMUR3_32) is its int in little-endian byte order, so CRC32 of
# "123456789" (0xcbf43926) reads "2639f4cb"; MURMUR3_128 is h1 then h2, each little-endian (seed 0 for both).
CHECKSUMS: dict[str, Callable[[bytes], str]] = {
    "MD5": _hex_digest("md5"),
    "SHA256": _hex_digest("sha256"),
    "SHA384": _hex_digest("sha384"),
    "SHA512": _hex_digest("sha512"),
    "CRC32": lambda data: (zlib.crc32(data) & 0xFFFFFFFF).to_bytes(4, "little").hex(),
    "MURMUR3_32": lambda data: mmh3.mmh3_32_digest(data, 0).hex(),
    "MURMUR3_128": lambda data: mmh3.mmh3_x64_128_digest(data, 0).hex(),
}
CHECKSUM_ALGORITHMS = tuple(CHECKSUMS)
"""ChecksumAlgorithm, in its declaration order."""


class OtaError(ValueError):
    """A request ThingsBoard refuses with a DataValidationException; str() is its message (REST answers 400)."""


def checksum(algorithm: str, data: bytes) -> str:
    """ThingsBoard's checksum text of `data` with `algorithm` (one of CHECKSUM_ALGORITHMS).

    OtaError for an unknown algorithm or empty data, with the server's messages.
    """
    if algorithm not in CHECKSUMS:
        raise OtaError("Unknown checksum algorithm!")
    if not data:
        raise OtaError("OtaPackage data should be specified!")
    return CHECKSUMS[algorithm](data)


def java_int(text: str) -> int | None:
    """Integer.parseInt, which the OTA handlers apply to sizes and chunk numbers: an optionally signed run of
    decimal digits within 32 bits; None where it throws."""
    if not re.fullmatch(r"[+-]?\d+", text):
        return None
    value = int(text)
    return value if -2 ** 31 <= value < 2 ** 31 else None


def attribute_key(ota_type: str, key: str) -> str:
    """OtaPackageUtil.getAttributeKey: e.g. ("FIRMWARE", "title") -> "fw_title"."""
    return f"{PREFIX[ota_type]}_{key}"


def chunk(data: bytes, size: int, number: int) -> bytes:
    """The bytes CaffeineOtaPackageCache.get(id, size, chunk) returns: all of them for size < 1, else bytes
    [size*number, size*number+size) of `data`, empty past the end."""
    if size < 1:
        return data
    start = size * number
    return data[start:start + size]


@dataclass
class OtaPackage:
    """An OTA package's info (OtaPackageInfo) without its data; `profile` is the device profile's name."""

    id: str
    created_time: int
    profile: str | None
    type: str
    title: str
    version: str
    tag: str | None = None
    url: str | None = None
    file_name: str | None = None
    content_type: str | None = None
    checksum_algorithm: str | None = None
    checksum: str | None = None
    data_size: int | None = None
    additional_info: dict[str, Any] = field(default_factory=dict)

    @property
    def has_data(self) -> bool:
        """Whether a file was uploaded (a URL package never has one)."""
        return self.data_size is not None and not self.url

    def info(self) -> dict[str, Any]:
        """The package as the inspection API shows it (OtaPackageInfo's field names, the profile by name)."""
        return {"id": self.id, "createdTime": self.created_time, "profile": self.profile, "type": self.type,
                "title": self.title, "version": self.version, "tag": self.tag, "url": self.url,
                "hasData": self.has_data, "fileName": self.file_name, "contentType": self.content_type,
                "checksumAlgorithm": self.checksum_algorithm, "checksum": self.checksum, "dataSize": self.data_size,
                "additionalInfo": self.additional_info}

    def shared_attributes(self) -> tuple[dict[str, Any], list[str]]:
        """(attributes to set, keys to delete) when this package becomes a device's target.

        DefaultOtaPackageStateService.updateAttributes: title, version, tag (deleted when empty), then size,
        checksum algorithm and checksum with the url deleted; a URL package sets the url and only the others
        it has.
        """
        t = self.type
        values: dict[str, Any] = {attribute_key(t, "title"): self.title, attribute_key(t, "version"): self.version}
        remove: list[str] = []
        if self.tag:
            values[attribute_key(t, "tag")] = self.tag
        else:
            remove.append(attribute_key(t, "tag"))
        if self.url:
            values[attribute_key(t, "url")] = self.url
            for key, value in (("size", self.data_size), ("checksum_algorithm", self.checksum_algorithm),
                               ("checksum", self.checksum)):
                if value in (None, ""):
                    remove.append(attribute_key(t, key))
                else:
                    values[attribute_key(t, key)] = value
        else:
            values[attribute_key(t, "size")] = self.data_size
            values[attribute_key(t, "checksum_algorithm")] = self.checksum_algorithm
            values[attribute_key(t, "checksum")] = self.checksum
            remove.append(attribute_key(t, "url"))
        return values, remove
