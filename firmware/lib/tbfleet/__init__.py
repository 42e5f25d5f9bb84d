# What every phase of the firmware shares: giving a module's RAM back once its work is done.
import gc
import sys


def unload(*names):
    # Drop tbfleet modules (their strings stay interned); the next import loads them again.
    package = sys.modules["tbfleet"].__dict__
    for name in names:
        sys.modules.pop("tbfleet." + name, None)
        package.pop(name, None)
    gc.collect()
