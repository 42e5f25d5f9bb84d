# TCP (optionally TLS) connections whose every wait has a deadline: select.poll, never an unbounded read.
# Deadlines are time.ticks_ms() values made with deadline(ms).
import select
import socket
import time

from tbfleet import BadAnswer, NoAnswer


def deadline(ms):
    return time.ticks_add(time.ticks_ms(), int(ms))


def connect(host, port, timeout_ms, ssl_ctx=None):
    # Returns a connected socket, non-blocking; NoAnswer when the server is not there. With ssl_ctx it is wrapped
    # for TLS, and the handshake happens inside the first write_all, under that write's deadline: a blocking
    # handshake would bound each read only, and a server that drips its handshake would hold the board for ever.
    try:
        addr = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
    except OSError as e:
        raise NoAnswer("cannot resolve %s: %s" % (host, e))
    sock = socket.socket(addr[0], socket.SOCK_STREAM, addr[2])
    try:
        sock.settimeout(timeout_ms / 1000)
        sock.connect(addr[-1])
        # From here every wait is a poll with a deadline. Non-blocking also makes readinto return what has arrived:
        # a blocking MicroPython stream read waits until the whole buffer is full.
        sock.setblocking(False)
        if ssl_ctx is not None:
            sock = ssl_ctx.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    except OSError as e:
        sock.close()
        raise NoAnswer("cannot connect to %s:%d: %s" % (host, port, e))
    return sock


_polled = _poller = None  # the socket whose waits _poller serves, and that poll object


def wait(sock, event, at):
    # Block until sock is ready for event (select.POLLIN/POLLOUT) or the deadline passes (NoAnswer). Past the
    # deadline it is NoAnswer even when data is there: a server that keeps sending (packets, header lines, 1xx
    # answers) must not extend the exchange. With at None it returns the poll object instead, registered for event,
    # for the caller's own polls of the socket (a function of its own for that: the HTTP application lifecycle
    # needed 0.25 KB more heap).
    global _polled, _poller
    if sock is not _polled:
        # One poll object per socket, not per wait: there are several waits on every packet's path.
        _poller = select.poll()
        _polled = sock
    _poller.register(sock, event)  # again for the same socket: only the events change
    if at is None:
        return _poller
    while True:
        left = time.ticks_diff(at, time.ticks_ms())
        if left <= 0:
            raise NoAnswer("no answer in time")
        # No for loop over the answer: its iterator takes four more slots of this function's frame, and a frame
        # above 11 slots goes on the heap, here at the top of every exchange (bench: 0.25 KB for MQTT).
        ready = _poller.poll(left)
        if ready:
            ev = ready[0][1]
            if ev & (select.POLLERR | select.POLLHUP) and not ev & event:
                raise NoAnswer("connection closed")
            return


def read_some(sock, buf, at, eof_ok=False):
    # Read at least one byte into the memoryview buf; returns the count. NoAnswer at the deadline, and on EOF
    # unless eof_ok (0 is returned then).
    while True:
        wait(sock, select.POLLIN, at)
        try:
            n = sock.readinto(buf)
        except OSError as e:
            if e.errno == 11:  # EAGAIN: TLS record not complete yet
                continue
            raise NoAnswer("read failed: %s" % e)
        if n is None:
            continue
        if n == 0 and not eof_ok:
            raise NoAnswer("connection closed")
        return n


def read_exact(sock, buf, at):
    # Fill the whole memoryview buf before the deadline.
    got = 0
    size = len(buf)
    while got < size:
        got += read_some(sock, buf[got:], at)


def write_all(sock, data, at):
    # Write all of data (one write call when the stack takes it whole, which keeps packets off Nagle's path).
    # The first write on a TLS socket makes the handshake: until it is done writes take nothing, and poll waits
    # for the direction the handshake needs.
    mv = memoryview(data)
    sent = 0
    while sent < len(mv):
        wait(sock, select.POLLOUT, at)
        try:
            n = sock.write(mv[sent:])
        except OSError as e:
            if e.errno == 11:
                continue
            raise NoAnswer("write failed: %s" % e)
        except ValueError as e:
            # MicroPython's TLS raises ValueError when the server's certificate fails verification (its text
            # spread over lines: one line for the log).
            raise BadAnswer("TLS handshake failed: %s" % " ".join(str(e).split()))
        if n:
            sent += n
