"""Every run of benchmarks/decode.py recorded in reports/BENCHMARKS.md, one line each, against the decode goals.

    python benchmarks/decode_history.py            # the markdown table reports/DECODE_RUNS.md starts with

Reads only the report (no timing). Per run: the measured triad bandwidth; compiled float32, int4 g128 and int8
(g128, symmetric per row) tokens/s with the paired speed-up over the compiled float32 of the same run; llama.cpp's
F32, Q8_0 and Q4_0 the same way; and the three decode goals of that run: int4's gain at least Q4_0's, the better
int8's gain at least Q8_0's, and int4's tokens/s at least half of Q4_0's. Runs before the compiled decoder have
no lensbench columns.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

REPORT = Path(__file__).resolve().parent.parent / "reports" / "BENCHMARKS.md"
HEAD = "## Whole-model decode side by side (benchmarks/decode.py)"
ROWS = {"fp32": "lensbench-compiled fp32", "int4": "lensbench-compiled int4 g128",
        "int8": "lensbench-compiled int8 g128", "int8 row": "lensbench-compiled int8 sym row",
        "F32": "llama.cpp F32", "Q8_0": "llama.cpp Q8_0", "Q4_0": "llama.cpp Q4_0"}


def runs(text: str) -> list[dict]:
    """Each decode run's date, triad and (tokens/s, speed-up) per method of ROWS found in it."""
    out = []
    sections = re.split(r"(?m)^(?=## )", text)
    for sec in sections:
        if not sec.startswith(HEAD):
            continue
        when = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d) UTC", sec.splitlines()[0])
        triad = re.search(r"triad ([\d.]+) GB/s", sec)
        row = {"when": when.group(1) if when else "?", "triad": float(triad.group(1)) if triad else None}
        first = {}  # method -> its cells in the run's first table that has it (the quiet one, before under load)
        for line in sec.splitlines():
            cells = [c.strip() for c in line.split("|")]
            if len(cells) > 4:
                first.setdefault(cells[1], cells)
        for key, name in ROWS.items():
            try:
                row[key] = (float(first[name][2]), float(first[name][4]))
            except (KeyError, ValueError):
                pass
        out.append(row)
    return out


def _cell(row: dict, key: str) -> str:
    v = row.get(key)
    return f"{v[0]:.1f} ({v[1]:.2f}x)" if v else "-"


def _goals(row: dict) -> str:
    if not all(k in row for k in ("int4", "Q4_0", "Q8_0")) or not ("int8" in row or "int8 row" in row):
        return "-"
    int8 = max(row.get("int8", (0, 0))[1], row.get("int8 row", (0, 0))[1])
    met = [row["int4"][1] >= row["Q4_0"][1], int8 >= row["Q8_0"][1], row["int4"][0] >= 0.5 * row["Q4_0"][0]]
    return " / ".join("yes" if m else "no" for m in met)


def table(rows: list[dict]) -> str:
    lines = ["| run (UTC) | triad GB/s | compiled fp32 | int4 g128 | int8 g128 | int8 row | llama.cpp F32 | Q8_0 | "
             "Q4_0 | int4 / Q4_0 tokens/s | goals: int4, int8, 0.5x |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['int4'][0] / r['Q4_0'][0]:.2f}" if "int4" in r and "Q4_0" in r else "-"
        triad = f"{r['triad']:.1f}" if r["triad"] else "-"
        fp32 = f"{r['fp32'][0]:.1f}" if "fp32" in r else "-"
        f32 = f"{r['F32'][0]:.1f}" if "F32" in r else "-"
        lines.append(f"| {r['when']} | {triad} | {fp32} | {_cell(r, 'int4')} | {_cell(r, 'int8')} | "
                     f"{_cell(r, 'int8 row')} | {f32} | {_cell(r, 'Q8_0')} | {_cell(r, 'Q4_0')} | {ratio} | "
                     f"{_goals(r)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args:
        print(f"decode_history.py takes no arguments, got {' '.join(args)}: run it as it is", file=sys.stderr)
        return 2
    print(table(runs(REPORT.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
