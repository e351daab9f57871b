"""`kvpack up` then `kvpack generate`, as the README tells a user, then Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from support.processes import free_port, wait_for


def test_up_serves_generate_and_stops_cleanly_on_ctrl_c(tmp_path, shared_data):
    ports = {name: free_port() for name in
             ("kvstore", "inference", "kvstore-metrics", "inference-metrics", "prometheus")}
    output = tmp_path / "up.out"
    process = subprocess.Popen(
        [sys.executable, "-m", "kvpack", "up",
         "--model", str(shared_data / "models" / "stories260K"),
         "--method", "fp16", "--run-dir", str(tmp_path / "run"),
         "--kvstore-port", str(ports["kvstore"]), "--inference-port", str(ports["inference"]),
         "--kvstore-metrics-port", str(ports["kvstore-metrics"]),
         "--inference-metrics-port", str(ports["inference-metrics"]),
         "--prometheus-port", str(ports["prometheus"])],
        stdout=output.open("w"), stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        wait_for(lambda: "kvpack up: running" in output.read_text() or process.poll() is not None,
                 timeout_seconds=180)
        assert process.poll() is None, output.read_text()
        text = output.read_text()
        assert f"127.0.0.1:{ports['inference']}" in text and "kvstore" in text
        result = subprocess.run(
            [sys.executable, "-m", "kvpack", "generate",
             "--target", f"127.0.0.1:{ports['inference']}",
             "--max-new-tokens", "8", "--json", "Once upon a time"],
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        reply = json.loads(result.stdout)
        assert reply["text"] and reply["prompt_tokens"] > 0
        assert {"cached_tokens", "ttft_seconds", "compression_ratio"} <= set(reply)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    text = output.read_text()
    assert process.returncode == 0, text
    assert "stopped inference" in text and "stopped kvstore" in text
    assert "Traceback" not in text
