# A scripted, pollable UDP socket for firmware unit tests: datagrams in, datagrams out, with delivery times.
# select.poll calls ioctl on io.IOBase objects, so a datagram becomes readable exactly when it is due.
import io
import select
import time

from micropython import const

_POLL = const(3)


class FakeUDP(io.IOBase):
    def __init__(self, on_send=None):
        self.t0 = time.ticks_ms()
        self.inbox = []  # [due ticks_ms, datagram], in delivery order
        self.sent = []  # [ms since creation, datagram] for each send
        self.on_send = on_send  # on_send(self, datagram) after each send, to script the server
        self.refused = False  # an ICMP port unreachable is pending: the next read fails with ECONNREFUSED
        self.closed = False

    def now(self):
        return time.ticks_diff(time.ticks_ms(), self.t0)

    def feed(self, data, after_ms=0):
        self.inbox.append([time.ticks_add(time.ticks_ms(), after_ms), bytes(data)])

    @property
    def datagrams(self):
        return [d for _, d in self.sent]

    def _due(self):
        return self.inbox and time.ticks_diff(time.ticks_ms(), self.inbox[0][0]) >= 0

    def send(self, data):
        if self.closed:
            raise OSError(9)
        data = bytes(data)
        self.sent.append([self.now(), data])
        if self.on_send:
            self.on_send(self, data)
        return len(data)

    write = send

    def recv(self, n):
        if self.refused:
            self.refused = False
            raise OSError(111)
        if not self._due():
            raise OSError(11)
        return self.inbox.pop(0)[1][:n]  # a datagram longer than n is cut, as recv does

    def ioctl(self, req, arg):
        if req != _POLL:
            return -1
        ready = 0
        if arg & select.POLLIN and (self.refused or self._due()):
            ready |= select.POLLIN
        if self.refused:
            ready |= select.POLLERR
        if arg & select.POLLOUT:
            ready |= select.POLLOUT
        return ready

    def close(self):
        self.closed = True
