"""Run a started service until SIGINT/SIGTERM, then stop it gracefully."""

from __future__ import annotations

import signal
import threading


def serve_until_signalled(name: str, stop_service) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print(f"{name}: shutting down", flush=True)
    stop_service()
