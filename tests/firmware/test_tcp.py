# The deadline helpers in tbfleet.tcp, over a scripted socket.
import select
import time

from fakesock import FakeSocket, Stream
from mptest import eq, raises
from tbfleet import NoAnswer, tcp


def test_read_exact_gathers_pieces():
    s = FakeSocket()
    s.feed(b"hel")
    s.feed(b"lo")
    buf = bytearray(5)
    tcp.read_exact(s, memoryview(buf), tcp.deadline(100))
    assert buf == b"hello"


def test_read_times_out_at_deadline():
    s = FakeSocket()
    t0 = time.ticks_ms()
    raises(NoAnswer, tcp.read_exact, s, memoryview(bytearray(1)), tcp.deadline(50))
    took = time.ticks_diff(time.ticks_ms(), t0)
    assert 40 <= took < 1000, took


def test_peer_close_is_no_answer():
    s = FakeSocket()
    s.feed(b"ab")
    s.hang_up()
    e = raises(NoAnswer, tcp.read_exact, s, memoryview(bytearray(3)), tcp.deadline(1000))
    assert "closed" in str(e)


def test_end_of_stream_is_zero_when_the_caller_takes_it():
    s = FakeSocket()
    s.feed(b"ab")
    s.hang_up()
    buf = memoryview(bytearray(4))
    at = tcp.deadline(1000)
    assert tcp.read_some(s, buf, at, True) == 2
    assert tcp.read_some(s, buf, at, True) == 0
    raises(NoAnswer, tcp.read_some, s, buf, at)


def test_write_all_is_one_write():
    s = FakeSocket()
    tcp.write_all(s, b"\x10\x0c" + b"x" * 12, tcp.deadline(100))
    assert s.writes == [b"\x10\x0c" + b"x" * 12]


def test_connect_refused_is_no_answer():
    # Port 1 on loopback: nothing listens there, so the kernel refuses at once.
    e = raises(NoAnswer, tcp.connect, "127.0.0.1", 1, 500)
    assert "cannot connect" in str(e)


def test_waits_on_one_socket_share_one_poll_object():
    # Several waits lie on every packet's path: a poll object per wait would be garbage each time.
    s = FakeSocket()
    s.feed(b"ab")
    buf = memoryview(bytearray(1))
    tcp.read_exact(s, buf, tcp.deadline(100))
    poller = tcp._poller
    tcp.write_all(s, b"x", tcp.deadline(100))
    tcp.read_exact(s, buf, tcp.deadline(100))
    assert tcp._poller is poller
    other = FakeSocket()
    other.feed(b"c")
    tcp.read_exact(other, buf, tcp.deadline(100))
    assert tcp._poller is not poller and buf[0] == ord("c")


def test_wait_without_deadline_gives_the_poll_object_for_the_callers_polls():
    s = FakeSocket()
    p = tcp.wait(s, select.POLLIN, None)
    assert p is tcp._poller
    eq(p.poll(0), [])
    s.feed(b"x")
    eq(len(p.poll(0)), 1)
    tcp.write_all(s, b"y", tcp.deadline(100))  # its waits take the same object
    assert tcp._poller is p


def test_data_that_keeps_arriving_does_not_extend_the_deadline():
    # A peer that streams for 5 s: reading packet after packet must end at the deadline (100 ms), not when the
    # stream stops.
    s = Stream(b"\xd0\x00")
    tcp.write_all(s, b"go", tcp.deadline(100))
    at = tcp.deadline(100)
    buf = memoryview(bytearray(2))
    e = raises(NoAnswer, lambda: [tcp.read_exact(s, buf, at) for _ in range(10 ** 9)])
    eq(str(e), "no answer in time")
    assert s.served > 1, s.served
