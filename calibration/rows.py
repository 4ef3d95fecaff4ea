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

User files (:func:`user_rows`): parquet, jsonl or plain text, read by :func:`exl2.calibration.textrows.file_rows`
(``exl2-eval --data`` reads them with it too); the first ``rows x length`` tokens are the rows, as in
ExLlamaV2. The seed is recorded but user rows contain nothing random.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import pathlib
import random
from functools import lru_cache

import torch

from exl2.calibration.textrows import (TextHash, TextRowsError, check_bos, check_ids, check_sizes, file_rows,
                                   load_tokenizer, separator, sha256_file, stream_tokens, tokens_sha256,
                                   vocab_size_of)

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


# Bad calibration input, naming the file (or argument) and the problem.  One class with the text readers'
# error: a bad user file raises it from exl2.calibration.textrows, and callers catch CalibrationError as before.
CalibrationError = TextRowsError


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
        """Write the rows and their provenance as safetensors (atomically)."""
        from exl2.core.files import save_safetensors

        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(path, {"input_ids": self.input_ids}, metadata={METADATA_KEY: _canonical(self.provenance)})
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
    if tokens_sha256(ids) != prov["tokens_sha256"]:
        raise CalibrationError(f"{path}: input_ids do not match the tokens_sha256 of the provenance")
    return CalibrationRows(ids, prov)


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# default mix


def allocate_rows(rows: int, weights: dict[str, int] | None = None) -> dict[str, int]:
    """Rows per category (in ``CATEGORIES`` order): at least one each when rows allow, then by largest
    deficit against the proportional share ``rows * w / sum(w)``; ties go to the earlier category."""
    check_sizes(rows, 1)
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
    check_sizes(rows, length)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CalibrationError(f"seed must be an integer, got {seed!r}")
    tok, tok_sha = load_tokenizer(tokenizer_json_path)
    vocab = vocab_size_of(tok, vocab_size)
    check_bos(bos_id, vocab)
    alloc = allocate_rows(rows, weights)
    manifest, mix = _mix()
    sep = separator(tok)
    text_hash = TextHash()
    blocks, cats = [], []

    def consecutive(cat: str, n_rows: int, bos=None) -> torch.Tensor:
        need = n_rows * length
        ids = stream_tokens(tok, mix[cat], need, text_hash, sep, bos)
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
            pool_hash = TextHash()
            pool = stream_tokens(tok, mix["multilingual"], pool_need, pool_hash, sep)
            text_hash.update(f"\x00multilingual_shuffled pool {pool_hash.hexdigest()}")
            pieces = [pool[i:i + SHUFFLE_PIECE] for i in range(0, len(pool) - SHUFFLE_PIECE + 1, SHUFFLE_PIECE)]
            per_row = -(-length // SHUFFLE_PIECE)  # ceil
            if len(pieces) < per_row:
                raise CalibrationError(f"default mix: only {len(pool)} multilingual tokens with "
                                       f"{tokenizer_json_path}, too few for shuffled rows of {length}")
            picked = [rng.sample(range(len(pieces)), per_row) for _ in range(n)]
            block = torch.tensor([[t for i in row for t in pieces[i]][:length] for row in picked],
                                 dtype=torch.int64)
            check_ids(block, vocab, f"default mix ({cat}) with {tokenizer_json_path}")
        else:
            block = consecutive(cat, n, bos_id if cat == "prose" else None)
            check_ids(block, vocab, f"default mix ({cat}) with {tokenizer_json_path}")
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
        "tokens_sha256": tokens_sha256(input_ids),
    }
    return CalibrationRows(input_ids, prov)


def _manifest_sha256() -> str:
    return sha256_file(DATA_DIR / "MANIFEST.json")


# ---------------------------------------------------------------------------------------------
# user files


def user_rows(path, tokenizer_json_path, rows: int, length: int, seed: int = 0, text_column: str | None = None,
              *, bos_id: int | None = None, vocab_size: int | None = None) -> CalibrationRows:
    """Rows from a parquet, JSON-lines or plain text file (:func:`exl2.calibration.textrows.file_rows`, which says
    how each is read), with their provenance.  Raises :class:`CalibrationError` naming the file for every bad
    input, including too few tokens.
    """
    check_sizes(rows, length)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CalibrationError(f"seed must be an integer, got {seed!r}")
    r = file_rows(path, tokenizer_json_path, rows, length, text_column, bos_id=bos_id, vocab_size=vocab_size)
    prov = {
        "format": FORMAT,
        **r.facts,
        "seed": seed, "rows": rows, "length": length,
        "categories": ["user"] * rows,
        "tokens_sha256": tokens_sha256(r.input_ids),
    }
    return CalibrationRows(r.input_ids, prov)
