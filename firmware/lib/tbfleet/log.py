# Level-gated console logging; callers never pass secrets here.
import time

# The least severe message printed: 0 debug, 1 info, 2 warn, 3 error (config.json's log_level, in that order).
level = 1
_t0 = time.ticks_ms()


def _emit(severity, msg, args):
    if severity >= level:
        if args:
            msg = msg % args
        print("%9.3f %s %s" % (time.ticks_diff(time.ticks_ms(), _t0) / 1000, "DIWE"[severity], msg))


def info(msg, *args):
    _emit(1, msg, args)


def warn(msg, *args):
    _emit(2, msg, args)


def error(msg, *args):
    _emit(3, msg, args)


def describe(e):
    # "Type: message" of an exception, as the log and the RPC error replies give it.
    return "%s: %s" % (type(e).__name__, e)
