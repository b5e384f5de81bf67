"""What ptxas makes of fastlab's attention kernels, without a GPU: the three kernels of one
attention forward and backward compiled for sm90 at chosen tiles, each with its registers,
stack (spills), shared memory and its SASS instructions counted by class (tensor-core HGMMA,
special-function MUFU, conversions, fp32 math, memory, barriers).

    python benches/kernel_sass.py [--shape B,H,S,D] [--dtype bf16|fp16|fp32] [--no-causal]
                                  [--tile KERNEL=BLOCK_M,BLOCK_N,WARPS,STAGES ...] [--json F]

KERNEL is fwd, dq or dkdv; a kernel without --tile compiles at the widest tile its
autotuner's pruning keeps. Runs on the CPU through Triton's compiler and the ptxas and
nvdisasm it ships (launches recorded and specialized as the JIT does for a GPU by
tests/_compile_sm90.py, TRITON_INTERPRET unset).
Use it to check a kernel variant offline before timing it on a GPU: that it issues fewer
special-function instructions, say, or spills nothing.
"""
import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import torch  # noqa: E402
import triton  # noqa: E402

import _compile_sm90 as harness  # noqa: E402

KERNELS = {"fwd": "_fwd_kernel", "dq": "_bwd_dq_kernel", "dkdv": "_bwd_dkdv_kernel"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: SASS opcode prefixes counted, in the order printed
CLASSES = ["HGMMA", "HMMA", "MUFU.EX2", "MUFU.RCP", "MUFU", "F2FP", "FFMA", "FMUL", "FADD",
           "FMNMX", "FSEL", "LDGSTS", "UTMALDG", "LDG", "STG", "LDSM", "LDS", "STS", "LDL",
           "STL", "WARPGROUP", "BAR", "SYNCS"]
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")


def _tool(name: str, cubin_path: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    flags = ["-c"] if name == "nvdisasm" else ["--dump-resource-usage"]
    return subprocess.run([path, *flags, cubin_path], capture_output=True, text=True,
                          check=True).stdout


def inspect_cubin(cubin: bytes):
    """(registers per thread, stack bytes per thread: where spills go) from the cubin's
    resource usage, and its SASS instructions by class (the first prefix of CLASSES each
    opcode has) with their total."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage, sass = _tool("cuobjdump", f.name), _tool("nvdisasm", f.name)
    registers = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    counts = collections.Counter()
    for op in _INSTRUCTION.findall(sass):
        counts["total"] += 1
        for cls in CLASSES:
            if op.startswith(cls):
                counts[cls] += 1
                break
    return (int(registers.group(1)) if registers else None,
            int(stack.group(1)) if stack else None, dict(counts))


def parse_tile(text: str):
    name, _, values = text.partition("=")
    if name not in KERNELS:
        raise argparse.ArgumentTypeError(f"--tile: kernel must be one of {list(KERNELS)}, "
                                         f"got {name!r}")
    try:
        tile = tuple(int(v) for v in values.split(","))
    except ValueError:
        tile = ()
    if len(tile) != 4:
        raise argparse.ArgumentTypeError(f"--tile: want {name}=BLOCK_M,BLOCK_N,WARPS,STAGES, "
                                         f"got {text!r}")
    return KERNELS[name], tile


def compile_call(shape, dtype, causal: bool, tiles: dict) -> list:
    """One row per compiled kernel: name, tile, registers, spills, shared bytes, counts."""
    rows = []
    compile_ = harness.triton.compile
    autotuned = harness._autotuned_compiles

    def pick(tuner, *args, **kwargs):
        want = tiles.get(tuner.fn.fn.__name__)
        if want is None:
            return autotuned(tuner, *args, **kwargs)
        for config in tuner.configs:
            kw = config.kwargs
            if (kw.get("BLOCK_M"), kw.get("BLOCK_N"), config.num_warps,
                    config.num_stages) == want:
                tuner.best_config = config
                return tuner.fn.run(*args, **kwargs, **config.all_kwargs())
        raise SystemExit(f"{tuner.fn.fn.__name__}: no candidate tile {want}; candidates: "
                         f"{[(c.kwargs, c.num_warps, c.num_stages) for c in tuner.configs]}")

    def record(src, target=None, options=None):
        compiled = compile_(src, target=target, options=options)
        names = src.fn.arg_names
        block = tuple(src.constants.get((names.index(n),)) for n in ("BLOCK_M", "BLOCK_N"))
        registers, stack, counts = inspect_cubin(compiled.asm["cubin"])
        rows.append(dict(kernel=src.fn.fn.__name__, block=block,
                         warps=compiled.metadata.num_warps,
                         stages=compiled.metadata.num_stages,
                         registers=registers, stack_bytes=stack,
                         shared=compiled.metadata.shared, sass=counts))
        return compiled

    harness.triton.compile, harness._autotuned_compiles = record, pick
    try:
        b, h, s, d = shape
        q, k, v = harness._inputs(b, h, h, s, d, dtype)
        opts = dict(kv_lens=None, causal=causal, scale=d ** -0.5)

        def run():
            out, lse = harness.A.attention_forward(q, k, v, **opts)
            harness.A.attention_backward(torch.randn_like(out), None, q, k, v, out, lse,
                                         **opts)
        harness.record_triton(run)
    finally:
        harness.triton.compile, harness._autotuned_compiles = compile_, autotuned
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1,2,1024,128",
                   help="B,H,S,D of q, k and v (default 1,2,1024,128)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--tile", type=parse_tile, action="append", default=[])
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    try:
        shape = tuple(int(x) for x in args.shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        p.error(f"--shape: want four positive integers B,H,S,D, got {args.shape!r}")
    candidates = {"_fwd_kernel": harness.A._FWD_CANDIDATES,
                  "_bwd_dq_kernel": harness.A._DQ_CANDIDATES,
                  "_bwd_dkdv_kernel": harness.A._DKDV_CANDIDATES}
    for kernel, tile in args.tile:
        if tile not in candidates[kernel]:
            p.error(f"--tile: {tile} is not a candidate of {kernel}; candidates "
                    f"(BLOCK_M, BLOCK_N, WARPS, STAGES): {candidates[kernel]}")
    rows = compile_call(shape, DTYPES[args.dtype], not args.no_causal, dict(args.tile))
    for r in rows:
        counts = r["sass"]
        print(f"{r['kernel']:18s} block {r['block']} warps {r['warps']} stages {r['stages']}: "
              f"{r['registers']} registers, {r['stack_bytes']} B stack, {r['shared']} B shared, "
              f"{counts.get('total', 0)} instructions")
        print("    " + "  ".join(f"{c} {counts[c]}" for c in CLASSES if c in counts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=shape, dtype=args.dtype, causal=not args.no_causal,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
