"""`kvpack calibrate`: write a KVQuant calibration artifact for one model."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from kvpack.calibrate.defaults import EVEN_KEY_BITS, EVEN_VALUE_BITS
from kvpack.common.flags import non_negative_int, positive_int


def bits_list(value: str) -> list[int]:
    try:
        bits = sorted({int(part) for part in value.split(",") if part.strip()})
    except ValueError:
        message = f"expected comma-separated bit widths, got {value!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not bits or any(b not in (2, 3, 4) for b in bits):
        raise argparse.ArgumentTypeError(f"bit widths must be among 2,3,4, got {value!r}")
    return bits


def optional_bits_list(value: str) -> list[int]:
    """Comma-separated bit widths among 2,3,4, or "none" for no width."""
    if value.strip().lower() in ("none", ""):
        return []
    return bits_list(value)


def fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not 0.0 <= number < 0.5:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 0.5), got {value}")
    return number


def add_parser(subparsers, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=(
        "Calibrate KVQuant for one model: Fisher-weighted per-layer codebooks for keys and "
        "values, per-channel pre-RoPE key scales, Q-Norm constants. Writes one safetensors file."))
    parser.add_argument("--model", required=True,
                        help="HF hub id, local HF folder, GGUF folder, or llama2.c folder")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    parser.add_argument("--text", required=True, type=Path, help="calibration text file (UTF-8)")
    parser.add_argument("--tokens", required=True, type=positive_int,
                        help="calibration tokens, split into --sequence-length windows")
    parser.add_argument("--sequence-length", type=positive_int, default=512,
                        help="tokens per calibration window (default %(default)s)")
    parser.add_argument("--bits", type=bits_list, default=[2, 3, 4],
                        help="bit widths to fit codebooks for (default 2,3,4)")
    parser.add_argument("--outliers", type=fraction, default=0.01,
                        help="fraction of elements kept as sparse outliers (default %(default)s)")
    parser.add_argument("--sink-tokens", type=non_negative_int, default=1,
                        help="first tokens of each window kept in fp16, left out of the fit "
                             "(default %(default)s)")
    parser.add_argument("--fisher-weighting", choices=("keys", "both", "values", "none"),
                        default="keys",
                        help="codebooks whose k-means weighs elements by their Fisher "
                             "information (all weigh by the squared scale) (default %(default)s)")
    def widths(default) -> str:
        return ",".join(map(str, default)) or "none"

    parser.add_argument("--even-key-bits", type=optional_bits_list, default=list(EVEN_KEY_BITS),
                        help="bit widths whose key codebook is evenly spaced in the calibrated "
                             "range instead of fitted by weighted k-means, comma-separated or "
                             f"none (default {widths(EVEN_KEY_BITS)}: on SmolLM2 evenly spaced "
                             "4-bit keys beat k-means, docs/eval.md)")
    parser.add_argument("--even-value-bits", type=optional_bits_list,
                        default=list(EVEN_VALUE_BITS),
                        help="the same for value codebooks "
                             f"(default {widths(EVEN_VALUE_BITS)})")
    parser.add_argument("--sensitivity-tokens", type=non_negative_int, default=512,
                        help="calibration tokens (the first ones of --text, in "
                             "--sequence-length windows) on which each layer's measured "
                             "sensitivity to K/V quantization at each bit width is recorded, "
                             "for --avg-bits allocation; 0 skips it (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    parser.add_argument("--out", required=True, type=Path, help="artifact path (.safetensors)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run_calibrate)


def token_windows(tokenizer, text: str, tokens: int, sequence_length: int):
    """The first `tokens` tokens of `text` as [S, L] windows (L = min(sequence_length, tokens)).
    Encodes a growing prefix of the text, so a small calibration never tokenizes a whole corpus."""
    import torch

    length = min(sequence_length, tokens)
    characters = tokens * 8
    while True:
        ids = tokenizer.encode(text[:characters])
        if len(ids) >= tokens or characters >= len(text):
            break
        characters *= 2
    usable = min(len(ids), tokens) // length * length
    if usable == 0:
        raise ValueError(f"the text holds {len(ids)} tokens, fewer than one window of {length}")
    return torch.tensor(ids[:usable], dtype=torch.long).reshape(-1, length)


def run_calibrate(args: argparse.Namespace) -> int:
    from kvpack.calibrate.calibrate import calibrate_model
    from kvpack.inference.loader import load_model

    prog = "kvpack calibrate"
    try:
        raw = args.text.read_bytes()
    except OSError as error:
        raise SystemExit(f"{prog}: --text: {error}") from None
    try:
        loaded = load_model(args.model, gguf_file=args.gguf_file, device=args.device)
        sequences = token_windows(loaded.tokenizer, raw.decode("utf-8", errors="replace"),
                                  args.tokens, args.sequence_length)
        sensitivity = None
        if args.sensitivity_tokens:
            windows = min(len(sequences),
                          -(-args.sensitivity_tokens // sequences.shape[1]))
            sensitivity = sequences[:windows]
        calibration = calibrate_model(
            loaded.model, sequences, model_id=loaded.model_id, bits_list=args.bits,
            outliers=args.outliers, sink_tokens=args.sink_tokens,
            text_sha256=hashlib.sha256(raw).hexdigest(), progress=not args.quiet,
            sensitivity_sequences=sensitivity, fisher_weighting=args.fisher_weighting,
            even_key_bits=tuple(args.even_key_bits), even_value_bits=tuple(args.even_value_bits),
        )
    except (ValueError, OSError) as error:
        raise SystemExit(f"{prog}: {error}") from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    calibration.save(args.out)
    meta = calibration.metadata
    print(f"{prog}: {meta['num_layers']} layers, {meta['num_tokens']} tokens, bits {meta['bits']}, "
          f"outliers {meta['outliers']} -> {args.out}", flush=True)
    return 0
