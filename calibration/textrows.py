"""A user's text file to token rows: parquet, JSON lines or plain text, read with a model's tokenizer.json.

``exl2-eval --data`` scores a model on these rows, and the converter calibrates on them (``-c``): the
calibration package sits below the runtime (it needs only a tokenizer.json), so both use these readers.
The tokenizing pieces the embedded default calibration mix shares with them (tokenizer loading, the document
stream, the text hash, the id checks) live here too.

Records (parquet rows, jsonl lines) are tokenized one by one without special tokens and joined by the tokens
of ``"\\n\\n"``; a plain text file is tokenized as it is (in newline-aligned pieces). With a ``bos_id`` each
record, or the text file, starts with BOS. The first ``rows x length`` tokens are the rows, as in ExLlamaV2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import torch

from exl2.core.errors import UserError

TEXT_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
TEXT_CHUNK = 1 << 16  # plain text is tokenized in pieces of about this many characters


class TextRowsError(UserError, ValueError):
    """Bad token-row input: names the file (or argument) and the problem."""


# ---------------------------------------------------------------------------------------------
# tokenizing pieces (shared with the default calibration mix)


def check_sizes(rows, length) -> None:
    for name, v in (("rows", rows), ("length", length)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise TextRowsError(f"{name} must be a positive integer, got {v!r}")


def sha256_file(path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokens_sha256(ids: torch.Tensor) -> str:
    """Hex sha256 of token ids as little-endian int64."""
    return hashlib.sha256(ids.contiguous().numpy().astype("<i8", copy=False).tobytes()).hexdigest()


def load_tokenizer(path):
    """(the tokenizers ``Tokenizer`` of a tokenizer.json, the file's sha256)."""
    from tokenizers import Tokenizer

    path = pathlib.Path(path)
    if not path.is_file():
        raise TextRowsError(f"{path}: tokenizer file not found")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise TextRowsError(f"{path}: not a tokenizers tokenizer.json ({e})") from e
    return tok, sha256_file(path)


class TextHash:
    """sha256 over exactly the documents that were tokenized, each length-prefixed, in order."""

    def __init__(self):
        self.h = hashlib.sha256()

    def update(self, text: str) -> None:
        data = text.encode("utf-8")
        self.h.update(len(data).to_bytes(8, "little"))
        self.h.update(data)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def stream_tokens(tok, docs, need: int | None, text_hash: TextHash, sep: list[int], bos_id=None):
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


def separator(tok) -> list[int]:
    """The tokens that join two documents: those of a blank line."""
    return tok.encode("\n\n", add_special_tokens=False).ids


def vocab_size_of(tok, vocab_size) -> int:
    """``vocab_size`` checked, or the tokenizer's size with added tokens when it is None."""
    n = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size is None:
        return n
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise TextRowsError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    return vocab_size


def check_bos(bos_id, vocab: int) -> None:
    if bos_id is not None and (isinstance(bos_id, bool) or not isinstance(bos_id, int) or not 0 <= bos_id < vocab):
        raise TextRowsError(f"bos_id {bos_id!r} is not a token id in [0, {vocab})")


def check_ids(ids: torch.Tensor, vocab_size: int, where: str) -> None:
    top = int(ids.max()) if ids.numel() else -1
    if top >= vocab_size:
        raise TextRowsError(f"{where}: the tokenizer produced id {top}, but the model has only {vocab_size} "
                            f"embedding rows (tokenizer and model do not match)")


# ---------------------------------------------------------------------------------------------
# user files


def _read_bytes(path: pathlib.Path) -> bytes:
    if not path.exists():
        raise TextRowsError(f"{path}: no such file")
    if not path.is_file():
        raise TextRowsError(f"{path}: not a regular file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise TextRowsError(f"{path}: cannot read ({e.strerror})") from e


def _decode(path: pathlib.Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextRowsError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from e
    return text.removeprefix("\ufeff")


def _parquet_docs(path: pathlib.Path, text_column):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise TextRowsError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
    try:
        table = pq.read_table(str(path))
    except Exception as e:
        raise TextRowsError(f"{path}: not a readable parquet file ({e})") from e
    if table.num_rows == 0:
        raise TextRowsError(f"{path}: the parquet file has no rows (empty)")
    is_str = lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or \
        (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t))
    strings = [f.name for f in table.schema if is_str(f.type)]
    if text_column is not None:
        if text_column not in table.column_names:
            raise TextRowsError(f"{path}: no column {text_column!r}; columns are {table.column_names}")
        if text_column not in strings:
            raise TextRowsError(f"{path}: column {text_column!r} is {table.schema.field(text_column).type}, "
                                f"not text")
        col = text_column
    elif len(strings) == 1:
        col = strings[0]
    elif "text" in strings:
        col = "text"
    elif not strings:
        raise TextRowsError(f"{path}: no text column (no string column among {table.column_names})")
    else:
        raise TextRowsError(f"{path}: no text column chosen: several string columns {strings} and none "
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
            raise TextRowsError(f"{path}: line {n} is not JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise TextRowsError(f"{path}: line {n} is not a JSON object")
        if field not in obj:
            raise TextRowsError(f"{path}: line {n} has no {field!r} field (no text column; "
                                f"fields: {sorted(obj)}); pass text_column")
        v = obj[field]
        if not isinstance(v, str):
            raise TextRowsError(f"{path}: line {n}: field {field!r} is {type(v).__name__}, not text")
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


@dataclasses.dataclass(frozen=True)
class TextRows:
    """``input_ids``: int64 ``[rows, length]``; ``facts``: where they came from (source file name, format and
    sha256, text column, text and tokenizer sha256, bos_id, vocab_size), JSON-able."""

    input_ids: torch.Tensor
    facts: dict


def file_rows(path, tokenizer_json_path, rows: int, length: int, text_column: str | None = None, *,
              bos_id: int | None = None, vocab_size: int | None = None) -> TextRows:
    """Rows from a parquet (``.parquet``/``.pq``), JSON-lines (``.jsonl``/``.ndjson``) or plain text file.

    parquet: the column ``text_column``, else the only string column, else the string column ``text``.
    jsonl: the field ``text_column`` (default ``text``) of every line. Anything else is UTF-8 plain text.
    Raises :class:`TextRowsError` naming the file for every bad input, including too few tokens.
    """
    check_sizes(rows, length)
    path = pathlib.Path(path)
    data = _read_bytes(path)
    if not data.strip():
        raise TextRowsError(f"{path}: the file is empty")
    kind = TEXT_SUFFIXES.get(path.suffix.lower(), "text")
    tok, tok_sha = load_tokenizer(tokenizer_json_path)
    vocab = vocab_size_of(tok, vocab_size)
    check_bos(bos_id, vocab)
    if kind == "parquet":
        docs, column = _parquet_docs(path, text_column)
        sep = separator(tok)
    elif kind == "jsonl":
        docs, column = _jsonl_docs(path, _decode(path, data), text_column)
        sep = separator(tok)
    else:
        if text_column is not None:
            raise TextRowsError(f"{path}: text_column {text_column!r} given, but this is a plain text file")
        text = _decode(path, data)
        docs, column, sep = _text_pieces(text), None, []
    if kind != "text" and not docs:
        raise TextRowsError(f"{path}: column {column!r} holds no text (empty)")
    need = rows * length
    text_hash = TextHash()
    ids = stream_tokens(tok, docs, need, text_hash, sep, bos_id if kind != "text" else None)
    if kind == "text" and bos_id is not None:
        ids = [bos_id] + ids
    if len(ids) < need:
        raise TextRowsError(f"{path}: only {len(ids)} tokens with {tokenizer_json_path}; "
                            f"{rows} rows x {length} = {need} needed")
    input_ids = torch.tensor(ids[:need], dtype=torch.int64).view(rows, length)
    check_ids(input_ids, vocab, f"{path} with {tokenizer_json_path}")
    facts = {
        "source": path.name,
        "source_format": kind,
        "source_sha256": hashlib.sha256(data).hexdigest(),
        "text_column": column,
        "text_sha256": text_hash.hexdigest(),
        "tokenizer_sha256": tok_sha,
        "bos_id": bos_id, "vocab_size": vocab,
    }
    return TextRows(input_ids, facts)


__all__ = ["TEXT_SUFFIXES", "TextHash", "TextRows", "TextRowsError", "check_bos", "check_ids", "check_sizes",
           "file_rows", "load_tokenizer", "separator", "sha256_file", "stream_tokens", "tokens_sha256",
           "vocab_size_of"]
