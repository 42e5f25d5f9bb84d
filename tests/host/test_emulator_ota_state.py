"""OTA packages in the emulator's state: checksums, packages, assignments and their effects (REST reference §7,
device reference §6.5; facts in docs/thingsboard-notes.md)."""

from __future__ import annotations

import base64
import copy
import json

import pytest

from emulator_fixtures import ALLOW_KEY, ALLOW_SECRET, CONFIG
from host_tools.emulator import ota
from host_tools.emulator.ota import OtaError
from host_tools.emulator.state import ConfigError, EmulatorState, load_config

FOX = b"The quick brown fox jumps over the lazy dog"
FW_KEYS = ["fw_title", "fw_version", "fw_size", "fw_checksum_algorithm", "fw_checksum"]


def make(config: dict | None = None, db: str = ":memory:") -> tuple[EmulatorState, list[str]]:
    events: list[str] = []
    return EmulatorState(config or CONFIG, db, events=events.append), events


def pushes(state: EmulatorState, name: str) -> list[object]:
    got: list[object] = []
    state.listen(name, lambda kind, data: got.append(data) if kind == "attributes" else None)
    return got


def firmware(state: EmulatorState, data: bytes = FOX, version: str = "1.0", profile: str = "check",
             algorithm: str = "SHA256", **info: object) -> ota.OtaPackage:
    package = state.create_package("fw", version, "FIRMWARE", profile, **info)
    return state.upload_package_data(package.id, data, file_name="fw.bin", content_type="application/octet-stream",
                                     checksum_algorithm=algorithm)


@pytest.mark.parametrize("algorithm, expected", [
    ("MD5", "9e107d9d372bb6826bd81d3542a419d6"),
    ("SHA256", "d7a8fbb307d7809469ca9abcb0082e4f8d5651e46d3cdb762d02d0bf37c9e592"),
    ("SHA384", "ca737f1014a48f4c0b6dd43cb177b0afd9e5169367544c494011e3317dbf9a509cb1e5dc1e85a941bbee3d7f2afbc9b1"),
    ("SHA512", "07e547d9586f6a73f73fbac0435ed76951218fb7d0c8d788a309d785436bbb642e93a252a954f23912547d1e8a3b5ed6e1"
               "bfd7097821233fa0538f3db854fee6"),
    # Guava prints a 32-bit HashCode little-endian: CRC32 0x414fa339 and MurmurHash3_x86_32 0x2e4ff723.
    ("CRC32", "39a34f41"),
    ("MURMUR3_32", "23f74f2e"),
    ("MURMUR3_128", "6c1b07bc7bbc4be347939ac4a93c437a"),
])
def test_checksums_are_guava_hash_code_strings(algorithm, expected):
    assert ota.checksum(algorithm, FOX) == expected


def test_crc32_check_value_is_little_endian():
    assert ota.checksum("CRC32", b"123456789") == "2639f4cb"  # CRC-32 check value 0xcbf43926


def test_checksum_refuses_empty_data_and_unknown_algorithms():
    with pytest.raises(OtaError, match="^OtaPackage data should be specified!$"):
        ota.checksum("MD5", b"")
    with pytest.raises(OtaError, match="^Unknown checksum algorithm!$"):
        ota.checksum("SHA1", FOX)


def test_chunks_as_the_package_cache_cuts_them():
    assert ota.chunk(b"abcdefg", 0, 5) == b"abcdefg"
    assert ota.chunk(b"abcdefg", 3, 0) == b"abc"
    assert ota.chunk(b"abcdefg", 3, 2) == b"g"
    assert ota.chunk(b"abcdefg", 3, 3) == b""


def test_create_upload_list_get_download():
    state, events = make()
    created = state.create_package("fw", "1.0", "FIRMWARE", "check", tag="fw 1.0", additional_info={"d": 1})
    assert not created.has_data and created.checksum is None and created.additional_info == {"d": 1}
    assert state.packages(assignable=True) == []
    uploaded = state.upload_package_data(created.id, FOX, file_name="fw.bin", content_type="application/x-bin",
                                         checksum_algorithm="MD5")
    assert uploaded.has_data and uploaded.data_size == len(FOX)
    assert (uploaded.checksum_algorithm, uploaded.checksum) == ("MD5", "9e107d9d372bb6826bd81d3542a419d6")
    assert state.package(created.id) == uploaded
    assert state.package_by_title("fw", "1.0") == uploaded
    assert state.package_data(created.id) == FOX
    assert state.packages() == [uploaded] == state.packages("check", "FIRMWARE", assignable=True)
    assert state.packages("check", "SOFTWARE") == [] == state.packages("allow")
    assert any("9e107d9d" in e for e in events)


def test_upload_verifies_a_given_checksum_case_sensitively():
    state, _ = make()
    package = state.create_package("fw", "1.0", "FIRMWARE", "check")
    good = ota.checksum("SHA256", FOX)
    for wrong in (good.upper(), "00" + good[2:]):
        with pytest.raises(OtaError, match="^Wrong otaPackage file!$"):
            state.upload_package_data(package.id, FOX, file_name="f", content_type="c", checksum_algorithm="SHA256",
                                      checksum=wrong)
    assert state.upload_package_data(package.id, FOX, file_name="f", content_type="c", checksum_algorithm="SHA256",
                                     checksum=good).checksum == good


@pytest.mark.parametrize("kwargs, message", [
    ({"title": ""}, "OtaPackage title should be specified!"),
    ({"version": ""}, "OtaPackage version should be specified!"),
    ({"ota_type": "BOOTLOADER"}, "Type should be specified!"),
    ({"title": "t" * 256}, "The length of title should be equal or shorter than 255"),
    ({"profile": "nope"}, "OtaPackage is referencing to non-existent device profile!"),
])
def test_create_refusals(kwargs, message):
    state, _ = make()
    args = {"title": "fw", "version": "1.0", "ota_type": "FIRMWARE", "profile": "check", **kwargs}
    with pytest.raises(OtaError) as e:
        state.create_package(args.pop("title"), args.pop("version"), args.pop("ota_type"), args.pop("profile"))
    assert str(e.value) == message


def test_title_and_version_are_unique_and_data_cannot_be_replaced():
    state, _ = make()
    package = firmware(state)
    with pytest.raises(OtaError, match="^OtaPackage with such title and version already exists!$"):
        state.create_package("fw", "1.0", "SOFTWARE", "allow")
    with pytest.raises(OtaError, match="^Updating otaPackage data is prohibited!$"):
        state.upload_package_data(package.id, b"other", file_name="f", content_type="c", checksum_algorithm="MD5")
    url = state.create_package("fw", "2.0", "FIRMWARE", "check", url="http://example.invalid/fw.bin")
    with pytest.raises(OtaError, match="^File can't be saved if URL present!$"):
        state.upload_package_data(url.id, FOX, file_name="f", content_type="c", checksum_algorithm="MD5")
    with pytest.raises(OtaError, match="^OtaPackage data should be specified!$"):
        state.upload_package_data(state.create_package("fw", "3.0", "FIRMWARE", "check").id, b"", file_name="f",
                                  content_type="c", checksum_algorithm="MD5")
    with pytest.raises(KeyError):
        state.upload_package_data("no-such-id", FOX, file_name="f", content_type="c", checksum_algorithm="MD5")


def test_assigning_to_a_device_sets_and_pushes_the_shared_attributes_and_records_the_state():
    state, _ = make()
    package = firmware(state, tag="fw 1.0")
    got = pushes(state, "pre-token")
    state.assign_device_package("pre-token", "FIRMWARE", package.id)
    shared = state.attributes("pre-token")["shared"]
    assert shared == {"fw_title": "fw", "fw_version": "1.0", "fw_tag": "fw 1.0", "fw_size": len(FOX),
                      "fw_checksum_algorithm": "SHA256", "fw_checksum": package.checksum}
    assert got == [{"deleted": ["fw_url"]}, shared]
    assert list(got[1]) == ["fw_title", "fw_version", "fw_tag", "fw_size", "fw_checksum_algorithm", "fw_checksum"]
    queued, initiated = state.telemetry("pre-token")
    assert queued["values"] == {"target_fw_title": "fw", "target_fw_version": "1.0", "target_fw_tag": "fw 1.0",
                                "target_fw_ts": queued["ts"], "fw_state": "QUEUED"}
    assert initiated["values"] == {"fw_state": "INITIATED"}
    assert state.resolve_package("pre-token", "FIRMWARE") == package
    assert state.ota_request(state.device("pre-token"), "FIRMWARE") == ("SUCCESS", package)
    assert state.ota_request(state.device("pre-token"), "SOFTWARE") == ("NOT_FOUND", None)


def test_the_devices_own_package_wins_over_the_profiles():
    state, _ = make()
    mine, theirs = firmware(state, version="1.0"), firmware(state, version="2.0")
    state.assign_device_package("pre-token", "FIRMWARE", mine.id)
    got = pushes(state, "pre-token")
    state.assign_profile_package("check", "FIRMWARE", theirs.id)
    assert got == []  # the device has its own package: the profile's change does not reach it
    assert state.resolve_package("pre-token", "FIRMWARE") == mine
    assert state.attributes("pre-basic")["shared"]["fw_version"] == "2.0"
    state.assign_device_package("pre-token", "FIRMWARE", None)  # back to the profile's package
    assert state.attributes("pre-token")["shared"]["fw_version"] == "2.0"
    assert state.device_package_id("pre-token", "FIRMWARE") is None
    assert state.profile_package_id("check", "FIRMWARE") == theirs.id


def test_unassigning_deletes_every_fw_attribute_and_pushes_the_deletion():
    state, _ = make()
    package = firmware(state)
    state.assign_profile_package("check", "FIRMWARE", package.id)
    got = pushes(state, "pre-basic")
    state.assign_profile_package("check", "FIRMWARE", None)
    assert state.attributes("pre-basic")["shared"] == {}
    assert got == [{"deleted": ["fw_title", "fw_version", "fw_ts", "fw_state", "fw_size", "fw_checksum",
                                "fw_checksum_algorithm", "fw_url", "fw_tag"]}]
    assert state.ota_request(state.device("pre-basic"), "FIRMWARE") == ("NOT_FOUND", None)


def test_reassigning_the_same_package_changes_nothing():
    state, _ = make()
    package = firmware(state)
    state.assign_device_package("pre-token", "FIRMWARE", package.id)
    got = pushes(state, "pre-token")
    state.assign_device_package("pre-token", "FIRMWARE", package.id)
    assert got == [] and len(state.telemetry("pre-token")) == 2


def test_software_uses_sw_keys_and_a_url_package_sets_the_url():
    state, _ = make()
    package = state.create_package("app", "7", "SOFTWARE", "check", url="http://example.invalid/app.bin")
    state.assign_device_package("pre-token", "SOFTWARE", package.id)
    assert state.attributes("pre-token")["shared"] == {"sw_title": "app", "sw_version": "7",
                                                       "sw_url": "http://example.invalid/app.bin"}
    assert state.ota_request(state.device("pre-token"), "SOFTWARE") == ("FAILURE", package)


@pytest.mark.parametrize("setup, message", [
    (lambda s: "missing", "Can't assign non-existent firmware!"),
    (lambda s: s.create_package("a", "1", "SOFTWARE", "check", url="u").id,
     "Can't assign firmware with type: SOFTWARE"),
    (lambda s: s.create_package("a", "1", "FIRMWARE", "check").id, "Can't assign firmware with empty data!"),
    (lambda s: firmware(s, profile="allow").id, "Can't assign firmware with different deviceProfile!"),
])
def test_assignment_refusals(setup, message):
    state, _ = make()
    package_id = setup(state)
    with pytest.raises(OtaError) as e:
        state.assign_device_package("pre-token", "FIRMWARE", package_id)
    assert str(e.value) == message
    with pytest.raises(OtaError) as e:
        state.assign_profile_package("check", "FIRMWARE", package_id)
    assert str(e.value) == message
    with pytest.raises(KeyError):
        state.assign_device_package("nobody", "FIRMWARE", None)
    with pytest.raises(KeyError):
        state.assign_profile_package("nothing", "FIRMWARE", None)


def test_an_assigned_package_cannot_be_deleted():
    state, _ = make()
    package = firmware(state)
    state.assign_device_package("pre-token", "FIRMWARE", package.id)
    with pytest.raises(OtaError, match="^The otaPackage referenced by the devices cannot be deleted!$"):
        state.delete_package(package.id)
    state.assign_device_package("pre-token", "FIRMWARE", None)
    state.assign_profile_package("check", "FIRMWARE", package.id)
    with pytest.raises(OtaError, match="^The otaPackage referenced by the device profile cannot be deleted!$"):
        state.delete_package(package.id)
    state.assign_profile_package("check", "FIRMWARE", None)
    assert state.delete_package(package.id) and not state.delete_package(package.id)


def test_a_provisioned_device_gets_its_profiles_package():
    state, _ = make()
    package = firmware(state, profile="allow")
    state.assign_profile_package("allow", "FIRMWARE", package.id)
    body = json.dumps({"deviceName": "new", "provisionDeviceKey": ALLOW_KEY, "provisionDeviceSecret": ALLOW_SECRET})
    assert state.provision(body.encode(), "http")["status"] == "SUCCESS"
    assert state.attributes("new")["shared"]["fw_checksum"] == package.checksum
    assert [t["values"].get("fw_state") for t in state.telemetry("new")] == ["QUEUED", "INITIATED"]


def ota_config(tmp_path) -> dict:
    (tmp_path / "fw-2.bin").write_bytes(FOX)
    config = copy.deepcopy(CONFIG)
    config["otaPackages"] = [
        {"title": "fw", "version": "1", "type": "FIRMWARE", "profile": "check", "text": "first"},
        {"title": "fw", "version": "2", "type": "FIRMWARE", "profile": "check", "file": "fw-2.bin",
         "checksumAlgorithm": "CRC32", "checksum": "39a34f41", "tag": "two"},
        {"title": "app", "version": "1", "type": "SOFTWARE", "profile": "allow",
         "base64": base64.b64encode(b"\x00\x01").decode(), "fileName": "app.bin", "contentType": "x/y"},
    ]
    config["profiles"][1]["firmware"] = {"title": "fw", "version": "1"}
    config["devices"][0]["firmware"] = {"title": "fw", "version": "2"}
    config["devices"][4]["software"] = {"title": "app", "version": "1"}
    return config


def test_packages_and_assignments_from_the_config_file(tmp_path):
    path = tmp_path / "emulator.json"
    path.write_text(json.dumps(ota_config(tmp_path)))
    state, _ = make(load_config(str(path)))
    two = state.package_by_title("fw", "2")
    assert (two.file_name, two.content_type, two.checksum_algorithm) == ("fw-2.bin", "application/octet-stream",
                                                                         "CRC32")
    assert state.package_data(two.id) == FOX
    assert state.attributes("pre-token")["shared"]["fw_version"] == "2"  # the device's own package
    assert state.attributes("pre-basic")["shared"]["fw_version"] == "1"  # the profile's
    assert state.attributes("other-profile")["shared"]["sw_checksum"] == ota.checksum("SHA256", b"\x00\x01")
    assert state.package_by_title("fw", "1").file_name == "fw-1.bin"


def test_a_restart_on_the_same_database_does_not_start_the_updates_again(tmp_path):
    config = ota_config(tmp_path)
    for entry in config["otaPackages"]:
        entry.pop("file", None) and entry.update(base64=base64.b64encode(FOX).decode())
    db = str(tmp_path / "state.db")
    state, _ = make(config, db)
    first = len(state.telemetry("pre-token"))
    state.close()
    state, _ = make(config, db)
    assert len(state.telemetry("pre-token")) == first
    config["devices"][0]["firmware"] = {"title": "fw", "version": "1"}
    state.close()
    state, _ = make(config, db)
    assert state.attributes("pre-token")["shared"]["fw_version"] == "1"


@pytest.mark.parametrize("change, message", [
    (lambda c: c["otaPackages"][0].update(type="X"), r"otaPackages\[0\]\.type: must be one of"),
    (lambda c: c["otaPackages"][0].update(base64="AA"), r"otaPackages\[0\]: needs exactly one of"),
    (lambda c: c["otaPackages"][0].update(text=""), r"data is empty"),
    (lambda c: c["otaPackages"][1].update(checksum="39A34F41"), r"otaPackages\[1\]\.checksum: does not match"),
    (lambda c: c["otaPackages"][1].update(file="missing.bin"), r"otaPackages\[1\]\.file: cannot read"),
    (lambda c: c["otaPackages"][0].update(profile="nope"), r"otaPackages\[0\]\.profile: no profile"),
    (lambda c: c["otaPackages"][0].update(profile=["check"]), r"otaPackages\[0\]\.profile: no profile"),
    (lambda c: c["devices"][0].update(firmware={"title": ["fw"], "version": "1"}), r"devices\[0\]\.firmware: must be"),
    (lambda c: c["otaPackages"][0].update(colour="red"), r"unknown field 'colour'"),
    (lambda c: c["otaPackages"].append(dict(c["otaPackages"][0])), r"another package has title"),
    (lambda c: c["profiles"][1].update(firmware={"title": "fw", "version": "9"}), r"profiles\[1\]\.firmware: no"),
    (lambda c: c["profiles"][0].update(firmware={"title": "fw", "version": "1"}), "different deviceProfile"),
    (lambda c: c["devices"][4].update(firmware={"title": "app", "version": "1"}), "with type: SOFTWARE"),
])
def test_config_mistakes_are_named(tmp_path, change, message):
    path = tmp_path / "emulator.json"
    config = ota_config(tmp_path)
    change(config)
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


def test_before_3_3_there_are_no_ota_packages(tmp_path):
    config = ota_config(tmp_path)
    config["otaPackages"][1]["file"] = str(tmp_path / "fw-2.bin")
    with pytest.raises(ConfigError, match="^otaPackages: ThingsBoard before 3.3 has no OTA packages$"):
        EmulatorState(config, server_version=(3, 2, 2))
    state = EmulatorState(CONFIG, server_version=(3, 2, 2))
    with pytest.raises(OtaError, match="^ThingsBoard before 3.3 has no OTA packages$"):
        state.create_package("fw", "1.0", "FIRMWARE", "check")
