"""Ahead-of-time compile check of every Triton kernel, without a GPU.

    python -m dpo_kernels.triton.aot [--arch 80 90] [--jobs N]

Compiles each kernel for every logits dtype, label dtype and launch config the launchers can choose
(the forward without and with its per-token statistics, WITH_STATS), in the argument specializations
Triton's JIT would make (vocabulary stride 1 folded to a constant;
16-byte divisible pointers and strides, as for V = 32000 or 128256; odd strides, as for V = 50257; a
strided vocabulary), down to cubin for each architecture. Prints registers, shared memory and local
memory per variant, and exits non-zero on a compile error, on register spills (local memory), or on
an aligned or odd-stride variant whose logits loads (the backward: also its gradient stores) are not
128-bit vectors (the kernels peel each row's head to a 16-byte boundary). Must run without
TRITON_INTERPRET.

The fused LM-head kernels (dpo_kernels.triton.linear) are compiled per dtype at their launch config,
with every combination of bias and softcap for H, row strides and pointers divisible by 16
("aligned"), and without / with both for neither ("unaligned"); the forward and merge kernels also
WITH_STATS (the per-token statistics), named "... stats ..."; the backward's dz kernel also with FILTER (the
gradient filter's keep flags), named "... filter ...", and the filter's two product kernels (d_hidden,
d_weight; blocks BLOCK_M x BLOCK_V x BLOCK_N/kBLOCK_K from ``linear.product_config``) per dtype, aligned
and unaligned, d_weight with and without its d_bias sum ("bias"); the one-pass backward's in-place dz kernel
(``fused_linear_logits_dz_kernel``, blocks BLOCK_M x BLOCK_V from ``linear.LOGITS_DZ_CONFIG``) per dtype,
without and with softcap, aligned and unaligned: no products, so its "vec" column reads yes / no for 16-byte
loads as the log-prob kernels' does, and it is checked for 16-byte loads and stores when aligned and for the CTA
barrier that orders its bf16/fp16 in-place stores after the other warps' loads. Their checks: no spills, shared
memory within the architecture's per-block limit, bf16/fp16 products on tensor cores (mma.sync /
wgmma in the PTX; HMMA on sm_80, HGMMA on sm_90 in the SASS when aligned), fp32 products off them
(IEEE fp32, no TF32), a CTA barrier in the kernels that reduce across warps, and 16-byte global loads
(plain or cp.async) when aligned; the "vec" column reads "mma" / "fma" for how they multiply. The
"CTA/SM" column is the occupancy the registers, threads and shared memory allow.

The variants compile in ``--jobs`` processes (default: every core); the table keeps the order of the variants
whatever order they finish in. Disassembling a cubin costs a fixed second or so of nvdisasm start-up, more than
most kernels take to compile, so the product kernels' SASS is read in batches, one nvdisasm start per batch
(``sass_many``). The time of the whole run goes to stderr, after the table (whose last line stays the summary).
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
    "token_logps_fwd_kernel": {
        "logits_ptr": "X",
        "labels_ptr": "Y",
        "logp_ptr": "fp32",
        "lse_ptr": "fp32",
        "stats_ptr": "fp32",
    },
    "token_logps_bwd_kernel": {
        "grad_logits_ptr": "X",
        "logits_ptr": "X",
        "labels_ptr": "Y",
        "grad_tok_ptr": "fp32",
        "lse_ptr": "fp32",
    },
    "token_logps_special_stats_kernel": {
        "logits_ptr": "X",
        "lse_ptr": "fp32",
        "stats_ptr": "fp32",
        "labels_ptr": "Y",
    },
}
# Reads 4 bytes per row, and the logits only of rows with a NaN or +inf: no vector loads to check.
UNVECTORIZED_KERNELS = ("token_logps_special_stats_kernel",)
VOCAB_STRIDES = ("stride_lv", "stride_gv")
# Kernels with a WITH_STATS constexpr: each is compiled without and with it.
STATS_KERNELS = ("token_logps_fwd_kernel",)
# Divisible by 16 when V is (V = 32000, 128256, ...); "unaligned" (V = 50257, 32001) leaves them odd.
ALIGNED_INTS = ("V", "stride_ln", "stride_lt", "stride_gn", "stride_gt")
# Both must read and write 128-bit vectors (the forward with and without statistics alike): the kernels
# peel each row's head to a 16-byte boundary.
VECTORIZED_LAYOUTS = ("aligned", "unaligned")
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Variant:
    kernel: str
    dtype: str
    label: str
    block: int
    warps: int
    layout: str
    arch: int
    stats: bool = False  # the forward's WITH_STATS variant (per-token statistics in the same pass)

    @property
    def name(self):
        stats = " stats" if self.stats else ""
        return (
            f"{self.kernel}{stats} {self.dtype}/{self.label} BLOCK_V={self.block} warps={self.warps} "
            f"{self.layout} sm_{self.arch}"
        )


def variants(archs):
    from .logprobs import LAUNCH_CONFIGS

    hot = LAUNCH_CONFIGS[-1]
    for arch in archs:
        for kernel in KERNEL_POINTERS:
            for stats in (False, True) if kernel in STATS_KERNELS else (False,):
                for dtype in DTYPES:
                    for block, warps in LAUNCH_CONFIGS:
                        for label in LABEL_DTYPES:
                            yield Variant(kernel, dtype, label, block, warps, "aligned", arch, stats)
                    for layout in LAYOUTS[1:]:  # odd and strided rows only matter at real vocabulary sizes
                        yield Variant(kernel, dtype, "i64", *hot, layout, arch, stats)


def source(variant: Variant):
    from triton.compiler import ASTSource

    from . import logprobs

    fn = getattr(logprobs, variant.kernel)
    pointers = KERNEL_POINTERS[variant.kernel]
    signature, constexprs, attrs = {}, {"BLOCK_V": variant.block}, {}
    if variant.kernel in STATS_KERNELS:
        constexprs["WITH_STATS"] = variant.stats
    # The launchers' ALIGN (logprobs.row_align): the logits per 16 bytes for odd rows (each row's head is
    # peeled to a 16-byte boundary), else 1.
    if "ALIGN" in fn.arg_names:
        constexprs["ALIGN"] = 16 // ELEMENT_BYTES[variant.dtype] if variant.layout == "unaligned" else 1
    for index, arg in enumerate(fn.arg_names):
        if arg in pointers:
            kind = pointers[arg]
            signature[arg] = "*" + {"X": variant.dtype, "Y": variant.label}.get(kind, kind)
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif arg in ("BLOCK_V", "WITH_STATS", "ALIGN"):
            signature[arg] = "constexpr"
        elif arg in VOCAB_STRIDES and variant.layout != "strided_vocab":
            signature[arg] = "constexpr"
            constexprs[arg] = 1
        else:
            signature[arg] = "i32"
            if arg in ALIGNED_INTS and variant.layout == "aligned":
                attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


# ---------------------------------------------------------------------------- fused LM head (linear.py)

LINEAR_POINTERS = {  # pointer argument -> element type ("X" hidden/weight dtype)
    "fused_linear_logps_fwd_kernel": {
        "hidden_ptr": "X", "weight_ptr": "X", "bias_ptr": "X", "labels_ptr": "i64",
        "m_part_ptr": "fp32", "s_part_ptr": "fp32", "zl_part_ptr": "fp32",
        "s1_part_ptr": "fp32", "s2_part_ptr": "fp32", "sz_part_ptr": "fp32", "am_part_ptr": "i32",
    },
    "fused_linear_logps_merge_kernel": {
        "m_part_ptr": "fp32", "s_part_ptr": "fp32", "zl_part_ptr": "fp32",
        "s1_part_ptr": "fp32", "s2_part_ptr": "fp32", "sz_part_ptr": "fp32", "am_part_ptr": "i32",
        "labels_ptr": "i64", "logp_ptr": "fp32", "lse_ptr": "fp32", "stats_ptr": "fp32",
    },
    "fused_linear_logps_bwd_dz_kernel": {
        "dz_ptr": "X", "grad_ptr": "fp32", "hidden_ptr": "X", "weight_ptr": "X", "bias_ptr": "X",
        "labels_ptr": "i64", "lse_ptr": "fp32", "keep_ptr": "i8",
    },
    "fused_linear_logps_bwd_dh_kernel": {"dh_ptr": "fp32", "dz_ptr": "X", "weight_ptr": "X", "keep_ptr": "i8"},
    "fused_linear_logps_bwd_dw_kernel": {
        "dw_ptr": "X", "db_ptr": "fp32", "dz_ptr": "X", "hidden_ptr": "X", "keep_ptr": "i8",
    },
    "fused_linear_logits_dz_kernel": {
        "logits_ptr": "fp32", "dz_ptr": "X", "grad_ptr": "fp32", "labels_ptr": "i64", "lse_ptr": "fp32",
    },
}  # fmt: skip
# The gradient filter's products (filter_eps > 0): blocked over H by ``linear.product_config``, not by the
# logits tiles' launch config; d_weight also sums d_bias (HAS_BIAS), d_hidden has no features.
LINEAR_PRODUCT_KERNELS = {
    "fused_linear_logps_bwd_dh_kernel": ("plain",),
    "fused_linear_logps_bwd_dw_kernel": ("plain", "bias"),
}
# The dz kernel also compiles FILTER (stores keep flags, writes kept tiles only), named "... filter ...".
LINEAR_FILTER_KERNELS = ("fused_linear_logps_bwd_dz_kernel",)
# The dz buffer's row stride (its chunk width VC, a multiple of BLOCK_V for a chunked vocabulary) and
# d_weight's (H): divisible by 16 in the aligned layout, as at V = 128256, H = 4096.
LINEAR_PRODUCT_ALIGNED_INTS = ("stride_dz", "stride_dw")
# The dz kernel's keep-flag row stride (its V tiles per chunk: 256 for VC = 16384 at BLOCK_V = 64, 2004 for one
# chunk of V = 128256): divisible by 16 in the aligned layout, unmarked in the unaligned one, so that both of
# the JIT's specializations are compiled (it only matters to FILTER; the launcher passes 0 without).
LINEAR_DZ_ALIGNED_INTS = ("stride_keep",)
# The one-pass backward's in-place dz kernel: elementwise over the stored logits (no products), one variant per
# dtype and softcap (``linear.LOGITS_DZ_CONFIG``), aligned (V and both row strides divisible by 16, as for a
# buffer with V = 128256) and unaligned (V = 50257 rows). Its checks: 16-byte loads and stores when aligned, and
# in bf16/fp16 the CTA barrier between each tile's load and its store (the 16-bit dz overwrites logits that
# other warps read).
LINEAR_LOGITS_DZ_KERNELS = ("fused_linear_logits_dz_kernel",)
LINEAR_LOGITS_DZ_FEATURES = ("plain", "softcap")
LINEAR_LOGITS_DZ_ALIGNED_INTS = ("V", "stride_lm", "stride_dz")
LINEAR_FLOATS = ("logit_scale", "softcap", "temperature", "filter_eps")
LINEAR_UNIT_STRIDES = ("stride_y", "stride_g")
# Kernels whose tiles are reduced across warps (row max / sums of the online log-sum-exp, the softmax of
# the dz tile): those reductions go through shared memory and need a CTA barrier (bar.sync) in the PTX.
LINEAR_BARRIER_KERNELS = ("fused_linear_logps_fwd_kernel", "fused_linear_logps_bwd_dz_kernel")
# Per SM: registers, shared memory (sm_80 164 KiB, sm_90 228 KiB; 1 KiB of it reserved per CTA), threads, CTAs.
SM_LIMITS = {80: (65536, 167936, 2048, 32), 90: (65536, 233472, 2048, 32)}  # contiguous labels and grad: the JIT folds 1 to a constant
# Divisible by 16 when H is (4096, 5120, ...); v_per_split is a multiple of BLOCK_V in every layout.
# "unaligned" also drops the 16-byte divisibility of the hidden and weight pointers (a sliced view).
LINEAR_ALIGNED_INTS = ("H", "stride_hm", "stride_wv")
LINEAR_FEATURES = {  # name -> (HAS_BIAS, HAS_SOFTCAP)
    "plain": (False, False),
    "bias": (True, False),
    "softcap": (False, True),
    "bias+softcap": (True, True),
}
# Opt-in shared memory per block: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
MAX_SHARED = {80: 166912, 90: 232448}
# Kernels with a WITH_STATS variant (per-token statistics from the forward pass), compiled both ways.
LINEAR_STATS_KERNELS = ("fused_linear_logps_fwd_kernel", "fused_linear_logps_merge_kernel")
CP_ASYNC_16 = r"cp\.async\.c[ag]\.shared\.global \[[^\]]*\], \[[^\]]*\], (16|0x10)\b"  # 16-byte async copy


@dataclass(frozen=True)
class LinearVariant:
    kernel: str
    dtype: str
    features: str
    layout: str
    arch: int
    stats: bool = False  # WITH_STATS
    filter: bool = False  # the dz kernel's FILTER variant (keep flags, kept tiles stored)

    @property
    def _torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]

    @property
    def config(self):
        from .linear import launch_config

        return launch_config(self._torch_dtype, aligned=self.layout == "aligned", with_stats=self.stats)

    @property
    def logits_dz(self):
        """The one-pass dz kernel's LogitsDzConfig (rows and columns per tile, warps); None for the other kernels."""
        from .linear import LOGITS_DZ_CONFIG

        return LOGITS_DZ_CONFIG if self.kernel in LINEAR_LOGITS_DZ_KERNELS else None

    @property
    def product(self):
        """The filtered products' ProductConfig (H block, warps, stages); None for the other kernels."""
        from .linear import product_config

        if self.kernel not in LINEAR_PRODUCT_KERNELS:
            return None
        return product_config(self._torch_dtype, aligned=self.layout == "aligned")

    @property
    def warps(self):
        if self.kernel == "fused_linear_logps_merge_kernel":
            return 4
        return (self.logits_dz or self.product or self.config).num_warps

    @property
    def stages(self):
        return (self.logits_dz or self.product or self.config).num_stages

    @property
    def name(self):
        stats = " stats" if self.stats else ""
        if self.kernel == "fused_linear_logps_merge_kernel":
            return f"{self.kernel} fp32/i64 BLOCK={self._merge_block()} warps={self.warps}{stats} sm_{self.arch}"
        if self.logits_dz:
            d = self.logits_dz
            return (
                f"{self.kernel} {self.dtype}/i64 {d.BLOCK_M}x{d.BLOCK_V} warps={d.num_warps} stages={d.num_stages} "
                f"{self.features} {self.layout} sm_{self.arch}"
            )
        c = self.config
        p = self.product
        blocks = f"{c.BLOCK_M}x{c.BLOCK_V}x{p.BLOCK_N}/k{p.BLOCK_K}" if p else f"{c.BLOCK_M}x{c.BLOCK_V}x{c.BLOCK_H}"
        return (
            f"{self.kernel} {self.dtype}/i64 {blocks} warps={self.warps} stages={self.stages} "
            f"{self.features}{stats}{' filter' if self.filter else ''} {self.layout} sm_{self.arch}"
        )

    @staticmethod
    def _merge_block():
        from .linear import MERGE_BLOCK

        return MERGE_BLOCK


def linear_variants(archs):
    for arch in archs:
        for kernel in LINEAR_POINTERS:
            if kernel in LINEAR_LOGITS_DZ_KERNELS:
                for dtype in DTYPES:
                    for layout in ("aligned", "unaligned"):
                        for features in LINEAR_LOGITS_DZ_FEATURES:
                            yield LinearVariant(kernel, dtype, features, layout, arch)
                continue
            if kernel in LINEAR_PRODUCT_KERNELS:
                for dtype in DTYPES:
                    for layout in ("aligned", "unaligned"):
                        for features in LINEAR_PRODUCT_KERNELS[kernel]:
                            yield LinearVariant(kernel, dtype, features, layout, arch)
                continue
            for stats in (False, True) if kernel in LINEAR_STATS_KERNELS else (False,):
                if kernel == "fused_linear_logps_merge_kernel":  # no products, no dtype: one variant
                    yield LinearVariant(kernel, "fp32", "plain", "aligned", arch, stats)
                    continue
                for filtered in (False, True) if kernel in LINEAR_FILTER_KERNELS else (False,):
                    for dtype in DTYPES:
                        for features in LINEAR_FEATURES:
                            yield LinearVariant(kernel, dtype, features, "aligned", arch, stats, filtered)
                        for features in ("plain", "bias+softcap"):
                            yield LinearVariant(kernel, dtype, features, "unaligned", arch, stats, filtered)


def linear_source(variant: LinearVariant):
    from triton.compiler import ASTSource

    from . import linear

    fn = getattr(linear, variant.kernel)
    pointers = LINEAR_POINTERS[variant.kernel]
    has_bias, has_softcap = LINEAR_FEATURES[variant.features]
    if variant.kernel == "fused_linear_logps_merge_kernel":
        constexprs = {"BLOCK": variant._merge_block()}
    elif variant.logits_dz:
        d = variant.logits_dz
        constexprs = {"HAS_SOFTCAP": has_softcap, "BLOCK_M": d.BLOCK_M, "BLOCK_V": d.BLOCK_V}
    elif variant.product:
        from .linear import GROUP_M

        c, p = variant.config, variant.product
        constexprs = {
            "BLOCK_M": c.BLOCK_M, "BLOCK_V": c.BLOCK_V, "BLOCK_N": p.BLOCK_N, "BLOCK_K": p.BLOCK_K, "GROUP_M": GROUP_M,
            "UPCAST_DOT": False,
        }  # fmt: skip
        if "HAS_BIAS" in fn.arg_names:
            constexprs["HAS_BIAS"] = has_bias
        if "RNE_BF16" in fn.arg_names:  # the interpreter's rounding fix, off on the GPU
            constexprs["RNE_BF16"] = False
    else:
        c = variant.config
        constexprs = {
            "HAS_BIAS": has_bias, "HAS_SOFTCAP": has_softcap, "UPCAST_DOT": False,
            "BLOCK_M": c.BLOCK_M, "BLOCK_V": c.BLOCK_V, "BLOCK_H": c.BLOCK_H,
        }  # fmt: skip
        if variant.kernel == "fused_linear_logps_bwd_dz_kernel":
            from .linear import GROUP_M

            constexprs["GROUP_M"] = GROUP_M
            constexprs["FILTER"] = variant.filter
    if variant.kernel in LINEAR_STATS_KERNELS:
        constexprs["WITH_STATS"] = variant.stats
    signature, attrs = {}, {}
    for index, arg in enumerate(fn.arg_names):
        if arg in pointers:
            kind = pointers[arg]
            signature[arg] = "*" + (variant.dtype if kind == "X" else kind)
            if variant.layout == "aligned" or arg not in ("hidden_ptr", "weight_ptr", "dw_ptr"):
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in LINEAR_UNIT_STRIDES:
            signature[arg] = "constexpr"
            constexprs[arg] = 1
        elif arg in LINEAR_FLOATS:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
            aligned_ints = LINEAR_ALIGNED_INTS + (LINEAR_PRODUCT_ALIGNED_INTS if variant.product else ())
            if variant.kernel == "fused_linear_logps_bwd_dz_kernel":
                aligned_ints += LINEAR_DZ_ALIGNED_INTS
            if variant.logits_dz:
                aligned_ints = LINEAR_LOGITS_DZ_ALIGNED_INTS
            if arg in ("v_per_split", "chunk_start") or (arg in aligned_ints and variant.layout == "aligned"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def linear_problems(variant: LinearVariant, ptx: str, shared: int, sass: str = "") -> list:
    problems = []
    if shared > MAX_SHARED.get(variant.arch, min(MAX_SHARED.values())):
        problems.append(f"shared memory {shared} B over the sm_{variant.arch} limit {MAX_SHARED.get(variant.arch)}")
    barrier = re.search(r"\bbar\.sync\b|\bbarrier\.sync\b", ptx)
    if variant.kernel in LINEAR_BARRIER_KERNELS and not barrier:
        problems.append("no CTA barrier (bar.sync) for the cross-warp reductions")
    if variant.logits_dz:
        if variant.dtype != "fp32" and not barrier:
            problems.append("no CTA barrier (bar.sync) between the logits loads and the in-place 16-bit dz stores")
        if variant.layout == "aligned" and not re.search(r"ld\.global(\.\w+)*\.v[248]", ptx):
            problems.append("aligned variant without 16-byte global loads")
        if variant.layout == "aligned" and not re.search(r"st\.global(\.\w+)*\.v[248]", ptx):
            problems.append("aligned variant without vectorized global stores")
    elif variant.kernel != "fused_linear_logps_merge_kernel":
        if variant.dtype == "fp32" and (uses_mma(ptx) or re.search(r"\b[HQ]?GMMA\b|\bHMMA\b", sass)):
            problems.append("fp32 products on tensor cores (TF32 mma): the fp32 path must be IEEE")
        if variant.dtype != "fp32" and not uses_mma(ptx):
            problems.append("bf16/fp16 products not on tensor cores (no mma.sync / wgmma)")
        if variant.dtype != "fp32" and variant.layout == "aligned" and sass:
            want = "HGMMA" if variant.arch >= 90 else "HMMA"
            if not re.search(rf"\b{want}\b", sass):
                problems.append(f"bf16/fp16 products without {want} in the sm_{variant.arch} SASS")
        if variant.layout == "aligned" and not re.search(CP_ASYNC_16, ptx) and not (
            re.search(r"ld\.global(\.\w+)*\.v[248]", ptx)
        ):
            problems.append("aligned variant without 16-byte global loads")
    return problems


def uses_mma(ptx: str) -> bool:
    return bool(re.search(r"\b(mma\.sync|wgmma\.mma_async)", ptx))


def sass(cubin: bytes) -> str:
    """The cubin's SASS, by the cuobjdump that ships with Triton (one disassembler start per cubin)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-sass", f.name], check=True, capture_output=True, text=True).stdout


def kernel_code(cubin: bytes) -> bytes:
    """The machine code of a cubin's kernels: its ``.text.*`` sections (an ELF64 little-endian file), in order."""
    import struct

    if cubin[:4] != b"\x7fELF" or cubin[4] != 2 or cubin[5] != 1:
        raise ValueError("not an ELF64 little-endian cubin")
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names = sections[shstrndx][4]

    def name(offset):
        return cubin[names + offset : cubin.index(b"\0", names + offset)]

    return b"".join(cubin[off : off + size] for sh_name, _, _, _, off, size in sections if name(sh_name).startswith(b".text."))


SASS_INSTRUCTION = re.compile(r"/\*([0-9a-f]+)\*/\s+(\S.*?)\s*;")


def sass_many(cubins: list, arch: int) -> list:
    """The SASS instructions (one per line, "OPCODE operands") of each cubin for ``arch``, from ONE start of the
    nvdisasm that ships with Triton. nvdisasm spends about a second starting up whatever it reads, more than a
    kernel takes to disassemble, so the kernels' code is laid end to end and read as one raw instruction stream
    (sm_90 as sm_90a, the target Triton compiles for), then split at the offsets where each kernel starts. A
    stream nvdisasm refuses falls back to :func:`sass` per cubin."""
    import triton

    codes = [kernel_code(cubin) for cubin in cubins]
    if not codes or any(len(code) % 16 for code in codes):  # whole 128-bit instructions, or read them one by one
        return [sass(cubin) for cubin in cubins]
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    binary = "SM90a" if arch == 90 else f"SM{arch}"
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(b"".join(codes))
        f.flush()
        proc = subprocess.run([tool, "-b", binary, "-ndf", f.name], capture_output=True, text=True)
    if proc.returncode != 0:
        return [sass(cubin) for cubin in cubins]
    starts, out = [], [[] for _ in codes]
    for code in codes:
        starts.append((starts[-1] + len(codes[len(starts) - 1])) if starts else 0)
    import bisect

    for m in SASS_INSTRUCTION.finditer(proc.stdout):
        out[bisect.bisect_right(starts, int(m[1], 16)) - 1].append(m[2])
    if any(len(lines) != len(code) // 16 for lines, code in zip(out, codes)):  # an instruction lost or misread
        return [sass(cubin) for cubin in cubins]
    return ["\n".join(lines) + "\n" for lines in out]


def ctas_per_sm(arch: int, regs: int, warps: int, shared: int) -> int:
    """Resident CTAs per SM from registers (allocated per warp in units of 256) and shared memory."""
    max_regs, max_shared, max_threads, max_ctas = SM_LIMITS.get(arch, SM_LIMITS[80])
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = max_regs // (per_warp * warps)
    by_shared = max_shared // (shared + 1024)
    return max(0, min(by_regs, by_shared, max_threads // (32 * warps), max_ctas))


def resource_usage(cubin: bytes) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], check=True, capture_output=True, text=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def must_vectorize(variant: Variant) -> bool:
    if variant.kernel in UNVECTORIZED_KERNELS:
        return False
    return variant.layout in VECTORIZED_LAYOUTS


def needs_sass(variant) -> bool:
    """The fused LM head's product kernels: their SASS must (bf16/fp16) or must not (fp32) hold tensor-core ops."""
    return (
        isinstance(variant, LinearVariant)
        and variant.kernel != "fused_linear_logps_merge_kernel"
        and not variant.logits_dz
    )


def compile_variant(variant: Variant) -> dict:
    """One variant compiled and checked (:func:`compile_variants` of one)."""
    return compile_variants([variant])[0]


def compile_variants(batch: list) -> list:
    """Each variant of ``batch`` compiled and checked, in order; the SASS of those that need it read by one
    disassembler start per architecture (:func:`sass_many`). A variant's seconds: its compile and its share of
    the batch's disassembly."""
    compiled = [_compile(variant) for variant in batch]
    for arch in sorted({c["variant"].arch for c in compiled}):
        todo = [c for c in compiled if "kernel" in c and c["variant"].arch == arch and needs_sass(c["variant"])]
        if todo:
            start = time.perf_counter()
            for c, code in zip(todo, sass_many([c["kernel"].asm["cubin"] for c in todo], arch)):
                c["sass"] = code
            share = (time.perf_counter() - start) / len(todo)
            for c in todo:
                c["seconds"] += share
    return [_check(c) if "kernel" in c else c for c in compiled]


def _compile(variant) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    start = time.perf_counter()
    linear = isinstance(variant, LinearVariant)
    options = {"num_warps": variant.warps}
    if linear:
        options["num_stages"] = variant.stages
    try:
        kernel = triton.compile(
            linear_source(variant) if linear else source(variant),
            target=GPUTarget("cuda", variant.arch, 32),
            options=options,
        )
    except Exception as error:  # report every failing variant, not just the first
        return {"variant": variant, "error": f"{type(error).__name__}: {error}"}
    usage = resource_usage(kernel.asm["cubin"])
    return {"variant": variant, "kernel": kernel, "usage": usage, "seconds": time.perf_counter() - start}


def _check(compiled: dict) -> dict:
    variant, kernel, usage = compiled["variant"], compiled["kernel"], compiled["usage"]
    linear = isinstance(variant, LinearVariant)
    ptx = kernel.asm["ptx"]
    vector_loads = bool(re.search(r"ld\.global(\.\w+)*\.v[248]", ptx))
    problems = []
    if usage.get("LOCAL", 0) or usage.get("STACK", 0):
        problems.append(f"register spills: local={usage.get('LOCAL')} stack={usage.get('STACK')}")
    if linear:
        problems += linear_problems(variant, ptx, kernel.metadata.shared, compiled.get("sass", ""))
        if needs_sass(variant):
            vector_loads = "mma" if uses_mma(ptx) else "fma"
    elif must_vectorize(variant) and not vector_loads:
        problems.append(f"{variant.layout} variant without vectorized global loads")
    elif must_vectorize(variant) and variant.kernel == "token_logps_bwd_kernel" and not re.search(
        r"st\.global(\.\w+)*\.v[248]", ptx
    ):
        problems.append(f"{variant.layout} variant without vectorized global stores")
    return {
        "variant": variant,
        "usage": usage,
        "shared": kernel.metadata.shared,
        "vector_loads": vector_loads,
        "seconds": compiled["seconds"],
        "problems": problems,
        "ctas": ctas_per_sm(variant.arch, usage.get("REG", 0), variant.warps, kernel.metadata.shared),
    }


def vec_column(value) -> str:
    return value if isinstance(value, str) else ("yes" if value else "no")


def compile_all(todo: list, jobs: int) -> list:
    """:func:`compile_variants` over ``todo`` in ``jobs`` processes; the results in the order of ``todo``.

    The variants whose SASS is read go in batches (one disassembler start per batch, about a second each), a few
    per process so that both share them; they are submitted first, being the longest, and the quick ones after
    them fill in around the last of them."""
    sass_idx = [i for i, v in enumerate(todo) if needs_sass(v)]
    size = max(1, min(16, -(-len(sass_idx) // (2 * jobs))))
    batches = [sass_idx[i : i + size] for i in range(0, len(sass_idx), size)]
    rest = [i for i, v in enumerate(todo) if not needs_sass(v)]
    batches += [rest[i : i + 8] for i in range(0, len(rest), 8)]
    results = [None] * len(todo)
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        futures = [(batch, pool.submit(compile_variants, [todo[i] for i in batch])) for batch in batches]
        for batch, future in futures:
            for i, result in zip(batch, future.result()):
                results[i] = result
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--kernels", nargs="+", help="compile only the kernels whose names contain one of these")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels with Python functions", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    todo = list(variants(args.arch)) + list(linear_variants(args.arch))
    if args.kernels:
        todo = [v for v in todo if any(k in v.kernel for k in args.kernels)]
    start = time.perf_counter()
    results = compile_all(todo, args.jobs)
    failures = 0
    width = max([80] + [len(variant.name) for variant in todo])
    print(f"{'variant':<{width}} {'regs':>4} {'smem':>6} {'local':>5} {'vec':>3} {'CTA/SM':>6} {'s':>5}")
    for result in results:
        variant = result["variant"]
        if "error" in result:
            failures += 1
            print(f"{variant.name:<{width}} COMPILE ERROR {result['error']}")
            continue
        usage = result["usage"]
        print(
            f"{variant.name:<{width}} {usage.get('REG', 0):>4} {result['shared']:>6} {usage.get('LOCAL', 0):>5} "
            f"{vec_column(result['vector_loads']):>3} {result['ctas']:>6} {result['seconds']:>5.1f}"
        )
        for problem in result["problems"]:
            failures += 1
            print(f"  FAIL: {problem}")
    # On stderr: the table's last line stays the summary that .ci/aot_check.py reads.
    print(f"aot: {len(results)} variants in {time.perf_counter() - start:.0f} s, {args.jobs} processes", file=sys.stderr)
    print(f"{len(results)} variants compiled for sm_{', sm_'.join(map(str, args.arch))}; {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
