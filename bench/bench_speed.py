"""Conversion speed at the demo preset, side by side in one run: this tree, an earlier commit, and llm-compressor.

    python bench/bench_speed.py [--write] [--baseline REF] [--no-peer] [--out DIR]

Three jobs, one after the other on the same machine, each in a process of its own:

1. ``exl2-convert -b 4.0 -mr 8 -ml 512 -r 16 -l 512`` (measure, quantize, KV profile, validate) on SmolLM2-135M
   with the code of ``--baseline`` (default: issue #24's starting commit, the last one before its first change),
   taken out of git into a folder of its own;
2. the same command with the code of this working tree (taken out the same way: ``git stash create`` keeps
   uncommitted edits), so editing files while the benchmark runs changes nothing;
3. llm-compressor's GPTQ (W4A16, group 64, act-order) on the same 16 x 512 calibration rows
   (bench/peers/llmcompressor.py; its setup: bench/peers/setup_llmcompressor.sh).

Each tree's native kernels are built before anything is timed.  Reported: wall and CPU seconds (the process and
its children), the stages from ``--status-json``, the held-out KL divergence each conversion's validation
measured (``validation.json``: 4 held-out rows x 512 tokens, KL(FP16 || EXL2) per token), and the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import header, publish  # noqa: E402

PRESET = ["-b", "4.0", "-mr", "8", "-ml", "512", "-r", "16", "-l", "512"]
BASELINE = "7ca108e"        # issue #24's starting commit: the parent of its first change (af2c1da)
PEER_SCHEME = "W4A16-g64"
REPORTED = ("measure", "quant", "kv_profile", "validate")     # the stages with a column of their own


def fixture() -> Path:
    from fixtures.smollm2 import build_smollm2          # the offline SmolLM2-135M fixture (FIXTURES.md)

    return Path(build_smollm2())


def export_tree(ref: str | None, dest: Path) -> tuple[Path, str]:
    """The package as of ``ref`` (None: the working tree, uncommitted edits included) under ``dest/exl2``;
    returns (the folder to put on PYTHONPATH, a label: the commit, with ``+edits`` when uncommitted edits came
    too)."""
    def git(*args) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True,
                              text=True).stdout.strip()

    edits = ""
    if ref is None:                                  # the stash commit holds uncommitted edits, if there are any
        stash = git("stash", "create")
        ref, edits = (stash, "+edits") if stash else ("HEAD", "")
    commit = git("rev-parse", "--short", "HEAD" if edits else ref) + edits
    pkg = dest / "exl2"
    pkg.mkdir(parents=True)
    git_archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", ref], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(pkg)], stdin=git_archive.stdout, check=True)
    if git_archive.wait() != 0:
        raise SystemExit(f"git archive {ref} failed")
    return dest, commit


def _env(pythonpath: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    env.pop("OMP_NUM_THREADS", None)
    return env


def build_kernels(pythonpath: Path) -> None:
    """Build (or load) the tree's native extension, so the timed run does not compile."""
    code = ("import exl2.quant_kernels.ext as e, sys; assert e.get() is not None, 'no native kernels'; "
            "sys.stdout.write(e.__file__)")
    got = subprocess.run([sys.executable, "-c", code], env=_env(pythonpath), check=True, capture_output=True,
                         text=True).stdout
    if not got.startswith(str(pythonpath)):
        raise SystemExit(f"the tree under {pythonpath} did not load its own code ({got})")


def convert(pythonpath: Path, src: Path, work: Path) -> dict:
    """One conversion at the preset: wall and CPU seconds, seconds per stage, the validation's numbers."""
    cmd = [sys.executable, "-c", "from exl2.convert.cli import convert_main; convert_main()", "-i", str(src),
           "-o", str(work), *PRESET, "--status-json"]
    events = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_env(pythonpath), text=True)
    for line in proc.stdout:                       # each event with the time it arrived
        if line.startswith("{"):
            events.append((time.perf_counter() - t0, json.loads(line)))
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    (work.parent / f"{work.name}.jsonl").write_text("".join(json.dumps(e) + "\n" for _, e in events))
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"exl2-convert failed under {pythonpath} (events: {work.parent / work.name}.jsonl)")
    target = events[-1][1]["targets"][0]
    v = json.loads((Path(target["output"]) / "validation.json").read_text())
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "stages": stage_seconds(events),
            "bpw": target["bpw"], "kld": v["kld_mean"], "ppl": v["ppl_exl2"], "ppl_fp16": v["ppl_fp16"]}


def stage_seconds(events: list) -> dict:
    """Seconds per stage: the time from one event to the next counts to the later event's stage."""
    out: dict[str, float] = {}
    prev = 0.0
    for t, e in events:
        st = str(e.get("stage", "")).split(":")[0]
        if st == "memory":                                  # a stage's memory report closes that stage
            st = str(e.get("of", "")).split(":")[0]
        st = {"quantize": "quant"}.get(st, st)
        out[st] = out.get(st, 0.0) + t - prev
        prev = t
    return out


def peer(src: Path, tmp: Path) -> dict | None:
    from bench.peers import llmcompressor, make_cal_dir

    why = llmcompressor.available()
    if why:
        print(f"llm-compressor skipped: {why}", flush=True)
        return None
    cal = make_cal_dir(src, tmp / "cal", 16, 512)
    t0 = time.perf_counter()
    meta = llmcompressor.run(src, cal, tmp / "llmc", PEER_SCHEME)
    return {"wall": time.perf_counter() - t0, "quant_wall": meta["quant_wall_s"], "cpu": meta["cpu_s"],
            "bpw": meta["bpw"], "version": meta["version"]}


def report(rows: dict, command: str) -> str:
    lines = header("Conversion speed at the demo preset, against the starting commit and llm-compressor "
                   "(bench/bench_speed.py)", command)
    lines += [f"{rows['model']}, `exl2-convert " + " ".join(PRESET) + "` (measure, quantize, KV profile, validate) "
              "with the code of two commits, and llm-compressor's GPTQ pass (" + PEER_SCHEME + ", act-order) on "
              "the same 16 x 512 calibration rows, one after the other in one run (meant to run alone on the "
              "machine).  Wall includes starting Python and loading the model; a stage's seconds are the time "
              "from one status event to the next, counted to the later event's stage.  KL: the conversion's own "
              "validation (4 held-out rows x 512 tokens, KL(FP16 || EXL2) per token).", ""]
    peer_wall = rows["peer"]["wall"] if rows.get("peer") else None
    base = rows["baseline"]["wall"]
    lines += ["| run | wall s | CPU s | measure s | quantize s | KV profile s | validate s | bpw | held-out KL | "
              "vs starting commit | vs llm-compressor |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key in ("baseline", "current"):
        r = rows[key]
        vs_peer = f"{r['wall'] / peer_wall:.2f}x" if peer_wall else "-"
        lines.append(f"| exl2 {r['commit']} ({'starting commit' if key == 'baseline' else 'this tree'}) | "
                     f"{r['wall']:.0f} | {r['cpu']:.0f} | " + " | ".join(
                         f"{r['stages'].get(st, 0):.0f}" for st in REPORTED) +
                     f" | {r['bpw']:.3f} | {r['kld']:.4f} | "
                     f"{r['wall'] / base:.2f}x | {vs_peer} |")
    if rows.get("peer"):
        p = rows["peer"]
        lines.append(f"| llm-compressor {p['version']} {PEER_SCHEME} | {p['wall']:.0f} | {p['cpu']:.0f} | - | "
                     f"{p['quant_wall']:.0f} | - | - | {p['bpw']:.3f} | - | {p['wall'] / base:.2f}x | 1.00x |")
    else:
        lines.append("| llm-compressor | not run (no venv: bash bench/peers/setup_llmcompressor.sh) |" + " |" * 9)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default=BASELINE, help=f"commit to compare with (default {BASELINE})")
    ap.add_argument("--no-peer", action="store_true", help="skip llm-compressor")
    ap.add_argument("--model", help="checkpoint folder (default: the SmolLM2-135M fixture)")
    ap.add_argument("--out", help="keep the jobs and logs here (default: a temporary folder)")
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = ap.parse_args(argv)
    src = Path(args.model) if args.model else fixture()
    with tempfile.TemporaryDirectory(prefix="bench_speed.") as tmp:
        tmp = Path(args.out) if args.out else Path(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        trees = {key: export_tree(ref, tmp / f"src-{key}") for key, ref in (("baseline", args.baseline),
                                                                             ("current", None))}
        for path, _ in trees.values():
            build_kernels(path)
        rows: dict = {"model": src.name if args.model else "SmolLM2-135M"}
        for key, (path, commit) in trees.items():
            rows[key] = {"commit": commit, **convert(path, src, tmp / f"job-{key}")}
            print(key, json.dumps(rows[key]), flush=True)
        rows["peer"] = None if args.no_peer else peer(src, tmp)
        print("peer", json.dumps(rows["peer"]), flush=True)
        (tmp / "bench_speed.json").write_text(json.dumps(rows, indent=1))
    flags = [f"--model {args.model}" if args.model else "", "--no-peer" if args.no_peer else "",
             "--write" if args.write else ""]
    cmd = " ".join(["python bench/bench_speed.py", *filter(None, flags)])
    text = report(rows, cmd)
    return publish('bench_speed', text, args.write)


if __name__ == "__main__":
    raise SystemExit(main())
