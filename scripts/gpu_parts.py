"""Splitting a file larger than one device transfer into parts, and putting it back together.

The manifest records the whole file's size and sha256 and each part's, so every part is checked
when it arrives (a part that broke in transit is resent alone) and the assembled file is checked
before it is installed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

CHUNK = 1 << 20


class PartError(RuntimeError):
    """A part or the assembled file is missing, short or has the wrong hash."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def part_name(stem: str, k: int) -> str:
    return f"{stem}.part{k:02d}"


def split(src: Path, dest: Path, part_size: int) -> dict:
    """Write ``src`` as parts of at most ``part_size`` bytes into ``dest``; returns the manifest
    (also written as ``dest/manifest.json``)."""
    if part_size < 1:
        raise ValueError(f"part size must be >= 1, got {part_size}")
    src, dest = Path(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob(f"{src.name}.part*"):
        old.unlink()
    parts = []
    with open(src, "rb") as f:
        k = 1
        while True:
            data = f.read(part_size)
            if not data:
                break
            name = part_name(src.name, k)
            (dest / name).write_bytes(data)
            parts.append({"name": name, "size": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()})
            k += 1
    manifest = {"file": src.name, "size": src.stat().st_size, "sha256": sha256_file(src),
                "part_size": part_size, "parts": parts}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def check_part(path: Path, entry: dict) -> None:
    path = Path(path)
    if not path.is_file():
        raise PartError(f"{entry['name']}: missing")
    if path.stat().st_size != entry["size"]:
        raise PartError(f"{entry['name']}: {path.stat().st_size} bytes, expected {entry['size']}")
    if sha256_file(path) != entry["sha256"]:
        raise PartError(f"{entry['name']}: sha256 differs from the manifest")


def store_part(src: Path, manifest: dict, store: Path) -> Path:
    """Check the part ``src`` against ``manifest`` and copy it into ``store``."""
    src = Path(src)
    entry = next((p for p in manifest["parts"] if p["name"] == src.name), None)
    if entry is None:
        raise PartError(f"{src.name} is not a part of {manifest['file']}")
    check_part(src, entry)
    store.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, store / src.name)
    check_part(store / src.name, entry)
    return store / src.name


def present(manifest: dict, store: Path) -> list[str]:
    """Names of the parts already in ``store`` with the right size (hashes are checked on
    arrival and again on assembly)."""
    return [p["name"] for p in manifest["parts"]
            if (Path(store) / p["name"]).is_file()
            and (Path(store) / p["name"]).stat().st_size == p["size"]]


def assemble(manifest: dict, store: Path, out: Path) -> Path:
    """Concatenate the parts in ``store`` into ``out`` (a file), checking every part and then
    the whole file's size and sha256."""
    store, out = Path(store), Path(out)
    for p in manifest["parts"]:
        check_part(store / p["name"], p)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as w:
        for p in manifest["parts"]:
            with open(store / p["name"], "rb") as r:
                shutil.copyfileobj(r, w, CHUNK)
    if out.stat().st_size != manifest["size"]:
        raise PartError(f"assembled {out.name}: {out.stat().st_size} bytes, "
                        f"expected {manifest['size']}")
    if sha256_file(out) != manifest["sha256"]:
        raise PartError(f"assembled {out.name}: sha256 differs from the manifest")
    return out


def repack_lzma(src: Path, out: Path) -> Path:
    """``src`` (a wheel) with every member recompressed with LZMA instead of deflate: the same
    files and RECORD, a fifth smaller for onnxruntime-gpu's CUDA library, and still a wheel pip
    installs. Every member is read back and compared before the repack is kept."""
    import zipfile

    src, out = Path(src), Path(out)
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(tmp, "w", zipfile.ZIP_LZMA) as zo:
        for info in zi.infolist():
            zo.writestr(info, zi.read(info), compress_type=zipfile.ZIP_LZMA)
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(tmp) as b:
        if a.namelist() != b.namelist():
            raise PartError(f"repack of {src.name} lists other members")
        for name in a.namelist():
            if hashlib.sha256(a.read(name)).digest() != hashlib.sha256(b.read(name)).digest():
                raise PartError(f"repack of {src.name}: {name} differs")
    tmp.replace(out)
    return out


def verify_record(wheel: Path, site: Path) -> int:
    """Check the files installed from ``wheel`` into ``site`` against the sha256s of the
    wheel's own RECORD; returns how many were checked."""
    import base64
    import csv
    import io
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        rows = list(csv.reader(io.StringIO(z.read(record).decode())))
    checked = 0
    for path, digest, *_ in rows:
        if not digest:
            continue
        algo, _, want = digest.partition("=")
        f = Path(site) / path
        if algo != "sha256" or not f.is_file():
            raise PartError(f"{path}: not installed, or no sha256 in RECORD")
        got = base64.urlsafe_b64encode(bytes.fromhex(sha256_file(f))).rstrip(b"=").decode()
        if got != want:
            raise PartError(f"{path}: installed file differs from the wheel's RECORD")
        checked += 1
    return checked
