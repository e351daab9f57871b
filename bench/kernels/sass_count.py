"""Offline SASS instruction counts of the KVQuant key-score kernel for an H100 (sm_90), no GPU.

Compiles `_kvquant_key_scores_kernel` (v1/v2) and `_kvquant_key_scores_v3_kernel` with the GPU
machine's Triton (3.6) for GPUTarget("cuda", 90, 32), disassembles the cubin with the bundled
cuobjdump, and counts SASS instructions per program (one BLOCK_T-token tile of HEADS KV heads):
the loop bodies found from backward branches times their trip counts, plus the straight-line
code. This is a cost proxy for an instruction-bound kernel, not a GPU time.

    pip install --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36 .venv/bin/python bench/kernels/sass_count.py [--dump DIR]

Shape: Llama-3-8B layer (32 query heads, 8 KV heads, head_dim 128), bf16 q, one decode query,
3-bit codes, 2 outlier slots (1% of 128), launch settings as `key_scores` picks them at 128K.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_kernels  # noqa: E402,F401  (sets up kvpack.kernels from the checkout)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from kvpack.kernels import kvquant_scores_v3_triton as kq3  # noqa: E402
from kvpack.kernels import kvquant_triton as kq  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

HEAD_DIM, BITS, NUM_SLOTS, GROUP = 128, 3, 2, 4


POINTERS = {"Q_ptr": "*bf16", "Codes_ptr": "*i32", "Index_ptr": "*u8", "Delta_ptr": "*fp16",
            "Sink_ptr": "*i32", "Zero_ptr": "*fp32", "Scale_ptr": "*fp32", "Lut_ptr": "*fp32",
            "InvFreq_ptr": "*fp32", "QOp_ptr": "*fp16", "Out_ptr": "*fp32"}
TOKENS = 131072
# integer arguments as the launcher passes them at the benchmark shape (kernel rows of
# bench_kvquant.py: 128K tokens, token_start 1, no sink); Triton specializes ints equal to 1 as
# constants and marks ints divisible by 16 (and every pointer: torch allocations) as such
INTS = dict(stride_qb=32 * HEAD_DIM, stride_qh=HEAD_DIM, stride_qt=HEAD_DIM,
            stride_cb=8 * TOKENS * 12, stride_ch=TOKENS * 12, stride_ct=12,
            stride_ob=8 * TOKENS * NUM_SLOTS, stride_oh=TOKENS * NUM_SLOTS, stride_ot=NUM_SLOTS,
            stride_kb=8 * TOKENS * 12, stride_kh=TOKENS * 12, stride_kt=12,
            stride_sb=32 * TOKENS, stride_sh=TOKENS, stride_sq=TOKENS,
            num_kv_heads=8, num_query_tokens=1, group_size=GROUP, token_start=1,
            num_tokens=TOKENS, num_sink=0, num_m_blocks=1)


def _source(fn, pointer_types: dict, constexprs: dict, ints: dict) -> ASTSource:
    signature, constants, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "attention_scaling":
            signature[name] = "fp32"
        elif ints[name] == 1:
            signature[name] = "constexpr"
            constants[name] = 1
        else:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs=constants, attrs=attrs)


def variants():
    """(label, kernel, constexprs, num_warps, block_t, maxnreg) of every design counted (maxnreg:
    the ptxas register cap the launcher passes, None: uncapped)."""
    base = dict(HEAD_DIM=HEAD_DIM, BITS=BITS, NUM_SLOTS=NUM_SLOTS, BLOCK_T=128, BLOCK_M=16,
                CORRECTION_ROWS=GROUP, HEADS=8, USE_DOT=True, INPUT_PRECISION="tf32", WORDS=True,
                COMPUTE=tl.float16, OUTLIER_ROW_CHUNK=GROUP)
    fn = kq._kvquant_key_scores_kernel
    out = []
    for prepared, name in ((False, "v1 queries rebuilt per tile"),
                           (True, "v2 prepared queries")):
        for block_t, warps in ((128, 8), (64, 4)):
            out.append((f"{name} bt{block_t} w{warps}", fn,
                        dict(base, BLOCK_T=block_t, PREPARED=prepared), warps, block_t, None))
    v3 = dict(BITS=BITS, NUM_SLOTS=NUM_SLOTS, BLOCK_M=16, CORRECTION_ROWS=GROUP, HEADS=8,
              PRMT=True, OUTLIER_ROW_CHUNK=GROUP, MASK_ROWS=False, OUTLIER_PREFETCH=False)
    for block_t, warps in ((64, 4), (128, 8)):
        for cap in (kq.V3_MAXNREG, None):
            for prefetch, direct in ((0, 0), (1, 0), (0, 1), (1, 1)):
                out.append((f"v3 register operand bt{block_t} w{warps} maxnreg {cap} "
                            f"prefetch {prefetch} direct store {direct}",
                            kq3._kvquant_key_scores_v3_kernel,
                            dict(v3, BLOCK_T=block_t, PREFETCH=prefetch, DIRECT_STORE=direct),
                            warps, block_t, cap))
    defaults = dict(v3, BLOCK_T=64, PREFETCH=1, DIRECT_STORE=1, OUTLIER_PREFETCH=True)
    out.append((f"v3 launcher defaults bt64 w4 maxnreg {kq.V3_MAXNREG} prefetch 1 direct store 1 "
                "outlier prefetch 1", kq3._kvquant_key_scores_v3_kernel, defaults, 4, 64,
                kq.V3_MAXNREG))
    # the launcher's defaults reading only the real query rows of the query operands
    out.append((f"v3 masked query rows bt64 w4 maxnreg {kq.V3_MAXNREG} prefetch 1 direct store "
                "1 outlier prefetch 1", kq3._kvquant_key_scores_v3_kernel,
                dict(defaults, MASK_ROWS=True), 4, 64, kq.V3_MAXNREG))
    # 2-bit codes through version 3 with the launcher's defaults (its 1-bit plane loads vanish)
    out.append((f"v3 2-bit register operand bt64 w4 maxnreg {kq.V3_MAXNREG} prefetch 1 direct "
                "store 1 outlier prefetch 1", kq3._kvquant_key_scores_v3_kernel,
                dict(defaults, BITS=2), 4, 64, kq.V3_MAXNREG))
    return out


def compile_sass(fn, constexprs, num_warps, dump: Path | None, label: str, maxnreg=None,
                 pointers: dict = POINTERS, ints: dict = INTS):
    """Compile fn for sm_90 (pointer argument types and integer argument values as the
    launcher passes them; the KVQuant score kernel's by default)."""
    src = _source(fn, pointers, constexprs, ints)
    options = dict(num_warps=num_warps, num_stages=1)
    if maxnreg:
        options["maxnreg"] = maxnreg
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([str(tool), "-sass", cubin.name], check=True, capture_output=True,
                              text=True).stdout
        usage = subprocess.run([str(tool), "-res-usage", cubin.name], check=True,
                               capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    compiled.regs = int(regs.group(1)) if regs else None
    compiled.stack = int(stack.group(1)) if stack else None  # spill/local bytes per thread
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")
        (dump / f"{stem}.sass").write_text(sass)
        (dump / f"{stem}.ttgir").write_text(compiled.asm["ttgir"])
    return compiled, sass


LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def parse(sass: str):
    """[(address, opcode, text)] of the kernel's instructions."""
    rows = []
    for match in LINE.finditer(sass):
        address, text = int(match.group(1), 16), match.group(2).strip()
        body = re.sub(r"^@!?U?P[T0-9]+\s+", "", text)
        opcode = body.split()[0] if body else ""
        rows.append((address, opcode, text))
    return rows


def loops(rows):
    """(start, end) address ranges of loop bodies: backward branches."""
    found = []
    for address, opcode, text in rows:
        if opcode.startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", text)
            if target and int(target.group(1), 16) <= address:
                found.append((int(target.group(1), 16), address))
    return found


def opcode_mix(rows, start, end, top=14):
    mix = collections.Counter(op.split(".")[0] for a, op, _ in rows if start <= a <= end)
    return ", ".join(f"{op} {n}" for op, n in mix.most_common(top))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", type=Path, default=None, help="write .sass/.ttgir here")
    parser.add_argument("--only", default="", help="substring of the variant labels to count")
    parser.add_argument("--maxnreg", type=int, default=None, help="ptxas register cap")
    args = parser.parse_args()
    print(f"triton {triton.__version__}, target sm_90; counts are offline SASS, not GPU time")
    for label, fn, constexprs, warps, block_t, cap in variants():
        if args.only not in label:
            continue
        compiled, sass = compile_sass(fn, constexprs, warps, args.dump, label,
                                      args.maxnreg or cap)
        rows = parse(sass)
        spans = sorted(loops(rows), key=lambda s: s[0])
        print(f"\n== {label}: regs {compiled.regs} stack(spill) {compiled.stack} B "
              f"shared {compiled.metadata.shared} B, {len(rows)} static SASS instructions")
        for start, end in spans:
            n = sum(1 for a, _, _ in rows if start <= a <= end)
            print(f"  loop {start:#06x}-{end:#06x}: {n} instructions; "
                  f"{opcode_mix(rows, start, end)}")
        elements = block_t * HEAD_DIM  # key elements of one head's tile
        heads = [(start, end) for start, end in spans if any(
            start <= a <= end and op.startswith("HGMMA") for a, op, _ in rows)]
        inner = min(heads, key=lambda s: s[1] - s[0]) if heads else None
        if inner:
            n = sum(1 for a, _, _ in rows if inner[0] <= a <= inner[1])
            bars = sum(1 for a, op, _ in rows if inner[0] <= a <= inner[1] and op.startswith("BAR"))
            shared = sum(1 for a, op, _ in rows if inner[0] <= a <= inner[1]
                         and op.split(".")[0] in ("LDS", "STS", "LDSM", "STSM"))
            local = sum(1 for a, op, _ in rows if inner[0] <= a <= inner[1]
                        and op.split(".")[0] in ("LDL", "STL"))
            print(f"  head loop (one KV head x {block_t} tokens): {n} SASS per thread, {bars} BAR, "
                  f"{shared} shared ld/st, {local} spill ld/st; "
                  f"{n * warps * 32 / elements:.2f} thread-instructions per key element")
        outside = [r for r in rows if not any(s <= r[0] <= e for s, e in spans)]
        print(f"  outside loops: {len(outside)} static (prologue, sin/cos, outliers, sink branch)")


if __name__ == "__main__":
    main()
