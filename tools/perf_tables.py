#!/usr/bin/env python3
"""The markdown tables of docs/performance.md, made from `epx_bench --json` files.

    tools/perf_tables.py run.json [more.json ...] [--commit C] [--machine M] [--date D] [--level 3]

Prints, for each file, one table per workload and shape (`ht`: the high-throughput rows of one
tokens x hidden; `ll`: the low-latency rows; `internode`: the rows across virtual nodes, with their
RDMA and NVLink bytes and the IB model, next to DeepEP's published internode figures), each under
a heading with the run's commit, machine and date. They come from the JSON (`commit`, `date`, `device`, `num_gpus`, `world`); --commit,
--machine and --date replace them (for a build made outside a git checkout, whose commit is
"unknown", or a file written before the JSON carried them). A simulated run (`epx_bench --sim R`,
`"simulated": true`) is labelled SIMULATED in its heading and gets a `rank` column (each row is its
slowest rank's numbers): its timings are not NVLink numbers. Columns no row of a table fills (the
NVLink GB/s of the low-latency rows, say) are left out. Needs only the standard library.

Files of `tests/python/overhead.py --json` (`"tool": "overhead"`) make host-overhead tables, after
the others, one per kind of run (simulated or real ranks, and how many): a column per package label
(its runs' host µs/call in file order, " / " between runs), the ratio of the first label's mean to
the second's where there are two, and the commits, machine and dates of the runs in its heading. A
nested row (the part of the row above it, or that call another way) is its own row under each
parent, so two parents' "general path" rows stay apart.
"""
import argparse
import json
import sys
from typing import Dict, Iterable, List, Optional, Tuple

# (heading, JSON field or None for a computed cell) of every column, in order.
COLUMNS = [
    ("op", "op"),
    ("rank", "sim_rank"),
    ("SMs", "sms"),
    ("µs", "median_us"),
    ("min–max µs", None),
    ("logical GB/s", "logical_gbps"),
    ("NVLink GB/s", "nvlink_gbps"),
    ("% ceiling", "pct_ceiling"),
    ("vs NCCL", "vs_nccl"),
    ("host µs/call", "host_us"),
    ("RDMA MB", "rdma_bytes"),
    ("NVLink MB", "nvlink_bytes"),
    ("IB model µs", "ib_model_us"),
    ("model RDMA GB/s", "rdma_gbps_model"),
    ("note", "note"),
]

# The line rate of the internode rows' IB model and DeepEP's published internode figures
# (docs/benchmarks.md; bench/internode_model.hpp).
IB_GBPS_PER_GPU = 50
DEEPEP_INTERNODE = "DeepEP's published internode HT: 43–58 GB/s RDMA per GPU (near the NIC line rate)"


def _number(value, fmt: str, minimum: float) -> str:
    """`value` formatted, or blank where the row has none (null, or below `minimum`: the bench's -1
    for 'not measured' and 0 for the ceiling row's time)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        return ""
    return fmt.format(value)


def _text(value) -> str:
    """Text for a markdown cell: pipes escaped, line breaks as spaces."""
    return "" if value is None else str(value).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _cell(row: dict, heading: str, field: Optional[str]) -> str:
    if heading == "min–max µs":
        lo, hi = row.get("min_us"), row.get("max_us")
        if _number(hi, "{}", 1e-12) == "" or _number(lo, "{}", 0) == "":
            return ""
        return f"{lo:.1f}–{hi:.1f}"
    value = row.get(field)
    if heading in ("op", "note"):
        return _text(value)
    if heading == "rank":
        return "" if value is None or not row.get("sim") else str(value)
    if heading == "SMs":
        return _number(value, "{:d}", 1) if isinstance(value, int) else ""
    if heading == "% ceiling":
        return _number(value, "{:.1f}", 0)
    if heading == "vs NCCL":
        return _number(value, "{:.2f}", 0)
    if heading == "host µs/call":
        return _number(value, "{:.1f}", 0)
    if heading in ("RDMA MB", "NVLink MB"):
        return _number(value / 1e6, "{:.1f}", 0) if _number(value, "{}", 0) else ""
    if heading in ("IB model µs", "model RDMA GB/s"):
        return _number(value, "{:.1f}", 0)
    return _number(value, "{:.1f}", 1e-12)  # times and GB/s: 0 means the row has none


def workload(row: dict) -> str:
    """'ht', 'll' or 'internode': the row's own field, else from the op's name (low-latency ops
    start 'll ')."""
    return row.get("workload") or ("ll" if str(row.get("op", "")).startswith("ll ") else "ht")


def groups(rows: Iterable[dict]) -> List[Tuple[Tuple[str, int, int], List[dict]]]:
    """The rows by (workload, tokens, hidden), in the order they first appear."""
    out: Dict[Tuple[str, int, int], List[dict]] = {}
    for row in rows:
        out.setdefault((workload(row), row.get("tokens", 0), row.get("hidden", 0)), []).append(row)
    return list(out.items())


def machine(report: dict) -> str:
    """'4×NVIDIA H200': the GPUs of the machine (those the run used where the JSON does not say)."""
    if report.get("machine"):
        return str(report["machine"])
    device = report.get("device") or "unknown GPU"
    num_gpus = report.get("num_gpus") or (1 if report.get("simulated") else report.get("world"))
    return f"{num_gpus}×{device}" if num_gpus else device


def run_info(report: dict, commit: Optional[str] = None, machine_name: Optional[str] = None,
             date: Optional[str] = None) -> Dict[str, str]:
    """Commit, machine and date of a run: the arguments where given, else the JSON's."""
    when = date or report.get("date") or "unknown date"
    if len(when) >= 10 and when[4] == "-" and when[7] == "-":
        when = when[:10]  # the day of an ISO 8601 time
    return {"commit": commit or report.get("commit") or "unknown",
            "machine": machine_name or machine(report),
            "date": when}


def table(rows: List[dict]) -> List[str]:
    """A markdown table of `rows`, without the columns none of them fills."""
    cells = [[_cell(r, heading, field) for heading, field in COLUMNS] for r in rows]
    keep = [i for i, (heading, _) in enumerate(COLUMNS) if heading == "op" or any(c[i] for c in cells)]
    lines = ["| " + " | ".join(COLUMNS[i][0] for i in keep) + " |",
             "| " + " | ".join("---" for _ in keep) + " |"]
    lines += ["| " + " | ".join(c[i] for i in keep) + " |" for c in cells]
    return lines


def tables(report: dict, commit: Optional[str] = None, machine_name: Optional[str] = None,
           date: Optional[str] = None, level: int = 3) -> str:
    """Every table of one report, each under its heading, as markdown."""
    info = run_info(report, commit, machine_name, date)
    simulated = bool(report.get("simulated"))
    world = report.get("world")
    where = f"commit `{info['commit']}`, {info['machine']}, {info['date']}"
    conditions = (f"{report.get('experts')} experts, top-{report.get('topk')}, {report.get('routing')} routing; "
                  f"median of {report.get('iters')} iterations")
    out: List[str] = []
    for (name, tokens, hidden), rows in groups(report.get("rows", [])):
        shape = f"{tokens} tokens/rank, hidden {hidden}"
        node_size = next((r.get("node_size") for r in rows if r.get("node_size")), None)
        nodes = ""
        if node_size:
            nodes = f" in {world // node_size if world else '?'} virtual nodes of {node_size}"
        if simulated:
            title = f"SIMULATED `{name}`, {world} ranks{nodes} on one GPU, {shape}: {where}"
            about = (f"{world} ranks as threads on one {report.get('device')}, {report.get('sms_per_rank')} SMs each: "
                     f"not NVLink numbers. Each row is its slowest rank's (`rank`). {conditions}.")
        else:
            title = f"`{name}`, EP{world}{nodes}, {shape}: {where}"
            about = f"Rank 0's view. {conditions}."
        if node_size:
            about += (" Virtual nodes inside one NVLink domain: the RDMA leg runs over NVLink, so µs and GB/s are "
                      "functional numbers, not a fabric's. RDMA MB: the messages the rank put across nodes; "
                      f"IB model µs = RDMA bytes / {IB_GBPS_PER_GPU} GB/s per GPU; model RDMA GB/s = RDMA bytes / "
                      f"max(µs, IB model µs). {DEEPEP_INTERNODE}.")
        out += ["#" * level + " " + title, "", about, ""] + table(rows) + [""]
        skipped = report.get("skipped") or []
        if skipped:
            out += ["Not measured in this run: " + "; ".join(_text(s) for s in skipped) + ".", ""]
    return "\n".join(out)


def _mean(values: List[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def overhead_kind(report: dict) -> str:
    """The kind of run of an overhead report (simulated ranks, one rank alone, real ranks): a table each."""
    world = report.get("world")
    if report.get("simulated"):
        return f"SIMULATED EP{world} (ranks as threads on one GPU, taking turns on the host)"
    if world == 1:
        return "EP1 (one process alone on one GPU: its ops exchange with itself)"
    return f"EP{world}"


def overhead_table(reports: List[dict], level: int = 3) -> str:
    """The host-overhead table of `tests/python/overhead.py --json` reports (see the module docstring)."""
    labels: List[str] = []
    ops: List[Tuple[str, ...]] = []  # a row's path: its name after those of the rows it is nested under
    runs: Dict[Tuple[str, Tuple[str, ...]], List[Optional[float]]] = {}
    for report in reports:
        label = str(report.get("label") or "unlabelled")
        if label not in labels:
            labels.append(label)
        path: List[str] = []
        for row in report.get("rows", []):
            depth = max(0, int(row.get("level") or 0))
            path = path[:depth] + [""] * (depth - len(path)) + [str(row.get("op", ""))]
            op = tuple(path)
            if op not in ops:
                ops.append(op)
            runs.setdefault((label, op), []).append(row.get("host_us"))
    first = reports[0] if reports else {}
    commits = sorted({str(r.get("commit") or "unknown") for r in reports})
    days = sorted({run_info(r)["date"] for r in reports})
    machines = sorted({machine(r) for r in reports})
    title = (f"Host overhead, {overhead_kind(first)}: commit {', '.join(f'`{c}`' for c in commits)}, {', '.join(machines)}, "
             f"{', '.join(days)}")
    about = (f"`tests/python/overhead.py`: HT {first.get('tokens')} tokens × {first.get('hidden')}, LL "
             f"{first.get('ll_tokens')} tokens, {first.get('experts')} experts, top-{first.get('topk')}; each figure "
             f"the median of {first.get('rounds')} loops of {first.get('iters')} calls (rank 0), runs in file "
             "order. ↳: a part of the row above, or the same call another way.")
    ratio = len(labels) == 2
    head = ["operation"] + [f"{_text(label)} µs" for label in labels] + (
        [f"ratio {_text(labels[0])} / {_text(labels[1])} (mean)"] if ratio else [])
    lines = ["#" * level + " " + title, "", about, "",
             "| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for op in ops:
        cells = ["↳ " * (len(op) - 1) + _text(op[-1])]
        means = []
        for label in labels:
            values = runs.get((label, op), [])
            cells.append(" / ".join(_number(v, "{:.1f}", 0) or "—" for v in values) or "—")
            means.append(_mean([v for v in values if _number(v, "{}", 0)]))
        if ratio:
            cells.append(f"{means[0] / means[1]:.2f}" if means[0] and means[1] else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", help="epx_bench --json (or tests/python/overhead.py --json) files")
    ap.add_argument("--commit", help="the commit of the build that ran (replaces the JSON's)")
    ap.add_argument("--machine", help='the machine, e.g. "4×H200 (NV18)" (replaces the JSON\'s GPUs)')
    ap.add_argument("--date", help="the day of the run, YYYY-MM-DD (replaces the JSON's)")
    ap.add_argument("--level", type=int, default=3, help="markdown heading level of each table (default 3)")
    args = ap.parse_args(argv)
    parts, overhead = [], []
    for path in args.json:
        try:
            with open(path, encoding="utf-8") as f:
                report = json.load(f)
        except (OSError, ValueError) as e:
            print(f"perf_tables: {path}: {e}", file=sys.stderr)
            return 1
        if report.get("tool") == "overhead":
            for key, value in (("commit", args.commit), ("machine", args.machine), ("date", args.date)):
                if value:
                    report[key] = value
            overhead.append(report)
        else:
            parts.append(tables(report, args.commit, args.machine, args.date, args.level))
    kinds: Dict[str, List[dict]] = {}
    for report in overhead:
        kinds.setdefault(overhead_kind(report), []).append(report)
    for group in kinds.values():
        parts.append(overhead_table(group, args.level))
    sys.stdout.write("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
