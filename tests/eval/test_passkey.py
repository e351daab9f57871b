"""`kvpack.eval.passkey`: prompt construction, SmolLM2 retrieves every key at full precision, and
stories260K (too small to retrieve anything) gives a deterministic, well-formed report."""

from __future__ import annotations

import pytest
from kvpack.eval.passkey import NEEDLE, build_prompt, passkey_eval
from kvpack.inference.methods import MethodSpec


def test_prompt_length_and_needle_depth(smollm2):
    tokenizer = smollm2.tokenizer
    positions = []
    for depth in (0.0, 0.5, 1.0):
        prompt = build_prompt(tokenizer, 400, depth, "12345")
        assert 360 <= len(prompt) <= 400
        text = tokenizer.decode(prompt)
        positions.append(text.index(NEEDLE.format(key="12345")) / len(text))
    assert positions[0] < 0.15 and 0.35 < positions[1] < 0.65 and positions[2] > 0.85


def test_too_short_a_prompt_is_a_value_error(smollm2):
    with pytest.raises(ValueError, match="too short"):
        build_prompt(smollm2.tokenizer, 10, 0.5, "12345")


def test_fp16_retrieves_every_key(smollm2):
    result = passkey_eval(smollm2, MethodSpec.of("fp16"), lengths=[128, 256],
                          depths=[0.1, 0.5, 0.9], max_new_tokens=6)
    assert [case["correct"] for case in result["cases"]] == [1] * 6, result["cases"]
    assert result["accuracy"] == 1.0


def test_report_shape_and_determinism_on_stories(stories):
    def run():
        return passkey_eval(stories, MethodSpec.of("fp16"), lengths=[200, 256], depths=[0.0, 1.0],
                            trials=2, seed=3, max_new_tokens=4)

    first, second = run(), run()
    assert [c["answers"] for c in first["cases"]] == [c["answers"] for c in second["cases"]]
    assert [(c["length"], c["depth"]) for c in first["cases"]] == [(200, 0.0), (200, 1.0),
                                                                  (256, 0.0), (256, 1.0)]
    for case in first["cases"]:
        assert case["trials"] == 2 and len(case["answers"]) == 2
        assert case["accuracy"] == case["correct"] / 2
        assert 0.75 * case["length"] <= case["prompt_tokens"] <= case["length"]
        assert case["bits_per_element"] == 16.0
    assert first["accuracy"] == sum(c["correct"] for c in first["cases"]) / 8


@pytest.mark.parametrize("kwargs, message", [
    ({"lengths": [], "depths": [0.5]}, "lengths"),
    ({"lengths": [128], "depths": [1.5]}, "depths"),
    ({"lengths": [128], "depths": [0.5], "trials": 0}, "trials"),
])
def test_bad_cases_are_value_errors(stories, kwargs, message):
    with pytest.raises(ValueError, match=message):
        passkey_eval(stories, MethodSpec.of("fp16"), **kwargs)
