"""Compile the sparse-attention kernel for a GPU architecture without a GPU (Triton builds sm_80 /
sm_90 binaries on the CPU): the compile test and bench/kernel_sass.py use it to check branches the
interpreter never compiles, shared-memory needs and the generated SASS."""

from __future__ import annotations

_POINTERS = {"Q", "K", "V", "O"}
_INDEX = {"RULES", "ROW_PTR", "RUNS", "ACTIVE", "KV_LEN", "CUBE_MAP", "SLOT"}
_DESCRIPTORS = {"DESC_K", "DESC_V", "DESC_KS", "DESC_VS"}
_FLOATS = {"inv_F", "inv_W", "inv_P", "qk_scale"}


def compile_for_target(arch: int, head_dim: int, block_m: int, block_n: int, use_tma: bool, warps: int,
                       stages: int, descriptors: bool | None = None, kv_len: bool = True,
                       merged_cube: bool = False, maxnreg: int | None = None, paired: bool = False):
    """The Triton CompiledKernel of `_sparse_attention_fwd` for sm_`arch` (bf16, one autotune
    config), with the divisibility hints a real launch gets (16-aligned pointers and strides).
    `descriptors` (default: use_tma) says whether the K/V arguments are TMA descriptors;
    `merged_cube` compiles the merged run walk of cube-order heads and `paired` full tiles two a step
    (both need use_tma); `maxnreg` caps the registers per thread as an autotune config's `maxnreg` does."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .triton_attention import _sparse_attention_fwd

    fn = _sparse_attention_fwd.fn
    descriptors = use_tma if descriptors is None else descriptors
    const = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, HAS_KV_LEN=kv_len, PRECISION="tf32",
                 USE_TMA=use_tma, MERGED_CUBE=merged_cube, PAIRED=paired)
    signature = {}
    for name in fn.arg_names:
        if name in const:
            signature[name] = "constexpr"
        elif name in _POINTERS:
            signature[name] = "*bf16"
        elif name in _INDEX:
            signature[name] = "*i32"
        elif name in _DESCRIPTORS:
            signature[name] = f"tensordesc<bf16[{block_n},{head_dim}]>" if descriptors else "*bf16"
        elif name in _FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    aligned = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
               if n in _POINTERS or n in _INDEX or n.startswith("stride_")}
    source = ASTSource(fn=fn, signature=signature, attrs=aligned,
                       constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": warps, "num_stages": stages, "maxnreg": maxnreg})
