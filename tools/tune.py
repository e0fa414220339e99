#!/usr/bin/env python3
"""Regenerates the SM defaults of Config::defaults (src/host/config.cpp) from measurements.

Runs epx_bench's high-throughput workload over a sweep of SM counts on every local GPU and, for
each operation, picks the smallest SM count within `--tolerance` of the best logical GB/s. Prints
the table and the line to put into Config::defaults for this rank count.

    tools/tune.py [--bench build/bench/epx_bench] [--sms 8,12,16,20,24,32] [--tolerance 0.03]
"""
import argparse
import json
import subprocess
import sys
import tempfile


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", default="build/bench/epx_bench")
    ap.add_argument("--sms", default="8,12,16,20,24,32")
    ap.add_argument("--tolerance", type=float, default=0.03)
    ap.add_argument("--iters", default="20")
    args, rest = ap.parse_known_args()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [args.bench, "--mode", "ht", "--sms", args.sms, "--iters", args.iters, "--json", f.name] + rest
        print("tune:", " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            return 1
        try:
            report = json.load(open(f.name))
        except (OSError, ValueError):
            print("tune: the benchmark wrote no JSON (no GPUs?)", file=sys.stderr)
            return 1
    if report.get("simulated"):
        print("tune: a simulated run (--sim) measures no NVLink numbers: nothing to tune from", file=sys.stderr)
        return 1
    best = {}
    for row in report["rows"]:
        if row["sms"] <= 0 or row["op"] == "raw store ceiling":
            continue
        best.setdefault(row["op"], []).append((row["sms"], row["logical_gbps"]))
    picks = []
    for op, points in sorted(best.items()):
        top = max(g for _, g in points)
        sms = min(s for s, g in points if g >= (1 - args.tolerance) * top)
        picks.append(sms)
        print(f"{op:32s} best {top:7.1f} GB/s; smallest SM count within {args.tolerance:.0%}: {sms}")
    world = report["world"]
    print(f"\nConfig::defaults for {world} ranks: c.num_sms = {max(picks)};  // tools/tune.py, {report['device']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
