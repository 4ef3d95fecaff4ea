"""Token rows from the default mix and from user files (a tiny tokenizer trained in conftest.py)."""

import json
import re
import sys

import pytest
import torch
from tokenizers import Tokenizer

from exl2.calibration import (CATEGORIES, MEASURE_WEIGHTS, CalibrationError, CalibrationRows, allocate_rows,
                              default_rows, load_rows, user_rows)

CJK = re.compile(r"[\u4e00-\u9fff]")


# ------------------------------------------------------------------ allocation


def test_allocation_matches_exllamav2_counts():
    assert allocate_rows(115) == {"prose": 68, "code": 15, "multilingual": 15, "multilingual_shuffled": 5,
                                  "random": 2, "technical": 10}
    assert allocate_rows(19, MEASURE_WEIGHTS) == {"prose": 8, "code": 3, "multilingual": 3,
                                                  "multilingual_shuffled": 1, "random": 2, "technical": 2}


@pytest.mark.parametrize("rows", range(1, 130))
def test_allocation_sums_and_covers(rows):
    alloc = allocate_rows(rows)
    assert list(alloc) == list(CATEGORIES) and sum(alloc.values()) == rows
    if rows >= len(CATEGORIES):
        assert min(alloc.values()) >= 1
    assert alloc["prose"] == max(alloc.values())


# ------------------------------------------------------------------ default mix


def test_default_rows_shape_categories_and_provenance(tiny_tokenizer):
    cal = default_rows(tiny_tokenizer, 12, 64, seed=3)
    assert cal.input_ids.dtype == torch.int64 and cal.input_ids.shape == (12, 64)
    assert cal.categories == ["prose"] * 7 + ["code", "multilingual", "multilingual_shuffled", "random",
                              "technical"]
    p = cal.provenance
    assert (p["rows"], p["length"], p["seed"], p["source"]) == (12, 64, 3, "default")
    for key in ("text_sha256", "tokenizer_sha256", "tokens_sha256", "manifest_sha256"):
        assert re.fullmatch(r"[0-9a-f]{64}", p[key]), key
    tok = Tokenizer.from_file(str(tiny_tokenizer))
    text = {}
    for i, c in enumerate(cal.categories):
        text.setdefault(c, tok.decode(cal.input_ids[i].tolist()))  # first row of each category
    assert CJK.search(text["multilingual"])  # Chinese comes first in the multilingual stream
    assert "Dashwood" in text["prose"]


def test_default_rows_deterministic(tiny_tokenizer):
    a = default_rows(tiny_tokenizer, 8, 48, seed=0)
    b = default_rows(tiny_tokenizer, 8, 48, seed=0)
    assert torch.equal(a.input_ids, b.input_ids) and a.sha256 == b.sha256 and a.provenance == b.provenance
    c = default_rows(tiny_tokenizer, 8, 48, seed=1)
    assert c.sha256 != a.sha256
    for i, cat in enumerate(a.categories):
        same = torch.equal(a.input_ids[i], c.input_ids[i])
        assert same == (cat not in ("random", "multilingual_shuffled")), cat


def test_random_rows_stay_below_vocab_size(tiny_tokenizer):
    vocab = Tokenizer.from_file(str(tiny_tokenizer)).get_vocab_size(with_added_tokens=True)
    cal = default_rows(tiny_tokenizer, 12, 2048, seed=5)
    rnd = cal.input_ids[[i for i, c in enumerate(cal.categories) if c == "random"]]
    assert rnd.max() < vocab and rnd.min() >= 0
    assert len(rnd.unique()) > 0.95 * vocab  # 2048 uniform draws miss ~1% of 464 ids: the whole vocabulary
    big = default_rows(tiny_tokenizer, 12, 256, seed=5, vocab_size=vocab + 1000)
    assert big.input_ids.max() >= vocab  # random rows use the model's embedding rows when larger


def test_text_token_beyond_vocab_size_is_an_error(tiny_tokenizer):
    with pytest.raises(CalibrationError, match="embedding rows"):
        default_rows(tiny_tokenizer, 6, 32, vocab_size=200)


def test_bos(tiny_tokenizer):
    cal = default_rows(tiny_tokenizer, 6, 32, bos_id=0)
    assert cal.input_ids[0, 0] == 0 and cal.provenance["bos_id"] == 0
    assert cal.input_ids[1, 0] != 0  # code rows: no BOS
    with pytest.raises(CalibrationError, match="bos_id"):
        default_rows(tiny_tokenizer, 6, 32, bos_id=10**6)


def test_default_mix_too_small_is_an_error(tiny_tokenizer):
    with pytest.raises(CalibrationError, match=r"category 'code' has only \d+ tokens.* 2 rows x 1000000 ="):
        default_rows(tiny_tokenizer, 2, 1_000_000, weights={"code": 1})


@pytest.mark.parametrize("rows,length", [(0, 8), (4, 0), (-1, 8), (4, -8), (True, 8), (4, 2.5)])
def test_bad_sizes(tiny_tokenizer, tmp_path, rows, length):
    with pytest.raises(CalibrationError, match="(rows|length) must be a positive integer"):
        default_rows(tiny_tokenizer, rows, length)
    txt = tmp_path / "a.txt"
    txt.write_text("hello " * 100)
    with pytest.raises(CalibrationError, match="(rows|length) must be a positive integer"):
        user_rows(txt, tiny_tokenizer, rows, length)


def test_bad_tokenizer(tmp_path):
    with pytest.raises(CalibrationError, match=r"nope\.json: tokenizer file not found"):
        default_rows(tmp_path / "nope.json", 6, 8)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(CalibrationError, match=r"tokenizer\.json: not a tokenizers tokenizer\.json"):
        default_rows(bad, 6, 8)


# ------------------------------------------------------------------ save / load


def test_save_load_roundtrip(tiny_tokenizer, tmp_path):
    cal = default_rows(tiny_tokenizer, 7, 40, seed=2)
    path = cal.save(tmp_path / "work" / "cal" / "measure.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["measure.safetensors"]  # no temp left
    back = load_rows(path)
    assert torch.equal(back.input_ids, cal.input_ids) and back.provenance == cal.provenance
    assert back.sha256 == cal.sha256 and CalibrationRows.load(path).categories == cal.categories
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:  # ExLlamaV2's key, provenance in the metadata
        assert list(f.keys()) == ["input_ids"] and json.loads(f.metadata()["exl2.calibration"])["rows"] == 7


def test_load_rejects_tampered_and_foreign_files(tiny_tokenizer, tmp_path):
    from safetensors.torch import save_file

    cal = default_rows(tiny_tokenizer, 6, 16)
    forged = tmp_path / "forged.safetensors"
    save_file({"input_ids": cal.input_ids + 1}, str(forged),
              metadata={"exl2.calibration": json.dumps(cal.provenance)})
    with pytest.raises(CalibrationError, match="forged.safetensors: input_ids do not match"):
        load_rows(forged)
    bare = tmp_path / "cal_data.safetensors"
    save_file({"input_ids": cal.input_ids}, str(bare))
    with pytest.raises(CalibrationError, match="cal_data.safetensors: no exl2.calibration provenance"):
        load_rows(bare)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 40)
    with pytest.raises(CalibrationError, match="junk.safetensors: not a readable safetensors"):
        load_rows(junk)
    with pytest.raises(CalibrationError, match="missing.safetensors: no such file"):
        load_rows(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------ user files

PARAS = [f"Paragraph {i}: the committee met on the {i}th day and agreed on item {i * 7}." for i in range(200)]


def _encode(tok_path, text):
    return Tokenizer.from_file(str(tok_path)).encode(text, add_special_tokens=False).ids


def test_txt(tiny_tokenizer, tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("\n".join(PARAS) + "\n", encoding="utf-8")
    cal = user_rows(path, tiny_tokenizer, 4, 50)
    assert cal.input_ids.shape == (4, 50) and cal.categories == ["user"] * 4
    assert cal.input_ids.flatten().tolist() == _encode(tiny_tokenizer, path.read_text())[:200]
    p = cal.provenance
    assert (p["source"], p["source_format"], p["text_column"]) == ("data.txt", "text", None)
    again = user_rows(path, tiny_tokenizer, 4, 50, seed=0)
    assert again.sha256 == cal.sha256


def test_jsonl(tiny_tokenizer, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "text": p, "body": p.upper()}) for i, p in enumerate(PARAS)))
    cal = user_rows(path, tiny_tokenizer, 3, 40)
    sep = _encode(tiny_tokenizer, "\n\n")
    want = _encode(tiny_tokenizer, PARAS[0]) + sep + _encode(tiny_tokenizer, PARAS[1])
    assert cal.input_ids.flatten().tolist()[:len(want)] == want
    with_bos = user_rows(path, tiny_tokenizer, 3, 40, bos_id=1).input_ids.flatten().tolist()
    first = _encode(tiny_tokenizer, PARAS[0])
    assert with_bos[:len(first) + 1 + len(sep) + 1] == [1] + first + sep + [1]  # BOS opens every record
    with pytest.raises(CalibrationError, match="bos_id -1 is not a token id"):
        user_rows(path, tiny_tokenizer, 3, 40, bos_id=-1)
    named = user_rows(path, tiny_tokenizer, 3, 40, text_column="body")
    assert named.provenance["text_column"] == "body" and named.sha256 != cal.sha256


def test_parquet(tiny_tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    single = tmp_path / "single.parquet"
    pq.write_table(pa.table({"id": list(range(200)), "content": PARAS}), single)
    cal = user_rows(single, tiny_tokenizer, 3, 40)
    assert cal.provenance["text_column"] == "content" and cal.provenance["source_format"] == "parquet"
    several = tmp_path / "several.parquet"
    pq.write_table(pa.table({"title": [p[:12] for p in PARAS], "text": PARAS}), several)
    assert user_rows(several, tiny_tokenizer, 3, 40).provenance["text_column"] == "text"
    assert user_rows(several, tiny_tokenizer, 3, 40).input_ids.equal(cal.input_ids)
    assert user_rows(several, tiny_tokenizer, 3, 4, text_column="title").provenance["text_column"] == "title"


def test_parquet_bad_columns(tiny_tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ambiguous = tmp_path / "ambiguous.parquet"
    pq.write_table(pa.table({"a": PARAS, "b": PARAS}), ambiguous)
    with pytest.raises(CalibrationError, match=r"ambiguous\.parquet: no text column chosen.*pass text_column"):
        user_rows(ambiguous, tiny_tokenizer, 2, 8)
    with pytest.raises(CalibrationError, match=r"ambiguous\.parquet: no column 'text'"):
        user_rows(ambiguous, tiny_tokenizer, 2, 8, text_column="text")
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), numbers)
    with pytest.raises(CalibrationError, match=r"numbers\.parquet: no text column"):
        user_rows(numbers, tiny_tokenizer, 2, 8)
    with pytest.raises(CalibrationError, match=r"numbers\.parquet: column 'x' is int64, not text"):
        user_rows(numbers, tiny_tokenizer, 2, 8, text_column="x")
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    with pytest.raises(CalibrationError, match=r"empty\.parquet: the parquet file has no rows"):
        user_rows(empty, tiny_tokenizer, 2, 8)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(CalibrationError, match=r"corrupt\.parquet: not a readable parquet file"):
        user_rows(corrupt, tiny_tokenizer, 2, 8)


def test_parquet_without_pyarrow(tiny_tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1....PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(CalibrationError, match=r"data\.parquet: reading parquet needs pyarrow \(pip install pyarrow\)"):
        user_rows(path, tiny_tokenizer, 2, 8)


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"", r"empty\.txt: the file is empty"),
    ("blank.txt", b"  \n\n\t\n", r"blank\.txt: the file is empty"),
    ("latin1.txt", "caf\xe9 ".encode("latin-1") * 50, r"latin1\.txt: not UTF-8 text \(invalid byte at offset 3\)"),
    ("nofield.jsonl", b'{"text": "a b c"}\n{"body": "x"}\n', r"nofield\.jsonl: line 2 has no 'text' field"),
    ("badjson.jsonl", b'{"text": "a b c"}\n{oops\n', r"badjson\.jsonl: line 2 is not JSON"),
    ("notobj.jsonl", b'["a"]\n', r"notobj\.jsonl: line 1 is not a JSON object"),
    ("numtext.jsonl", b'{"text": 5}\n', r"numtext\.jsonl: line 1: field 'text' is int, not text"),
    ("emptytext.jsonl", b'{"text": ""}\n', r"emptytext\.jsonl: column 'text' holds no text"),
    ("short.txt", b"just a few words\n", r"short\.txt: only \d+ tokens with .*; 4 rows x 64 = 256 needed"),
])
def test_bad_user_files(tiny_tokenizer, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CalibrationError, match=message):
        user_rows(path, tiny_tokenizer, 4, 64)


def test_missing_and_unreadable_user_files(tiny_tokenizer, tmp_path):
    with pytest.raises(CalibrationError, match=r"absent\.jsonl: no such file"):
        user_rows(tmp_path / "absent.jsonl", tiny_tokenizer, 2, 8)
    with pytest.raises(CalibrationError, match=r": not a regular file"):
        user_rows(tmp_path, tiny_tokenizer, 2, 8)
    txt = tmp_path / "plain.txt"
    txt.write_text("words " * 100)
    with pytest.raises(CalibrationError, match=r"plain\.txt: text_column 'text' given, but this is a plain text"):
        user_rows(txt, tiny_tokenizer, 2, 8, text_column="text")


# ------------------------------------------------------------------ real tokenizer


@pytest.mark.slow
def test_default_rows_smollm2_qwen2_sizes(smollm2_dir):
    tok_path = smollm2_dir / "tokenizer.json"
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    cal = default_rows(tok_path, 115, 2048, bos_id=cfg["bos_token_id"], vocab_size=cfg["vocab_size"])
    assert cal.input_ids.shape == (115, 2048) and cal.input_ids.max() < cfg["vocab_size"]
    assert {c: cal.categories.count(c) for c in CATEGORIES} == allocate_rows(115)
    tok = Tokenizer.from_file(str(tok_path))
    multi = [tok.decode(cal.input_ids[i].tolist()) for i, c in enumerate(cal.categories) if c == "multilingual"]
    assert sum(len(CJK.findall(t)) for t in multi) > 2000
    code = [tok.decode(cal.input_ids[i].tolist()) for i, c in enumerate(cal.categories) if c == "code"]
    assert any("def " in t for t in code) and any("#include" in t or "SQLITE_API" in t for t in code)
    measure = default_rows(tok_path, 19, 2048, weights=MEASURE_WEIGHTS, vocab_size=cfg["vocab_size"])
    assert measure.categories.count("random") == 2 and measure.categories.count("prose") == 8
