# Power cuts in the middle of the store's writes, on LittleFS (vfs.VfsLfs2) over a RAM block device. For every n from
# 0 up to the number of block operations (programs and erases) the uncut operation takes, the power fails after n of
# them, either cleanly or tearing operation n+1 (half its bytes written, half the block erased); then the flash is
# mounted again from what it holds. The store must then give exactly the old record or exactly the new one.
import os
import vfs

from mptest import eq
from ramblock import RamBlock
from tbfleet import log, store

_AT = "/flash"
OLD, NEW = 0, 1


def record(i):
    # Realistic records of every type and size: short ones LittleFS inlines in its metadata, longer ones get a block.
    server = "tb.fleet.example:%d" % (1883 + i % 2 * 7000)
    device = "esp32-a4cf12f3%04x" % i
    kind = i % 3
    if kind == 0:
        return {"type": "ACCESS_TOKEN", "token": "kT3vQ9pZx7LmB2n%05d" % i, "device": device, "server": server}
    if kind == 1:
        return {"type": "MQTT_BASIC", "client_id": device, "username": "fleet-user-%d" % i,
                "password": "Zq81-w0rd-%d-" % i + "p" * (i % 40), "device": device, "server": server}
    return {"type": "X509_CERTIFICATE", "device": device, "server": server}


def mount(bdev):
    vfs.mount(vfs.VfsLfs2(bdev), _AT)
    os.chdir(_AT)


def unmount():
    os.chdir("/")
    vfs.umount(_AT)


def fresh(bdev):
    vfs.VfsLfs2.mkfs(bdev)
    return bdev.image()


def after(bdev, image, act):
    # The flash image after act() ran uncut on image, and the block operations and erases it took.
    bdev.restore(image)
    mount(bdev)
    ops, erases = bdev.ops, bdev.erases
    act()
    ops, erases = bdev.ops - ops, bdev.erases - erases
    unmount()
    return bdev.image(), ops, erases


def sweep(bdev, image, act, check, torn):
    # Cut act() after every n block operations; check(n, ops) runs once power is back and the flash remounted.
    # Returns the block operations act() takes uncut.
    ops = after(bdev, image, act)[1]
    for n in range(ops + 1):
        bdev.restore(image)
        mount(bdev)
        bdev.cut_after(n, torn)
        if n < ops:
            try:
                act()
            except OSError:
                pass  # LittleFS may notice that its writes went nowhere; the power is off anyway
        else:
            act()
        unmount()
        bdev.power_on()
        mount(bdev)
        check(n, ops)
        unmount()
    return ops


def quiet():
    log.level = 4  # above error: nothing printed


def outcome(got, old, new):
    if got == old:
        return OLD
    if got == new:
        return NEW
    raise AssertionError("after the cut the store gave %r, neither the old %r nor the new %r" % (got, old, new))


def check_switch(seen, name):
    # The cut points must flip the result once, from old to new, at a single operation: the commit.
    assert seen[0] == OLD and seen[-1] == NEW and seen == sorted(seen), (name, seen)


def cut_saves(blocks, block_size, histories):
    # For each history k (records 0..k saved one after another), cut the save of record k+1 over record k.
    # Returns {(block operations, of which erases): how many saves took that many} and the cut points tried.
    quiet()
    bdev = RamBlock(blocks, block_size)
    image = fresh(bdev)
    per_save = {}
    points = 0
    for k in range(histories):
        old, new = record(k), record(k + 1)
        image = after(bdev, image, lambda: store.save(old))[0]
        for torn in (False, True):
            seen = []

            def check(n, ops):
                seen.append(outcome(store.load(), old, new))
                eq((k, n, os.listdir()), (k, n, ["creds.json"]))
                # The flash is still fit for use.
                store.save(record(k + 2))
                eq((k, n, store.load()), (k, n, record(k + 2)))

            points += sweep(bdev, image, lambda: store.save(new), check, torn) + 1
            check_switch(seen, (k, torn))
        shape = after(bdev, image, lambda: store.save(new))[1:]
        per_save[shape] = per_save.get(shape, 0) + 1
    return per_save, points


def test_cut_save_over_old_record_esp32_flash():
    # ESP32 LittleFS: 4096-byte erase blocks, MicroPython's default 32-byte program size. Short records live in the
    # metadata, longer ones take a fresh block (one erase); every 14th save or so compacts the metadata (3 erases).
    per_save, points = cut_saves(16, 4096, 30)
    assert max(erases for _, erases in per_save) >= 3, per_save
    print("esp32 geometry: block operations per save", per_save, "cut points", points)


def test_cut_save_over_old_record_small_blocks():
    # 512-byte blocks: metadata compacts every few saves, and about every 134th save LittleFS moves a worn metadata
    # pair elsewhere (block_cycles), which the histories here reach.
    per_save, points = cut_saves(24, 512, 150)
    assert len(per_save) >= 4, per_save
    print("512-byte blocks: block operations per save", per_save, "cut points", points)


def test_cut_first_save():
    quiet()
    points = 0
    for blocks, block_size in ((16, 4096), (24, 512)):
        bdev = RamBlock(blocks, block_size)
        image = fresh(bdev)
        for i in range(3):
            new = record(i)
            print("first save, %d-byte blocks, %s: block operations" % (block_size, new["type"]),
                  after(bdev, image, lambda: store.save(new))[1:])
            for torn in (False, True):
                seen = []

                def check(n, ops):
                    got = store.load()
                    seen.append(OLD if got is None else outcome(got, None, new))
                    eq((n, os.listdir()), (n, [] if got is None else ["creds.json"]))

                points += sweep(bdev, image, lambda: store.save(new), check, torn) + 1
                check_switch(seen, (block_size, i, torn))
    print("first save: cut points", points)


def test_cut_while_cleaning_up_after_a_cut():
    # A save cut so that its temporary file survives; then the load that clears it up is cut too, at every operation.
    # The result must be what that load gives uncut: the old record when there is one; without one, the new record
    # when the temporary file was complete, else None.
    quiet()
    bdev = RamBlock(16, 4096)
    empty = fresh(bdev)
    old, new = record(4), record(5)
    with_old = after(bdev, empty, lambda: store.save(old))[0]
    points = 0
    for start, wants in ((with_old, [old]), (empty, [None, new])):
        ops = after(bdev, start, lambda: store.save(new))[1]
        left = []
        for n in range(ops):
            bdev.restore(start)
            mount(bdev)
            bdev.cut_after(n)
            try:
                store.save(new)
            except OSError:
                pass
            unmount()
            bdev.power_on()
            mount(bdev)
            if "creds.json.tmp" in os.listdir():
                left.append((bdev.image(), store.load()))
            unmount()
        eq(sorted(set(want is not None for _, want in left)), sorted(set(want is not None for want in wants)))
        for image, want in left:
            assert want in wants, want
            for torn in (False, True):

                def check(n, ops):
                    got = store.load()
                    eq((n, got), (n, want))
                    eq((n, os.listdir()), (n, [] if got is None else ["creds.json"]))

                points += sweep(bdev, image, store.load, check, torn) + 1
    print("cleanup after a cut: cut points", points)


def test_cut_discard():
    # Setting a record aside, cut: afterwards the record is either still in use or wholly in creds.json.bad.
    quiet()
    bdev = RamBlock(16, 4096)
    old = record(1)
    image = after(bdev, fresh(bdev), lambda: store.save(old))[0]
    for torn in (False, True):
        seen = []

        def check(n, ops):
            got = store.load()
            if got is None:
                eq(os.listdir(), ["creds.json.bad"])
                os.rename("creds.json.bad", "creds.json")
                eq(store.load(), old)
                seen.append(NEW)
            else:
                eq(got, old)
                seen.append(OLD)

        ops = sweep(bdev, image, lambda: store.discard("revoked"), check, torn)
        check_switch(seen, torn)
    print("discard: block operations", ops, "cut points", 2 * (ops + 1))
