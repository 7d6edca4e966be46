"""Does onnxruntime's transformer optimizer fuse the Optimum SmolLM2 export, and does it help?

    python benchmarks/ort_fusion_probe.py                       # node counts and logits checks
    python benchmarks/ort_fusion_probe.py --bench --json probe.json

For each ``model_type`` (``--types``) and ``opt_level`` (``--levels``) it runs
``onnxruntime.transformers.optimizer.optimize_model(path, model_type, num_heads=9,
hidden_size=576, opt_level)`` and reports the node count before and after, the fused op types
that appear, and the largest |logit difference| against the original model on a 64-token
prompt (prefill, empty cache) plus whether 16 greedy tokens (with the KV cache) stay the same.
It also saves the graph onnxruntime itself runs at each session optimization level
(``optimized_model_filepath``, offline) and counts its nodes. ``--bench`` times prefill and
decode of every distinct optimized graph against the original with the same code as
``cpu_model_bench.py`` (repetitions interleaved across the graphs). Nothing here changes the
converter.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
try:  # the installed package (with its op library); the source tree only without one
    import serq_onnx  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO))

from serq_onnx import model_bench as mb  # noqa: E402
from serq_onnx.bench import machine_name  # noqa: E402
from serq_onnx.evaluate import causal_lm_spec, decode_speed, prefill_feed  # noqa: E402

CACHE = Path(os.environ.get("SERQ_CACHE", REPO / ".cache"))
MODEL = CACHE / "smollm2-135m"
FUSED = ["SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding",
         "GroupQueryAttention", "MultiHeadAttention", "Attention", "SkipLayerNormalization",
         "LayerNormalization", "FusedMatMul", "QuickGelu", "Gelu", "FastGelu", "BiasGelu",
         "EmbedLayerNormalization", "MatMulNBits", "GatherBlockQuantized"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--float", dest="float_model", type=Path,
                    default=MODEL / "onnx-fp32" / "model.onnx")
    ap.add_argument("--types", default="gpt2,qwen3",
                    help="optimize_model model types (onnxruntime 1.32 has no llama type; "
                         "qwen3 is its RoPE/GQA/RMSNorm decoder)")
    ap.add_argument("--levels", default="0,1,99", help="optimize_model opt_level values")
    ap.add_argument("--attention-options", action="store_true",
                    help="also try, at opt_level 0, FusionOptions asking for MultiHeadAttention "
                         "and for GroupQueryAttention (node counts and fused ops only)")
    ap.add_argument("--num-heads", type=int, default=9)
    ap.add_argument("--hidden-size", type=int, default=576)
    ap.add_argument("--work", type=Path, default=MODEL / "bench" / "fusion",
                    help="where optimized models are saved for --bench")
    ap.add_argument("--text", type=Path, default=CACHE / "austen" / "prideprejudice.txt")
    ap.add_argument("--check-tokens", type=int, default=64)
    ap.add_argument("--bench", action="store_true", help="time prefill and decode too")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5, help="interleaved across the graphs")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-spin", action="store_true",
                    help="idle onnxruntime threads sleep instead of spinning (shared machines)")
    ap.add_argument("--no-offline", action="store_true",
                    help="skip the session optimization levels saved offline")
    ap.add_argument("--json", type=Path)
    return ap.parse_args(argv)


def op_counts(graph) -> Counter:
    return Counter(n.op_type for n in graph.node)


def fused_ops(counts: Counter, before: Counter) -> dict[str, int]:
    """Op types that the original graph lacks, and the named fused types, with their counts."""
    return {op: n for op, n in counts.most_common() if op not in before or op in FUSED}


def _session(source, threads: int, level=None, save_to: Path | None = None):
    """A CPU session; ``save_to``: also write the graph it runs there (weights external)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if level is not None:
        so.graph_optimization_level = level
    if save_to is not None:
        so.optimized_model_filepath = str(save_to)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    save_to.name + ".data")
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def nodes_as_run(save_to: Path) -> dict:
    """Node counts of the graph a session saved; fused nodes whose names lack ``/layers.N/``
    count as outside the layers."""
    import onnx

    c = mb.node_counts(onnx.load(str(save_to), load_external_data=False).graph.node)
    return {"nodes": c["total"], "nodes_per_layer": c["nodes_per_layer"],
            "outside_layers": c["outside_layers"], "by_op": c["by_op"]}


def check_logits(ref, sess, ids: np.ndarray, new_tokens: int = 16) -> dict:
    """max |logit diff| on a prefill of ``ids`` and whether greedy decoding agrees."""
    out = {}
    try:
        spec = causal_lm_spec(sess)
        (a,) = ref.run(["logits"], prefill_feed(causal_lm_spec(ref), ids))
        (b,) = sess.run(["logits"], prefill_feed(spec, ids))
        d = np.abs(a.astype(np.float64) - b.astype(np.float64))
        out.update(max_abs_diff=float(d.max()), max_abs_logit=float(np.abs(a).max()),
                   top1_agree=float((a[0].argmax(-1) == b[0].argmax(-1)).mean()))
        ta = decode_speed(ref, ids, new_tokens=new_tokens, warmup=False)["tokens"]
        tb = decode_speed(sess, ids, new_tokens=new_tokens, warmup=False)["tokens"]
        out["greedy_tokens_equal"] = ta == tb
    except Exception as e:  # a fused graph the harness cannot feed is itself a finding
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return out


def offline_levels(path: Path, threads: int, work: Path) -> dict:
    """Node counts of the graph onnxruntime saves at each session optimization level."""
    import onnx
    import onnxruntime as ort

    levels = {"ORT_DISABLE_ALL": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "ORT_ENABLE_BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "ORT_ENABLE_EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "ORT_ENABLE_ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    before = op_counts(onnx.load(str(path), load_external_data=False).graph)
    out = {}
    for name, level in levels.items():
        d = work / f"offline-{name.lower()}"
        d.mkdir(parents=True, exist_ok=True)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        so.graph_optimization_level = level
        so.optimized_model_filepath = str(d / "model.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    "model.onnx.data")
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        t0 = time.perf_counter()
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        load_s = time.perf_counter() - t0
        counts = op_counts(onnx.load(str(d / "model.onnx"), load_external_data=False).graph)
        nodes = mb.node_counts(onnx.load(str(d / "model.onnx"), load_external_data=False)
                               .graph.node)
        out[name] = {"nodes": sum(counts.values()), "session_load_seconds": load_s,
                     "nodes_per_layer": nodes["nodes_per_layer"],
                     "fused": fused_ops(counts, before), "path": str(d / "model.onnx")}
        print(f"  offline {name:<20} {out[name]['nodes']:>6} nodes "
              f"({nodes['nodes_per_layer']:.1f} per layer), load {load_s:.1f} s, fused/new: "
              f"{out[name]['fused']}", flush=True)
    return out


def main(argv=None) -> int:
    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.optimizer import MODEL_TYPES, optimize_model

    args = parse_args(argv)
    path = args.float_model
    print(f"machine: {machine_name()}; threads {args.threads}")
    print(f"optimize_model model types in onnxruntime {ort.__version__}: {', '.join(MODEL_TYPES)}")
    proto = onnx.load(str(path), load_external_data=False)
    before = op_counts(proto.graph)
    base_nodes = mb.node_counts(proto.graph.node)
    del proto
    print(f"original: {sum(before.values())} nodes ({base_nodes['nodes_per_layer']:.1f} per "
          f"layer x {base_nodes['layers']}, {base_nodes['outside_layers']} outside)")
    text = mb.prompt_text(args.text, max(args.prompt_tokens, args.check_tokens))
    check_ids = mb.prompt_ids(path.parent, text, args.check_tokens)
    report = {"machine": machine_name(), "onnxruntime": ort.__version__, "model": str(path),
              "original_nodes": sum(before.values()), "original_by_op": dict(before),
              "original_nodes_per_layer": base_nodes["nodes_per_layer"],
              "model_types_available": list(MODEL_TYPES), "optimizer": {}, "offline": {},
              "bench": {}}
    ref = _session(str(path), args.threads)
    to_bench: dict[str, Path] = {"float32 (original)": path}
    signatures: dict[tuple, str] = {}

    args.work.mkdir(parents=True, exist_ok=True)
    if not args.no_offline:
        print("== onnxruntime session optimization, saved offline (optimized_model_filepath)")
        report["offline"] = offline_levels(path, args.threads, args.work)
        to_bench["offline ORT_ENABLE_ALL graph"] = Path(
            report["offline"]["ORT_ENABLE_ALL"]["path"])

    print("== onnxruntime.transformers.optimizer.optimize_model")
    for t in [s for s in args.types.split(",") if s]:
        for lvl in [int(s) for s in args.levels.split(",") if s]:
            key = f"{t} opt_level {lvl}"
            t0 = time.perf_counter()
            try:
                m = optimize_model(str(path), model_type=t, num_heads=args.num_heads,
                                   hidden_size=args.hidden_size, opt_level=lvl, use_gpu=False)
            except Exception as e:
                report["optimizer"][key] = {"error": f"{type(e).__name__}: {e}",
                                            "traceback": traceback.format_exc(limit=3)}
                print(f"  {key}: failed: {type(e).__name__}: {e}", flush=True)
                continue
            seconds = time.perf_counter() - t0
            counts = op_counts(m.model.graph)
            nodes = mb.node_counts(m.model.graph.node)
            entry = {"seconds": seconds, "nodes": sum(counts.values()),
                     "nodes_per_layer": nodes["nodes_per_layer"],
                     "fused": fused_ops(counts, before),
                     "fused_operator_statistics": m.get_fused_operator_statistics()}
            sig = tuple(sorted(counts.items()))
            try:
                with tempfile.TemporaryDirectory(prefix="fusion-probe-") as tmp:
                    sess = _session(m.model.SerializeToString(), args.threads,
                                    save_to=Path(tmp) / "run.onnx")
                    entry["as_run"] = nodes_as_run(Path(tmp) / "run.onnx")
                entry["check"] = check_logits(ref, sess, check_ids)
                del sess
            except Exception as e:
                entry["check"] = {"error": f"onnxruntime cannot load it: {type(e).__name__}: "
                                           f"{str(e).splitlines()[0]}"}
            if args.bench and "error" not in entry["check"] and sig not in signatures:
                out = args.work / f"{t}-o{lvl}"
                out.mkdir(parents=True, exist_ok=True)
                m.save_model_to_file(str(out / "model.onnx"), use_external_data_format=False)
                to_bench[key] = out / "model.onnx"
            entry["same_graph_as"] = signatures.get(sig)
            signatures.setdefault(sig, key)
            del m
            report["optimizer"][key] = entry
            as_run = entry.get("as_run", {}).get("nodes")
            print(f"  {key}: {entry['nodes']} nodes ({nodes['nodes_per_layer']:.1f} per layer), "
                  f"{as_run} as onnxruntime runs it, in {seconds:.0f} s; fused/new: "
                  f"{entry['fused']}; check: {entry['check']}"
                  + (f"; same graph as {entry['same_graph_as']}" if entry["same_graph_as"]
                     else ""), flush=True)
    if args.attention_options:
        from onnxruntime.transformers.fusion_options import AttentionOpType, FusionOptions

        print("== optimize_model at opt_level 0 with attention fusion options")
        for t in [s for s in args.types.split(",") if s]:
            for mode in ("MultiHeadAttention", "GroupQueryAttention"):
                key = f"{t} opt_level 0, {mode} requested"
                options = FusionOptions(t)
                options.use_multi_head_attention = True
                if mode == "GroupQueryAttention":
                    options.set_attention_op_type(AttentionOpType.GroupQueryAttention)
                try:
                    m = optimize_model(str(path), model_type=t, num_heads=args.num_heads,
                                       hidden_size=args.hidden_size, opt_level=0,
                                       optimization_options=options, use_gpu=False)
                except Exception as e:
                    report["optimizer"][key] = {"error": f"{type(e).__name__}: {e}"}
                    print(f"  {key}: failed: {type(e).__name__}: {e}", flush=True)
                    continue
                counts = op_counts(m.model.graph)
                report["optimizer"][key] = {"nodes": sum(counts.values()),
                                            "fused": fused_ops(counts, before)}
                print(f"  {key}: {sum(counts.values())} nodes; fused/new: "
                      f"{fused_ops(counts, before)}", flush=True)
                del m
    del ref

    if args.bench:
        print(f"== speed: prefill {args.prompt_tokens}, decode {args.decode_tokens}, median of "
              f"{args.reps}")
        ids = mb.prompt_ids(path.parent, text, args.prompt_tokens)
        runners = [mb.OnnxRunner(mb.Variant(name, p), ids, decode_tokens=args.decode_tokens,
                                 threads=args.threads, spinning=not args.no_spin)
                   for name, p in to_bench.items()]
        results = mb.run_interleaved(runners, args.reps, log=lambda line: print(line, flush=True))
        for r in results:
            report["bench"][r.variant] = r.to_dict()
        results[0].variant = "float32"
        print(mb.format_table(results))
    if args.json:
        mb.write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
