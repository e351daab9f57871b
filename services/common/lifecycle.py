"""Run a started service until SIGINT/SIGTERM, then stop it gracefully and exit."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

# How long a stopped service waits for its remaining non-daemon threads before exiting anyway
EXIT_GRACE_SECONDS = 15.0


def serve_until_signalled(name: str, stop_service) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print(f"{name}: shutting down", flush=True)
    stop_service()
    exit_if_threads_linger(name, EXIT_GRACE_SECONDS)


def exit_if_threads_linger(name: str, grace_seconds: float) -> None:
    """Interpreter exit joins every non-daemon thread (gRPC's handler pool among them), so one
    handler stuck in a call would keep a stopped service alive for ever. Give them grace_seconds,
    then name the ones left on stderr (for whoever finds the hang) and exit with status 0: the
    service itself has stopped."""
    deadline = time.monotonic() + grace_seconds
    for thread in _other_live_threads():
        thread.join(max(0.0, deadline - time.monotonic()))
    lingering = [thread.name for thread in _other_live_threads()]
    if lingering:
        print(f"{name}: threads still running {grace_seconds:g} s after shutdown: "
              f"{', '.join(lingering)}; exiting", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(0)


def _other_live_threads() -> list[threading.Thread]:
    current = threading.current_thread()
    return [thread for thread in threading.enumerate()
            if thread is not current and not thread.daemon and thread.is_alive()]
