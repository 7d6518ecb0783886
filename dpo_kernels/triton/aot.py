"""Ahead-of-time compile check of every Triton kernel, without a GPU.

    python -m dpo_kernels.triton.aot [--arch 80 90] [--jobs N]

Compiles each kernel for every logits dtype, label dtype and launch config the launchers can choose,
in the argument specializations Triton's JIT would make (vocabulary stride 1 folded to a constant;
16-byte divisible pointers and strides, as for V = 32000 or 128256; odd strides, as for V = 50257; a
strided vocabulary), down to cubin for each architecture. Prints registers, shared memory and local
memory per variant, and exits non-zero on a compile error, on register spills (local memory), or on
an aligned variant whose logits loads are not vectorized. Must run without TRITON_INTERPRET.
"""

import argparse
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

DTYPES = ("fp32", "bf16", "fp16")
LABEL_DTYPES = ("i64", "i32")
# The JIT's view of the integer arguments: "one" is folded to a constant, "aligned" divides by 16.
LAYOUTS = ("aligned", "unaligned", "strided_vocab")

KERNEL_POINTERS = {  # pointer argument -> element type ("X" logits dtype, "Y" label dtype)
    "token_logps_fwd_kernel": {"logits_ptr": "X", "labels_ptr": "Y", "logp_ptr": "fp32", "lse_ptr": "fp32"},
    "token_logps_bwd_kernel": {
        "grad_logits_ptr": "X",
        "logits_ptr": "X",
        "labels_ptr": "Y",
        "grad_tok_ptr": "fp32",
        "lse_ptr": "fp32",
    },
}
VOCAB_STRIDES = ("stride_lv", "stride_gv")
# Divisible by 16 when V is (V = 32000, 128256, ...): the masks and row starts then allow 128-bit loads.
ALIGNED_INTS = ("V", "stride_ln", "stride_lt", "stride_gn", "stride_gt")


@dataclass(frozen=True)
class Variant:
    kernel: str
    dtype: str
    label: str
    block: int
    warps: int
    layout: str
    arch: int

    @property
    def name(self):
        return f"{self.kernel} {self.dtype}/{self.label} BLOCK_V={self.block} warps={self.warps} {self.layout} sm_{self.arch}"


def variants(archs):
    from .logprobs import LAUNCH_CONFIGS

    hot = LAUNCH_CONFIGS[-1]
    for arch in archs:
        for kernel in KERNEL_POINTERS:
            for dtype in DTYPES:
                for block, warps in LAUNCH_CONFIGS:
                    for label in LABEL_DTYPES:
                        yield Variant(kernel, dtype, label, block, warps, "aligned", arch)
                for layout in LAYOUTS[1:]:  # odd and strided rows only matter at real vocabulary sizes
                    yield Variant(kernel, dtype, "i64", *hot, layout, arch)


def source(variant: Variant):
    from triton.compiler import ASTSource

    from . import logprobs

    fn = getattr(logprobs, variant.kernel)
    pointers = KERNEL_POINTERS[variant.kernel]
    signature, constexprs, attrs = {}, {"BLOCK_V": variant.block}, {}
    for index, arg in enumerate(fn.arg_names):
        if arg in pointers:
            kind = pointers[arg]
            signature[arg] = "*" + {"X": variant.dtype, "Y": variant.label}.get(kind, kind)
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif arg == "BLOCK_V":
            signature[arg] = "constexpr"
        elif arg in VOCAB_STRIDES and variant.layout != "strided_vocab":
            signature[arg] = "constexpr"
            constexprs[arg] = 1
        else:
            signature[arg] = "i32"
            if arg in ALIGNED_INTS and variant.layout == "aligned":
                attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def resource_usage(cubin: bytes) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], check=True, capture_output=True, text=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def compile_variant(variant: Variant) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    start = time.perf_counter()
    try:
        kernel = triton.compile(
            source(variant), target=GPUTarget("cuda", variant.arch, 32), options={"num_warps": variant.warps}
        )
    except Exception as error:  # report every failing variant, not just the first
        return {"variant": variant, "error": f"{type(error).__name__}: {error}"}
    usage = resource_usage(kernel.asm["cubin"])
    vector_loads = bool(re.search(r"ld\.global(\.\w+)*\.v[248]", kernel.asm["ptx"]))
    problems = []
    if usage.get("LOCAL", 0) or usage.get("STACK", 0):
        problems.append(f"register spills: local={usage.get('LOCAL')} stack={usage.get('STACK')}")
    if variant.layout == "aligned" and not vector_loads:
        problems.append("aligned variant without vectorized global loads")
    return {
        "variant": variant,
        "usage": usage,
        "shared": kernel.metadata.shared,
        "vector_loads": vector_loads,
        "seconds": time.perf_counter() - start,
        "problems": problems,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels with Python functions", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    todo = list(variants(args.arch))
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(compile_variant, todo))
    failures = 0
    print(f"{'variant':<80} {'regs':>4} {'smem':>6} {'local':>5} {'vec':>3} {'s':>5}")
    for result in results:
        variant = result["variant"]
        if "error" in result:
            failures += 1
            print(f"{variant.name:<80} COMPILE ERROR {result['error']}")
            continue
        usage = result["usage"]
        print(
            f"{variant.name:<80} {usage.get('REG', 0):>4} {result['shared']:>6} {usage.get('LOCAL', 0):>5} "
            f"{'yes' if result['vector_loads'] else 'no':>3} {result['seconds']:>5.1f}"
        )
        for problem in result["problems"]:
            failures += 1
            print(f"  FAIL: {problem}")
    print(f"{len(results)} variants compiled for sm_{', sm_'.join(map(str, args.arch))}; {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
