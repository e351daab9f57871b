"""`kvpack inference serve` (as a real process) and `kvpack generate`, including bad flags."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from kvpack.cli import main


def test_serve_process_and_generate_json(shared_data, capsys):
    env = {**os.environ, "KVPACK_METHOD": "fp16"}  # flags also come from KVPACK_* variables
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvpack",
            "inference",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--model",
            str(shared_data / "models" / "stories260K"),
            "--metrics-port",
            "0",
            "--kvstore",
            "none",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        banner = process.stdout.readline()
        assert banner.startswith("inference: gRPC on 127.0.0.1:"), banner
        address = banner.split()[3].rstrip(",")
        assert (
            main(
                [
                    "generate",
                    "--target",
                    address,
                    "--max-new-tokens",
                    "8",
                    "--json",
                    "Once upon a time",
                ]
            )
            == 0
        )
        result = json.loads(capsys.readouterr().out)
        for key in ("text", "prompt_tokens", "cached_tokens", "ttft_seconds", "compression_ratio"):
            assert key in result, key
        assert result["completion_tokens"] == 8 and result["text"]
        assert (
            main(["generate", "--target", address, "--max-new-tokens", "8", "Once upon a time"])
            == 0
        )
        assert capsys.readouterr().out == result["text"] + "\n"  # streamed as plain text
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inference", "serve", "--model", "m", "--bits", "3"], "--bits applies to kivi/kvquant"),
        (["inference", "serve", "--model", "m", "--device", "tpu"], "invalid choice"),
        (["inference", "serve", "--model", "m", "--block-tokens", "0"], "positive"),
        (["inference", "serve", "--model", "m", "--kvstore-streams", "0"], "positive"),
        (["inference", "serve"], "--model"),
        (["generate", "--target", "nowhere", "hi"], "HOST:PORT"),
    ],
)
def test_bad_flags_give_a_one_line_error(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(error_lines) == 1 and message in error_lines[0]


def test_generate_against_no_server_is_a_one_line_error():
    with pytest.raises(SystemExit) as raised:
        main(["generate", "--target", "127.0.0.1:1", "hi"])
    assert str(raised.value).startswith("kvpack generate: UNAVAILABLE")
    assert "\n" not in str(raised.value)
