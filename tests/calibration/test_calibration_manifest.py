"""The embedded default mix: every file listed, hashed, licensed; held-out text absent."""

import gzip
import hashlib
import json
import re

import pytest

from exl2.calibration import rows as R

MANIFEST = json.loads((R.DATA_DIR / "MANIFEST.json").read_text(encoding="utf-8"))
FILES = MANIFEST["files"]


def _text(entry) -> str:
    return gzip.decompress((R.DATA_DIR / entry["path"]).read_bytes()).decode("utf-8")


@pytest.mark.parametrize("entry", FILES, ids=[f["path"] for f in FILES])
def test_file_hashes_match_manifest(entry):
    blob = (R.DATA_DIR / entry["path"]).read_bytes()
    assert len(blob) == entry["bytes"]
    assert hashlib.sha256(blob).hexdigest() == entry["sha256"]
    raw = gzip.decompress(blob)
    assert len(raw) == entry["text_bytes"]
    assert hashlib.sha256(raw).hexdigest() == entry["text_sha256"]
    docs = raw.decode("utf-8")[:-1].split(MANIFEST["document_separator"])
    assert len(docs) == entry["documents"] and all(d.strip() for d in docs)


@pytest.mark.parametrize("entry", FILES, ids=[f["path"] for f in FILES])
def test_provenance_recorded(entry):
    assert entry["category"] in R.CATEGORIES and entry["licence"]
    src = entry["source"]
    for pkg in src.get("packages", [src]):
        assert pkg["package"] and pkg["version"] and pkg["members"]
        assert re.fullmatch(r"[0-9a-f]{64}", pkg["archive_sha256"])
        assert "://" not in json.dumps(pkg)  # URL-free provenance


def test_no_unlisted_files_and_size_budget():
    listed = {f["path"] for f in FILES} | {"MANIFEST.json", MANIFEST["licenses_file"]["path"]}
    present = {p.name for p in R.DATA_DIR.iterdir() if not p.name.startswith(".")}
    assert present == listed
    total = sum(p.stat().st_size for p in R.DATA_DIR.iterdir())
    assert total < 4_000_000, total  # the brief's budget: a few MB in the package
    lic = (R.DATA_DIR / MANIFEST["licenses_file"]["path"]).read_bytes()
    assert hashlib.sha256(lic).hexdigest() == MANIFEST["licenses_file"]["sha256"]


def test_categories_and_languages_covered():
    cats = {f["category"] for f in FILES}
    assert cats == set(R.CATEGORIES) - {"random", "multilingual_shuffled"}  # those two are made at run time
    multi = "".join(_text(f) for f in FILES if f["category"] == "multilingual")
    for name, pattern in [("Chinese", r"[\u4e00-\u9fff]"), ("Japanese kana", r"[\u3040-\u30ff]"),
                          ("Cyrillic", r"[\u0400-\u04ff]"), ("Greek", r"[\u0370-\u03ff]"),
                          ("Arabic script", r"[\u0600-\u06ff]"), ("Hangul", r"[\uac00-\ud7af]"),
                          ("Devanagari", r"[\u0900-\u097f]")]:
        assert len(re.findall(pattern, multi)) > 500, name
    assert len(re.findall(r"[\u4e00-\u9fff]", multi)) > 50_000  # Chinese matters for Qwen2


def test_held_out_evaluation_text_absent():
    prose = "".join(_text(f) for f in FILES if f["category"] == "prose")
    assert "Sir Walter Elliot, of Kellynch Hall" not in prose  # Persuasion's first line
    assert "Kellynch" not in prose
    everything = "".join(_text(f) for f in FILES)
    for module in MANIFEST["held_out"]["python_modules"]:
        assert f"# file: Lib/{module}.py" not in everything
    assert "class TextWrapper" not in everything and "def heappush(" not in everything
    assert "class shlex" not in everything and "class TopologicalSorter" not in everything


def test_build_script_describes_the_committed_files():
    # Importing the build script does nothing (no download); its table must match what is committed.
    from fixtures import build_calibration as B

    assert [(f[0], f[1], f[3]) for f in B.FILES] == [(f["path"], f["category"], f["licence"]) for f in FILES]
    assert B.DOC_SEPARATOR == MANIFEST["document_separator"]
    assert tuple(MANIFEST["held_out"]["python_modules"]) == B.HELD_OUT_MODULES
    for f in FILES:
        src = f["source"]
        for pkg in src.get("packages", [src]):
            pinned = B.DEBS if pkg["kind"] == "debian" else B.WHEELS
            assert pinned[pkg["package"]] == pkg["version"]


def test_no_overlap_with_committed_evaluation_texts():
    from fixtures import texts

    norm = lambda t: re.sub(r"\s+", " ", t)
    mix = norm("".join(_text(f) for f in FILES))
    for name in ("persuasion", "stdlib_code"):
        held = norm(texts.load_text(name))
        step = len(held) // 60
        probes = [held[i:i + 100] for i in range(step // 2, len(held) - 100, step)]
        leaked = [p for p in probes if p in mix]
        assert not leaked, (name, leaked[:3])
