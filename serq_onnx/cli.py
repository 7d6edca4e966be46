"""The serq-onnx command line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from .errors import SerqError

DESCRIPTION = ("serq-onnx: quantize ONNX language models with SERQ (4-bit weights, 4- or 8-bit "
               "activations) into SerqMatMul nodes that run in onnxruntime; evaluate them, build "
               "onnxruntime's own 4-bit baseline, and time the kernels.")

JSON_HELP = ("print one JSON object on stdout instead of the text report; logs and progress "
             "go to stderr; on failure the object is {\"error\": ..., \"exit_code\": ...} "
             "(default: text)")
JSON_PATH_HELP = ("write the results as JSON to PATH; with no PATH (or -) print them as one "
                  "JSON object on stdout instead of the text, logs on stderr (default: none)")
# Commands whose --json takes an optional file path (the others take none).
_JSON_PATH_COMMANDS = ("eval", "bench")


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="quantize an ONNX causal LM with SERQ",
                       description="Convert an Optimum-exported causal LM: every decoder linear "
                       "layer becomes one SerqMatMul (4-bit weights, 4/8-bit activations).")
    p.add_argument("model", type=Path, help="model.onnx of an Optimum export")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    _add_conversion_options(p)
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run calibration sequences and GPTQ layers on a Ray cluster: HOST:PORT, "
                   "ray://HOST:PORT, or auto (a local Ray instance started for the conversion); "
                   "same model as without it; needs "
                   "'serq-onnx[ray]' (default: off, all in this process)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what inspect prints for these settings and write nothing (the "
                   "output folder is checked, not created; default: off)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=_convert)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="what convert would do with a model, without converting",
                       description="List the linear layers convert would quantize, where each "
                       "flattening scale folds (and why not), whether attention fuses, sizes "
                       "before and after, estimated conversion time and memory, and the passes "
                       "the chosen method runs. Needs no calibration data and writes nothing.")
    p.add_argument("model", type=Path, help="model.onnx of an Optimum export")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="also check this output folder as convert would (default: none)")
    _add_conversion_options(p)
    p.add_argument("--overwrite", action="store_true",
                   help="with -o: accept a non-empty output folder written by serq-onnx "
                   "(default: refuse)")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=_inspect)


def _add_conversion_options(p) -> None:
    from . import calibration, gram_chunks  # light: the defaults live beside their code

    p.add_argument("--scheme", default="w4a8", choices=["w4a8", "w4a4"],
                   help="4-bit weights with 8- or 4-bit activations (default w4a8)")
    p.add_argument("--method", default="serq",
                   choices=["serq", "rtn", "flatten", "smoothquant", "l2qer"],
                   help="serq (default); rtn: no flattening, no R; flatten: no R; baselines: "
                   "smoothquant (scales max|X|^alpha / max|W|^(1-alpha)), l2qer (two-factor "
                   "low-rank error correction of --rank, 8-bit factors)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="SmoothQuant migration strength in [0, 1] (default 0.5)")
    p.add_argument("--rank", type=int, default=128, help="salient channels r (default 128)")
    p.add_argument("--group-w", type=int, default=128,
                   help="weight group size along K (default 128)")
    p.add_argument("--group-a", type=int, default=None,
                   help="activation group size (0: whole row; default 128 for w4a8, 32 for w4a4)")
    p.add_argument("--weight-quant", default=None, choices=["gptq", "rtn"],
                   help="main weight rounding: gptq (compensates rounding errors with the "
                   "calibration inputs) or rtn (round to nearest: faster, less accurate); "
                   "default: gptq for serq and flatten, rtn for the baselines, as published")
    p.add_argument("--weight-scale", default=None, choices=["mse", "absmax"],
                   help="weight group scales: mse (clipping searched for the least rounding "
                   "error) or absmax (max|w| / 7); default: mse for serq and flatten, absmax for "
                   "the baselines")
    p.add_argument("--fuse-attention", action=argparse.BooleanOptionalAction, default=True,
                   help="each layer's attention as onnxruntime's GroupQueryAttention (checked "
                   "against the export; kept as exported where not recognised); default: on")
    p.add_argument("--lm-head", default="auto", choices=["auto", "float", "int8"],
                   help="int8 runs the LM head as SerqMatMul with 8-bit weights and activations "
                   "(+0.04%% perplexity on SmolLM2, a quarter of its bytes per token); float keeps "
                   "it float; default: auto, int8 where the head is a MatMul with a constant "
                   "weight, else float")
    p.add_argument("--layers", default=None, metavar="PATTERN",
                   help="convert only the decoder linears whose label (layers.3.mlp.down_proj, "
                   "as in the report) or ONNX node name matches this regular expression "
                   "(searched anywhere in it, e.g. 'mlp' or 'layers\\.[0-3]\\.'); the others stay "
                   "float; the LM head follows --lm-head; default: every decoder linear")
    p.add_argument("--calib", type=Path,
                   help="UTF-8 text file for calibration (default: none, random tokens, with a "
                   "warning: accuracy suffers)")
    p.add_argument("--calib-samples", type=int, default=calibration.DEFAULT_SAMPLES,
                   help=f"calibration sequences (default {calibration.DEFAULT_SAMPLES})")
    p.add_argument("--calib-seqlen", type=int, default=calibration.DEFAULT_SEQLEN,
                   help=f"tokens per calibration sequence (default {calibration.DEFAULT_SEQLEN})")
    p.add_argument("--gram-memory", type=float, default=None,
                   metavar="MIB",
                   help="MiB of GPTQ Gram matrices (float32 K x K per layer input) held at once; "
                   "where they all exceed it, they are collected and used in chunks of layers, "
                   "one more pass over the calibration text per chunk, each starting where the "
                   "one before stopped, for the same model "
                   "(0: one layer input at a time; inf: never split; summing briefly holds about "
                   "3x this; default: a quarter of the float model's size (a sixteenth with "
                   f"--low-memory), within {gram_chunks.GRAM_MEMORY_FLOOR_MIB:g}-"
                   f"{gram_chunks.DEFAULT_GRAM_MEMORY_MIB:g})")
    p.add_argument("--low-memory", action="store_true",
                   help="for models near the machine's memory: the float onnxruntime sessions "
                   "(checks, calibration) read the weights from the model file as mapped "
                   "instead of copying them, so they are held once, in the page cache; "
                   "forward passes about 25%% slower, float rounding slightly different")
    p.add_argument("--no-fuse", action="store_true",
                   help="one SerqMatMul per linear layer (default: q/k/v and gate/up, which read "
                   "the same activation, share one node that quantizes it once)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip comparing the converted model with the float one")


def _conversion_kwargs(args) -> dict:
    return dict(scheme=args.scheme, rank=args.rank, group_w=args.group_w, group_a=args.group_a,
                method=args.method, calib=args.calib, calib_samples=args.calib_samples,
                calib_seqlen=args.calib_seqlen, weight_quant=args.weight_quant,
                weight_scale=args.weight_scale, smooth_alpha=args.alpha, lm_head=args.lm_head,
                fuse_attention=args.fuse_attention, layers=args.layers,
                gram_memory_mib=args.gram_memory, low_memory=args.low_memory,
                verify=not args.no_verify,
                fuse=not args.no_fuse, overwrite=args.overwrite)


def _log(args):
    """Where messages go: stderr when stdout carries JSON, else stdout."""
    if _json_stdout(args):
        return lambda msg: print(msg, file=sys.stderr)
    return print


def _json_stdout(args) -> bool:
    return getattr(args, "json", None) in (True, "-")


def _emit(args, text: str, data: dict) -> None:
    if _json_stdout(args):
        print(json.dumps(data, indent=1, default=str))
    else:
        print(text)


def _convert(args) -> int:
    if args.dry_run:
        from .inspect import inspect_model

        result = inspect_model(args.model, output=args.output, log=_log(args),
                               **_conversion_kwargs(args))
        _emit(args, f"dry run: nothing written to {args.output}\n{result.summary()}",
              dict(result.to_json(), dry_run=True, output=str(args.output)))
        return 0
    from dataclasses import asdict

    from .converter import convert

    report = convert(args.model, args.output, progress=not args.quiet, log=_log(args),
                     ray=args.ray, **_conversion_kwargs(args))
    _emit(args, report.summary(), asdict(report))
    return 0


def _inspect(args) -> int:
    from .inspect import inspect_model

    result = inspect_model(args.model, output=args.output, log=_log(args),
                           **_conversion_kwargs(args))
    _emit(args, result.summary(), result.to_json())
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and last-word accuracy of an ONNX causal LM",
                       description="Perplexity over non-overlapping windows and LAMBADA-style "
                       "last-word accuracy, both on one text, for float or converted models.")
    p.add_argument("model_dir", type=Path, help="folder with model.onnx and tokenizer.json")
    p.add_argument("--text", type=Path, required=True, help="UTF-8 evaluation text")
    p.add_argument("--ctx", type=int, default=1024,
                   help="window length, non-overlapping (default 1024)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="perplexity on the first N tokens only (default: all)")
    p.add_argument("--last-word", type=int, default=200, metavar="N",
                   help="last-word passages, spread over the whole text (default 200; 0: skip)")
    p.add_argument("--last-word-context", type=int, default=256, metavar="TOKENS",
                   help="context tokens before each last word (default 256)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help=JSON_PATH_HELP)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars (default: shown)")
    p.set_defaults(func=_eval)


def _eval(args) -> int:
    from .evaluate import evaluate_model_dir

    json_path = None if args.json in (None, "-") else Path(args.json)
    result = evaluate_model_dir(args.model_dir, args.text, ctx=args.ctx,
                                max_tokens=args.max_tokens, last_word=args.last_word,
                                last_word_context=args.last_word_context, json_path=json_path,
                                progress=not args.quiet)
    _emit(args, str(result), result.to_dict())
    return 0


def _add_nbits(sub) -> None:
    p = sub.add_parser("nbits", help="onnxruntime's own 4-bit weight-only baseline (MatMulNBits)",
                       description="Quantize the same decoder linears that convert does with "
                       "onnxruntime's MatMulNBits quantizer (round to nearest, 4-bit blocks "
                       "along K); lm_head, embeddings and attention stay float.")
    p.add_argument("model", type=Path, help="model.onnx of an Optimum export")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("--block-size", type=int, default=128,
                   help="weights per scale along K (a power of two >= 16; default 128)")
    p.add_argument("--asymmetric", action="store_true", help="zero points (default: symmetric)")
    p.add_argument("--accuracy-level", type=int, default=None, choices=range(5), metavar="N",
                   help="MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 "
                   "activations (default: unset)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=_nbits)


def _nbits(args) -> int:
    from .nbits_baseline import make_matmulnbits_model

    out = make_matmulnbits_model(args.model, args.output, block_size=args.block_size,
                                 symmetric=not args.asymmetric,
                                 accuracy_level=args.accuracy_level, overwrite=args.overwrite,
                                 progress=not args.quiet)
    config_file = Path(out).parent / "nbits_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    _emit(args, f"wrote {out}", {"output": str(out), "config": config})
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time SerqMatMul against onnxruntime's kernels",
                       description="Time float MatMul, MatMulNBits (blocks 32 and 128, "
                       "accuracy_level 0 and 4), onnxruntime's dynamic int8 and SerqMatMul "
                       "w4a8/w4a4 on the same shapes in one process: each case model holds L "
                       "independent nodes of one kernel with their own weights, timed inside "
                       "one session call; prints ms per node and ratios.")
    p.add_argument("--suite", default=None, metavar="NAME",
                   help="shape set: smollm2, llama3-8b or all (default: smollm2 when neither "
                   "--shape nor --model is given; otherwise none, and a given suite is added)")
    p.add_argument("--model", type=Path,
                   help="add the linear-layer shapes of this ONNX model (default: none)")
    p.add_argument("--shape", action="append", default=[], metavar="KxN",
                   help="add a weight shape (repeatable; default: none)")
    p.add_argument("--m", default=",".join(map(str, bench_defaults()["ms"])),
                   help="token counts, comma separated (default %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads (default 0: onnxruntime's default)")
    p.add_argument("--rank", type=int, default=128,
                   help="SerqMatMul salient rank (default 128, capped at K)")
    p.add_argument("--group", type=int, default=128,
                   help="SerqMatMul weight group (default 128; MatMulNBits runs blocks 32 and "
                   "128)")
    p.add_argument("--group-a", type=int, default=None,
                   help="activation group of both SerqMatMul schemes (default: each scheme's "
                   "conversion default, 128 for w4a8 and 32 for w4a4)")
    p.add_argument("--nodes", type=int, default=0, metavar="L",
                   help="nodes per case model (default 0: automatic, enough weight copies for "
                   "64 MiB, 8 to 64, fewer at large M); always cut to --memory-mib")
    p.add_argument("--memory-mib", type=int, default=bench_defaults()["memory_mib"],
                   metavar="MIB", help="weight copies of one kernel at most, in MiB "
                   "(default %(default)s)")
    p.add_argument("--seconds", type=float, default=0.5,
                   help="minimum timing per kernel and case (default 0.5)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write every raw figure as JSON to PATH; with no PATH (or -) print "
                   "them as one JSON object on stdout instead of the table, logs on stderr "
                   "(default: none)")
    p.add_argument("--plot", type=Path, metavar="PATH.png",
                   help="also draw the speed-ups over float MatMul as a PNG (needs "
                   "matplotlib; default: none)")
    p.add_argument("--markdown", action="store_true",
                   help="print a markdown table (for models/RESULTS-cpu.md) instead of the text "
                   "table (default: text)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar (default: shown)")
    p.set_defaults(func=_bench)


def bench_defaults() -> dict:
    # literal copies of bench.DEFAULT_MS / DEFAULT_MEMORY_MIB: the parser is built without
    # importing numpy and onnx (tests/test_bench.py checks they agree)
    return {"ms": [1, 8, 128, 512], "memory_mib": 1024}


def _bench(args) -> int:
    from . import bench

    try:
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shape]
        ms = [int(m) for m in args.m.split(",")]
    except ValueError:
        raise SerqError("--shape takes KxN (e.g. 576x1536) and --m comma-separated integers")
    if any(len(s) != 2 for s in shapes):
        raise SerqError("--shape takes KxN, e.g. 576x1536")
    if any(k < 2 or n < 1 for k, n in shapes):
        raise SerqError("--shape needs K >= 2 and N >= 1")
    json_path = None if args.json in (None, "-") else Path(args.json)
    bench.check_args(ms, threads=args.threads, rank=args.rank, group=args.group,
                     group_a=args.group_a, min_seconds=args.seconds, nodes=args.nodes,
                     memory_mib=args.memory_mib, suite=args.suite, json_path=json_path,
                     plot_path=args.plot)
    if args.model:
        shapes += bench.shapes_of_model(args.model)
    suite = args.suite or (None if shapes else bench.DEFAULT_SUITE)
    if suite:
        shapes += [s for s in bench.SUITES[suite] if s not in shapes]
    shapes = list(dict.fromkeys(shapes))
    results = bench.run(shapes, ms, threads=args.threads, rank=args.rank, group=args.group,
                        group_a=args.group_a, min_seconds=args.seconds, nodes=args.nodes,
                        memory_mib=args.memory_mib, progress=not args.quiet)
    machine = bench.machine_name()
    settings = dict(shapes=[list(s) for s in shapes], ms=ms, rank=args.rank,
                    group=args.group, group_a=args.group_a, nodes=args.nodes,
                    memory_mib=args.memory_mib, seconds=args.seconds)
    if _json_stdout(args):
        print(json.dumps(bench.to_json(results, threads=args.threads, settings=settings),
                         indent=1))
    elif args.markdown:
        print(bench.format_markdown(results, machine=machine, threads=args.threads), end="")
    else:
        print(f"machine: {machine}")
        print(bench.threads_line(args.threads))
        print(bench.format_table(results))
    if json_path is not None:
        bench.write_json(json_path, results, threads=args.threads, settings=settings)
        print(f"wrote {json_path}", file=sys.stderr)
    if args.plot:
        bench.write_plot(args.plot, results, title=f"{machine}; {bench.threads_line(args.threads)}")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _add_genai_config(sub) -> None:
    p = sub.add_parser("genai-config", help="write genai_config.json for onnxruntime-genai",
                       description="Write genai_config.json into a model folder (convert does "
                       "this itself when the input folder has config.json), so that "
                       "onnxruntime-genai's og.Model loads it; a converted model gets the op "
                       "library copied in, since genai loads custom op libraries only from "
                       "inside the model folder.")
    p.add_argument("folder", type=Path, metavar="OUT_DIR",
                   help="folder with the model and its config.json (or a genai_config.json "
                   "to update)")
    p.add_argument("--model-file", default="model.onnx",
                   help="the decoder's file name in OUT_DIR (default model.onnx)")
    p.add_argument("--share-buffer", action=argparse.BooleanOptionalAction, default=True,
                   help="genai's past_present_share_buffer: one preallocated KV cache that "
                   "GroupQueryAttention appends to in place (default: on where the attention "
                   "is GroupQueryAttention, off otherwise)")
    p.add_argument("--library", type=Path, default=None,
                   help="op library to copy in (default: the one serq-onnx loads, "
                   "$SERQ_ONNX_LIBRARY or the installed copy)")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=_genai_config)


def _genai_config(args) -> int:
    from .genai import write_genai_config

    out = write_genai_config(args.folder, model_file=args.model_file,
                             share_buffer=args.share_buffer, library=args.library)
    _emit(args, f"wrote {out}", {"genai_config": str(out),
                                 "config": json.loads(Path(out).read_text())})
    return 0


# --- serving: serve (Ray Serve) and triton-repo (a Triton model repository) ---------------------

def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a converted model with Ray Serve (OpenAI-style API)",
                       description="Serve a converted model folder with Ray Serve: POST "
                       "/v1/completions (OpenAI completions), GET /v1/models, GET /health; every "
                       "replica opens the model with the op library registered. Needs the serve "
                       "extra (pip install 'serq-onnx[serve]'). Ctrl-C stops.")
    p.add_argument("model_dir", type=Path, help="output folder of serq-onnx convert")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")
    p.add_argument("--host", default="127.0.0.1",
                   help="HTTP address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="an existing Ray cluster (HOST:PORT, ray://HOST:PORT or auto); "
                   "default: start a local Ray instance")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of the local Ray instance (default: all of this machine)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0,
                   help="CPUs Ray reserves for each replica (default 1)")
    p.add_argument("--threads", type=int, default=0,
                   help="onnxruntime intra-op threads per replica (default 0: onnxruntime's "
                   "default)")
    p.add_argument("--max-ongoing-requests", type=int, default=4,
                   help="requests one replica works on at once; more wait in Serve's queue "
                   "(default 4)")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: the "
                   "folder's name)")
    p.add_argument("--library-path", default=None, metavar="PATH",
                   help="the op library as the replicas' machines see it (default: "
                   "$SERQ_ONNX_LIBRARY, else each replica's installed copy)")
    p.add_argument("--route-prefix", default="/",
                   help="URL prefix of the routes, to tell models apart on one Serve instance "
                   "(default /)")
    p.add_argument("--start-timeout", type=float, default=300.0,
                   help="seconds to wait for every replica to load the model (default 300)")
    p.add_argument("--json", action="store_true",
                   help="once serving, print one JSON object (url, model, replicas, Ray "
                   "address) on stdout instead of the text line; logs go to stderr; on failure "
                   "the object is {\"error\": ..., \"exit_code\": ...} (default: text)")
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    from . import serve

    server = serve.start(args.model_dir, replicas=args.replicas, host=args.host, port=args.port,
                         ray_address=args.ray_address, num_cpus=args.num_cpus,
                         cpus_per_replica=args.cpus_per_replica, threads=args.threads,
                         model_name=args.model_name,
                         max_ongoing_requests=args.max_ongoing_requests,
                         library=args.library_path, start_timeout=args.start_timeout,
                         route_prefix=args.route_prefix)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)  # Ray's core worker installed its own
    try:
        _emit(args, f"serving {args.model_dir} at {server.url}/v1/completions "
              f"({args.replicas} replica{'s' if args.replicas != 1 else ''}, Ray cluster at "
              f"{server.ray_address or 'unknown'}); Ctrl-C stops",
              {"url": f"{server.url}/v1/completions", "model_dir": str(args.model_dir),
               "replicas": args.replicas, "ray_address": server.ray_address})
        sys.stdout.flush()
        serve.serve_forever(server)
    finally:
        server.stop()
    return 0


def _add_triton_repo(sub) -> None:
    p = sub.add_parser("triton-repo", help="write a Triton Inference Server model repository",
                       description="Write REPO/<name>/ for Triton's onnxruntime backend: "
                       "config.pbtxt (checked against Triton's model-config schema), 1/model.onnx "
                       "and the op library, named by model_operations. Needs the triton extra "
                       "(pip install 'serq-onnx[triton]').")
    p.add_argument("model_dir", type=Path, help="output folder of serq-onnx convert")
    p.add_argument("repo", type=Path, help="model repository folder (created if missing; "
                   "other models in it are left alone)")
    p.add_argument("--model-name", default=None,
                   help="the model's folder and name in the repository (default: the model "
                   "folder's name)")
    p.add_argument("--library-path", default=None, metavar="PATH",
                   help="op_library_filename as the server sees it, e.g. inside its container "
                   "(default: the absolute path of the copy written into REPO/<name>/)")
    p.add_argument("--kind", default="cpu", choices=["cpu", "gpu"],
                   help="instance_group kind: KIND_CPU or KIND_GPU (default cpu)")
    p.add_argument("--instances", type=int, default=1,
                   help="model instances in the instance group (default 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing REPO/<name> written by this command")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=_triton_repo)


def _triton_repo(args) -> int:
    from .triton_repo import write_repo

    target = write_repo(args.model_dir, args.repo, model_name=args.model_name,
                        library_path=args.library_path, kind=args.kind,
                        instances=args.instances, overwrite=args.overwrite)
    _emit(args, f"wrote {target} (serve it with: tritonserver --model-repository={target.parent})",
          {"model_folder": str(target), "repository": str(target.parent),
           "config": str(target / "config.pbtxt")})
    return 0

# --- end of serving --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="serq-onnx", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"serq-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_inspect(sub)
    _add_eval(sub)
    _add_nbits(sub)
    _add_bench(sub)
    _add_genai_config(sub)
    _add_serve(sub)
    _add_triton_repo(sub)
    return parser


def _wants_json(argv: list[str]) -> bool:
    """Whether ``argv`` asks for JSON on stdout, read before (or without) parsing it, so that
    usage errors answer in JSON too."""
    command = next((a for a in argv if not a.startswith("-")), None)
    for i, a in enumerate(argv):
        if a == "--json":
            if command not in _JSON_PATH_COMMANDS:
                return True
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            return nxt is None or nxt == "-" or nxt.startswith("-")
    return False


_JSON_ERRORS = {"enabled": False}


def _json_error(message: str, code: int) -> None:
    if _JSON_ERRORS["enabled"]:
        try:
            print(json.dumps({"error": message, "exit_code": code}))
        except OSError:  # stdout closed: the stderr line and the exit code remain
            pass


class _Parser(argparse.ArgumentParser):
    """Usage errors also as a JSON object on stdout when ``--json`` asks for JSON."""

    def error(self, message: str):
        _json_error(f"{self.prog}: {message}", 2)
        super().error(message)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same cleanup (staging folders) runs."""


def _terminate(signum, frame):
    raise _Terminated


def _fail(kind: str, message: str, code: int) -> int:
    """Report a failure: ``serq-onnx: kind: message`` on stderr, and with --json also as a
    JSON object."""
    print(f"serq-onnx: {kind}: {message}" if message else f"serq-onnx: {kind}", file=sys.stderr)
    _json_error(message or kind, code)
    return code


def main(argv: list[str] | None = None) -> int:
    """The command line. With ``--json`` stdout carries exactly one JSON object: the result, or
    ``{"error": message, "exit_code": code}`` (the message also on stderr); exit codes are
    the same either way: 2 bad input or usage, 3 internal error, 130/143 interrupted."""
    argv = sys.argv[1:] if argv is None else list(argv)
    _JSON_ERRORS["enabled"] = _wants_json(argv)
    args = build_parser().parse_args(argv)
    _JSON_ERRORS["enabled"] = _json_stdout(args)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except SerqError as err:
        return _fail("error", str(err), 2)
    except _Terminated:
        return _fail("terminated", "", 143)
    except KeyboardInterrupt:
        return _fail("interrupted", "", 130)
    except Exception as err:  # a bug: one line by default, the traceback on request
        if os.environ.get("SERQ_DEBUG"):
            traceback.print_exc()
        first = str(err).splitlines()[0] if str(err) else ""
        return _fail("internal error", f"{type(err).__name__}: {first} (set SERQ_DEBUG=1 for "
                     "the traceback and please report it)", 3)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
