"""Host CPU time per Python call of the epx operations, next to their GPU kernel time.

    python tests/python/overhead.py [--num-processes N | --sim R] [--tokens 4096] [--hidden 7168] ...
                                    [--json out.json --label NAME --commit C]

Real ranks: one process per GPU (all visible by default; needs 2, or `--num-processes 1`: one rank
alone on GPU 0, whose ops exchange with itself, the host cost of a real rank's call without what
simulated ranks add). Simulated ranks (`--sim R`, and by default when fewer than 2 GPUs are
visible): R ranks as threads of this process on GPU 0 (an epx.SimWorld, see epx/sim.py): each call
also pays what a simulated rank adds (the GIL released around its launch, the event that tracks
its op's stream). For each operation, rank 0 prints:
  - host us/call: time of the Python call (the epx.Buffer method): the median over --rounds loops
    of the mean of each loop of calls that do not wait for the GPU (the fresh dispatch does: it
    includes the count exchange). Real ranks: wall time. Simulated ranks take turns: while one issues its loop, its peers wait in a host
    barrier (no GIL held, no CPU used), so its wall time is its own host cost; the kernels it queued
    wait on the GPU for the peers' turns (bounded by the wait timeout). The host-synced fresh
    dispatch cannot wait for a turn: its ranks run together and it reports the thread's CPU time;
  - binding us/call: the same launch through epx._C alone (outputs preallocated), i.e. without the
    Python layer (argument checks, allocation, stream handling);
  - under the cached dispatch and the combine, the same call through the package's general path (what
    the binding's whole call leaves to the package: here a previous_event without an event), and the
    binding's whole call alone (without the package method's frame);
  - under low_latency_dispatch, the parts of its floor: the binding call with DeepEP's two stream orders,
    the stream orders alone, and making its outputs alone;
  - GPU us/call: kernel (and memset) time per call from the torch profiler. Simulated ranks: every
    rank's kernels on the one GPU over the calls of all ranks (they share its SMs: not NVLink numbers).
With --json, rank 0 also writes the table as JSON ("tool": "overhead", the run's commit, date, device,
the package's --label, and the rows with null for what was not measured), which tools/perf_tables.py
turns into docs/performance.md's host-overhead tables (several runs side by side, the ratio of two labels).
"""
import argparse
import datetime
import json
import math
import os
import socket
import statistics
import sys
import time
from pathlib import Path

# Never create NVLink multicast objects; simulated ranks need more hardware queues and every kernel
# loaded when the context is made (tests/python/conftest.py says why). Read when CUDA starts: set first.
for _key, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                     ("NVSHMEM_DISABLE_NVLS", "1"), ("CUDA_DEVICE_MAX_CONNECTIONS", "32"),
                     ("CUDA_MODULE_LOADING", "EAGER")):
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def _add_build_tree() -> None:
    build = os.environ.get("EPX_BUILD_DIR")
    path = (Path(build) if build else Path(__file__).resolve().parents[2] / "build") / "python"
    if (path / "epx" / "__init__.py").exists():
        sys.path.insert(0, str(path))


_add_build_tree()
import epx  # noqa: E402


class Rank:
    """How one rank waits and measures: real (a process per GPU) or simulated (a SimWorld thread)."""

    def __init__(self, rank: int, world: int, group, simulated: bool) -> None:
        self.rank, self.world, self.group, self.simulated = rank, world, group, simulated
        self.clock = time.thread_time if simulated else time.perf_counter

    def synchronize(self) -> None:
        # A simulated rank waits for its own stream only (a device-wide sync would wait for its peers).
        if self.simulated:
            self.group.synchronize()
        else:
            torch.cuda.synchronize()

    def barrier(self) -> None:
        if self.simulated:
            self.group.barrier()
        else:
            dist.barrier()

    def host_us(self, fn, iters: int, rounds: int, host_synced: bool = False) -> float:
        """The median over `rounds` loops of the mean host time per call of a loop of `iters` calls."""
        return statistics.median(self._loop_us(fn, iters, host_synced) for _ in range(rounds))

    def _loop_us(self, fn, iters: int, host_synced: bool) -> float:
        self.synchronize()
        self.barrier()
        if not self.simulated or host_synced:
            start = self.clock()
            for _ in range(iters):
                fn()
            elapsed = self.clock() - start
        else:
            for turn in range(self.world):
                if turn == self.rank:
                    start = time.perf_counter()
                    for _ in range(iters):
                        fn()
                    elapsed = time.perf_counter() - start
                self.barrier()
        self.synchronize()
        return elapsed / iters * 1e6

    def gpu_us(self, fn, iters: int) -> float:
        """Kernel time per call. Simulated: rank 0 profiles the whole GPU while every rank runs the loop
        (the barriers keep every rank's calls inside the profiled span), divided over all ranks' calls."""
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
        self.synchronize()
        self.barrier()
        if not self.simulated:  # real ranks: no barrier inside the profiled span (NCCL's kernels would count)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(iters):
                    fn()
                torch.cuda.synchronize()
            return sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA) / iters
        # Simulated: the host barriers launch nothing, so they may sit inside the profiled span.
        prof = None
        if self.rank == 0:
            try:
                prof = profile(activities=[ProfilerActivity.CUDA])
                prof.__enter__()
            except Exception as e:  # a rank's peers wait at the barrier: report, do not leave the loop
                print(f"rank {self.rank}: the profiler did not start ({e!r}); GPU us/call left out")
                prof = None
        self.barrier()
        for _ in range(iters):
            fn()
        self.synchronize()
        self.barrier()  # every rank's stream is drained: the profiler's device sync waits for nothing
        result = float("nan")
        if prof is not None:
            try:
                prof.__exit__(None, None, None)
                total = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
                result = total / (iters * self.world)
            except Exception as e:
                print(f"rank {self.rank}: the profiler failed ({e!r}); GPU us/call left out")
        self.barrier()
        return result


def measure_rank(ctx: Rank, device: torch.device, args):
    """Makes the Buffer, measures every operation; returns (title, rows) (rows on every rank)."""
    world, rank = ctx.world, ctx.rank
    E = args.experts_per_rank * world
    N, H, K, T = args.tokens, args.hidden, args.topk, args.ll_tokens
    buffer = epx.Buffer(ctx.group,
                        num_nvl_bytes=epx.Buffer.get_nvl_buffer_size_hint(world * N, H, world, K),
                        num_rdma_bytes=epx.Buffer.get_low_latency_rdma_size_hint(T, H, world, E, num_topk=K),
                        low_latency_mode=True, explicitly_destroy=True)
    rt = buffer.runtime
    stream = buffer.get_comm_stream().cuda_stream
    g = torch.Generator(device="cpu").manual_seed(rank)
    x = torch.randn((N, H), generator=g).to(torch.bfloat16).to(device)
    topk_idx = torch.rand((N, E), generator=g).topk(K, dim=1).indices.to(device)
    topk_weights = torch.rand((N, K), generator=g).to(device)
    ntpr, _, ntpe, itir, _ = buffer.get_dispatch_layout(topk_idx, E)
    layout = dict(num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe)

    def fresh():
        return buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, **layout)

    recv_x, _, _, _, handle, _ = fresh()
    h = handle[-1]

    any_dtype = sum(1 << code for code in epx._tensors._DTYPE_CODES.values())

    def d(t):  # the binding's descriptor of a tensor, as the package makes it
        return epx._aten.describe(t, t.device, any_dtype, 0)

    out_recv = torch.empty_like(recv_x)
    combined = torch.empty_like(x)

    rows = []

    def measure(name, wrapper, raw=None, iters=args.iters, host_synced=False):
        for _ in range(3):
            wrapper()
        rows.append((name, ctx.host_us(wrapper, iters, args.rounds, host_synced),
                     ctx.host_us(raw, iters, args.rounds) if raw else float("nan"), ctx.gpu_us(wrapper, iters)))

    measure("dispatch (fresh, host-synced)", fresh, host_synced=True)
    measure("dispatch (cached)", lambda: buffer.dispatch(x, handle=handle),
            lambda: rt.dispatch(h, x=d(x), recv_x=d(out_recv), stream=stream))
    # The same operation through the package's general path: an EventOverlap without an event is no event
    # (the same stream order), but the binding's whole call leaves any previous_event to the package.
    no_event = epx.EventOverlap()
    measure("  general path", lambda: buffer.dispatch(x, handle=handle, previous_event=no_event))

    def whole_call_row(call, call_args):
        """The binding's whole call alone, when the package under test uses it (it attached its buffer)."""
        try:
            answered = call(*call_args) is not None
        except epx.EpxError:  # a package from before the whole calls: its buffer is not attached
            return
        if not answered:
            raise RuntimeError(f"{call.__name__} declined the default call")
        measure("  whole call alone", lambda: call(*call_args))

    whole_call_row(rt.cached_dispatch_call, (x, handle) + (None,) * 6 + (1, 0, None, None, False, False))
    measure("combine", lambda: buffer.combine(recv_x, handle),
            lambda: rt.combine(h, x=d(recv_x), combined_x=d(combined), stream=stream))
    measure("  general path", lambda: buffer.combine(recv_x, handle, previous_event=no_event))
    whole_call_row(rt.combine_call, (recv_x, handle, None, None, None, None, False, False))  # as Buffer.combine

    x_ll, idx_ll = x[:T].contiguous(), topk_idx[:T].contiguous()
    recv, count, ll_handle, _, _ = buffer.low_latency_dispatch(x_ll, idx_ll, T, E)
    E_loc = E // world
    outs = dict(
        recv_x=torch.empty((E_loc, world * T, H), dtype=torch.float8_e4m3fn, device=device),
        recv_scales=torch.empty((E_loc, H // 128, world * T), dtype=torch.float32, device=device).transpose(1, 2),
        recv_count=torch.empty((E_loc,), dtype=torch.int32, device=device),
        src_info=torch.empty((E_loc, world * T), dtype=torch.int32, device=device),
        layout_range=torch.empty((E_loc, world), dtype=torch.int64, device=device),
        src_topk_slot=torch.empty((E_loc, world * T), dtype=torch.int32, device=device))
    raw_outs = {k: d(t) for k, t in outs.items()}  # the binding's keywords: LowLatencyDispatchOutputs' fields
    measure("low_latency_dispatch (fp8)", lambda: buffer.low_latency_dispatch(x_ll, idx_ll, T, E),
            lambda: rt.low_latency_dispatch(x=d(x_ll), topk_idx=d(idx_ll), num_max_dispatch_tokens_per_rank=T,
                                            num_experts=E, **raw_outs, stream=stream))
    # What the low-latency call's floor is made of, without the package: the binding call with DeepEP's two
    # stream orders (the communication stream waits for the current one, then the reverse), the orders
    # alone, and the six outputs alone (_aten, as the call makes them).
    compute = epx._streams._current_raw_stream(device.index)
    measure("  binding + stream orders", lambda: rt.low_latency_dispatch(
        x=d(x_ll), topk_idx=d(idx_ll), num_max_dispatch_tokens_per_rank=T, num_experts=E, **raw_outs, stream=stream,
        wait_stream=compute, join_stream=compute))
    measure("  stream orders alone", lambda: (rt.stream_wait(stream, compute), rt.stream_wait(compute, stream)))
    plan = epx._ll._ll_plan(world, E, T, H, True, False)
    measure("  outputs alone", lambda: epx._aten.empty_plan(x_ll, plan))
    y = torch.randn((E_loc, world * T, H), generator=g).to(torch.bfloat16).to(device)
    w_ll = topk_weights[:T].contiguous()
    out_ll = torch.empty((T, H), dtype=torch.bfloat16, device=device)
    core = ll_handle[-1]  # the binding's LowLatencyHandle
    measure("low_latency_combine", lambda: buffer.low_latency_combine(y, idx_ll, w_ll, ll_handle),
            lambda: rt.low_latency_combine(core, x=d(y), topk_idx=d(idx_ll), topk_weights=d(w_ll), out=d(out_ll),
                                           stream=stream))
    ctx.synchronize()
    buffer.destroy()
    mode = f"simulated EP{world} (ranks as threads on cuda:{device.index}, taking turns on the host)" \
        if ctx.simulated else f"EP{world}"
    title = (f"epx overhead: {mode}, HT {N} tokens x {H} hidden, LL {T} tokens, {E} experts, top-{K}, "
             f"median of {args.rounds} loops of {args.iters} calls each (rank 0)")
    return title, rows


def print_table(title, rows) -> None:
    print(title)
    print(f"{'operation':34s} {'host us/call':>13s} {'binding us/call':>16s} {'GPU us/call':>12s}")
    for name, host, raw, gpu in rows:
        print(f"{name:34s} {host:13.1f} {raw:16.1f} {gpu:12.1f}")
    sys.stdout.flush()


def write_json(path: str, title: str, rows, args, simulated: bool, world: int) -> None:
    """The table as tools/perf_tables.py reads it; a row's nested level is its name's leading spaces / 2."""
    def number(v):
        return None if v is None or math.isnan(v) else round(v, 3)

    report = dict(
        tool="overhead", label=args.label or os.path.dirname(epx.__file__), commit=args.commit,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        device=torch.cuda.get_device_name(0), num_gpus=1 if simulated else world, world=world,
        simulated=simulated, title=title, tokens=args.tokens, ll_tokens=args.ll_tokens, hidden=args.hidden,
        experts=args.experts_per_rank * world, topk=args.topk, iters=args.iters, rounds=args.rounds,
        torch=torch.__version__,
        rows=[dict(op=name.strip(), level=(len(name) - len(name.lstrip())) // 2, host_us=number(host),
                   binding_us=number(raw), gpu_us=number(gpu)) for name, host, raw, gpu in rows])
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
        f.write("\n")


def worker(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    title, rows = measure_rank(Rank(rank, world, dist.group.WORLD, False), device, args)
    if rank == 0:
        print_table(title, rows)
        if args.json:
            write_json(args.json, title, rows, args, False, world)
    dist.destroy_process_group()


def sim_rank(group, args):
    return measure_rank(Rank(group.rank(), group.size(), group, True), torch.device("cuda", group.device), args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-processes", type=int, default=0,
                        help="real ranks, one process per GPU (1: one rank alone on GPU 0)")
    parser.add_argument("--sim", type=int, default=0, metavar="R",
                        help="R simulated ranks on GPU 0 (default: 2 when fewer than 2 GPUs are visible)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ll-tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts-per-rank", type=int, default=8)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5, help="loops of --iters calls per figure (their median)")
    parser.add_argument("--json", help="also write the table as JSON here (rank 0), for tools/perf_tables.py")
    parser.add_argument("--label", help="the package measured, as the JSON names it (default: its directory)")
    parser.add_argument("--commit", default="unknown", help="the commit of the tree measured, for the JSON")
    args = parser.parse_args()
    num_gpus = torch.cuda.device_count()
    if args.sim and args.num_processes:
        print("--sim and --num-processes: choose one")
        return 2
    if args.sim or (not args.num_processes and num_gpus < 2):
        if num_gpus < 1:
            print("needs a GPU (simulated ranks run on GPU 0)")
            return 2
        world = args.sim or 2
        if world < 2 or world > epx.SimWorld.max_world(0):
            print(f"--sim: 2 to {epx.SimWorld.max_world(0)} simulated ranks, asked for {world}")
            return 2
        with epx.SimWorld(world) as sim:
            title, rows = sim.run(sim_rank, args)[0]
        print_table(title, rows)
        if args.json:
            write_json(args.json, title, rows, args, True, world)
        return 0
    world = args.num_processes or num_gpus
    if world < 1 or world > num_gpus:
        print(f"needs 1 to {num_gpus} GPUs, asked for {world}")
        return 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(world, port, args), nprocs=world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
