# A RAM block device for LittleFS (vfs.VfsLfs2) tests, with a power budget: after a set number of block
# operations (programs or erases) the power "vanishes" and every later write is silently lost, as on a board whose
# supply is cut in the middle of a save. Reads keep working so that the code under test runs on unaware.
# Programming behaves like NOR flash: it can only clear bits (the new byte is old AND data); erase sets 0xFF.
from micropython import const

_IOCTL_INIT = const(1)
_IOCTL_DEINIT = const(2)
_IOCTL_SYNC = const(3)
_IOCTL_BLOCK_COUNT = const(4)
_IOCTL_BLOCK_SIZE = const(5)
_IOCTL_BLOCK_ERASE = const(6)

# What happens to one operation
_DONE = const(0)
_HALF = const(1)
_LOST = const(2)


class RamBlock:
    def __init__(self, blocks, block_size=4096):
        self.blocks = blocks
        self.block_size = block_size
        self.data = bytearray(b"\xff" * (blocks * block_size))
        self.ops = 0  # block operations issued so far, including lost ones
        self.erases = 0  # of which erases
        self._left = None  # operations the power budget still allows; None: mains power
        self._torn = False

    def cut_after(self, n, torn=False):
        # The power fails after n more operations; with torn, the operation it fails in is half done
        # (the first half of a program's bytes written, the first half of an erased block erased).
        self._left = n
        self._torn = torn

    def power_on(self):
        self._left = None

    def image(self):
        return bytes(self.data)

    def restore(self, image):
        # Back to an earlier image() with mains power, as a fresh flash chip holding those bytes.
        self.data[:] = image
        self._left = None

    def _fate(self):
        self.ops += 1
        left = self._left
        if left is None:
            return _DONE
        self._left = left - 1
        if left > 0:
            return _DONE
        return _HALF if left == 0 and self._torn else _LOST

    def readblocks(self, block, buf, off=0):
        at = block * self.block_size + off
        buf[:] = self.data[at : at + len(buf)]

    def writeblocks(self, block, buf, off=0):
        fate = self._fate()
        if fate == _LOST:
            return
        n = len(buf) if fate == _DONE else len(buf) // 2
        at = block * self.block_size + off
        data = self.data
        for i in range(n):
            data[at + i] &= buf[i]

    def ioctl(self, op, arg):
        if op == _IOCTL_BLOCK_COUNT:
            return self.blocks
        if op == _IOCTL_BLOCK_SIZE:
            return self.block_size
        if op == _IOCTL_BLOCK_ERASE:
            self.erases += 1
            fate = self._fate()
            if fate != _LOST:
                at = arg * self.block_size
                n = self.block_size if fate == _DONE else self.block_size // 2
                self.data[at : at + n] = b"\xff" * n
            return 0
        if op in (_IOCTL_INIT, _IOCTL_DEINIT, _IOCTL_SYNC):
            return 0
        return None
