"""The `kvpack` command: one entry point, one subcommand per component.

Components register their subcommands in `COMMANDS`; each is imported only when used, so
`kvpack kvstore serve` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kvpack import __version__
from kvpack.common.flags import apply_env_defaults

# subcommand -> (module with add_parser(subparsers), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "kvstore": ("kvpack.kvstore.cli", "the KV block store service"),
    "calibrate": ("kvpack.calibrate.cli", "KVQuant calibration: write a model's codebooks"),
    "inference": ("kvpack.inference.cli", "the inference service"),
    "generate": ("kvpack.inference.generate_cli", "stream a completion from an inference service"),
    "eval": ("kvpack.eval.cli", "fidelity evaluation: perplexity and passkey retrieval"),
    "up": ("kvpack.up", "run the whole stack as local processes (embedded defaults)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpack", description="LLM serving with a compressed, shareable KV cache."
    )
    parser.add_argument("--version", action="version", version=f"kvpack {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        importlib.import_module(module).add_parser(subparsers, name, help_text)
    apply_env_defaults(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
