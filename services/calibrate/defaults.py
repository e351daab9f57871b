"""Calibration defaults that the CLI needs without importing torch (the kvstore image has none)."""

# Bit widths whose codebooks are evenly spaced instead of k-means fitted (defaults: docs/eval.md).
EVEN_KEY_BITS: tuple[int, ...] = (4,)
EVEN_VALUE_BITS: tuple[int, ...] = ()
