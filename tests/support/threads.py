"""Run a test's worker on several threads at once."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_in_threads(target: Callable[[int], None], count: int) -> None:
    """Start target(0) .. target(count - 1) on their own threads and wait for all of them."""
    threads = [threading.Thread(target=target, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
