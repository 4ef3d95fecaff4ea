"""llama.cpp's quantizer as a peer: HF checkpoint -> F16 GGUF -> imatrix -> llama-quantize -> dequantized HF.

Needs the tools built by ``bash bench/peers/setup_llamacpp.sh`` (under ``<repo>/.peers/llama.cpp``, or the
directory named by ``$EXL2_LLAMACPP_DIR``). Works for Llama-architecture checkpoints (the GGUF reading side
uses :func:`fixtures.smollm2.read_state_dict`, which maps llama tensor names back and undoes the q/k row
permutation of llama.cpp's converter).

    python bench/peers/llamacpp.py --src DIR --cal CALDIR --out DIR --scheme Q4_K_M

Caches, next to ``out`` in ``<out.parent>/.llamacpp-cache/<src name>-<hash of src path>/``: the F16 GGUF
(rebuilt when src's weights change) and one importance matrix per calibration text and context length.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOT = Path(os.environ.get("EXL2_LLAMACPP_DIR", REPO / ".peers" / "llama.cpp"))
BIN = ROOT / "bin"
CONVERTER = ROOT / "src" / "convert_hf_to_gguf.py"
TOOLS = ("llama-quantize", "llama-imatrix")
SETUP = "bash bench/peers/setup_llamacpp.sh"

# The decoder layers' linear weights, by their GGUF names (blk.N.<name>.weight).
LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_LINEAR_RE = re.compile(r"^blk\.\d+\.(%s)\.weight$" % "|".join(LINEAR))
IMATRIX_CTX = 512
THREADS = int(os.environ.get("EXL2_LLAMACPP_THREADS", "2"))


class PeerError(RuntimeError):
    """A failure worth one line: the tool's own last message, or what is missing."""


def available() -> str | None:
    missing = [t for t in TOOLS if not os.access(BIN / t, os.X_OK)]
    if missing:
        return f"llama.cpp {', '.join(missing)} not built in {BIN}: run {SETUP}"
    if not CONVERTER.is_file():
        return f"llama.cpp converter {CONVERTER} missing: run {SETUP}"
    return None


def version() -> str:
    f = ROOT / "VERSION"
    commit = f.read_text().strip() if f.is_file() else "unknown"
    return f"llama.cpp@{commit[:9]}"


# ------------------------------------------------------------------------------------------- helpers


def _run(cmd: list, what: str, log: Path) -> float:
    """Run a tool with its output in ``log``; return wall seconds; raise PeerError with its last error line."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(map(str, cmd)) + "\n")
        fh.flush()
        rc = subprocess.run([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": str(THREADS)}).returncode
    dt = time.perf_counter() - t0
    if rc != 0:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        err = [ln for ln in lines if re.search(r"error|exception|failed|invalid|what\(\)", ln, re.I)]
        # the cause, when the tool gives one ("...: failed to quantize: <cause>", "ModuleNotFoundError: ...")
        cause = [ln for ln in err if re.search(r"failed to \w+: \S|^\w*(Error|Exception): |invalid ", ln)]
        last = (cause or err or lines or ["(no output)"])[-1]
        m = re.search(r"offending tensor: (\S+)", "\n".join(lines))
        if m:
            last += f" (offending tensor {m.group(1)})"
        raise PeerError(f"{what} failed (exit {rc}): {last[:300]} [log: {log}]")
    return dt


def _sha(data: bytes, n: int = 12) -> str:
    return hashlib.sha256(data).hexdigest()[:n]


def _weights_stamp(src: Path) -> str:
    """Size and mtime of src's weight files: the F16 GGUF is rebuilt when they change."""
    parts = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
             for f in sorted(src.iterdir()) if f.suffix in (".safetensors", ".bin") or f.name.endswith(".json")]
    return _sha("\n".join(parts).encode())


def cache_dir(src: Path, out: Path) -> Path:
    src = src.resolve()
    return out.resolve().parent / ".llamacpp-cache" / f"{src.name}-{_sha(str(src).encode(), 10)}"


def convert_f16(src: Path, cache: Path) -> Path:
    """src (HF) -> F16 GGUF with llama.cpp's own converter (cached)."""
    gguf_path = cache / "model-f16.gguf"
    stamp = cache / "model-f16.stamp"
    want = _weights_stamp(src)
    if gguf_path.is_file() and stamp.is_file() and stamp.read_text() == want:
        return gguf_path
    tmp = cache / "model-f16.gguf.tmp"
    tmp.unlink(missing_ok=True)
    env_py = sys.executable
    _run([env_py, CONVERTER, src, "--outtype", "f16", "--outfile", tmp], "convert_hf_to_gguf.py",
         cache / "convert.log")
    os.replace(tmp, gguf_path)
    stamp.write_text(want)
    return gguf_path


def compute_imatrix(f16: Path, cal_dir: Path, cache: Path, ctx: int = IMATRIX_CTX) -> tuple[Path, dict]:
    """llama-imatrix over cal_dir/text.txt in chunks of ctx tokens (cached per text and ctx)."""
    text = (Path(cal_dir) / "text.txt").resolve()
    if not text.is_file():
        raise PeerError(f"{text} missing (make it with bench.peers.make_cal_dir)")
    key = f"{_sha(text.read_bytes())}-c{ctx}"
    path = cache / f"imatrix-{key}.gguf"
    info_path = cache / f"imatrix-{key}.json"
    if path.is_file() and info_path.is_file():
        return path, json.loads(info_path.read_text())
    log = cache / f"imatrix-{key}.log"
    tmp = cache / f"imatrix-{key}.tmp.gguf"
    dt = _run([BIN / "llama-imatrix", "-m", f16, "-f", text, "-o", tmp, "-c", ctx, "-b", ctx, "--chunks", -1,
               "-t", THREADS, "--output-format", "gguf"], "llama-imatrix", log)
    os.replace(tmp, path)
    out = log.read_text(errors="replace")
    m = re.search(r"computing over (\d+) chunks, n_ctx=(\d+)", out)
    ppl = re.findall(r"Final estimate: PPL = ([0-9.]+)", out)
    info = {"chunks": int(m.group(1)) if m else None, "ctx": int(m.group(2)) if m else ctx,
            "text": str(text), "text_sha256": _sha(text.read_bytes(), 64), "wall_s": round(dt, 2),
            "f16_ppl": float(ppl[-1]) if ppl else None}
    info_path.write_text(json.dumps(info, indent=2))
    return path, info


def gguf_types(path: Path) -> dict[str, tuple[str, int, int]]:
    """name -> (ggml type name, bytes, elements) for every tensor of a GGUF file, read from its header with
    the vendored gguf-py (it knows the newest types; the installed gguf may not)."""
    code = ("import json,sys; from gguf import GGUFReader; r=GGUFReader(sys.argv[1]);"
            "print(json.dumps({t.name:[t.tensor_type.name,int(t.n_bytes),int(t.n_elements)] for t in r.tensors}))")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src" / "gguf-py")}
    p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise PeerError(f"cannot read {path}: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    return {k: tuple(v) for k, v in json.loads(p.stdout).items()}


def summarize(types: dict[str, tuple[str, int, int]]) -> dict:
    lin = {k: v for k, v in types.items() if _LINEAR_RE.match(k)}
    if not lin:
        raise PeerError("no decoder linear weights (blk.N.attn_q.weight, ...) in the quantized GGUF")
    counts: dict[str, int] = {}
    by_proj: dict[str, dict[str, int]] = {}
    for name, (ty, _, _) in lin.items():
        counts[ty] = counts.get(ty, 0) + 1
        proj = _LINEAR_RE.match(name).group(1)
        by_proj.setdefault(proj, {})
        by_proj[proj][ty] = by_proj[proj].get(ty, 0) + 1
    nbytes = sum(v[1] for v in lin.values())
    nel = sum(v[2] for v in lin.values())
    head = {k: types[k][0] for k in ("output.weight", "token_embd.weight") if k in types}
    if "output.weight" not in types:
        head = {"tied": True, "token_embd.weight": head.get("token_embd.weight")}
    return {"bpw": round(nbytes * 8 / nel, 4), "type_counts": dict(sorted(counts.items())),
            "type_by_proj": by_proj, "head": head,
            "file_bpw_all": round(sum(v[1] for v in types.values()) * 8 / sum(v[2] for v in types.values()), 4)}


def _dequantizable(types) -> set[str]:
    try:
        from gguf.quants import _type_traits  # gguf >= 0.10: the numpy (de)quantizers
        from gguf import GGMLQuantizationType as T
    except ImportError:
        return set()
    ok = {t.name for t in _type_traits} | {"F32", "F16"}
    known = {t.name for t in T}
    return {ty for ty, _, _ in types.values() if ty in ok and ty in known}


def dequantized_state(qpath: Path, types, work: Path) -> tuple[dict, str]:
    """HF-named float32 torch tensors of a quantized GGUF. gguf.quants when it knows every type; otherwise
    llama.cpp dequantizes itself (llama-quantize --allow-requantize ... F32), then the F32 file is read."""
    import numpy as np
    import torch
    from gguf import GGUFReader

    from fixtures.smollm2 import read_state_dict

    present = {ty for ty, _, _ in types.values()}
    missing = present - _dequantizable(types)
    how = "gguf.quants"
    path = qpath
    if missing:
        path = work / "dequant-f32.gguf"
        _run([BIN / "llama-quantize", "--allow-requantize", qpath, path, "F32", THREADS],
             "llama-quantize F32 (dequantize)", work / "dequant.log")
        how = f"llama-quantize F32 (gguf {_gguf_version()} lacks {sorted(missing)})"
    state = read_state_dict(GGUFReader(str(path)))
    if missing:
        path.unlink(missing_ok=True)
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, how


def _gguf_version() -> str:
    try:
        from importlib.metadata import version as v
        return v("gguf")
    except Exception:  # noqa: BLE001
        return "?"


# ------------------------------------------------------------------------------------------------ run


def decode_speed(src, work, scheme: str = "Q4_K_M", *, depth: int = 0, new: int = 128,
                 repeats: int = 3) -> dict:
    """Batch-1 decode speed of llama.cpp on src quantized to ``scheme`` (no importance matrix: it changes the
    weights, not the work per token): ``llama-bench`` generating ``new`` tokens after ``depth`` tokens already in
    its cache, ``repeats`` runs on THREADS threads.  Returns tokens/s (mean and standard deviation as
    llama-bench reports them) and what ran."""
    import json as _json

    for tool in ("llama-quantize", "llama-bench"):
        if not os.access(BIN / tool, os.X_OK):
            raise PeerError(f"llama.cpp {tool} not built in {BIN}: run {SETUP}")
    src = Path(src).resolve()
    cache = cache_dir(src, Path(work))
    cache.mkdir(parents=True, exist_ok=True)
    f16 = convert_f16(src, cache)
    qpath = cache / f"model-{scheme}-noimat.gguf"
    if not qpath.is_file():
        tmp = qpath.with_suffix(".tmp")
        _run([BIN / "llama-quantize", f16, tmp, scheme, THREADS], f"llama-quantize {scheme}",
             cache / f"quantize-{scheme}-noimat.log")
        os.replace(tmp, qpath)
    log = cache / "llama-bench.log"
    cmd = ([BIN / "llama-bench", "-m", qpath, "-p", "0", "-n", new] + (["-d", depth] if depth else [])
           + ["-t", THREADS, "-r", repeats, "-o", "json"])
    _run(cmd, "llama-bench", log)
    text = log.read_text(errors="replace")
    start = text.index("[")                      # the JSON array after the echoed command line
    rows = _json.loads(text[start:text.rindex("]") + 1])
    tg = [r for r in rows if int(r.get("n_gen", 0)) == new]
    if not tg:
        raise PeerError(f"llama-bench printed no generation row [log: {log}]")
    r = tg[0]
    return {"tool": version(), "scheme": scheme, "depth": depth, "new": new, "threads": THREADS,
            "repeats": repeats, "tokens_per_s": float(r["avg_ts"]), "stddev_ts": float(r["stddev_ts"]),
            "model_bytes": qpath.stat().st_size,
            "command": "llama-bench " + " ".join(str(c) for c in cmd[1:]).replace(str(qpath), f"{src.name}-{scheme}.gguf")}


def run(src, cal_dir, out, scheme: str, *, imatrix: bool = True, keep_gguf: bool = False) -> dict:
    """Quantize src with llama.cpp to ``scheme``, calibrated with an importance matrix over cal_dir/text.txt,
    and write the dequantized weights to out; returns the meta written to out/peer.json.

    scheme: a llama-quantize type (Q4_K_M, Q3_K_S, IQ4_NL, Q2_0, ...), optionally followed by per-tensor
    overrides ``+<regex>=<ggml type>`` passed as ``--tensor-type`` (first match wins), e.g.
    ``Q2_0+ffn_down=q3_k+attn_=q4_0``."""
    from . import write_checkpoint

    reason = available()
    if reason:
        raise PeerError(reason)
    src, out = Path(src).resolve(), Path(out).resolve()
    if not (src / "config.json").is_file():
        raise PeerError(f"{src}: not a HF checkpoint (no config.json)")
    cache = cache_dir(src, out)
    cache.mkdir(parents=True, exist_ok=True)
    f16 = convert_f16(src, cache)

    imat_info = None
    imat_s = 0.0
    cmd = [BIN / "llama-quantize"]
    if imatrix:
        imat, imat_info = compute_imatrix(f16, Path(cal_dir), cache)
        imat_s = imat_info["wall_s"]
        cmd += ["--imatrix", imat]
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", scheme) + ("" if imatrix else "-noimat")
    qpath = cache / f"model-{tag}.gguf"
    qpath.unlink(missing_ok=True)
    base, *overrides = scheme.split("+")
    for o in overrides:
        if "=" not in o:
            raise PeerError(f"scheme {scheme!r}: override {o!r} is not <tensor regex>=<ggml type>")
        cmd += ["--tensor-type", o]
    cmd += [f16, qpath, base, THREADS]
    try:
        q_s = _run(cmd, f"llama-quantize {scheme}", cache / f"quantize-{tag}.log")
        types = gguf_types(qpath)
        meta = {"tool": "llama.cpp", "version": version(), "scheme": scheme}
        if overrides:
            meta["tensor_types"] = overrides
        meta.update(summarize(types))
        state, how = dequantized_state(qpath, types, cache)
        meta.update({
            "quant_wall_s": round(imat_s + q_s, 2), "imatrix_wall_s": imat_s, "quantize_wall_s": round(q_s, 2),
            "imatrix": ({"chunks": imat_info["chunks"], "ctx": imat_info["ctx"], "text": str((Path(cal_dir) / "text.txt").resolve()),
                         "f16_ppl_on_cal": imat_info["f16_ppl"]} if imat_info else None),
            "threads": THREADS, "dequantized_with": how, "src": str(src),
        })
        write_checkpoint(src, state, out, meta)
    finally:
        if not keep_gguf:
            qpath.unlink(missing_ok=True)
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", required=True, help="HF checkpoint (fp16)")
    ap.add_argument("--cal", required=True, help="calibration dir from bench.peers.make_cal_dir (text.txt)")
    ap.add_argument("--out", required=True, help="output dir: dequantized checkpoint + peer.json")
    ap.add_argument("--scheme", required=True,
                    help="llama-quantize type, e.g. Q4_K_M, Q3_K_S, IQ4_NL; '+regex=type' adds --tensor-type")
    ap.add_argument("--no-imatrix", action="store_true", help="quantize without an importance matrix")
    ap.add_argument("--keep-gguf", action="store_true", help="keep the quantized GGUF in the cache dir")
    a = ap.parse_args(argv)
    try:
        meta = run(a.src, a.cal, a.out, a.scheme, imatrix=not a.no_imatrix, keep_gguf=a.keep_gguf)
    except (PeerError, OSError, ValueError, KeyError) as e:
        print(f"llamacpp: {e}".replace("\n", " "), file=sys.stderr)
        return 1
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script: make `bench.peers` and `fixtures` importable
        sys.path.insert(0, str(REPO))
        __package__ = "bench.peers"
        import bench.peers  # noqa: F401
    sys.exit(main())
