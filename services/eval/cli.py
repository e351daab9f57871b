"""`kvpack eval ppl` and `kvpack eval passkey`: fidelity of a compression method on a real model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvpack.common.flags import positive_int
from kvpack.inference.cli import METHOD_FLAGS, method_params

HF_QUANTO = "hf-quanto"
CACHE_DTYPES = ("float16", "bfloat16", "float32")


def comma_list(kind):
    def parse(value: str):
        try:
            items = [kind(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list, got {value!r}") from None
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {value!r}")
        return items

    return parse


def _add_common(parser: argparse.ArgumentParser, *, methods_help: str) -> None:
    parser.add_argument("--model", required=True,
                        help="HF model id, local HF folder, GGUF file, or llama2.c folder")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
    parser.add_argument("--method", default="fp16", help=methods_help + " (default %(default)s)")
    # The codec flags of `kvpack inference serve`, same names and types.
    for dest, (param, kind, methods) in METHOD_FLAGS.items():
        parser.add_argument(f"--{dest.replace('_', '-')}", dest=dest, type=kind, default=None,
                            help=f"codec parameter {param} of {'/'.join(methods)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="(default %(default)s)")
    parser.add_argument("--dtype", choices=CACHE_DTYPES, default="float32",
                        help="model dtype (default %(default)s)")
    parser.add_argument("--cache-dtype", choices=CACHE_DTYPES, default="float16",
                        help="dtype the KV cache stores full-precision numbers in (scales, "
                             "windows, the fp16 codec) (default %(default)s)")
    parser.add_argument("--prefill-chunk-tokens", type=positive_int, default=256,
                        help="prompt tokens per prefill step (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_parser(subparsers, name: str, help_text: str) -> None:
    evaluate = subparsers.add_parser(name, help=help_text, description=help_text)
    commands = evaluate.add_subparsers(dest="eval_command", required=True, metavar="COMMAND")
    ppl = commands.add_parser(
        "ppl", help="perplexity through the compressed cache",
        description="Perplexity of the first --tokens tokens of --text: prefill of "
                    "--prefill-tokens, then teacher-forced decode one token at a time, every "
                    "prediction attending through the method's cache. Scores tokens 1..N-1; "
                    "bits per element are the codec's stored bytes over all K and V elements.")
    _add_common(ppl, methods_help="fp16|kivi|qjl|kvquant, or hf-quanto (HF QuantizedCache, "
                                  "--bits 2|4)")
    ppl.add_argument("--text", required=True, type=Path, help="UTF-8 text file")
    ppl.add_argument("--tokens", required=True, type=positive_int, help="tokens to evaluate (N)")
    ppl.add_argument("--prefill-tokens", type=positive_int, default=128,
                     help="tokens prefilled before decoding (default %(default)s)")
    ppl.set_defaults(run=run_ppl, parser=ppl)

    passkey = commands.add_parser(
        "passkey", help="passkey retrieval at several context lengths and depths",
        description="Hide a 5-digit pass key in filler text at each depth of each length; "
                    "greedy answer through the method's cache; accuracy per case and overall.")
    _add_common(passkey, methods_help="fp16|kivi|qjl|kvquant")
    passkey.add_argument("--lengths", type=comma_list(int), default=[256, 512, 1024],
                         help="prompt lengths in tokens (default 256,512,1024)")
    passkey.add_argument("--depths", type=comma_list(float), default=[0.1, 0.5, 0.9],
                         help="needle depths in [0, 1] (default 0.1,0.5,0.9)")
    passkey.add_argument("--trials", type=positive_int, default=1,
                         help="keys per length and depth (default %(default)s)")
    passkey.add_argument("--seed", type=int, default=0, help="key seed (default %(default)s)")
    passkey.add_argument("--max-new-tokens", type=positive_int, default=10,
                         help="answer tokens generated (default %(default)s)")
    passkey.set_defaults(run=run_passkey, parser=passkey)


def method_spec(args: argparse.Namespace):
    """The method and its codec parameters from the flags; bad combinations exit with one line."""
    from kvpack.inference.methods import MethodSpec, available_methods

    parser = args.parser
    allowed = available_methods() + ([HF_QUANTO] if args.run is run_ppl else [])
    if args.method not in allowed:
        parser.error(f"--method must be one of {', '.join(allowed)}, got {args.method!r}")
    if args.method == HF_QUANTO:
        given = [dest for dest in METHOD_FLAGS
                 if dest != "bits" and getattr(args, dest) is not None]
        if given:
            parser.error(f"--{given[0].replace('_', '-')} does not apply to --method {HF_QUANTO}")
        if args.bits not in (2, 4):
            parser.error(f"--method {HF_QUANTO} needs --bits 2 or 4")
        return MethodSpec.of(HF_QUANTO, {"bits": args.bits})
    if args.method == "kvquant" and args.calibration is None:
        parser.error("--method kvquant needs --calibration PATH (made by `kvpack calibrate`)")
    return MethodSpec.of(args.method, method_params(args, parser))


def _load(args: argparse.Namespace):
    from kvpack.inference.loader import load_model, parse_dtype

    loaded = load_model(args.model, gguf_file=args.gguf_file, device=args.device, dtype=args.dtype)
    return loaded, parse_dtype(args.cache_dtype)


def _emit(args: argparse.Namespace, result: dict, summary: str) -> None:
    print(json.dumps(result) if args.json else summary, flush=True)


def run_ppl(args: argparse.Namespace) -> int:
    from kvpack.calibrate.cli import token_windows

    prog = "kvpack eval ppl"
    spec = method_spec(args)
    if args.prefill_tokens > args.tokens:
        args.parser.error(f"--prefill-tokens {args.prefill_tokens} exceeds --tokens {args.tokens}")
    try:
        text = args.text.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise SystemExit(f"{prog}: --text: {error}") from None
    try:
        loaded, cache_dtype = _load(args)
        token_ids = token_windows(loaded.tokenizer, text, args.tokens, args.tokens)[0]
        if spec.name == HF_QUANTO:
            from kvpack.eval.hf_quanto import hf_quanto_perplexity

            result = hf_quanto_perplexity(loaded, token_ids, bits=args.bits,
                                          prefill_tokens=args.prefill_tokens,
                                          progress=not args.quiet)
        else:
            from kvpack.eval.perplexity import codec_perplexity

            result = codec_perplexity(loaded, token_ids, spec, prefill_tokens=args.prefill_tokens,
                                      chunk_tokens=args.prefill_chunk_tokens,
                                      cache_dtype=cache_dtype, progress=not args.quiet)
    except (ValueError, OSError, ImportError) as error:
        raise SystemExit(f"{prog}: {error}") from None
    data = {"model": loaded.model_id, "text": str(args.text), **result.to_json()}
    _emit(args, data, f"{spec.name} {data['params']}: ppl {result.ppl:.4f} over {result.tokens} "
                      f"tokens, {result.bits_per_element:.3f} bits per element")
    return 0


def run_passkey(args: argparse.Namespace) -> int:
    from kvpack.eval.passkey import passkey_eval

    prog = "kvpack eval passkey"
    spec = method_spec(args)
    try:
        loaded, cache_dtype = _load(args)
        result = passkey_eval(loaded, spec, lengths=args.lengths, depths=args.depths,
                              trials=args.trials, seed=args.seed,
                              max_new_tokens=args.max_new_tokens,
                              chunk_tokens=args.prefill_chunk_tokens, cache_dtype=cache_dtype,
                              progress=not args.quiet)
    except (ValueError, OSError) as error:
        raise SystemExit(f"{prog}: {error}") from None
    result = {"model": loaded.model_id, **result}
    lines = [f"{case['length']:>6} tokens  depth {case['depth']:.2f}: "
             f"{case['correct']}/{case['trials']}" for case in result["cases"]]
    _emit(args, result, "\n".join(lines + [f"accuracy {result['accuracy']:.3f}"]))
    return 0

