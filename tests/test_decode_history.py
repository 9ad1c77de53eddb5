"""benchmarks/decode_history.py: the per-run table of the decode benchmark read back from the report."""
import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "decode_history.py"

RUN = """
## Whole-model decode side by side (benchmarks/decode.py) — 2026-12-07 05:30 UTC

Machine: x86_64, 2 cores. Measured bandwidth: copy 31.8 GB/s, triad 31.8 GB/s. 49.9 min.

| method | tokens/s (median) | tokens/s (best) | x own dense (paired) | bytes/token |
|---|---|---|---|---|
| lensbench-compiled fp32 | 20.0 | 21.0 | 1.00 | 544.6 MB |
| lensbench-compiled int8 g128 | 60.0 | 61.0 | 3.00 | 145.7 MB |
| lensbench-compiled int8 sym row | 62.0 | 63.0 | 3.10 | 142.0 MB |
| lensbench-compiled int4 g128 | 80.0 | 90.0 | 4.00 | 78.5 MB |
| llama.cpp F32 | 50.0 | 52.0 | 1.00 | 546.5 MB |
| llama.cpp Q8_0 | 150.0 | 160.0 | 3.20 | 151.4 MB |
| llama.cpp Q4_0 | 170.0 | 180.0 | 3.50 | 98.4 MB |
"""


def _module():
    spec = importlib.util.spec_from_file_location("decode_history", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_each_run_becomes_a_row_with_its_goals():
    mod = _module()
    other = ("\n## KV-cache decode speed (benchmarks/kv.py speed) — 2026-12-03 20:49 UTC\n\n"
             "| lensbench-compiled fp32 | 1 | 1 | 9 |\n")
    runs = mod.runs("# Benchmark record\n" + other + RUN)
    assert len(runs) == 1  # only the decode benchmark's sections
    run = runs[0]
    assert run["when"] == "2026-12-07 05:30" and run["triad"] == 31.8
    assert run["int4"] == (80.0, 4.0) and run["Q8_0"] == (150.0, 3.2)
    row = mod.table(runs).splitlines()[2]
    # int4 gains 4.00x >= Q4_0's 3.50x; the better int8 3.10x < Q8_0's 3.20x; 80 / 170 = 0.47 < 0.5
    assert row.endswith("| 0.47 | yes / no / no |"), row
    assert "80.0 (4.00x)" in row and "| 20.0 |" in row


def test_a_run_without_lensbench_rows_has_no_goals():
    mod = _module()
    text = "\n".join(line for line in RUN.splitlines() if "lensbench" not in line)
    row = mod.table(mod.runs(text)).splitlines()[2]
    assert row.endswith("| - | - |") and "170.0 (3.50x)" in row


def test_an_argument_is_refused_in_one_line():
    run = subprocess.run([sys.executable, str(SCRIPT), "--since", "2026"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "takes no arguments" in run.stderr and len(run.stderr.strip().splitlines()) == 1
