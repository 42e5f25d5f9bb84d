# Small assertion helpers for the MicroPython tests (no unittest on the board's interpreter).


def raises(exc_type, fn, *args, **kwargs):
    """Call fn and return the exception of exc_type it raised; fail if it raised nothing."""
    try:
        fn(*args, **kwargs)
    except exc_type as e:
        return e
    raise AssertionError("expected %s from %s" % (exc_type.__name__, fn))


def eq(got, want):
    if got != want:
        raise AssertionError("got %r, want %r" % (got, want))
