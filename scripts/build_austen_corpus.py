#!/usr/bin/env python3
"""Build the Jane Austen text corpus from the Debian ``r-cran-janeaustenr`` package.

The package ships the six novels as R character vectors (one element per line)
inside a lazy-load database (``data/Rdata.rdb`` + ``data/Rdata.rdx``). This script
downloads the .deb (without installing it, which would pull in R), unpacks it,
decodes the R serialization format with a small stdlib-only reader, and writes one
UTF-8 text file per novel.

Usage:
    python scripts/build_austen_corpus.py [--out training/data/austen]
"""

from __future__ import annotations

import argparse
import bz2
import glob
import gzip
import lzma
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "training" / "data" / "austen"
PACKAGE = "r-cran-janeaustenr"
DATA_SUBDIR = "usr/lib/R/site-library/janeaustenr/data"

# R object name -> output file stem, in publication order.
BOOKS = {
    "sensesensibility": "sense_and_sensibility",
    "prideprejudice": "pride_and_prejudice",
    "mansfieldpark": "mansfield_park",
    "emma": "emma",
    "northangerabbey": "northanger_abbey",
    "persuasion": "persuasion",
}


# --------------------------------------------------------------------------- #
# Minimal reader for R's XDR serialization format (versions 2 and 3).
# --------------------------------------------------------------------------- #

# SEXP types
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP = 9, 10, 13, 14, 15, 16
DOTSXP, VECSXP, EXPRSXP, RAWSXP, S4SXP = 17, 19, 20, 24, 25
# Pseudo-types used only in serialization
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP = 255, 254, 253, 252
MISSINGARG_SXP, BASENAMESPACE_SXP, NAMESPACESXP, PACKAGESXP = 251, 250, 249, 248
PERSISTSXP, EMPTYENV_SXP, BASEENV_SXP = 247, 242, 241
ATTRLANGSXP, ATTRLISTSXP = 240, 239

NA_INTEGER = -(2**31)
PAIRLIST_TYPES = {LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLANGSXP, ATTRLISTSXP}
SPECIALS = {
    NILVALUE_SXP: None,
    GLOBALENV_SXP: "<GlobalEnv>",
    UNBOUNDVALUE_SXP: "<unbound>",
    MISSINGARG_SXP: "<missing>",
    BASENAMESPACE_SXP: "<namespace:base>",
    EMPTYENV_SXP: "<EmptyEnv>",
    BASEENV_SXP: "<BaseEnv>",
}


class RVector(list):
    """A decoded R vector; ``attrs`` holds its attributes (e.g. ``names``)."""

    def __init__(self, items=(), attrs: dict | None = None):
        super().__init__(items)
        self.attrs = attrs or {}

    def as_dict(self) -> dict:
        """Map ``names`` attribute to elements (for named lists)."""
        return dict(zip(self.attrs.get("names", []), self))


class RReader:
    """Decode one XDR-serialized R object from ``data``."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs: list = []
        self.native_encoding = "utf-8"

    def read(self):
        if self.data[:2] != b"X\n":
            raise ValueError(f"not an XDR R serialization (header {self.data[:2]!r})")
        self.pos = 2
        version = self._int()
        self._int()  # writer R version
        self._int()  # minimal reader R version
        if version == 3:
            n = self._int()
            self.native_encoding = self._bytes(n).decode("ascii") or "utf-8"
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")
        return self._item()

    # -- primitives --------------------------------------------------------- #
    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def _bytes(self, n: int) -> bytes:
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # long vector: two 32-bit halves
            hi, lo = self._int(), self._int()
            n = (hi << 32) + lo
        return n

    def _charsxp(self, levels: int) -> str | None:
        n = self._int()
        if n == -1:
            return None  # NA_character_
        raw = self._bytes(n)
        if levels & (1 << 2):  # LATIN1_MASK
            return raw.decode("latin-1")
        if levels & (1 << 1):  # BYTES_MASK
            return raw.decode("latin-1")
        # UTF8_MASK, ASCII_MASK, or native encoding
        enc = "utf-8" if levels & ((1 << 3) | (1 << 6)) else self.native_encoding
        return raw.decode(enc, errors="replace")

    def _strvec_with_zero(self) -> list:
        if self._int() != 0:
            raise ValueError("expected 0 before persistent string vector")
        return [self._item() for _ in range(self._int())]

    # -- items -------------------------------------------------------------- #
    def _item(self):
        flags = self._int()
        t = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        if t in SPECIALS:
            return SPECIALS[t]
        if t == REFSXP:
            idx = flags >> 8 or self._int()
            return self.refs[idx - 1]
        if t in (PERSISTSXP, NAMESPACESXP, PACKAGESXP):
            val = (t, self._strvec_with_zero())
            self.refs.append(val)
            return val
        if t == SYMSXP:
            name = self._item()  # a CHARSXP
            self.refs.append(("sym", name))
            return ("sym", name)
        if t == ENVSXP:
            self._int()  # locked
            env: dict = {}
            self.refs.append(env)
            env["enclos"] = self._item()
            env["frame"] = self._item()
            env["hashtab"] = self._item()
            env["attrib"] = self._item()
            return env
        if t in PAIRLIST_TYPES:
            return self._pairlist(t, has_attr, has_tag)
        if t == CHARSXP:
            return self._charsxp(levels)

        if t in (LGLSXP, INTSXP):
            n = self._length()
            vals = struct.unpack_from(f">{n}i", self.data, self.pos)
            self.pos += 4 * n
            out = RVector(None if v == NA_INTEGER else v for v in vals)
        elif t == REALSXP:
            n = self._length()
            out = RVector(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif t == CPLXSXP:
            n = self._length()
            v = struct.unpack_from(f">{2 * n}d", self.data, self.pos)
            self.pos += 16 * n
            out = RVector(complex(v[i], v[i + 1]) for i in range(0, 2 * n, 2))
        elif t in (STRSXP, VECSXP, EXPRSXP):
            n = self._length()
            out = RVector(self._item() for _ in range(n))
        elif t == RAWSXP:
            out = RVector(self._bytes(self._length()))
        elif t == S4SXP:
            out = RVector()
        else:
            raise NotImplementedError(f"R SEXP type {t} at byte {self.pos - 4}")
        if has_attr:
            out.attrs = self._attr_dict(self._item())
        return out

    def _pairlist(self, t: int, has_attr: bool, has_tag: bool):
        """Read a (possibly long) pairlist iteratively; returns list of (tag, value)."""
        items: list = []
        while True:
            if has_attr:
                self._item()  # attributes of the cons cell: ignored
            tag = self._item() if has_tag else None
            items.append((tag[1] if isinstance(tag, tuple) else tag, self._item()))
            # Peek at the CDR: continue the loop while it is another cons cell.
            flags = struct.unpack_from(">i", self.data, self.pos)[0]
            if (flags & 0xFF) != t:
                self._item()  # terminating NILVALUE (or odd tail): consume
                return items
            self.pos += 4
            has_attr = bool(flags & (1 << 9))
            has_tag = bool(flags & (1 << 10))

    @staticmethod
    def _attr_dict(pairlist) -> dict:
        return dict(pairlist) if isinstance(pairlist, list) else {}


def decompress_chunk(blob: bytes, compressed) -> bytes:
    """Decompress one lazy-load chunk: 4-byte big-endian length, then the payload."""
    (length,) = struct.unpack(">I", blob[:4])
    kind = compressed[0] if isinstance(compressed, list) else compressed
    if kind in (1, True):
        out = zlib.decompress(blob[4:])
    elif kind == 2:  # bzip2: 1 type byte, then data ('0' = stored, '2' = bzip2)
        out = blob[5:] if blob[4:5] == b"0" else bz2.decompress(blob[5:])
    elif kind == 3:  # xz: 1 type byte, then data ('0' = stored, 'Z' = xz)
        out = blob[5:] if blob[4:5] == b"0" else lzma.decompress(blob[5:])
    else:
        out = blob[4:]
    if len(out) != length:
        raise ValueError(f"chunk length mismatch: header {length}, got {len(out)}")
    return out


def read_index(rdx_path: Path) -> dict:
    """Parse the ``.rdx`` index (an .rds file: gzip'd, or a 4-byte-length zlib chunk)."""
    raw = rdx_path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        data = gzip.decompress(raw)
    elif raw[:2] == b"X\n":
        data = raw
    else:
        data = decompress_chunk(raw, 1)
    return RReader(data).read().as_dict()


def read_lazyload_db(data_dir: Path) -> dict[str, object]:
    """Return {variable name: decoded object} for an R lazy-load database."""
    index = read_index(data_dir / "Rdata.rdx")
    compressed = index.get("compressed", [1])
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].as_dict().items():
        chunk = decompress_chunk(rdb[offset : offset + length], compressed)
        objects[name] = RReader(chunk).read()
    return objects


# --------------------------------------------------------------------------- #
# Download + extract
# --------------------------------------------------------------------------- #


def fetch_deb(workdir: Path) -> Path:
    """``apt-get download`` the package into ``workdir`` (updating lists if needed)."""
    cmd = ["apt-get", "download", PACKAGE]
    if subprocess.run(cmd, cwd=workdir).returncode != 0:
        print("apt-get download failed; running apt-get update and retrying", flush=True)
        subprocess.run(["apt-get", "update"], check=True)
        subprocess.run(cmd, cwd=workdir, check=True)
    debs = sorted(glob.glob(str(workdir / f"{PACKAGE}_*.deb")))
    if not debs:
        raise FileNotFoundError(f"no {PACKAGE} .deb found in {workdir}")
    return Path(debs[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="austen-") as tmp:
        tmp_path = Path(tmp)
        deb = fetch_deb(tmp_path)
        extract = tmp_path / "pkg"
        subprocess.run(["dpkg", "-x", str(deb), str(extract)], check=True)
        objects = read_lazyload_db(extract / DATA_SUBDIR)

    missing = set(BOOKS) - set(objects)
    if missing:
        raise KeyError(f"objects {sorted(missing)} not found; available: {sorted(objects)}")

    total = 0
    for obj_name, stem in BOOKS.items():
        lines = objects[obj_name]
        if not all(s is None or isinstance(s, str) for s in lines):
            raise TypeError(f"{obj_name} is not a character vector")
        text = "\n".join("" if s is None else s for s in lines)
        path = out_dir / f"{stem}.txt"
        path.write_text(text, encoding="utf-8", newline="\n")
        total += len(text)
        rel = os.path.relpath(path)
        print(f"{stem:<24} {len(lines):>6} lines {len(text):>9,} chars -> {rel}", flush=True)
    print(f"total {total:,} chars", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
