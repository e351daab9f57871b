"""Method specs: service defaults, overrides, and errors naming the problem."""

from __future__ import annotations

import pytest
from kvpack.inference.methods import MethodSpec, available_methods, build_layer_codecs


def test_service_window_default_applies_unless_overridden():
    codec = build_layer_codecs(MethodSpec.of("kivi"), num_layers=2, head_dim=64)[0]
    assert codec.params()["window"] == 128
    codec = build_layer_codecs(MethodSpec.of("kivi", {"window": 0}), num_layers=2, head_dim=64)[0]
    assert codec.params()["window"] == 0
    assert MethodSpec.of("fp16") == MethodSpec("fp16")


def test_every_design_method_is_available():
    assert {"fp16", "kivi", "qjl", "kvquant"} <= set(available_methods())


@pytest.mark.parametrize(
    ("spec", "message"),
    [(MethodSpec.of("zstd"), "unknown method"), (MethodSpec.of("kivi", {"colour": 1}), "colour")],
)
def test_bad_methods_are_value_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        build_layer_codecs(spec, num_layers=1, head_dim=64)
