"""Generate the C++ side of the AOT manifest for the CUDA kernel of SerqMatMul.

``python scripts/gen_cuda_embed.py --manifest BUILD/manifest.json --out DIR`` writes

* ``serq_cuda_tables.cc``: the launch plan of the manifest (steps, argument expressions, grids,
  scratch sizes, shape classes, split-K, fast units) translated to C++ functions over
  ``serq::cuda::Quantities``, and one entry per (variant, arch) with its launch metadata;
* ``serq_cuda_cubins.S``: every cubin, byte for byte, through ``.incbin`` (fast to assemble,
  no giant array literals);
* ``serq_cuda_index.json``: name, arch, size and sha256 of every embedded cubin, and the
  cache key of the sources they were built from (installed beside the library so that tests
  can check the embedding against an AOT build).

The plan's expressions are a restricted Python subset (see ``kernels/plan.py``); they are
translated with :mod:`ast`, and anything the C++ side does not know (a new name, operator or
variant tag) stops the build here with a message instead of producing a launcher that
disagrees with the Python one.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import string
import sys
from pathlib import Path

# Fields of serq::cuda::Quantities (custom_ops/src/cuda/plan.h).
QUANTITIES = ("M", "N", "K", "rank", "K_pad", "r_pad", "K_ext", "group_w", "block", "bits_w",
              "KX", "unit", "n_units", "n_pairs", "group_a_eff", "n_groups", "qmax", "off", "ldp",
              "has_perm", "has_scale", "has_bias", "n_split", "pairs_per_split")
# Buffers the C++ side binds itself (serq::cuda::Buf); the manifest's scratch buffers follow.
FIXED_BUFFERS = {"A": "kBufA", "act_perm": "kBufActPerm", "act_scale": "kBufActScale",
                 "bias": "kBufBias", "Y": "kBufY", "Bp": "kBufBp", "sw": "kBufSw", "ws": "kBufWs",
                 "B": "kBufB", "scales": "kBufScales"}
# Variant-name tags computed by serq::cuda::MakePlan (kernels/launch.py: ``tags``).
TAGS = {"a_dtype", "y_dtype", "perm_dtype", "part_dtype", "gemm_class", "quant_ch", "unit",
        "bits_w"}
SCRATCH_TYPES = {"int8": "*i8", "int32": "*i32", "float32": "*fp32"}
ARG_TYPES = {"*fp32", "*fp16", "*bf16", "*i8", "*u8", "*i32", "*i64", "i32"}
TRITON_SCRATCH_ARGS = ("global_scratch", "profile_scratch")
MAX_CX = 8


class GenError(Exception):
    pass


class Translator:
    """Python plan expression -> C++ expression. Kinds: 'int' (int64_t) or 'val' (PlanValue)."""

    def __init__(self, ints: dict[str, str], buffers: dict[str, str],
                 arrays: dict[str, list[int]] | None = None):
        self.ints, self.buffers, self.arrays = ints, buffers, arrays or {}

    def expr(self, src: str) -> tuple[str, str]:
        try:
            tree = ast.parse(src, mode="eval")
        except SyntaxError as e:
            raise GenError(f"cannot parse plan expression {src!r}: {e}") from e
        return self.node(tree.body, src)

    def as_int(self, node, src) -> str:
        code, kind = self.node(node, src)
        if kind != "int":
            raise GenError(f"{src!r}: a buffer where a number is needed")
        return code

    def node(self, n, src) -> tuple[str, str]:
        if isinstance(n, ast.Constant) and isinstance(n.value, int) and not isinstance(n.value, bool):
            return f"int64_t{{{n.value}}}", "int"
        if isinstance(n, ast.Name):
            if n.id in self.ints:
                return self.ints[n.id], "int"
            if n.id in self.buffers:
                return f"PlanValue::Buffer({self.buffers[n.id]})", "val"
            raise GenError(f"{src!r}: unknown name {n.id!r} (not a quantity, buffer or constexpr "
                           "the C++ launcher knows)")
        if isinstance(n, ast.BinOp):
            a, b = self.as_int(n.left, src), self.as_int(n.right, src)
            ops = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}
            if type(n.op) in ops:
                return f"({a} {ops[type(n.op)]} {b})", "int"
            if isinstance(n.op, ast.FloorDiv):
                return f"FloorDiv({a}, {b}, err)", "int"
            raise GenError(f"{src!r}: unsupported operator {type(n.op).__name__}")
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return f"(-{self.as_int(n.operand, src)})", "int"
        if isinstance(n, ast.Compare):
            if len(n.ops) != 1:
                raise GenError(f"{src!r}: chained comparisons are not supported")
            ops = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">",
                   ast.GtE: ">="}
            if type(n.ops[0]) not in ops:
                raise GenError(f"{src!r}: unsupported comparison")
            a, b = self.as_int(n.left, src), self.as_int(n.comparators[0], src)
            return f"int64_t({a} {ops[type(n.ops[0])]} {b})", "int"
        if isinstance(n, ast.BoolOp):
            op = "&&" if isinstance(n.op, ast.And) else "||"
            parts = [f"({self.as_int(v, src)} != 0)" for v in n.values]
            return f"int64_t({f' {op} '.join(parts)})", "int"
        if isinstance(n, ast.IfExp):
            t = self.as_int(n.test, src)
            (a, ka), (b, kb) = self.node(n.body, src), self.node(n.orelse, src)
            if ka == kb == "int":
                return f"(({t}) != 0 ? {a} : {b})", "int"
            a = a if ka == "val" else f"PlanValue::Int({a})"
            b = b if kb == "val" else f"PlanValue::Int({b})"
            return f"(({t}) != 0 ? {a} : {b})", "val"
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and not n.keywords:
            args = [self.as_int(a, src) for a in n.args]
            if n.func.id == "cdiv" and len(args) == 2:
                return f"CeilDivChecked({args[0]}, {args[1]}, err)", "int"
            if n.func.id in ("min", "max") and len(args) >= 2:
                code = args[0]
                for a in args[1:]:
                    code = f"std::{n.func.id}<int64_t>({code}, {a})"
                return code, "int"
            raise GenError(f"{src!r}: unsupported call {n.func.id}")
        if (isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name)
                and n.value.id in self.arrays and isinstance(n.slice, ast.Constant)):
            arr, i = self.arrays[n.value.id], n.slice.value
            if not isinstance(i, int) or not 0 <= i < len(arr):
                raise GenError(f"{src!r}: index {i!r} out of range")
            return f"int64_t{{{arr[i]}}}", "int"
        raise GenError(f"{src!r}: unsupported expression {ast.dump(n)}")


def c_str(s: str) -> str:
    return json.dumps(s)


def generate(manifest_path: Path, out: Path) -> None:
    root = manifest_path.parent
    m = json.loads(manifest_path.read_text())
    if m.get("version") != 1:
        raise GenError(f"manifest version {m.get('version')} (this launcher reads version 1)")
    plan = m["plan"]
    scratch = list(plan["scratch"].items())
    buffers = dict(FIXED_BUFFERS)
    for i, (name, _) in enumerate(scratch):
        if name in buffers:
            raise GenError(f"scratch buffer {name!r} shadows an op buffer")
        buffers[name] = f"Buf(kNumFixedBufs + {i})"
    q_ints = {n: f"q.{n}" for n in QUANTITIES}
    tr = Translator(q_ints, buffers)

    kernels_by_fn: dict[str, list[dict]] = {}
    for e in m["kernels"]:
        kernels_by_fn.setdefault(e["kernel"].split(":")[1], []).append(e)
    kernel_names = list(plan["grids"])
    for fn in kernels_by_fn:
        if fn not in plan["grids"]:
            raise GenError(f"kernel {fn} has no grid in the plan")

    L = ["// Generated by scripts/gen_cuda_embed.py from the AOT manifest; do not edit.",
         '#include "cuda/plan_tables.h"', "", "#include <algorithm>", "",
         "namespace serq {", "namespace cuda {", "namespace {", ""]

    # Kernels: constexpr names (per kernel, same for every variant) and grid functions.
    cx_names: dict[str, list[str]] = {}
    arg_lists: dict[str, list[str]] = {}
    for k, fn in enumerate(kernel_names):
        entries = kernels_by_fn.get(fn, [])
        names = sorted({c for e in entries for c in e["constexprs"]})
        if len(names) > MAX_CX:
            raise GenError(f"{fn}: more than {MAX_CX} constexprs")
        for e in entries:
            if sorted(e["constexprs"]) != names:
                raise GenError(f"{e['name']}: constexprs differ from the other variants of {fn}")
            if e["num_ctas"] != 1 or e.get("launch_cooperative_grid") or e.get("launch_pdl"):
                raise GenError(f"{e['name']}: clusters, cooperative or PDL launches are not "
                               "supported by the launcher")
            if e["global_scratch_size"] or e["profile_scratch_size"]:
                raise GenError(f"{e['name']}: Triton scratch is not supported")
            for a in e["args"]:
                if a["type"] not in ARG_TYPES:
                    raise GenError(f"{e['name']}: argument type {a['type']!r}")
        argn = [a["name"] for a in entries[0]["args"]] if entries else []
        for e in entries:
            if [a["name"] for a in e["args"]] != argn:
                raise GenError(f"{e['name']}: argument order differs from the other variants")
        cx_names[fn], arg_lists[fn] = names, argn
        gtr = Translator({**q_ints, **{c: f"cx[{i}]" for i, c in enumerate(names)}}, {})
        if len(plan["grids"][fn]) != 3:
            raise GenError(f"grid of {fn} must have 3 axes")
        for ax, g in enumerate(plan["grids"][fn]):
            code = gtr.expr(g)
            if code[1] != "int":
                raise GenError(f"grid {g!r} of {fn} is not a number")
            L.append(f"int64_t Grid{k}_{ax}(const Quantities& q, const int64_t* cx, bool* err) "
                     f"{{ (void)q; (void)cx; (void)err; return {code[0]}; }}")
    L.append("")

    # Steps.
    step_rows = []
    for path, steps in plan["steps"].items():
        for s_i, st in enumerate(steps):
            fn = st["kernel"]
            if fn not in kernel_names:
                raise GenError(f"step {st['step']} of {path}: unknown kernel {fn}")
            for _, field, _, _ in string.Formatter().parse(st["variant"]):
                if field is not None and field not in TAGS:
                    raise GenError(f"variant template {st['variant']!r}: unknown tag {field!r}")
            tag = f"{path}_{s_i}"
            code, kind = tr.expr(st["when"])
            if kind != "int":
                raise GenError(f"condition {st['when']!r} is not a number")
            L.append(f"bool When_{tag}(const Quantities& q, bool* err) {{ (void)err; return {code} != 0; }}")
            unknown = set(st["args"]) - set(arg_lists[fn])
            if unknown:
                raise GenError(f"step {st['step']} of {path}: arguments {sorted(unknown)} are not "
                               f"parameters of {fn}")
            fns = []
            for a_i, a in enumerate(arg_lists[fn]):
                if a in st["args"]:
                    code, kind = tr.expr(st["args"][a])
                    code = code if kind == "val" else f"PlanValue::Int({code})"
                elif a in TRITON_SCRATCH_ARGS:
                    code = "PlanValue::Int(0)"  # the build refuses kernels that need it
                else:
                    raise GenError(f"step {st['step']} of {path}: no value for parameter {a} of {fn}")
                L.append(f"PlanValue Arg_{tag}_{a_i}(const Quantities& q, bool* err) "
                         f"{{ (void)q; (void)err; return {code}; }}")
                fns.append(f"Arg_{tag}_{a_i}")
            L.append(f"const ArgFn kArgs_{tag}[] = {{{', '.join(fns) or 'nullptr'}}};")
            step_rows.append(f"{{{c_str(path)}, {c_str(st['step'])}, {kernel_names.index(fn)}, "
                             f"{c_str(st['variant'])}, When_{tag}, kArgs_{tag}, {len(fns)}}}")
    L.append("")

    # Scratch counts.
    sc_rows = []
    for i, (name, spec) in enumerate(scratch):
        if spec["dtype"] not in SCRATCH_TYPES:
            raise GenError(f"scratch {name}: dtype {spec['dtype']}")
        code, kind = tr.expr(spec["count"])
        if kind != "int":
            raise GenError(f"scratch {name}: count is not a number")
        L.append(f"int64_t Scratch_{i}(const Quantities& q, bool* err) {{ (void)err; return {code}; }}")
        size = {"int8": 1, "int32": 4, "float32": 4}[spec["dtype"]]
        sc_rows.append(f"{{{c_str(name)}, {c_str(SCRATCH_TYPES[spec['dtype']])}, {size}, Scratch_{i}}}")

    # Quantization chunk rule.
    qc = m["quant_chunks"]
    qtr = Translator({"group_a_eff": "group_a_eff"}, {}, {"chunks": qc["chunks"]})
    code, kind = qtr.expr(qc["rule"])
    L.append(f"int64_t QuantChunkRule(int64_t group_a_eff) {{ (void)group_a_eff; return {code}; }}")
    L.append("")

    # Kernel entries.
    blobs = []
    entry_rows = []
    index = []
    for j, e in enumerate(m["kernels"]):
        fn = e["kernel"].split(":")[1]
        k = kernel_names.index(fn)
        aligned = set(e["aligned16"])
        L.append(f"const ArgSpec kEntryArgs{j}[] = {{" + ", ".join(
            f"{{{c_str(a['name'])}, {c_str(a['type'])}, {'true' if a['name'] in aligned else 'false'}}}"
            for a in e["args"]) + "};")
        cx = [int(e["constexprs"][c]) for c in cx_names[fn]] + [0] * (MAX_CX - len(cx_names[fn]))
        cubin = root / e["cubin"]
        data = cubin.read_bytes()
        blobs.append(cubin.resolve())
        index.append({"name": e["name"], "arch": e["arch"], "symbol": e["symbol"],
                      "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        entry_rows.append(
            f"{{{c_str(e['name'])}, {int(e['arch'])}, {c_str(e.get('ptx_target') or '')}, "
            f"{c_str(e['symbol'])}, {k}, {int(e['threads'])}, {int(e['shared'])}, "
            f"kEntryArgs{j}, {len(e['args'])}, {{{', '.join(map(str, cx))}}}, "
            f"serq_cubin_{j}, {len(data)}}}")

    grid_rows = [f"{{{c_str(fn)}, {{Grid{k}_0, Grid{k}_1, Grid{k}_2}}}}"
                 for k, fn in enumerate(kernel_names)]
    gc_rows = [f"{{{c_str(c['name'])}, {int(c['m_max'])}, {int(c['BM'])}, {int(c['BN'])}, "
               f"{int(c['max_split'])}}}" for c in m["gemm_configs"]]
    fu_rows = [f"{{{int(u)}, {int(v['half'])}, {int(v['units_per_pair'])}}}"
               for u, v in m["fast_units"].items()]

    L += ["}  // namespace", ""]
    L.append("extern \"C\" {")
    for j in range(len(blobs)):
        L.append(f"extern const unsigned char serq_cubin_{j}[];")
    L.append("}")
    L += [
        "const KernelFn kKernelFns[] = {" + ", ".join(grid_rows) + "};",
        "const StepSpec kSteps[] = {" + ", ".join(step_rows) + "};",
        "const ScratchSpec kScratch[] = {" + ", ".join(sc_rows) + "};",
        "const GemmClass kGemmClasses[] = {" + ", ".join(gc_rows) + "};",
        "const FastUnit kFastUnits[] = {" + ", ".join(fu_rows) + "};",
        "const KernelEntry kEntries[] = {" + ",\n  ".join(entry_rows) + "};",
        "",
        "const Tables& GetTables() {",
        "  static const Tables t{kKernelFns, sizeof kKernelFns / sizeof kKernelFns[0],",
        "                        kSteps, sizeof kSteps / sizeof kSteps[0],",
        "                        kScratch, sizeof kScratch / sizeof kScratch[0],",
        "                        kGemmClasses, sizeof kGemmClasses / sizeof kGemmClasses[0],",
        "                        kFastUnits, sizeof kFastUnits / sizeof kFastUnits[0],",
        f"                        {int(m['split_k']['target_programs'])}, "
        f"{int(m['split_k']['min_pairs_per_split'])}, QuantChunkRule,",
        "                        kEntries, sizeof kEntries / sizeof kEntries[0],",
        f"                        {c_str(json.dumps(m['archs']))}}};",
        "  return t;",
        "}",
        "",
        "}  // namespace cuda",
        "}  // namespace serq",
    ]
    if len(scratch) + len(FIXED_BUFFERS) > 32:
        raise GenError("too many buffers")

    S = ["/* Generated by scripts/gen_cuda_embed.py: the AOT cubins, byte for byte. */",
         '\t.section .rodata.serq_cubins,"a",@progbits']
    for j, path in enumerate(blobs):
        if '"' in str(path) or "\n" in str(path):
            raise GenError(f"cubin path {path} cannot be embedded")
        # the hash makes this file change (and be reassembled) whenever a cubin does
        S += [f"/* {index[j]['sha256']} */","\t.balign 16", f"\t.globl serq_cubin_{j}", f"\t.hidden serq_cubin_{j}",
              f"\t.type serq_cubin_{j}, @object", f"serq_cubin_{j}:", f'\t.incbin "{path}"',
              f"\t.size serq_cubin_{j}, . - serq_cubin_{j}"]
    S.append('\t.section .note.GNU-stack,"",@progbits')

    out.mkdir(parents=True, exist_ok=True)
    (out / "serq_cuda_tables.cc").write_text("\n".join(L) + "\n")
    (out / "serq_cuda_cubins.S").write_text("\n".join(S) + "\n")
    key_file = root / "key"  # scripts/aot_cached.py: the hash of the sources built
    key = key_file.read_text().strip() if key_file.is_file() else None
    (out / "serq_cuda_index.json").write_text(
        json.dumps({"aot_key": key, "archs": m["archs"], "cubins": index}, indent=1) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    try:
        generate(a.manifest, a.out)
    except (GenError, KeyError, OSError) as e:
        print(f"gen_cuda_embed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
