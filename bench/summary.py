"""The summary at the top of BENCHMARKS.md, built from the generated sections below it.

    python bench/summary.py [--write]

Reads BENCHMARKS.md itself (no model, a few seconds): the quality sweep (section ``quality``, bench/quality.py)
and the option tables (``quality_tables``, bench/tables.py).  Writes section ``summary`` under the title: EXL2 at
3, 4 and 5 bpw against the baselines (round-to-nearest, uniform GPTQ 4-bit g128) and the peers on both copies of
SmolLM2-135M, each EXL2 row with the converter settings it was made with and whether those are today's defaults;
then every section's date and command.  ``make bench`` runs it after the benchmarks.

Where a row's settings come from, in this order:

* the section's own record: bench/quality.py prints ``EXL2 settings (ROWS, from quantization_config): `...```
  under each table, from the written models;
* bench/tables.py's labels, whose settings are its ``RUNS``;
* else the section's command line and date: ``--asym`` where the command gives it, else the converter's default
  on that date (``ASYM_DEFAULTS``); the tables and the norm have had today's defaults since they exist.

Today's defaults are the converter's option declarations (``exl2.convert.options``), with ``--asym auto``
resolved for the section's quantization rows.
"""
from __future__ import annotations

import argparse
import datetime
import re
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import PATH, write_section  # noqa: E402

BPWS = (3.0, 4.0, 5.0)
# The converter's --asym default by date (docs/decisions/0007-asymmetric-calibration.md): 0 before the option
# existed (2026-12-02) and while it was off; auto (None) since 2026-12-03.
ASYM_DEFAULTS = (("0000-00-00", 0.0), ("2026-12-03", None))
DECISION = "docs/decisions/0007-asymmetric-calibration.md"


# ------------------------------------------------------------------------------------------ reading


def sections(text: str) -> dict[str, str]:
    """{name: body} of every marked section, in file order."""
    out = {}
    for m in re.finditer(r"<!-- (\w+):start -->\n(.*?)\n<!-- \1:end -->", text, re.S):
        out[m.group(1)] = m.group(2)
    return out


def date_of(body: str) -> str:
    m = re.search(r"^Date: (\d{4}-\d\d-\d\d)", body, re.M)
    return m.group(1) if m else ""


def command(body: str) -> str:
    m = re.search(r"^Command: `([^`]*)`", body, re.M)
    return m.group(1) if m else ""


def title(body: str) -> str:
    m = re.search(r"^## (.*)$", body, re.M)
    return m.group(1) if m else ""


def tables(body: str) -> list[tuple[str, list[dict], str]]:
    """Every markdown table of a section: (the ### heading above it, rows as {column: cell}, the text between
    this table and the next heading)."""
    out, heading, lines = [], "", body.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("### "):
            heading = line[4:]
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            cols = [c.strip() for c in line.strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(cols, (c.strip() for c in lines[i].strip("|").split("|")))))
                i += 1
            after = []
            while i < len(lines) and not lines[i].startswith(("### ", "|")):
                after.append(lines[i])
                i += 1
            out.append((heading, rows, "\n".join(after)))
            continue
        i += 1
    return out


def variant(heading: str) -> str | None:
    if "jitter" in heading:
        return "jittered copy (seed 0)" if "seed 0" in heading else heading
    return "fixture" if "fixture" in heading else None


# ------------------------------------------------------------------------------------------ settings


def parse_settings(s: str) -> dict:
    """``asym=0.25 tables=exl2 norm=sweep rows=16x512 ...`` -> dict (asym as a float)."""
    d = dict(kv.split("=", 1) for kv in s.split())
    d["asym"] = float(d["asym"])
    return d


def today(rows: int, length: int) -> dict:
    """The converter's defaults for a job with these quantization rows."""
    from exl2.convert.options import BY_NAME, auto_asym

    asym = BY_NAME["asym"].default
    norm = BY_NAME["norm"].default
    return {"asym": auto_asym(rows, length) if asym is None else float(asym),
            "tables": BY_NAME["tables"].default, "norm": "sweep" if norm is None else f"{norm:g}"}


def from_command(cmd: str, date: str, rows: int, length: int) -> dict:
    """A section without a record: --asym from its command line, else the default on its date."""
    args = shlex.split(cmd)
    asym = None
    if "--asym" in args and args.index("--asym") + 1 < len(args):
        v = args[args.index("--asym") + 1]
        asym = "auto" if v == "auto" else float(v)
    if asym is None:
        asym = [a for d, a in ASYM_DEFAULTS if d <= date][-1]
        how = f"not recorded; the converter's default on {date}"
    else:
        how = "not recorded; from the command line"
    if asym in (None, "auto"):
        from exl2.convert.options import auto_asym

        asym = auto_asym(rows, length)
    return {"asym": float(asym), "tables": "exl2", "norm": "sweep", "how": how}


def describe(s: dict) -> str:
    return f"asym {s['asym']:g}, tables {s['tables']}, norm {s['norm']}"


def verdict(s: dict, now: dict) -> str:
    diff = [f"{k} {s[k]:g}" if isinstance(s[k], float) else f"{k} {s[k]}" for k in ("asym", "tables", "norm")
            if s[k] != now[k]]
    return "yes" if not diff else "**no**: " + ", ".join(diff)


# ------------------------------------------------------------------------------------------ rows


def kl_cells(row: dict, ref: dict | None) -> list[str]:
    p, c = float(row["prose KL"]), float(row["code KL"])
    ratio = "" if ref is None else f"{p / float(ref['prose KL']):.2f} / {c / float(ref['code KL']):.2f}"
    return [f"{p:.4f}", f"{c:.4f}", ratio]


def quality_rows(name: str, body: str) -> tuple[dict[str, list[list[str]]], list[str], list[dict]]:
    """Summary rows per variant from the quality sweep; notes; the EXL2 rows' settings (for the text)."""
    date, cmd = date_of(body), command(body)
    m = re.search(r"(\d+) rows x (\d+) tokens", body)
    rows_, length = (int(m.group(1)), int(m.group(2))) if m else (16, 512)
    now = today(rows_, length)
    out, notes, made = {}, [], []
    for heading, rows, after in tables(body):
        v = variant(heading)
        if v is None or "model" not in rows[0]:
            continue
        recorded = {}
        for line in after.splitlines():
            r = re.match(r"EXL2 settings \((.*), from quantization_config\): `([^`]*)`", line)
            if r:
                for scheme in r.group(1).split(", "):
                    recorded[scheme] = {**parse_settings(r.group(2)), "how": "recorded by the section"}
        ref = next((r for r in rows if r["model"].startswith("GPTQ 4-bit g128")), None)
        found = []
        for r in rows:
            model = r["model"]
            exl2 = re.fullmatch(r"EXL2 ([\d.]+) bpw", model)
            if exl2 and float(exl2.group(1)) in BPWS:
                s = recorded.get(model) or from_command(cmd, date, rows_, length)
                found.append(float(exl2.group(1)))
                made.append({**s, "variant": v, "model": model, "today": verdict(s, now), "date": date})
                cells = [model, r["bpw"], describe(s) + f" ({s['how']})", verdict(s, now)]
            elif model.startswith(("RTN 4-bit", "GPTQ 4-bit g128")):
                cells = [model, r["bpw"], "baseline: our GPTQ without asymmetric calibration" if
                         model.startswith("GPTQ") else "baseline: round-to-nearest, no calibration", "-"]
            elif model.startswith(("llama.cpp", "llm-compressor")):
                cells = [model, r["bpw"], "peer, its own tool (head: " + r["head"] + ")", "-"]
            else:
                continue
            out.setdefault(v, []).append(cells + kl_cells(r, ref) + [f"{name} ({date})"])
        missing = [f"{b:g}" for b in BPWS if b not in found]
        if missing:
            notes.append(f"{v}: no EXL2 row at {', '.join(missing)} bpw in section `{name}`.")
    return out, notes, made


def tables_rows(name: str, body: str) -> tuple[dict[str, list[list[str]]], list[dict]]:
    """The option-tables rows made with today's defaults (their settings from bench/tables.py's RUNS)."""
    from bench.tables import RUNS

    date = date_of(body)
    m = re.search(r"quantized\s+with its (\d+) x (\d+) rows", body)
    rows_, length = (int(m.group(1)), int(m.group(2))) if m else (16, 512)
    now = today(rows_, length)
    settings = {label: {"asym": float(asym), "tables": tables_, "norm": "sweep" if norms is None else
                        ",".join(f"{n:g}" for n in norms), "how": "bench/tables.py's RUNS"}
                for label, tables_, norms, asym in RUNS}
    out, made = {}, []
    for heading, rows, _ in tables(body):
        v = variant(heading)
        if v is None or "run" not in rows[0]:
            continue
        ref = next((r for r in rows if r["run"].startswith("GPTQ 4-bit g128")), None)
        for r in rows:
            s = settings.get(r["run"])
            if s is None or verdict(s, now) != "yes":
                continue
            made.append({**s, "variant": v, "model": "EXL2 4 bpw", "today": "yes", "date": date, "ref": ref, "row": r})
            out.setdefault(v, []).append([f"EXL2 4 bpw ({r['run']})", r["bpw"], describe(s) + f" ({s['how']})",
                                          "yes"] + kl_cells(r, ref) + [f"{name} ({date})"])
    return out, made


# ------------------------------------------------------------------------------------------ report


def report(text: str, argv: list[str]) -> str:
    secs = sections(text)
    q_rows, notes, q_made = quality_rows("quality", secs["quality"]) if "quality" in secs else ({}, [], [])
    t_rows, t_made = tables_rows("quality_tables", secs["quality_tables"]) if "quality_tables" in secs else ({}, [])
    m = re.search(r"(\d+) rows x (\d+) tokens", secs.get("quality", ""))
    rows_, length = (int(m.group(1)), int(m.group(2))) if m else (16, 512)
    now = today(rows_, length)
    L = ["## Summary: EXL2 at 3, 4 and 5 bpw against the baselines and peers (bench/summary.py)", "",
         f"Command: `{' '.join(['python bench/summary.py', *argv])}` (reads the sections below; `make bench` runs "
         "it after them)  ", f"Date: {datetime.date.today()}", "",
         "SmolLM2-135M, KL divergence from the FP16 model in nats per token on held-out prose / code, and its ratio "
         "to uniform GPTQ 4-bit g128 of the same section and model copy (lower is better). *Today's defaults*: the "
         f"converter's, at these benchmarks' {rows_} x {length} quantization rows ({describe(now)}; `--asym auto` "
         f"gives {now['asym']:g} below 50,000 tokens, see {DECISION}). The sections below have perplexity, the "
         "other bpw and how each run was made.", ""]
    for v in sorted(set(q_rows) | set(t_rows), key=lambda x: (x != "fixture", x)):
        L += [f"### {v}", "",
              "| model | bpw | made with | today's defaults | prose KL | code KL | / GPTQ g128 | section (date) |",
              "|---|---:|---|---|---:|---:|---:|---|"]
        rows = q_rows.get(v, [])
        exl2 = [r for r in rows if r[0].startswith("EXL2")]
        rest = [r for r in rows if not r[0].startswith("EXL2")]
        L += ["| " + " | ".join(r) + " |" for r in exl2 + t_rows.get(v, []) + rest]
        L.append("")
    stale = [x for x in q_made if x["today"] != "yes"]
    fresh = t_made
    if fresh:
        parts = []
        for x in fresh:
            r, ref = x["row"], x["ref"]
            parts.append(f"{float(r['prose KL']) / float(ref['prose KL']):.2f} / "
                         f"{float(r['code KL']) / float(ref['code KL']):.2f} on the {x['variant']}")
        L.append(f"- With today's defaults, EXL2 at 4.0 bpw reaches {' and '.join(parts)} of uniform GPTQ g128's KL "
                 f"(prose / code; section `quality_tables`, {fresh[0]['date']}).")
    if stale:
        by = sorted({(x["date"], describe(x)) for x in stale})
        L.append("- **Not made with today's defaults**: " + "; ".join(
            f"{', '.join(sorted({x['model'] for x in stale if (x['date'], describe(x)) == b}))} of section "
            f"`quality` ({b[0]}, {b[1]})" for b in by) +
            f". `python bench/quality.py --write` (part of `make bench`) remakes them with today's defaults; the "
            f"difference asymmetric calibration made at 3.0 and 4.0 bpw is in {DECISION}.")
    if not fresh:
        L.append("- No section has an EXL2 row made with today's defaults.")
    L += [f"- {n}" for n in notes]
    L += ["", "### Sections", "", "| section | date | command |", "|---|---|---|"]
    for name, body in secs.items():
        if name == "summary":
            continue
        L.append(f"| [{title(body)}](#{anchor(title(body))}) | {date_of(body)} | `{command(body)}` |")
    return "\n".join(L + [""])


def anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="replace (or add) the summary at the top of BENCHMARKS.md")
    args = ap.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    text = report(PATH.read_text(), argv)
    print(text)
    if args.write:
        print(f"wrote {write_section('summary', text, first=True)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
