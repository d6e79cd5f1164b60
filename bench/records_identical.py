"""Do the records of a run stay the same across a change of the code? Trains one small sweep with an older commit
and with this checkout, and compares every run folder's records, measurements of the machine aside.

    python bench/records_identical.py --against ce979ab [--keep DIR]

The older commit is unpacked with `git archive` into a temporary folder and run from there (PYTHONPATH), so this
checkout is not touched. Then this checkout resumes the older commit's runs 8 steps further, and those records
must equal a run this checkout trained to the same length from the start: old run folders resume.

Compared: config.json, every metrics.jsonl row and summary.json, as JSON values (so a float must be bit for bit
the same), without what measures the machine rather than the run: any key ending in `_s` (seconds, tokens per
second), the peak memory and its kind, and the versions of the software. A key the older commit did not write
(a setting or a column added since) is listed, not compared; every key both wrote must be equal. Exit 1 on any
difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["--dataset", "mini", "--preset", "tiny", "--tokenizer", "bytes", "--grokfast", "--baseline",
         "--alpha", "0.9", "--gain", "0.1", "--filter", "ema,ma", "--window", "20", "--seed", "0,1",
         "--evals-per-epoch", "40", "--eval-tokens", "8192", "--no-compile"]
STEPS, EXTENDED = 24, 32
MACHINE = {"peak_bytes", "peak_kind", "versions"}


def run(code: Path, out: Path, steps: int, data_cache: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "hlb_gpt", *SWEEP, "--max-steps", str(steps), "--data-cache", str(data_cache),
               "--out", str(out)]
    # From `code`: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH.
    subprocess.run(command, env=env, cwd=code, check=True, stdout=subprocess.DEVNULL)


def without_machine(value):
    if isinstance(value, dict):
        return {k: without_machine(v) for k, v in value.items() if not k.endswith("_s") and k not in MACHINE}
    if isinstance(value, list):
        return [without_machine(v) for v in value]
    return value


def records(folder: Path) -> dict:
    found = {}
    for name in ("config.json", "summary.json"):
        if (folder / name).exists():
            found[name] = without_machine(json.loads((folder / name).read_text()))
    rows = (folder / "metrics.jsonl").read_text().splitlines()
    found["metrics.jsonl"] = [without_machine(json.loads(row)) for row in rows]
    return found


def shared(old, new, added: set[str], where: str = ""):
    """`new` without the keys `old` lacks (collected in `added`), at any depth."""
    if isinstance(old, dict) and isinstance(new, dict):
        added.update(f"{where}{k}" for k in new.keys() - old.keys())
        return {k: shared(old[k], v, added, f"{where}{k}.") for k, v in new.items() if k in old}
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [shared(o, n, added, where) for o, n in zip(old, new)]
    return new


def _pairs(old, new) -> list[tuple[dict, dict]]:
    """A record's dicts side by side: the file itself, or its rows (a row one of them lacks: empty)."""
    if isinstance(old, dict):
        return [(old, new)]
    return [(o, n) for o, n in zip(old + [{}] * (len(new) - len(old)), new + [{}] * (len(old) - len(new)))]


def differences(a: Path, b: Path, added: set[str]) -> list[str]:
    runs_a = sorted(p.name for p in a.iterdir() if (p / "config.json").exists())
    runs_b = sorted(p.name for p in b.iterdir() if (p / "config.json").exists())
    if runs_a != runs_b:
        return [f"run folders differ: {runs_a} vs {runs_b}"]
    found = []
    for name in runs_a:
        ra, rb = records(a / name), records(b / name)
        for file in sorted(set(ra) | set(rb)):
            if file not in ra or file not in rb:
                found.append(f"{name}/{file} is in one of them only")
                continue
            new = shared(ra[file], rb[file], added, f"{file}: ")
            if ra[file] != new:
                keys = sorted({k for old_row, new_row in _pairs(ra[file], new) for k in old_row
                               if old_row[k] != new_row.get(k)})
                found.append(f"{name}/{file} differs in {', '.join(keys)}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="the older commit (anything `git archive` takes)")
    parser.add_argument("--keep", type=Path, help="train into this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.keep or Path(tmp)).resolve()
        old_code = work / "old-code"
        old_code.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.against], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(old_code)], input=archive.stdout, check=True)
        cache = work / "data-cache"
        run(old_code, work / "old", STEPS, cache)
        run(ROOT, work / "new", STEPS, cache)
        added: set[str] = set()
        found = differences(work / "old", work / "new", added)
        print(f"{STEPS} steps, {args.against} vs this checkout: "
              f"{'identical' if not found else '; '.join(found)}"
              + (f" (keys {args.against} did not write, not compared: {', '.join(sorted(added))})" if added else ""))
        run(ROOT, work / "old", EXTENDED, cache)  # this checkout resumes the older commit's runs
        run(ROOT, work / "fresh", EXTENDED, cache)
        extended = differences(work / "old", work / "fresh", set())
        print(f"{args.against}'s runs resumed to {EXTENDED} steps by this checkout vs trained by it from the start: "
              f"{'identical' if not extended else '; '.join(extended)}")
        return 1 if found or extended else 0


if __name__ == "__main__":
    sys.exit(main())
