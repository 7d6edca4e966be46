"""Greedy decode speed of model folders in onnxruntime-genai against a plain onnxruntime session.

    python benchmarks/genai_decode.py out/ builder-w4a8/ --text book.txt --new-tokens 128

Each folder (with its genai_config.json, as ``convert`` or ``serq-onnx genai-config`` write it)
generates ``--new-tokens`` greedy tokens after a ``--prompt-tokens`` prompt from ``--text``:
with :func:`serq_onnx.evaluate.decode_speed` (the plain session, KV cache bound on the device),
with :func:`serq_onnx.genai.generate` (genai, its config as written) and with genai without the
shared KV buffer. Repetitions are interleaved across folders and runtimes; the best decode
tokens/s of each is printed, and whether genai's tokens equal the plain session's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from serq_onnx import genai
from serq_onnx.calibration import tokenize_file
from serq_onnx.evaluate import decode_speed


def _without_shared_buffer(folder: Path, root: Path) -> Path:
    """A folder of links to ``folder``'s files whose config turns the shared KV buffer off."""
    out = root / f"{folder.name}-noshare"
    out.mkdir()
    for f in folder.iterdir():
        if f.name != genai.GENAI_CONFIG:
            os.symlink(f.resolve(), out / f.name)
    cfg = json.loads((folder / genai.GENAI_CONFIG).read_text())
    cfg["search"]["past_present_share_buffer"] = False
    (out / genai.GENAI_CONFIG).write_text(json.dumps(cfg, indent=4))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--text", type=Path, required=True, help="prompt text (UTF-8)")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="default 64")
    ap.add_argument("--new-tokens", type=int, default=128, help="default 128")
    ap.add_argument("--reps", type=int, default=3, help="default 3")
    args = ap.parse_args()
    prompt = tokenize_file(args.folders[0], args.text, max_tokens=args.prompt_tokens)
    best: dict[tuple[str, str], float] = {}
    root = Path(tempfile.mkdtemp(prefix="genai-decode-"))
    try:
        noshare = {f: _without_shared_buffer(f, root) for f in args.folders}
        for rep in range(args.reps):
            for folder in args.folders:
                plain = decode_speed(folder / "model.onnx", prompt, new_tokens=args.new_tokens)
                runs = {"plain session": plain,
                        "genai": genai.generate(folder, prompt, args.new_tokens),
                        "genai, no shared buffer": genai.generate(noshare[folder], prompt,
                                                                  args.new_tokens)}
                line = []
                for name, r in runs.items():
                    key = (str(folder), name)
                    best[key] = max(best.get(key, 0.0), r["decode_tokens_per_s"])
                    line.append(f"{name} {r['decode_tokens_per_s']:.1f}")
                got = runs["genai"]["tokens"]
                same = got == plain["tokens"][:len(got)]
                print(f"rep {rep} {folder}: {', '.join(line)} tokens/s; genai tokens equal the "
                      f"plain session's: {same}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for (folder, name), v in best.items():
        print(f"{folder:40s} {name:26s} best {v:.1f} decode tokens/s")


if __name__ == "__main__":
    main()
