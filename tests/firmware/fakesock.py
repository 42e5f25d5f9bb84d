# A scripted, pollable stream that stands in for a TCP socket in firmware unit tests.
# It works with select.poll (MicroPython calls ioctl on stream objects derived from io.IOBase).
import io
import select
import time

from micropython import const

_POLL = const(3)


class FakeSocket(io.IOBase):
    def __init__(self, on_write=None):
        self.inbox = bytearray()
        self.writes = []  # each write() call, as bytes: one entry per call proves "one packet, one write"
        self.on_write = on_write  # called as on_write(self, data) after each write, to script replies
        self.closed = False
        self.peer_closed = False

    def feed(self, data):
        self.inbox += data

    def hang_up(self):
        self.peer_closed = True

    @property
    def written(self):
        return b"".join(self.writes)

    def readinto(self, buf):
        if not self.inbox:
            if self.peer_closed:
                return 0
            return None
        n = min(len(buf), len(self.inbox))
        buf[:n] = self.inbox[:n]
        self.inbox = self.inbox[n:]
        return n

    def read(self, n=-1):
        buf = bytearray(len(self.inbox) if n < 0 else n)
        got = self.readinto(buf)
        return None if got is None else bytes(buf[:got])

    def recv(self, n):
        return self.read(n) or b""

    def write(self, data):
        if self.closed:
            raise OSError(9)
        data = bytes(data)
        self.writes.append(data)
        if self.on_write:
            self.on_write(self, data)
        return len(data)

    send = write

    def sendall(self, data):
        self.write(data)

    def ioctl(self, req, arg):
        if req != _POLL:
            return -1
        ready = 0
        if arg & select.POLLIN and (self.inbox or self.peer_closed):
            ready |= select.POLLIN
        if arg & select.POLLOUT and not self.closed:
            ready |= select.POLLOUT
        if self.peer_closed:
            ready |= select.POLLHUP
        return ready

    def close(self):
        self.closed = True

    def setblocking(self, flag):
        pass

    def settimeout(self, t):
        pass


def scripted(*replies):
    # A FakeSocket that feeds replies[k] after the k-th write (None: no reply to that write).
    def on_write(sock, data):
        k = len(sock.writes) - 1
        if k < len(replies) and replies[k] is not None:
            sock.feed(replies[k])

    return FakeSocket(on_write)


class Stream(FakeSocket):
    # A peer that, once the first write arrived, keeps sending `chunk` (after `prefix`), a piece per read, for
    # `for_ms` ms and then closes: a deadline that data keeps postponing ends with "connection closed" after for_ms
    # instead of "no answer in time". `served` counts the pieces sent.
    def __init__(self, chunk, prefix=b"", for_ms=5000):
        super().__init__(self._start)
        self.chunk = chunk
        self.prefix = prefix
        self.for_ms = for_ms
        self.until = None
        self.served = 0

    def _start(self, sock, data):
        if self.until is None:
            self.feed(self.prefix)
            self.until = time.ticks_add(time.ticks_ms(), self.for_ms)

    def readinto(self, buf):
        if self.until is not None and not self.inbox and not self.peer_closed:
            if time.ticks_diff(self.until, time.ticks_ms()) > 0:
                self.feed(self.chunk)
                self.served += 1
            else:
                self.hang_up()
        return super().readinto(buf)

    def ioctl(self, req, arg):
        if req == _POLL and self.until is not None and arg & select.POLLIN and not self.peer_closed:
            return select.POLLIN | (arg & select.POLLOUT)
        return super().ioctl(req, arg)
