"""A test that reads a FIFO or /dev/zero must fail, not hang: `with no_hang(seconds):`."""
import contextlib
import signal


class Hung(BaseException):
    """Not an OSError (TimeoutError is one): no `except OSError` in the code under test hides it."""


@contextlib.contextmanager
def no_hang(seconds=30):
    """Fail instead of hanging (a FIFO read blocks forever, /dev/zero never ends)."""
    def expire(signum, frame):
        raise Hung(f"hung for {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
