"""A stopped service exits even when a thread is stuck (interpreter exit would wait for it)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROGRAM = textwrap.dedent("""
    import threading
    from kvpack.common.lifecycle import exit_if_threads_linger

    release = threading.Event()
    worker = threading.Thread(target=release.wait, name="stuck-handler")
    worker.start()
    if {stuck}:
        exit_if_threads_linger("svc", 0.5)
        print("not reached")
    else:
        release.set()
        exit_if_threads_linger("svc", 5.0)
        print("returned")
""")


def _run(stuck: bool) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROGRAM.format(stuck=stuck)],
                          capture_output=True, text=True, timeout=60)


def test_stuck_thread_is_named_and_the_process_exits():
    result = _run(stuck=True)
    assert result.returncode == 0
    assert "not reached" not in result.stdout
    assert "stuck-handler" in result.stderr and "svc: threads still running" in result.stderr


def test_finished_threads_let_shutdown_return_normally():
    result = _run(stuck=False)
    assert result.returncode == 0
    assert result.stdout.strip() == "returned" and result.stderr == ""
