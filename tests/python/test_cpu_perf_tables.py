"""CPU tests of tools/perf_tables.py: epx_bench JSON in, the markdown tables of docs/performance.md
out (commit, machine and date per table; simulated runs labelled). Needs neither torch nor epx."""
import importlib.util
import json
from pathlib import Path

import pytest

_TOOL = Path(__file__).resolve().parents[2] / "tools" / "perf_tables.py"
_spec = importlib.util.spec_from_file_location("perf_tables", _TOOL)
perf_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(perf_tables)

# What `epx_bench --json` writes (bench/report_json.cpp), cut to a few rows of each workload.
REAL_RUN = r"""{
  "commit": "ee0b767", "date": "2026-11-28T07:00:21Z", "device": "NVIDIA H200", "num_gpus": 4, "world": 4,
  "simulated": false, "sms_per_rank": 132,
  "experts": 256, "topk": 8, "routing": "uniform", "warmup": 5, "iters": 30, "seed": 1,
  "skipped": [],
  "rows": [
    {"workload": "ht", "op": "raw store ceiling", "sms": 24, "tokens": 4096, "hidden": 7168, "median_us": 0, "min_us": 0, "max_us": 0, "logical_gbps": 0, "nvlink_gbps": 304.9, "pct_ceiling": 100, "vs_nccl": -1, "host_us": -1, "note": "peer stores, same SMs", "sim": false},
    {"workload": "ht", "op": "combine bf16", "sms": 24, "tokens": 4096, "hidden": 7168, "median_us": 584.1, "min_us": 580.25, "max_us": 590.5, "logical_gbps": 365.2, "nvlink_gbps": 273.7, "pct_ceiling": 89.8, "vs_nccl": 1.0397, "host_us": 7.7, "note": "", "sim": false},
    {"workload": "ht", "op": "combine w3c8q256", "sms": 24, "tokens": 4096, "hidden": 7168, "median_us": 591.9, "min_us": 590, "max_us": 600, "logical_gbps": 360.4, "nvlink_gbps": 270.1, "pct_ceiling": 88.6, "vs_nccl": null, "host_us": 7.9, "note": "row region: \"these\" rings | do not fit\nhere \\ now", "sim": false},
    {"workload": "ht", "op": "nccl a2a combine bf16", "sms": 0, "tokens": 4096, "hidden": 7168, "median_us": 607.3, "min_us": 600, "max_us": 610, "logical_gbps": 351.2, "nvlink_gbps": 263.2, "pct_ceiling": -1, "vs_nccl": -1, "host_us": -1, "note": "baseline (all SMs NCCL wants)", "sim": false},
    {"workload": "ll", "op": "ll dispatch fp8", "sms": 0, "tokens": 128, "hidden": 7168, "median_us": 32.7, "min_us": 31.3, "max_us": 37.5, "logical_gbps": 226.4, "nvlink_gbps": -1, "pct_ceiling": -1, "vs_nccl": 2.23, "host_us": 4.3, "note": "all SMs while running", "sim": false},
    {"workload": "ll", "op": "ll dispatch fp8 kernel", "sms": 0, "tokens": 128, "hidden": 7168, "median_us": 29.8, "min_us": 29.5, "max_us": 30.1, "logical_gbps": 248.4, "nvlink_gbps": -1, "pct_ceiling": -1, "vs_nccl": -1, "host_us": -1, "note": "kernels only: graph replay", "sim": false}
  ]
}
"""

SIM_RUN = {
    "commit": "unknown", "date": "2026-12-01T10:00:00Z", "device": "NVIDIA H200", "num_gpus": 1, "world": 4,
    "simulated": True, "sms_per_rank": 33, "experts": 256, "topk": 8, "routing": "uniform", "warmup": 5,
    "iters": 30, "seed": 1,
    "skipped": ["nccl a2a dispatch/combine bf16 (ht): a simulated rank has no NCCL communicator"],
    "rows": [
        {"op": "dispatch bf16 cached", "sms": 20, "tokens": 4096, "hidden": 7168, "median_us": 2000.04,
         "min_us": 1990, "max_us": 2100, "logical_gbps": 100.0, "nvlink_gbps": 75.0, "pct_ceiling": 50.0,
         "vs_nccl": -1, "host_us": 9.0, "note": "", "sim": True, "sim_rank": 2},
        {"op": "dispatch bf16 cached", "sms": 20, "tokens": 512, "hidden": 7168, "median_us": 300.0,
         "min_us": 290, "max_us": 310, "logical_gbps": 80.0, "nvlink_gbps": 60.0, "pct_ceiling": 40.0,
         "vs_nccl": -1, "host_us": 8.0, "note": "", "sim": True, "sim_rank": 0},
    ],
}

HT_TABLE = """\
### `ht`, EP4, 4096 tokens/rank, hidden 7168: commit `ee0b767`, 4×NVIDIA H200, 2026-11-28

Rank 0's view. 256 experts, top-8, uniform routing; median of 30 iterations.

| op | SMs | µs | min–max µs | logical GB/s | NVLink GB/s | % ceiling | vs NCCL | host µs/call | note |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| raw store ceiling | 24 |  |  |  | 304.9 | 100.0 |  |  | peer stores, same SMs |
| combine bf16 | 24 | 584.1 | 580.2–590.5 | 365.2 | 273.7 | 89.8 | 1.04 | 7.7 |  |
| combine w3c8q256 | 24 | 591.9 | 590.0–600.0 | 360.4 | 270.1 | 88.6 |  | 7.9 | row region: "these" rings \\| do not fit here \\ now |
| nccl a2a combine bf16 |  | 607.3 | 600.0–610.0 | 351.2 | 263.2 |  |  |  | baseline (all SMs NCCL wants) |
"""

LL_TABLE = """\
### `ll`, EP4, 128 tokens/rank, hidden 7168: commit `ee0b767`, 4×NVIDIA H200, 2026-11-28

Rank 0's view. 256 experts, top-8, uniform routing; median of 30 iterations.

| op | µs | min–max µs | logical GB/s | vs NCCL | host µs/call | note |
| --- | --- | --- | --- | --- | --- | --- |
| ll dispatch fp8 | 32.7 | 31.3–37.5 | 226.4 | 2.23 | 4.3 | all SMs while running |
| ll dispatch fp8 kernel | 29.8 | 29.5–30.1 | 248.4 |  |  | kernels only: graph replay |
"""


def test_real_run_gives_one_table_per_workload_with_commit_machine_and_date():
    out = perf_tables.tables(json.loads(REAL_RUN))
    assert out == HT_TABLE + "\n" + LL_TABLE


def test_simulated_run_is_labelled_and_names_each_rows_rank():
    out = perf_tables.tables(SIM_RUN)
    headings = [line for line in out.splitlines() if line.startswith("###")]
    # One table per shape (4096 and 512 tokens), both simulated, both with the run's commit and date.
    assert headings == [
        "### SIMULATED `ht`, 4 ranks on one GPU, 4096 tokens/rank, hidden 7168: commit `unknown`, 1×NVIDIA H200, 2026-12-01",
        "### SIMULATED `ht`, 4 ranks on one GPU, 512 tokens/rank, hidden 7168: commit `unknown`, 1×NVIDIA H200, 2026-12-01",
    ]
    assert "4 ranks as threads on one NVIDIA H200, 33 SMs each: not NVLink numbers." in out
    # No vs NCCL column (no baseline), no note column (no notes): columns no row fills are left out.
    assert "| op | rank | SMs | µs | min–max µs | logical GB/s | NVLink GB/s | % ceiling | host µs/call |" in out
    assert "| dispatch bf16 cached | 2 | 20 | 2000.0 | 1990.0–2100.0 | 100.0 | 75.0 | 50.0 | 9.0 |" in out
    assert "| dispatch bf16 cached | 0 | 20 | 300.0 |" in out
    assert out.count("Not measured in this run: nccl a2a dispatch/combine bf16 (ht): a simulated rank has no "
                     "NCCL communicator.") == 2


def test_arguments_replace_the_runs_commit_machine_and_date():
    out = perf_tables.tables(SIM_RUN, commit="c90ee46", machine_name="1×H200 (NV18)", date="2026-12-02",
                             level=4)
    assert out.splitlines()[0] == ("#### SIMULATED `ht`, 4 ranks on one GPU, 4096 tokens/rank, hidden 7168: "
                                   "commit `c90ee46`, 1×H200 (NV18), 2026-12-02")


def test_a_file_without_commit_or_date_says_unknown():
    report = json.loads(REAL_RUN)
    for key in ("commit", "date", "num_gpus"):
        del report[key]
    info = perf_tables.run_info(report)
    assert info == {"commit": "unknown", "machine": "4×NVIDIA H200", "date": "unknown date"}
    # Rows without the workload field are told apart by their op names.
    for row in report["rows"]:
        del row["workload"]
    assert [name for (name, _, _), _ in perf_tables.groups(report["rows"])] == ["ht", "ll"]


def test_command_line_reads_files_and_prints_every_table(tmp_path, capsys):
    real, sim = tmp_path / "real.json", tmp_path / "sim.json"
    real.write_text(REAL_RUN, encoding="utf-8")
    sim.write_text(json.dumps(SIM_RUN), encoding="utf-8")
    assert perf_tables.main([str(real), str(sim)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(HT_TABLE + "\n" + LL_TABLE)
    assert out.count("### SIMULATED") == 2


def test_command_line_names_a_broken_file(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('{"rows": [', encoding="utf-8")
    assert perf_tables.main([str(broken)]) == 1
    assert "broken.json" in capsys.readouterr().err


@pytest.mark.parametrize("value, cell", [(None, ""), (-1, ""), (0, ""), (12.345, "12.3")])
def test_missing_numbers_leave_the_cell_blank(value, cell):
    row = {"op": "x", "median_us": value}
    assert perf_tables._cell(row, "µs", "median_us") == cell


# An internode run (`epx_bench --mode internode --sim 8 --node-size 4`): bytes and the IB model per row,
# and a row without numbers (-1).
INTERNODE_RUN = {
    "commit": "abc1234", "date": "2026-12-02T06:30:00Z", "device": "NVIDIA H200", "num_gpus": 1, "world": 8,
    "simulated": True, "sms_per_rank": 16, "experts": 256, "topk": 8, "routing": "uniform", "warmup": 5,
    "iters": 30, "seed": 1, "skipped": [],
    "rows": [
        {"workload": "internode", "op": "internode dispatch bf16 fresh", "sms": 16, "tokens": 4096, "hidden": 7168,
         "median_us": 3000.0, "min_us": 2900, "max_us": 3100, "logical_gbps": 120.0, "nvlink_gbps": 60.0,
         "pct_ceiling": -1, "vs_nccl": -1, "host_us": 40.0, "note": "2 virtual nodes x 4", "sim": True,
         "sim_rank": 6, "node_size": 4, "rdma_bytes": 56_200_000, "nvlink_bytes": 180_000_000,
         "ib_model_us": 1124.0, "rdma_gbps_model": 18.73},
        {"workload": "internode", "op": "internode combine bf16", "sms": 16, "tokens": 4096, "hidden": 7168,
         "median_us": 0, "min_us": 0, "max_us": 0, "logical_gbps": 0, "nvlink_gbps": 0, "pct_ceiling": -1,
         "vs_nccl": -1, "host_us": -1, "note": "no numbers | here", "sim": True,
         "sim_rank": 0, "node_size": 4, "rdma_bytes": -1, "nvlink_bytes": -1, "ib_model_us": -1,
         "rdma_gbps_model": -1},
    ],
}


def test_internode_rows_show_bytes_and_the_ib_model_next_to_deepeps_figures():
    out = perf_tables.tables(INTERNODE_RUN)
    lines = out.splitlines()
    assert lines[0] == ("### SIMULATED `internode`, 8 ranks in 2 virtual nodes of 4 on one GPU, 4096 tokens/rank, "
                        "hidden 7168: commit `abc1234`, 1×NVIDIA H200, 2026-12-02")
    assert "the RDMA leg runs over NVLink, so µs and GB/s are functional numbers" in out
    assert "IB model µs = RDMA bytes / 50 GB/s per GPU" in out
    assert "DeepEP's published internode HT: 43–58 GB/s RDMA per GPU (near the NIC line rate)." in out
    assert ("| op | rank | SMs | µs | min–max µs | logical GB/s | NVLink GB/s | host µs/call | RDMA MB | NVLink MB "
            "| IB model µs | model RDMA GB/s | note |") in lines
    assert ("| internode dispatch bf16 fresh | 6 | 16 | 3000.0 | 2900.0–3100.0 | 120.0 | 60.0 | 40.0 | 56.2 | 180.0 "
            "| 1124.0 | 18.7 | 2 virtual nodes x 4 |") in lines
    assert ("| internode combine bf16 | 0 | 16 |  |  |  |  |  |  |  |  |  | no numbers \\| here |"
            in lines)


def test_ht_rows_have_no_internode_columns():
    out = perf_tables.tables(json.loads(REAL_RUN))
    assert "RDMA MB" not in out and "IB model" not in out and "virtual nodes" not in out


def _overhead_run(label, commit, cached, general, whole=None):
    """What `tests/python/overhead.py --json` writes, cut to three rows (`whole`: None leaves its row out)."""
    rows = [dict(op="dispatch (cached)", level=0, host_us=cached, binding_us=8.0, gpu_us=406.0),
            dict(op="general path", level=1, host_us=general, binding_us=None, gpu_us=406.1)]
    if whole is not None:
        rows.append(dict(op="whole call alone", level=1, host_us=whole, binding_us=None, gpu_us=406.2))
    return dict(tool="overhead", label=label, commit=commit, date="2026-12-02T23:40:00Z", device="NVIDIA H200",
                num_gpus=1, world=2, simulated=True, title="t", tokens=4096, ll_tokens=128, hidden=7168,
                experts=16, topk=8, iters=50, rounds=11, rows=rows)


def test_overhead_runs_make_one_table_with_the_ratio_of_two_labels(tmp_path, capsys):
    runs = [_overhead_run("new|pkg", "346cf88", 12.4, 16.9, 13.1), _overhead_run("45f5a6f", "346cf88", 18.0, 22.6),
            _overhead_run("new|pkg", "346cf88", 14.3, 22.7, 12.6), _overhead_run("45f5a6f", "346cf88", 16.8, None)]
    paths = []
    for i, run in enumerate(runs):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(run))
    assert perf_tables.main([str(p) for p in paths] + ["--machine", "1×H200"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "### Host overhead, SIMULATED EP2 (ranks as threads on one GPU, taking turns on the host): " \
                     "commit `346cf88`, 1×H200, 2026-12-02"
    assert "median of 11 loops of 50 calls" in out[2]
    assert out[4] == "| operation | new\\|pkg µs | 45f5a6f µs | ratio new\\|pkg / 45f5a6f (mean) |"
    # Runs in file order; the ratio of the means; a null figure is "—" and left out of the mean; a row
    # one label lacks is "—" and has no ratio; nested rows are marked.
    assert out[6] == f"| dispatch (cached) | 12.4 / 14.3 | 18.0 / 16.8 | {(12.4 + 14.3) / (18.0 + 16.8):.2f} |"
    assert out[7] == f"| ↳ general path | 16.9 / 22.7 | 22.6 / — | {(16.9 + 22.7) / 2 / 22.6:.2f} |"
    assert out[8] == "| ↳ whole call alone | 13.1 / 12.6 | — |  |"
    assert len(out) == 9


def test_overhead_table_sits_after_the_bench_tables(tmp_path, capsys):
    bench, over = tmp_path / "bench.json", tmp_path / "over.json"
    bench.write_text(REAL_RUN)
    over.write_text(json.dumps(_overhead_run("a", "c1", 1.0, 2.0)))
    assert perf_tables.main([str(over), str(bench)]) == 0
    out = capsys.readouterr().out
    assert out.index("### `ht`, EP4") < out.index("### Host overhead")
    assert "| dispatch (cached) | 1.0 | —" not in out and "| dispatch (cached) | 1.0 |" in out  # one label: no ratio


def test_overhead_nested_rows_stay_under_their_parent_and_each_kind_of_run_has_its_table(tmp_path, capsys):
    def run(world, simulated, cached, combine):
        report = _overhead_run("pkg", "c1", cached, cached + 1)
        report.update(world=world, simulated=simulated)
        report["rows"] += [dict(op="combine", level=0, host_us=combine, binding_us=None, gpu_us=None),
                           dict(op="general path", level=1, host_us=combine + 1, binding_us=None, gpu_us=None)]
        return report

    paths = []
    for i, report in enumerate([run(2, True, 10.0, 20.0), run(1, False, 5.0, 7.0), run(2, True, 12.0, 22.0)]):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(report))
    assert perf_tables.main([str(p) for p in paths]) == 0
    out = capsys.readouterr().out.splitlines()
    headings = [line for line in out if line.startswith("### ")]
    assert len(headings) == 2 and "SIMULATED EP2" in headings[0] and "Host overhead, EP1 (one process alone" in headings[1]
    simulated = out[:out.index(headings[1])]
    assert "| dispatch (cached) | 10.0 / 12.0 |" in simulated
    assert "| ↳ general path | 11.0 / 13.0 |" in simulated  # under the dispatch
    assert "| combine | 20.0 / 22.0 |" in simulated
    assert simulated.index("| ↳ general path | 21.0 / 23.0 |") > simulated.index("| combine | 20.0 / 22.0 |")
    real = out[out.index(headings[1]):]
    assert "| dispatch (cached) | 5.0 |" in real and "| ↳ general path | 8.0 |" in real


def test_performance_md_host_overhead_tables_are_the_tools_output_for_the_kept_runs(capsys):
    """docs/performance.md's generated host-overhead tables are what perf_tables makes of docs/runs/."""
    root = _TOOL.parents[1]
    runs = root / "docs" / "runs" / "e39c0d8-h200"
    files = [runs / f"oh-{mode}-{i}-{pkg}.json" for mode in ("sim", "real") for i in (1, 2) for pkg in ("new", "base")]
    assert perf_tables.main([str(f) for f in files] + ["--machine", "1×H200"]) == 0
    out = capsys.readouterr().out
    assert out.count("### Host overhead") == 2
    assert out in (root / "docs" / "performance.md").read_text(encoding="utf-8")
