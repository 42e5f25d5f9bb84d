# Level-gated console logging; callers never pass secrets here.
import time
from micropython import const

DEBUG = const(10)
INFO = const(20)
WARN = const(30)
ERROR = const(40)

level = INFO
_t0 = time.ticks_ms()


def _emit(tag, msg, args):
    if args:
        msg = msg % args
    print("%9.3f %s %s" % (time.ticks_diff(time.ticks_ms(), _t0) / 1000, tag, msg))


def debug(msg, *args):
    if level <= DEBUG:
        _emit("D", msg, args)


def info(msg, *args):
    if level <= INFO:
        _emit("I", msg, args)


def warn(msg, *args):
    if level <= WARN:
        _emit("W", msg, args)


def error(msg, *args):
    if level <= ERROR:
        _emit("E", msg, args)
