"""The launch plan of one SerqMatMul call: kernels in order, their arguments, grids, scratch.

Written as data -- small expressions over named quantities -- so that the Python launcher
(:mod:`.launch`, run by the tests) and the C++ launcher (which reads them from the manifest)
follow one description. Names:

* sizes: ``M`` (rows of A, leading dims flattened), ``N``, ``K``, ``rank``, ``K_pad``,
  ``r_pad``, ``K_ext``, ``group_w``, ``block`` (``reference.Layout``) and ``KX``, ``unit``,
  ``n_units``, ``n_pairs``, ``group_a_eff``, ``n_groups``, ``qmax``, ``off`` (:mod:`.layout`),
  ``ldp = max(16, ceil(M / 16) * 16)``, ``n_split`` / ``pairs_per_split`` (:func:`.configs.split_k`);
* flags: ``has_perm``, ``has_scale``, ``has_bias`` (0/1: the optional input is present);
* buffers: op inputs ``A``, ``act_perm``, ``act_scale``, ``bias``, output ``Y``; repacked
  weights ``Bp``, ``sw``, ``ws`` (fast path) or the reference ``B``, ``scales`` (generic);
  scratch ``q``, ``sa``, ``za``, ``part`` (see :data:`SCRATCH`). An absent optional input is
  passed as any pointer (0 is fine): the kernels never read it when its flag is 0.

Expressions use ``+ - * //``, ``cdiv(a, b)``, ``min``, ``max`` and ``x if cond else y``.
"""

from __future__ import annotations

from typing import Any

# Scratch buffers of one call: (element type, element count), allocated from onnxruntime's
# allocator per call (or cached by M); every one is fully written before it is read.
SCRATCH: dict[str, tuple[str, str]] = {
    "q": ("int8", "M * KX"),
    "sa": ("float32", "n_units * ldp"),
    "za": ("int32", "n_units * ldp"),
    "part": ("float32", "n_split * M * N if n_split > 1 else 0"),
}

QUANT_ARGS = {
    "a_ptr": "A", "perm_ptr": "act_perm", "ascale_ptr": "act_scale", "q_ptr": "q",
    "sa_ptr": "sa", "za_ptr": "za", "K": "K", "stride_am": "K", "K_pad": "K_pad",
    "rank": "rank", "r_pad": "r_pad", "K_ext": "K_ext", "KX": "KX", "group": "group_a_eff",
    "n_groups": "n_groups", "unit": "unit", "n_units": "n_units", "ldp": "ldp", "qmax": "qmax",
    "off": "off", "has_perm": "has_perm", "has_scale": "has_scale",
}

GEMM_ARGS = {
    "q_ptr": "q", "w_ptr": "Bp", "sa_ptr": "sa", "za_ptr": "za", "sw_ptr": "sw", "ws_ptr": "ws",
    "bias_ptr": "bias", "y_ptr": "Y if n_split == 1 else part", "M": "M", "N": "N",
    "ldq": "KX", "ldw": "KX // 2", "ldp": "ldp", "n_pairs": "n_pairs",
    "pairs_per_split": "pairs_per_split", "stride_ym": "N",
    "stride_ys": "0 if n_split == 1 else M * N", "has_bias": "has_bias if n_split == 1 else 0",
}

REDUCE_ARGS = {
    "p_ptr": "part", "bias_ptr": "bias", "y_ptr": "Y", "MN": "M * N", "N": "N",
    "n_split": "n_split", "stride_ps": "M * N", "has_bias": "has_bias",
}

GENERIC_ARGS = {
    "q_ptr": "q", "b_ptr": "B", "sa_ptr": "sa", "za_ptr": "za", "sc_ptr": "scales",
    "bias_ptr": "bias", "y_ptr": "Y", "M": "M", "N": "N", "K_ext": "K_ext", "ldq": "KX",
    "ldb": "K_ext // 2 if bits_w == 4 else K_ext", "lds": "K_ext // group_w", "ldp": "ldp",
    "block": "block", "group_w": "group_w", "stride_ym": "N", "has_bias": "has_bias",
}

GRIDS = {
    "act_quant_kernel": ["M", "n_groups", "1"],
    "serq_gemm_kernel": ["cdiv(N, BN)", "cdiv(M, BM)", "n_split"],
    "splitk_reduce_kernel": ["cdiv(M * N, BLOCK)", "1", "1"],
    "serq_generic_kernel": ["cdiv(N, BN)", "cdiv(M, BM)", "1"],
}

# Per path: (step, kernel, variant name, arguments, condition). Variant names are templates
# over a_dtype / y_dtype (fp32, fp16, bf16: A's and Y's element types), perm_dtype (i32 or
# i64; i32 when act_perm is absent), part_dtype (fp32 when n_split > 1, else y_dtype),
# gemm_class (:data:`.configs.GEMM_CONFIGS` entry chosen by M), quant_ch
# (:func:`.configs.quant_chunk` of group_a_eff), unit and bits_w.
STEPS: dict[str, list[tuple[str, str, str, dict[str, str], str]]] = {
    "fast": [
        ("quant", "act_quant_kernel", "act_quant_{a_dtype}_perm{perm_dtype}_ch{quant_ch}", QUANT_ARGS,
         "M > 0"),
        ("gemm", "serq_gemm_kernel", "gemm_{gemm_class}_u{unit}_{part_dtype}", GEMM_ARGS,
         "M > 0"),
        ("reduce", "splitk_reduce_kernel", "splitk_reduce_{y_dtype}", REDUCE_ARGS,
         "M > 0 and n_split > 1"),
    ],
    "generic": [
        ("quant", "act_quant_kernel", "act_quant_{a_dtype}_perm{perm_dtype}_ch{quant_ch}", QUANT_ARGS,
         "M > 0"),
        ("gemm", "serq_generic_kernel", "generic_w{bits_w}_{y_dtype}", GENERIC_ARGS, "M > 0"),
    ],
}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def evaluate(expr: str, names: dict[str, Any]) -> Any:
    """Value of one plan expression (a restricted Python expression) over ``names``."""
    return eval(expr, {"__builtins__": {}, "cdiv": cdiv, "min": min, "max": max}, names)  # noqa: S307


def as_manifest() -> dict[str, Any]:
    return {
        "scratch": {k: {"dtype": t, "count": n} for k, (t, n) in SCRATCH.items()},
        "grids": GRIDS,
        "steps": {path: [{"step": s, "kernel": k, "variant": v, "args": a, "when": c}
                         for s, k, v, a, c in steps]
                  for path, steps in STEPS.items()},
    }
