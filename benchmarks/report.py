"""The README's benchmark tables, generated from benchmarks/results/*.json.

    python -m benchmarks.report            # rewrite README.md between <!-- report:NAME --> and <!-- /report:NAME -->
    python -m benchmarks.report --check    # exit 1 when README.md and the results disagree (CI runs it)

Each block NAME is rendered from results/<NAME>.json (or <NAME>_quick.json) with a caption
naming the machine, versions, commit, date and load average of the run; a block without a
result file says how to measure it, and a result measured before the current code (its meta
has "stale") says so above its table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from benchmarks._harness import RESULTS, ROOT, fmt_bytes, fmt_s

README = ROOT / "README.md"
MEASURE = "`python -m benchmarks.run_all` on an idle machine, then `python -m benchmarks.report`"


def load(name: str, results: Path) -> Optional[dict]:
    for stem in (name, name + "_quick"):
        if (results / f"{stem}.json").exists():
            return json.loads((results / f"{stem}.json").read_text())
    return None


def caption(doc: dict) -> str:
    m = doc["meta"]
    where = f"{m['device_name']}" + (f", CUDA {m['cuda']}" if m.get("cuda") else f", {m['cpu_count']} cores")
    dirty = " (uncommitted changes)" if m.get("git_dirty") else ""
    load_avg = f"load average {m['loadavg_before'][0]} before, {m['loadavg_after'][0]} after"
    text = (f"`{' '.join(m['argv'])}` -> `benchmarks/results/{doc['benchmark']}_{m['device']}"
            f"{'_quick' if doc['config'].get('quick') else ''}.json`: {where}, torch {m['torch']}, commit "
            f"{m['git_commit'][:10]}{dirty}, {m['date'][:10]}, {load_avg}, OMP_WAIT_POLICY {m['OMP_WAIT_POLICY']}"
            f"{', a quick run' if doc['config'].get('quick') else ''}.")
    if m.get("stale"):
        text = f"**Stale, to be re-measured ({MEASURE}):** {m['stale']}\n\n" + text
    return text


def _by_case(doc: dict) -> Dict[str, Dict[str, dict]]:
    out: Dict[str, Dict[str, dict]] = {}
    for r in doc["results"]:
        out.setdefault(r["case"], {})[r["contender"]] = r
    return out


def _cell(r: Optional[dict], what: Callable[[dict], str] = lambda r: fmt_s(r["time_s"])) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return r["status"] + (" (not installed)" if "No module named" in r.get("error", "") else "")
    return what(r)


def efficient(doc: dict) -> str:
    pairs = ["| case (float32, x needs grad) | rcka-kernels | plain PyTorch | ratio | aten ops | extra memory | value rel. diff |",
             "|---|---|---|---|---|---|---|"]
    multi = ["| case | contender | time | peak memory | aten ops | FLOP/s / dense matmul's |", "|---|---|---|---|---|---|"]
    for case, rs in _by_case(doc).items():
        ours, plain = rs.get("rcka"), rs.get("plain")
        if ours and plain and ours["status"] == plain["status"] == "ok":
            diff = abs(ours["value"] - plain["value"]) / max(abs(plain["value"]), 1e-30)
            diff = "other quantity" if ours.get("other_quantity") else f"{diff:.1e}"
            mem = f"{fmt_bytes(ours['peak_bytes'])} vs {fmt_bytes(plain['peak_bytes'])}"
            pairs.append(f"| {case} | {fmt_s(ours['time_s'])} | {fmt_s(plain['time_s'])} | **{ours['time_s'] / plain['time_s']:.2f}** | "
                         f"{ours['ops']} vs {plain['ops']} | {mem} | {diff} |")
            continue
        mm = rs.get("matmul")
        for name, r in rs.items():
            frac = ""
            if r.get("flops") and mm and mm["status"] == r["status"] == "ok":
                frac = f"{(r['flops'] / r['time_s']) / (mm['flops'] / mm['time_s']):.2f}"
            multi.append(f"| {case} | {name} | {_cell(r)} | {_cell(r, lambda r: fmt_bytes(r['peak_bytes']))} | "
                         f"{_cell(r, lambda r: str(r.get('ops', '')))} | {frac} |")
    return "\n".join(pairs + ([""] + multi if len(multi) > 2 else []))


def naive(doc: dict) -> str:
    fams: Dict[str, List[dict]] = {}
    for r in doc["results"]:
        fams.setdefault(r["family"], []).append(r)
    out = []
    for fam, rs in fams.items():
        names = list(dict.fromkeys(r["contender"] for r in rs))
        cells = {(r["n"], r["contender"]): r for r in rs}
        out += [f"{fam} (time, extra memory):", "", "| n | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for n in sorted({r["n"] for r in rs}):
            row = [_cell(cells.get((n, c)), lambda r: f"{fmt_s(r['time_s'])}, +{fmt_bytes(r['peak_bytes'])}") for c in names]
            out.append(f"| {n} | " + " | ".join(row) + " |")
        errs = {c: max((r["abs_err"] for r in rs if r["contender"] == c and "abs_err" in r), default=None) for c in names}
        out += ["", "Largest |value - float64 reference|: " + ", ".join(f"{c} {e:.1e}" for c, e in errs.items() if e is not None) + ".", ""]
    if doc["config"].get("plot"):
        out.append(f"![linear CKA against the naive code](benchmarks/results/{doc['config']['plot']})")
    return "\n".join(out).rstrip()


def compare(doc: dict) -> str:
    out = []
    for case, rs in _by_case(doc).items():
        any_r = next(iter(rs.values()))
        la, lb = any_r["layers"]
        what = doc["config"].get("describe", {}).get(case, case)
        out += [f"{what}: {any_r['n']:,} samples, batches of {any_r['batch_size']}, {la} x {lb} layers:", "",
                "| contender | time (median) | extra memory | max abs vs its definition (float64) |", "|---|---|---|---|"]
        for name, r in rs.items():
            err = f"{r['max_abs_vs_definition']:.1e}" if "max_abs_vs_definition" in r else ""
            what = name
            if name == "rcka exact" and r.get("layer_names") and r["layers"] != any_r["layers"]:
                what += f" ({', '.join(r['layer_names'][0])} of each)"
            out.append(f"| {what} | {_cell(r)} | {_cell(r, lambda r: fmt_bytes(r['peak_bytes']))} | {err} |")
        ex, fw = rs.get("rcka exact"), rs.get("forward passes only")
        gemm = next((r for r in rs.values() if "madds" in r), None)
        if ex and fw and gemm and ex["status"] == fw["status"] == gemm["status"] == "ok":
            rate = gemm["madds"] / gemm["time_s"]
            floor = ex["floor_madds"] / rate
            out += ["", f"Exact estimator's floor: {ex['floor_madds'] / 1e9:.1f} G multiply-adds at the float32 GEMM rate measured in "
                    f"the same rounds ({rate / 1e9:.1f} G/s) = {fmt_s(floor)}; its time without the forward passes: "
                    f"{fmt_s(ex['time_s'] - fw['time_s'])} (**{(ex['time_s'] - fw['time_s']) / floor:.2f}x** the floor)."]
        out.append("")
    return "\n".join(out).rstrip()


#: README block -> (result file stem, renderer)
BLOCKS = {"efficient-cpu": ("efficient_cpu", efficient), "efficient-cuda": ("efficient_cuda", efficient),
          "naive-cpu": ("naive_cpu", naive), "compare-cpu": ("compare_cpu", compare), "compare-cuda": ("compare_cuda", compare)}


def render(block: str, results: Path = RESULTS) -> str:
    stem, fn = BLOCKS[block]
    doc = load(stem, results)
    if doc is None:
        gpu = "make gpu-check" if stem.endswith("cuda") else ""
        return f"*Not measured yet: {MEASURE}" + (f" (on a GPU: `{gpu}`)" if gpu else "") + ".*"
    return caption(doc) + "\n\n" + fn(doc)


def regenerate(text: str, results: Path = RESULTS) -> str:
    def sub(m: re.Match) -> str:
        if m.group(1) not in BLOCKS:
            raise SystemExit(f"report: README block {m.group(1)!r} has no renderer (known: {', '.join(BLOCKS)})")
        return f"<!-- report:{m.group(1)} -->\n{render(m.group(1), results)}\n<!-- /report:{m.group(1)} -->"

    return re.sub(r"<!-- report:([\w-]+) -->.*?<!-- /report:\1 -->", sub, text, flags=re.S)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md differs from what the results give")
    ap.add_argument("--readme", default=str(README))
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    path = Path(args.readme)
    old = path.read_text()
    new = regenerate(old, Path(args.results))
    if args.check:
        if new != old:
            print(f"{path}: benchmark tables differ from benchmarks/results; run `python -m benchmarks.report`", file=sys.stderr)
            return 1
        print(f"{path}: benchmark tables match the results")
        return 0
    path.write_text(new)
    print(f"{path}: {len(re.findall(r'<!-- report:', new))} blocks regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
