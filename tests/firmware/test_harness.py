# Proves the harness itself: a passing MicroPython test passes, and the interpreter is the Unix port.
import sys


def test_runs_under_micropython():
    assert sys.implementation.name == "micropython"


def test_working_directory_is_empty_scratch():
    import os

    assert os.listdir() == []
    with open("scratch", "w") as f:
        f.write("x")
