"""`kvpack eval ppl|passkey` from the command line: JSON shape, one-line errors."""

from __future__ import annotations

import json

import pytest
from kvpack.eval.perplexity import codec_perplexity
from kvpack.inference.methods import MethodSpec

from kvpack.cli import main


@pytest.fixture
def story_file(tmp_path, story_text):
    path = tmp_path / "story.txt"
    path.write_text(story_text)
    return path


def ppl_argv(shared_data, story_file, *extra):
    return ["eval", "ppl", "--model", str(shared_data / "models" / "stories260K"),
            "--text", str(story_file), "--quiet", *extra]


def test_ppl_json(shared_data, story_file, stories, story_tokens, capsys):
    assert main(ppl_argv(shared_data, story_file, "--tokens", "48", "--prefill-tokens", "16",
                         "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"ppl", "nll", "tokens", "bits_per_element", "method", "params", "total_tokens",
            "prefill_tokens", "cache_bytes", "model"} <= data.keys()
    assert data["method"] == "fp16" and data["tokens"] == 47 and data["bits_per_element"] == 16.0
    expected = codec_perplexity(stories, story_tokens[:48], MethodSpec.of("fp16"),
                                prefill_tokens=16)
    assert data["ppl"] == pytest.approx(expected.ppl, rel=1e-9)


def test_passkey_json(shared_data, capsys):
    assert main(["eval", "passkey", "--model", str(shared_data / "models" / "stories260K"),
                 "--lengths", "200", "--depths", "0.5", "--max-new-tokens", "3", "--quiet",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "fp16" and len(data["cases"]) == 1
    assert 0.0 <= data["accuracy"] <= 1.0


@pytest.mark.parametrize("extra, message", [
    (["--tokens", "16", "--method", "zip"], "--method must be one of"),
    (["--tokens", "16", "--sketch-dim", "64"], "--sketch-dim applies to qjl"),
    (["--tokens", "16", "--method", "hf-quanto", "--bits", "3"], "needs --bits 2 or 4"),
    (["--tokens", "16", "--method", "hf-quanto", "--bits", "4", "--window", "8"],
     "--window does not apply"),
    (["--tokens", "16", "--method", "kvquant", "--bits", "3"], "needs --calibration"),
    (["--tokens", "16"], "--prefill-tokens 128 exceeds --tokens 16"),
    (["--tokens", "0"], "expected a positive integer"),
    (["--tokens", "16", "--bits", "two"], "invalid int value"),
])
def test_bad_flags_give_one_line(shared_data, story_file, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(ppl_argv(shared_data, story_file, *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("kvpack eval ppl: error:") and message in last, err


def test_missing_text_is_one_line(shared_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(ppl_argv(shared_data, tmp_path / "missing.txt", "--tokens", "16",
                      "--prefill-tokens", "4"))
    message = str(exit_info.value.code)
    assert message.startswith("kvpack eval ppl: --text:") and "\n" not in message


def test_codec_rejection_is_one_line(shared_data, story_file):
    """stories260K has head_dim 8; KIVI needs a multiple of 16: a clean error, not a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(ppl_argv(shared_data, story_file, "--tokens", "16", "--prefill-tokens", "4",
                      "--method", "kivi"))
    message = str(exit_info.value.code)
    assert message.startswith("kvpack eval ppl:") and "head_dim" in message and "\n" not in message
