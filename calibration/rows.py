"""Calibration datasets to token rows: the embedded default mix and user files.

Everything here is a pure, deterministic function of its inputs (files, tokenizer, seed, sizes).
The result, :class:`CalibrationRows`, is an int64 tensor ``[rows, length]`` plus its provenance, saved as
safetensors (``work/cal/*.safetensors``) with the tensor under ``input_ids`` (ExLlamaV2's
``cal_data.safetensors`` key) and the provenance as JSON in the metadata.

Default mix (``calibration/data``, see MANIFEST.json) — categories and their share of the rows, after
ExLlamaV2's built-in set (docs/pipeline.md section 3; for Qwen2 its 115 quantization rows are C4 10 + Wiki 48 +
TinyStories 10 = 68 prose, code 15, multilingual 15, shuffled multilingual 5, random 2, technical 10):

============================  =====  =====  ============================================================
category                      quant  meas.  rows are
============================  =====  =====  ============================================================
``prose``                        68      8  consecutive ``length`` tokens of English prose; with a
                                            ``bos_id`` every document starts with BOS
``code``                         15      3  consecutive tokens of source code (Python, C, shell, JS, Rust)
``multilingual``                 15      3  consecutive tokens of prose in other languages (Chinese first)
``multilingual_shuffled``         5      1  128-token pieces of the multilingual text drawn with the seed
``random``                        2      2  uniform token ids in ``[0, vocab_size)`` drawn with the seed
``technical``                    10      2  consecutive tokens of documentation, maths, licence texts
============================  =====  =====  ============================================================

``rows`` are shared out in proportion to the weights (``QUANT_WEIGHTS`` by default; pass
``MEASURE_WEIGHTS`` for ExLlamaV2's measurement proportion): every category gets one row when ``rows`` is
at least the number of categories, then each further row goes to the category furthest below its
proportional share (ties to the earlier category). 115 rows give exactly 68/15/15/5/2/10.

Within a category, documents of its files are interleaved round-robin (file order as in the manifest)
and rows are consecutive token windows of that stream, so text rows do not depend on the seed; the seed
drives only the random and shuffled rows. Documents are tokenized one by one without special tokens and
joined by the tokens of ``"\\n\\n"``.

User files (:func:`user_rows`): parquet (one text column), jsonl (one JSON object per line) or plain
text. Records (parquet rows, jsonl lines) are tokenized one by one without special tokens and joined by
the tokens of ``"\\n\\n"``; a plain text file is tokenized as it is (in newline-aligned pieces). With a
``bos_id`` each record, or the text file, starts with BOS. The first ``rows x length`` tokens are the
rows, as in ExLlamaV2. The seed is recorded but user rows contain nothing random.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import pathlib
import random
from functools import lru_cache

import torch

__all__ = ["CATEGORIES", "QUANT_WEIGHTS", "MEASURE_WEIGHTS", "CalibrationError", "CalibrationRows",
           "allocate_rows", "default_rows", "user_rows", "load_rows"]

DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
FORMAT = "exl2.calibration/1"
METADATA_KEY = "exl2.calibration"

CATEGORIES = ("prose", "code", "multilingual", "multilingual_shuffled", "random", "technical")
QUANT_WEIGHTS = {"prose": 68, "code": 15, "multilingual": 15, "multilingual_shuffled": 5, "random": 2,
                 "technical": 10}
MEASURE_WEIGHTS = {"prose": 8, "code": 3, "multilingual": 3, "multilingual_shuffled": 1, "random": 2,
                   "technical": 2}
SHUFFLE_PIECE = 128  # tokens per shuffled piece (ExLlamaV2)
SHUFFLE_POOL = 65536  # at least this many multilingual tokens (or all of them) feed the shuffled rows
TEXT_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
TEXT_CHUNK = 1 << 16  # plain text is tokenized in pieces of about this many characters


class CalibrationError(ValueError):
    """Bad calibration input: names the file (or argument) and the problem."""


# ---------------------------------------------------------------------------------------------
# result


@dataclasses.dataclass(frozen=True)
class CalibrationRows:
    """``input_ids``: int64 ``[rows, length]``; ``provenance``: JSON-able facts (see ``provenance_keys``)."""

    input_ids: torch.Tensor
    provenance: dict

    @property
    def categories(self) -> list[str]:
        """Category of each row (``"user"`` for user files)."""
        return list(self.provenance["categories"])

    @property
    def sha256(self) -> str:
        """Hash of tokens and provenance together: the calibration hash later stages record."""
        return hashlib.sha256(_canonical(self.provenance).encode("utf-8")).hexdigest()

    def save(self, path) -> pathlib.Path:
        """Write safetensors to a temporary name beside ``path`` and rename it into place."""
        from safetensors.torch import save_file

        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            save_file({"input_ids": self.input_ids.contiguous()}, str(tmp),
                      metadata={METADATA_KEY: _canonical(self.provenance)})
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    @classmethod
    def load(cls, path) -> "CalibrationRows":
        return load_rows(path)


def load_rows(path) -> CalibrationRows:
    """Read rows saved by :meth:`CalibrationRows.save`; checks shape, dtype and the token hash."""
    from safetensors import safe_open

    path = pathlib.Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "input_ids" not in f.keys():
                raise CalibrationError(f"{path}: no input_ids tensor")
            ids = f.get_tensor("input_ids")
    except CalibrationError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CalibrationError(f"{path}: not a readable safetensors file ({e})") from e
    if METADATA_KEY not in meta:
        raise CalibrationError(f"{path}: no {METADATA_KEY} provenance in the metadata")
    prov = json.loads(meta[METADATA_KEY])
    if ids.dtype != torch.int64 or ids.dim() != 2 or list(ids.shape) != [prov["rows"], prov["length"]]:
        raise CalibrationError(f"{path}: input_ids is {ids.dtype} {list(ids.shape)}, provenance says int64 "
                               f"[{prov['rows']}, {prov['length']}]")
    if _tokens_sha256(ids) != prov["tokens_sha256"]:
        raise CalibrationError(f"{path}: input_ids do not match the tokens_sha256 of the provenance")
    return CalibrationRows(ids, prov)


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _tokens_sha256(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.contiguous().numpy().astype("<i8", copy=False).tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# shared helpers


def _check_sizes(rows, length) -> None:
    for name, v in (("rows", rows), ("length", length)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise CalibrationError(f"{name} must be a positive integer, got {v!r}")


def sha256_file(path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_tokenizer(path):
    from tokenizers import Tokenizer

    path = pathlib.Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: tokenizer file not found")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise CalibrationError(f"{path}: not a tokenizers tokenizer.json ({e})") from e
    return tok, sha256_file(path)


class _TextHash:
    """sha256 over exactly the documents that were tokenized, each length-prefixed, in order."""

    def __init__(self):
        self.h = hashlib.sha256()

    def update(self, text: str) -> None:
        data = text.encode("utf-8")
        self.h.update(len(data).to_bytes(8, "little"))
        self.h.update(data)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _stream(tok, docs, need: int | None, text_hash: _TextHash, sep: list[int], bos_id=None):
    """Token ids of ``docs`` joined by ``sep``, tokenizing only until ``need`` tokens exist (None: all).

    Documents go to the tokenizer in batches that start small and double, so a request that needs one
    document does not tokenize a hundred, and one over many short records still batches them."""
    out: list[int] = []
    docs = iter(docs)
    first, batch = True, 4
    while need is None or len(out) < need:
        chunk = [d for _, d in zip(range(batch), docs)]
        if not chunk:
            break
        batch = min(2 * batch, 1024)
        for d, enc in zip(chunk, tok.encode_batch(chunk, add_special_tokens=False)):
            if need is not None and len(out) >= need:
                break  # only documents whose tokens reach the rows are hashed
            text_hash.update(d)
            if not first:
                out += sep
            first = False
            if bos_id is not None:
                out.append(bos_id)
            out += enc.ids
    return out


def _sep(tok) -> list[int]:
    return tok.encode("\n\n", add_special_tokens=False).ids


def _vocab(tok, vocab_size) -> int:
    n = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size is None:
        return n
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise CalibrationError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    return vocab_size


def _check_bos(bos_id, vocab: int) -> None:
    if bos_id is not None and (isinstance(bos_id, bool) or not isinstance(bos_id, int) or not 0 <= bos_id < vocab):
        raise CalibrationError(f"bos_id {bos_id!r} is not a token id in [0, {vocab})")


def _check_ids(ids: torch.Tensor, vocab_size: int, where: str) -> None:
    top = int(ids.max()) if ids.numel() else -1
    if top >= vocab_size:
        raise CalibrationError(f"{where}: the tokenizer produced id {top}, but the model has only {vocab_size} "
                               f"embedding rows (tokenizer and model do not match)")


# ---------------------------------------------------------------------------------------------
# default mix


def allocate_rows(rows: int, weights: dict[str, int] | None = None) -> dict[str, int]:
    """Rows per category (in ``CATEGORIES`` order): at least one each when rows allow, then by largest
    deficit against the proportional share ``rows * w / sum(w)``; ties go to the earlier category."""
    _check_sizes(rows, 1)
    weights = dict(QUANT_WEIGHTS if weights is None else weights)
    unknown = set(weights) - set(CATEGORIES)
    if unknown or not weights or any(not isinstance(w, int) or w < 0 for w in weights.values()) \
            or sum(weights.values()) == 0:
        raise CalibrationError(f"weights must map categories {CATEGORIES} to non-negative integers "
                               f"(not all zero), got {weights!r}")
    cats = [c for c in CATEGORIES if weights.get(c, 0) > 0]
    total = sum(weights[c] for c in cats)
    alloc = {c: 0 for c in CATEGORIES}
    if rows >= len(cats):
        for c in cats:
            alloc[c] = 1
    for _ in range(rows - sum(alloc.values())):
        # deficit_c = rows * w_c / total - alloc_c, compared exactly in integers (times total)
        best = max(cats, key=lambda c: (rows * weights[c] - alloc[c] * total, -cats.index(c)))
        alloc[best] += 1
    return alloc


@lru_cache(maxsize=1)
def _mix() -> tuple[dict, dict[str, tuple[str, ...]]]:
    """(manifest, {category: interleaved documents}) of the embedded data, every file hash-checked."""
    manifest_path = DATA_DIR / "MANIFEST.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CalibrationError(f"{manifest_path}: cannot read the default mix manifest ({e})") from e
    sep = manifest["document_separator"]
    per_cat: dict[str, list[list[str]]] = {}
    for entry in manifest["files"]:
        path = DATA_DIR / entry["path"]
        try:
            blob = path.read_bytes()
        except OSError as e:
            raise CalibrationError(f"{path}: cannot read ({e.strerror})") from e
        if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise CalibrationError(f"{path}: sha256 differs from MANIFEST.json (modified or corrupt)")
        text = gzip.decompress(blob).decode("utf-8")
        docs = text[:-1].split(sep) if text.endswith("\n") else text.split(sep)
        per_cat.setdefault(entry["category"], []).append(docs)
    mixed = {}
    for cat, files in per_cat.items():
        order = []
        for i in range(max(len(f) for f in files)):
            order += [f[i] for f in files if i < len(f)]
        mixed[cat] = tuple(order)
    return manifest, mixed


def default_rows(tokenizer_json_path, rows: int, length: int, seed: int = 0, bos_id: int | None = None,
                 vocab_size: int | None = None, *, weights: dict[str, int] | None = None) -> CalibrationRows:
    """Rows from the embedded default mix; see the module docstring for the construction.

    ``bos_id``: the model's BOS id, put at the start of every prose document (None: no BOS).
    ``vocab_size``: the model's embedding rows (default: the tokenizer's size with added tokens); random
    rows stay below it and a text token at or above it is an error.
    """
    _check_sizes(rows, length)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CalibrationError(f"seed must be an integer, got {seed!r}")
    tok, tok_sha = _load_tokenizer(tokenizer_json_path)
    vocab = _vocab(tok, vocab_size)
    _check_bos(bos_id, vocab)
    alloc = allocate_rows(rows, weights)
    manifest, mix = _mix()
    sep = _sep(tok)
    text_hash = _TextHash()
    blocks, cats = [], []

    def consecutive(cat: str, n_rows: int, bos=None) -> torch.Tensor:
        need = n_rows * length
        ids = _stream(tok, mix[cat], need, text_hash, sep, bos)
        if len(ids) < need:
            raise CalibrationError(f"default mix: category {cat!r} has only {len(ids)} tokens with "
                                   f"{tokenizer_json_path}; {n_rows} rows x {length} = {need} needed "
                                   f"(ask for fewer rows or a shorter length, or use a dataset file)")
        return torch.tensor(ids[:need], dtype=torch.int64).view(n_rows, length)

    for cat in CATEGORIES:
        n = alloc[cat]
        if n == 0:
            continue
        # One generator per category; str seeds go through sha512, stable across Python versions.
        rng = random.Random(f"exl2-calibration/{seed}/{cat}")
        text_hash.update(f"\x00category {cat}")
        if cat == "random":
            block = torch.tensor([[rng.randrange(vocab) for _ in range(length)] for _ in range(n)],
                                 dtype=torch.int64)
        elif cat == "multilingual_shuffled":
            pool_need = max(SHUFFLE_POOL, 4 * n * length, alloc["multilingual"] * length)
            pool_hash = _TextHash()
            pool = _stream(tok, mix["multilingual"], pool_need, pool_hash, sep)
            text_hash.update(f"\x00multilingual_shuffled pool {pool_hash.hexdigest()}")
            pieces = [pool[i:i + SHUFFLE_PIECE] for i in range(0, len(pool) - SHUFFLE_PIECE + 1, SHUFFLE_PIECE)]
            per_row = -(-length // SHUFFLE_PIECE)  # ceil
            if len(pieces) < per_row:
                raise CalibrationError(f"default mix: only {len(pool)} multilingual tokens with "
                                       f"{tokenizer_json_path}, too few for shuffled rows of {length}")
            picked = [rng.sample(range(len(pieces)), per_row) for _ in range(n)]
            block = torch.tensor([[t for i in row for t in pieces[i]][:length] for row in picked],
                                 dtype=torch.int64)
            _check_ids(block, vocab, f"default mix ({cat}) with {tokenizer_json_path}")
        else:
            block = consecutive(cat, n, bos_id if cat == "prose" else None)
            _check_ids(block, vocab, f"default mix ({cat}) with {tokenizer_json_path}")
        blocks.append(block)
        cats += [cat] * n
    input_ids = torch.cat(blocks, dim=0)
    prov = {
        "format": FORMAT,
        "source": "default",
        "manifest_sha256": _manifest_sha256(),
        "text_sha256": text_hash.hexdigest(),
        "tokenizer_sha256": tok_sha,
        "seed": seed, "rows": rows, "length": length, "bos_id": bos_id, "vocab_size": vocab,
        "weights": {c: (QUANT_WEIGHTS if weights is None else weights).get(c, 0) for c in CATEGORIES},
        "categories": cats,
        "tokens_sha256": _tokens_sha256(input_ids),
    }
    return CalibrationRows(input_ids, prov)


def _manifest_sha256() -> str:
    return sha256_file(DATA_DIR / "MANIFEST.json")


# ---------------------------------------------------------------------------------------------
# user files


def _read_bytes(path: pathlib.Path) -> bytes:
    if not path.exists():
        raise CalibrationError(f"{path}: no such file")
    if not path.is_file():
        raise CalibrationError(f"{path}: not a regular file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise CalibrationError(f"{path}: cannot read ({e.strerror})") from e


def _decode(path: pathlib.Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from e
    return text.removeprefix("\ufeff")


def _parquet_docs(path: pathlib.Path, text_column):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise CalibrationError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
    try:
        table = pq.read_table(str(path))
    except Exception as e:
        raise CalibrationError(f"{path}: not a readable parquet file ({e})") from e
    if table.num_rows == 0:
        raise CalibrationError(f"{path}: the parquet file has no rows (empty)")
    is_str = lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or \
        (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t))
    strings = [f.name for f in table.schema if is_str(f.type)]
    if text_column is not None:
        if text_column not in table.column_names:
            raise CalibrationError(f"{path}: no column {text_column!r}; columns are {table.column_names}")
        if text_column not in strings:
            raise CalibrationError(f"{path}: column {text_column!r} is {table.schema.field(text_column).type}, "
                                   f"not text")
        col = text_column
    elif len(strings) == 1:
        col = strings[0]
    elif "text" in strings:
        col = "text"
    elif not strings:
        raise CalibrationError(f"{path}: no text column (no string column among {table.column_names})")
    else:
        raise CalibrationError(f"{path}: no text column chosen: several string columns {strings} and none "
                               f"named 'text'; pass text_column")
    docs = [v for v in table.column(col).to_pylist() if v]
    return docs, col


def _jsonl_docs(path: pathlib.Path, text: str, text_column):
    field = text_column or "text"
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise CalibrationError(f"{path}: line {n} is not JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise CalibrationError(f"{path}: line {n} is not a JSON object")
        if field not in obj:
            raise CalibrationError(f"{path}: line {n} has no {field!r} field (no text column; "
                                   f"fields: {sorted(obj)}); pass text_column")
        v = obj[field]
        if not isinstance(v, str):
            raise CalibrationError(f"{path}: line {n}: field {field!r} is {type(v).__name__}, not text")
        if v:
            docs.append(v)
    return docs, field


def _text_pieces(text: str):
    """Plain text in pieces of about TEXT_CHUNK characters, cut after a newline; joined they are the text."""
    i = 0
    while i < len(text):
        j = text.find("\n", i + TEXT_CHUNK)
        j = len(text) if j < 0 else j + 1
        yield text[i:j]
        i = j


def user_rows(path, tokenizer_json_path, rows: int, length: int, seed: int = 0, text_column: str | None = None,
              *, bos_id: int | None = None, vocab_size: int | None = None) -> CalibrationRows:
    """Rows from a parquet (``.parquet``/``.pq``), JSON-lines (``.jsonl``/``.ndjson``) or plain text file.

    parquet: the column ``text_column``, else the only string column, else the string column ``text``.
    jsonl: the field ``text_column`` (default ``text``) of every line. Anything else is UTF-8 plain text.
    Raises :class:`CalibrationError` naming the file for every bad input, including too few tokens.
    """
    _check_sizes(rows, length)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CalibrationError(f"seed must be an integer, got {seed!r}")
    path = pathlib.Path(path)
    data = _read_bytes(path)
    if not data.strip():
        raise CalibrationError(f"{path}: the file is empty")
    kind = TEXT_SUFFIXES.get(path.suffix.lower(), "text")
    tok, tok_sha = _load_tokenizer(tokenizer_json_path)
    vocab = _vocab(tok, vocab_size)
    _check_bos(bos_id, vocab)
    if kind == "parquet":
        docs, column = _parquet_docs(path, text_column)
        sep = _sep(tok)
    elif kind == "jsonl":
        docs, column = _jsonl_docs(path, _decode(path, data), text_column)
        sep = _sep(tok)
    else:
        if text_column is not None:
            raise CalibrationError(f"{path}: text_column {text_column!r} given, but this is a plain text file")
        text = _decode(path, data)
        docs, column, sep = _text_pieces(text), None, []
    if kind != "text" and not docs:
        raise CalibrationError(f"{path}: column {column!r} holds no text (empty)")
    need = rows * length
    text_hash = _TextHash()
    ids = _stream(tok, docs, need, text_hash, sep, bos_id if kind != "text" else None)
    if kind == "text" and bos_id is not None:
        ids = [bos_id] + ids
    if len(ids) < need:
        raise CalibrationError(f"{path}: only {len(ids)} tokens with {tokenizer_json_path}; "
                               f"{rows} rows x {length} = {need} needed")
    input_ids = torch.tensor(ids[:need], dtype=torch.int64).view(rows, length)
    _check_ids(input_ids, vocab, f"{path} with {tokenizer_json_path}")
    prov = {
        "format": FORMAT,
        "source": path.name,
        "source_format": kind,
        "source_sha256": hashlib.sha256(data).hexdigest(),
        "text_column": column,
        "text_sha256": text_hash.hexdigest(),
        "tokenizer_sha256": tok_sha,
        "seed": seed, "rows": rows, "length": length, "bos_id": bos_id, "vocab_size": vocab,
        "categories": ["user"] * rows,
        "tokens_sha256": _tokens_sha256(input_ids),
    }
    return CalibrationRows(input_ids, prov)
