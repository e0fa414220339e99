"""Shared by the Python tests: pools of ranks (real: one process per GPU; simulated: threads of
this process on one GPU), seeded inputs that every rank can regenerate for every other rank, and
pure-torch references of every epx operation.

The references run on the CPU with elementwise IEEE operations only (no reductions whose order
could differ), so high-throughput results and fp8 casts compare bit for bit.
"""
import importlib
import os
import queue
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

# Never create NVLink multicast objects on the shared GPU hosts; bound every device wait.
# Simulated ranks: more hardware queues (see conftest.py).
for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1"),
               ("EPX_TIMEOUT_S", "60"), ("CUDA_DEVICE_MAX_CONNECTIONS", "32"),
               ("CUDA_MODULE_LOADING", "EAGER")):
    os.environ.setdefault(_k, _v)


def fresh_seed() -> int:
    """EPX_TEST_SEED if set, else a fresh one; the tests print it so a failure can be replayed."""
    env = os.environ.get("EPX_TEST_SEED")
    return int(env) if env else int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def num_gpus() -> int:
    try:
        return torch.cuda.device_count()
    except Exception:  # no driver
        return 0


_SIM_MAX_WORLD = None


def sim_max_world() -> int:
    """The most simulated ranks GPU 0 holds (0 without a GPU)."""
    global _SIM_MAX_WORLD
    if _SIM_MAX_WORLD is None:
        import epx
        _SIM_MAX_WORLD = epx.SimWorld.max_world(0) if num_gpus() > 0 else 0
    return _SIM_MAX_WORLD


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- Rank processes ---------------------------------------------------------------------------------

@dataclass
class RankContext:
    """What a test function gets on each rank: `fn(ctx, *args)`. `group` is a torch.distributed
    group (real ranks) or an epx.SimGroup (simulated ranks, `simulated` True): test code that
    waits for the GPU or captures a graph goes through `synchronize()`, `graph()` and `barrier()`,
    which keep the rules of a SimWorld (epx/sim.py) in both modes."""
    rank: int
    world: int
    group: Any
    device: torch.device
    buffers: Dict[tuple, Any] = field(default_factory=dict)
    simulated: bool = False

    def synchronize(self) -> None:
        """Waits for this rank's work: the device (real) or the rank's current stream (simulated: a
        device-wide sync would wait for the peers' kernels, which may wait for this rank)."""
        if self.simulated:
            self.group.synchronize()
        else:
            torch.cuda.synchronize()

    def graph(self, cuda_graph: "torch.cuda.CUDAGraph"):
        """torch.cuda.graph(cuda_graph) for this rank; simulated: the SimGroup's capture (a stream of
        the rank's own, thread-local mode, no device-wide sync)."""
        return self.group.graph(cuda_graph) if self.simulated else torch.cuda.graph(cuda_graph)

    def barrier(self) -> None:
        """Host barrier over the ranks."""
        if self.simulated:
            self.group.barrier()
        else:
            import torch.distributed as dist
            dist.barrier(group=self.group, device_ids=[self.device.index])

    def buffer(self, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False):
        """A cached epx.Buffer (creation is collective: every rank asks for the same ones in order)."""
        import epx
        key = (num_nvl_bytes, num_rdma_bytes, low_latency_mode)
        if key not in self.buffers:
            self.buffers[key] = epx.Buffer(self.group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=low_latency_mode,
                                           explicitly_destroy=True)
        return self.buffers[key]


def _worker_main(rank: int, world: int, port: int, sys_path: List[str], inbox, outbox) -> None:
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    try:
        import torch.distributed as dist
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
        ctx = RankContext(rank, world, dist.group.WORLD, device)
        outbox.put((rank, "ready", None))
    except BaseException:
        outbox.put((rank, "error", traceback.format_exc()))
        return
    while True:
        item = inbox.get()
        if item is None:
            break
        module, name, args = item
        try:
            fn = getattr(importlib.import_module(module), name)
            result = fn(ctx, *args)
            torch.cuda.synchronize()
            outbox.put((rank, "ok", result))
        except BaseException:
            outbox.put((rank, "error", traceback.format_exc()))
    try:
        # In creation order, on every rank alike (freeing is collective); a Buffer made without
        # explicitly_destroy (as some clients make theirs) is freed when the last reference goes.
        for b in list(ctx.buffers.values()):
            if b.explicitly_destroy and b.runtime is not None:
                b.destroy()
        ctx.buffers.clear()
        dist.destroy_process_group()
    except BaseException:
        pass


class RankPool:
    """`world` processes (rank r on GPU r) with torch.distributed (NCCL) initialized, running test
    functions on request. A failure anywhere marks the pool broken (the caller starts a new one)."""

    def __init__(self, world: int, start_timeout_s: float = 240.0) -> None:
        import torch.multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.world = world
        self.broken = False
        self.inboxes = [ctx.Queue() for _ in range(world)]
        self.outbox = ctx.Queue()
        port = free_port()
        self.procs = [ctx.Process(target=_worker_main, args=(r, world, port, list(sys.path), self.inboxes[r], self.outbox),
                                  daemon=True) for r in range(world)]
        for p in self.procs:
            p.start()
        self._collect("start", start_timeout_s)

    def _collect(self, what: str, timeout_s: float) -> List[Any]:
        results: Dict[int, Any] = {}
        errors: Dict[int, str] = {}
        deadline = time.monotonic() + timeout_s
        while len(results) + len(errors) < self.world:
            try:
                rank, status, payload = self.outbox.get(timeout=1.0)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(self.procs) if not p.is_alive()]
                now = time.monotonic()
                if dead and not errors:
                    errors.update({r: f"process exited with code {code}" for r, code in dead if r not in results})
                    deadline = min(deadline, now + 20)  # give the others a moment to report
                if now > deadline:
                    break
                continue
            if status == "error":
                errors[rank] = payload
                deadline = min(deadline, time.monotonic() + float(os.environ.get("EPX_TIMEOUT_S", "60")) + 20)
            else:
                results[rank] = payload
        if errors or len(results) < self.world:
            self.broken = True
            missing = [r for r in range(self.world) if r not in results and r not in errors]
            lines = [f"{what} failed on {self.world} ranks:"]
            for r in sorted(errors):
                lines.append(f"--- rank {r}:\n{errors[r]}")
            if missing:
                lines.append(f"--- ranks {missing}: no answer within the timeout")
            self.close()
            raise AssertionError("\n".join(lines))
        return [results[r] for r in range(self.world)]

    def run(self, fn: Callable, *args, timeout_s: float = 300.0) -> List[Any]:
        """Runs `fn(ctx, *args)` on every rank; returns the results by rank, or raises with every
        failing rank's traceback."""
        if self.broken:
            raise AssertionError("rank pool is broken by an earlier failure")
        for q in self.inboxes:
            q.put((fn.__module__, fn.__qualname__, args))
        return self._collect(f"{fn.__module__}.{fn.__qualname__}{args}", timeout_s)

    def close(self) -> None:
        for q in self.inboxes:
            try:
                q.put(None)
            except Exception:
                pass
        deadline = time.monotonic() + (5 if self.broken else 60)
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(5)


def _sim_make_context(group, pool: "SimRankPool") -> None:
    pool.contexts[group.rank()] = RankContext(group.rank(), group.size(), group, torch.device("cuda", group.device),
                                              simulated=True)


def _sim_call(group, pool: "SimRankPool", fn: Callable, args: tuple) -> Any:
    return fn(pool.contexts[group.rank()], *args)


class SimRankPool:
    """`world` simulated ranks (threads of this process on GPU 0, an epx.SimWorld) running test
    functions on request, with the interface of RankPool. A failure marks the pool broken."""

    def __init__(self, world: int) -> None:
        import epx
        self.world = world
        self.broken = False
        self.contexts: List[Optional[RankContext]] = [None] * world
        self.sim = epx.SimWorld(world, device=0)
        self.sim.run(_sim_make_context, self)

    def run(self, fn: Callable, *args, timeout_s: float = 300.0) -> List[Any]:
        """Runs `fn(ctx, *args)` on every rank; returns the results by rank, or raises with every
        failing rank's traceback (the first failure first)."""
        import epx
        if self.broken:
            raise AssertionError("simulated rank pool is broken by an earlier failure")
        try:
            return self.sim.run(_sim_call, self, fn, args, timeout_s=timeout_s)
        except epx.SimRankError as e:
            self.broken = True
            self.close()
            raise AssertionError(f"{fn.__module__}.{fn.__qualname__}{args}: {e}") from None

    def close(self) -> None:
        self.sim.close()  # frees the ranks' Buffers on their threads


# ---- Seeded inputs ----------------------------------------------------------------------------------

def generator(seed: int, rank: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + rank * 7919 + salt) & 0x7FFFFFFFFFFFFFFF)


@dataclass
class RankInput:
    x: torch.Tensor             # [N, H] bf16 (CPU)
    topk_idx: torch.Tensor      # [N, K] int64, -1 = none, distinct experts per token
    topk_weights: torch.Tensor  # [N, K] float32


def make_input(seed: int, rank: int, num_tokens: int, hidden: int, num_experts: int, num_topk: int,
               drop: float = 0.1, salt: int = 0) -> RankInput:
    """Rank `rank`'s inputs; any rank can make any rank's (CPU, deterministic)."""
    g = generator(seed, rank, salt)
    scores = torch.rand((num_tokens, num_experts), generator=g)
    topk_idx = scores.topk(num_topk, dim=1).indices.to(torch.int64)
    topk_idx[torch.rand((num_tokens, num_topk), generator=g) < drop] = -1
    topk_weights = torch.rand((num_tokens, num_topk), generator=g) + 0.25
    x = (torch.randn((num_tokens, hidden), generator=g) * (1 + rank)).to(torch.bfloat16)
    return RankInput(x, topk_idx, topk_weights)


def token_counts(seed: int, world: int, lo: int, hi: int, salt: int = 0) -> List[int]:
    g = torch.Generator().manual_seed(seed * 31 + 17 + salt)
    return [int(v) for v in torch.randint(lo, hi + 1, (world,), generator=g)]


# ---- fp8 helpers (same math as the core's reference model) ----------------------------------------

FP8_MAX = 448.0


def per_token_cast_to_fp8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[N, H] -> (fp8 [N, H], f32 scales [N, ceil(H/128)]); x ~= q * scale per 128 channels."""
    n, h = x.shape
    pad = (-h) % 128
    xf = torch.nn.functional.pad(x.float(), (0, pad)).view(n, (h + pad) // 128, 128)
    amax = xf.abs().amax(dim=2).clamp_min(1e-4)
    scale_inv = amax / torch.full_like(amax, FP8_MAX)
    q = (xf * (torch.full_like(amax, FP8_MAX) / amax).unsqueeze(2)).to(torch.float8_e4m3fn)
    return q.view(n, h + pad)[:, :h].contiguous(), scale_inv


def fp8_dequant(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp8 [N, H] with f32 scales [N, H/128] -> f32 [N, H] (elementwise, exact)."""
    n, h = q.shape
    return (q.float().view(n, h // 128, 128) * scales.float().unsqueeze(2)).view(n, h)


def ceil_log2_exact(v: torch.Tensor) -> torch.Tensor:
    """ceil(log2(v)) for positive float32, exactly (from the float's bits, not log2)."""
    mantissa, exponent = torch.frexp(v)
    return torch.where(mantissa == 0.5, exponent - 1, exponent).to(torch.int32)


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2^e as float32, exactly (built from the bits; e in the normal range)."""
    if exponent.numel():
        assert int(exponent.min()) >= -126 and int(exponent.max()) <= 127, "exponent outside the normal float range"
    return ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)


def ll_quantize(x: torch.Tensor, round_scale: bool) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The low-latency cast of bf16 [N, H] (H % 128 == 0): (fp8 [N, H], scale_inv f32 [N, H/128],
    exponents int32 [N, H/128] or None)."""
    n, h = x.shape
    xf = x.float().view(n, h // 128, 128)
    amax = xf.abs().amax(dim=2).clamp_min(1e-4)
    if round_scale:
        exponent = ceil_log2_exact(amax / torch.full_like(amax, FP8_MAX))
        scale_inv = pow2(exponent)
        scale = pow2(-exponent)
    else:
        exponent = None
        scale_inv = amax / torch.full_like(amax, FP8_MAX)
        scale = torch.full_like(amax, FP8_MAX) / amax
    q = (xf * scale.unsqueeze(2)).to(torch.float8_e4m3fn).view(n, h)
    return q, scale_inv, exponent


def pack_ue8m0(exponent: torch.Tensor) -> torch.Tensor:
    """int32 exponents [N, G] -> int32 [N, ceil(G/4)]: byte k (little-endian) = exponent + 127."""
    n, g = exponent.shape
    pad = (-g) % 4
    b = torch.nn.functional.pad((exponent + 127).to(torch.int64), (0, pad)).view(n, (g + pad) // 4, 4)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)


# ---- References: high-throughput ------------------------------------------------------------------

def ref_layout(topk_idx: torch.Tensor, num_experts: int, world: int):
    num_tokens = topk_idx.size(0)
    experts_per_rank = num_experts // world
    rank_of = torch.where(topk_idx >= 0, topk_idx // experts_per_rank, torch.full_like(topk_idx, -1))
    is_token_in_rank = torch.zeros((num_tokens, world), dtype=torch.bool)
    for r in range(world):
        is_token_in_rank[:, r] = (rank_of == r).any(dim=1)
    num_tokens_per_rank = is_token_in_rank.sum(dim=0).to(torch.int32)
    valid = topk_idx[topk_idx >= 0]
    num_tokens_per_expert = torch.bincount(valid, minlength=num_experts).to(torch.int32)
    return num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank


@dataclass
class RefDispatch:
    x: torch.Tensor                  # [rows, H] (any dtype, rows of the sources)
    scales: Optional[torch.Tensor]   # [rows, S] or None
    topk_idx: torch.Tensor           # [rows, K] local ids, -1 elsewhere
    topk_weights: torch.Tensor       # [rows, K], 0 where -1
    src_rank: torch.Tensor           # [rows]
    src_idx: torch.Tensor            # [rows] int32
    num_recv_tokens_per_expert: List[int]
    rank_prefix_matrix: torch.Tensor  # [R, R] int32


def ref_dispatch(xs: Sequence[torch.Tensor], scales: Optional[Sequence[torch.Tensor]],
                 topk: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], me: int, num_experts: int,
                 expert_alignment: int = 1) -> RefDispatch:
    """What rank `me` receives: each token once per destination rank, ordered by (source, token)."""
    world = len(xs)
    epr = num_experts // world
    rows_x, rows_s, rows_i, rows_w, rows_r, rows_t = [], [], [], [], [], []
    counts = torch.zeros((world, world), dtype=torch.int64)
    for s in range(world):
        rank_of = torch.where(topk[s] >= 0, topk[s] // epr, torch.full_like(topk[s], -1))
        for r in range(world):
            counts[s, r] = (rank_of == r).any(dim=1).sum()
        tokens = (rank_of == me).any(dim=1).nonzero().flatten()
        local = torch.where(rank_of[tokens] == me, topk[s][tokens] - me * epr, torch.full_like(topk[s][tokens], -1))
        rows_x.append(xs[s][tokens])
        if scales is not None:
            rows_s.append(scales[s][tokens])
        rows_i.append(local)
        rows_w.append(torch.where(local >= 0, weights[s][tokens], torch.zeros_like(weights[s][tokens])))
        rows_r.append(torch.full((tokens.numel(),), s, dtype=torch.int64))
        rows_t.append(tokens.to(torch.int32))
    per_expert = torch.zeros(epr, dtype=torch.int64)
    for s in range(world):
        valid = topk[s][(topk[s] >= me * epr) & (topk[s] < (me + 1) * epr)] - me * epr
        per_expert += torch.bincount(valid, minlength=epr)
    aligned = [int((c + expert_alignment - 1) // expert_alignment * expert_alignment) for c in per_expert.tolist()]
    return RefDispatch(torch.cat(rows_x), torch.cat(rows_s) if scales is not None else None, torch.cat(rows_i),
                       torch.cat(rows_w), torch.cat(rows_r), torch.cat(rows_t), aligned,
                       counts.cumsum(dim=0).to(torch.int32))


def ref_combine(dispatched: Sequence[RefDispatch], ys: Sequence[torch.Tensor], me: int, num_tokens: int,
                weights: Optional[Sequence[torch.Tensor]] = None, bias_0: Optional[torch.Tensor] = None,
                bias_1: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """combined[t] = bf16(((sum over ranks r ascending of y_r[row of (me, t)]) + bias_0) + bias_1), fp32;
    weights likewise without biases. dispatched[r] / ys[r]: rank r's dispatch and combine input."""
    hidden = ys[0].size(1)
    acc = torch.zeros((num_tokens, hidden), dtype=torch.float32)
    acc_w = None if weights is None else torch.zeros((num_tokens, weights[0].size(1)), dtype=torch.float32)
    for r, d in enumerate(dispatched):
        rows = (d.src_rank == me).nonzero().flatten()
        tokens = d.src_idx[rows].long()
        acc[tokens] = acc[tokens] + ys[r][rows].float()
        if acc_w is not None:
            acc_w[tokens] = acc_w[tokens] + weights[r][rows].float()
    if bias_0 is not None:
        acc = acc + bias_0.float()
    if bias_1 is not None:
        acc = acc + bias_1.float()
    return acc.to(torch.bfloat16), acc_w


def ref_combine_internode(dispatched, ys, me: int, num_tokens: int, node_size: int, weights=None, bias_0=None,
                          bias_1=None):
    """The two-level combine of docs/protocol.md for owner `me`: per node m, P_m = the fp32 sum of the
    rows of (me, t) on m's ranks, local index ascending; a remote P_m is rounded to bf16 once; the
    owner adds them for m ascending (only nodes that received t), then bias_0, bias_1, and rounds.
    Weights: the same order, fp32 throughout."""
    world = len(dispatched)
    my_node = me // node_size
    acc = torch.zeros((num_tokens, ys[0].size(1)), dtype=torch.float32)
    acc_w = None if weights is None else torch.zeros((num_tokens, weights[0].size(1)), dtype=torch.float32)
    for m in range(world // node_size):
        part = torch.zeros_like(acc)
        part_w = None if acc_w is None else torch.zeros_like(acc_w)
        seen = torch.zeros(num_tokens, dtype=torch.bool)
        for r in range(m * node_size, (m + 1) * node_size):
            d = dispatched[r]
            rows = (d.src_rank == me).nonzero().flatten()
            tokens = d.src_idx[rows].long()
            part[tokens] = part[tokens] + ys[r][rows].float()
            if part_w is not None:
                part_w[tokens] = part_w[tokens] + weights[r][rows].float()
            seen[tokens] = True
        if m != my_node:
            part = part.to(torch.bfloat16).float()
        acc[seen] = acc[seen] + part[seen]
        if acc_w is not None:
            acc_w[seen] = acc_w[seen] + part_w[seen]
    if bias_0 is not None:
        acc = acc + bias_0.float()
    if bias_1 is not None:
        acc = acc + bias_1.float()
    return acc.to(torch.bfloat16), acc_w


# ---- References: low-latency ----------------------------------------------------------------------

@dataclass
class RefLowLatency:
    recv_count: torch.Tensor           # [E_loc] int32
    rows: List[List[Tuple[int, int, int]]]  # per local expert: (source rank, token, k) in row order
    layout_range: torch.Tensor         # [E_loc, R] int64


def ref_ll_dispatch(topk: Sequence[torch.Tensor], me: int, num_experts: int) -> RefLowLatency:
    world = len(topk)
    epr = num_experts // world
    rows: List[List[Tuple[int, int, int]]] = []
    layout = torch.zeros((epr, world), dtype=torch.int64)
    for j in range(epr):
        e = me * epr + j
        expert_rows = []
        for s in range(world):
            first = len(expert_rows)
            hits = (topk[s] == e).nonzero().tolist()  # (t, k), t ascending
            expert_rows += [(s, t, k) for t, k in hits]
            layout[j, s] = (first << 32) | (len(expert_rows) - first)
        rows.append(expert_rows)
    count = torch.tensor([len(r) for r in rows], dtype=torch.int32)
    return RefLowLatency(count, rows, layout)


def fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 fma(a, b, c) = a * b + c rounded once to float32 (the GPU's __fmaf_rn), elementwise on
    the CPU, for a product a * b that is exact in float64 (a float32 times a bfloat16: 24 + 8
    significant bits). The sum is rounded to odd in float64 (TwoSum gives its exact error; an
    inexact sum with an even last bit steps one ulp toward the exact value); rounding that to
    float32 is then the correctly rounded sum (53 >= 24 + 2 bits), which a plain float64 sum
    would not always be (two roundings)."""
    p = a.double() * b.double()
    cd = c.double()
    s = p + cd
    bv = s - p
    err = (p - (s - bv)) + (cd - bv)
    even = (s.view(torch.int64) & 1) == 0
    toward = torch.where(err > 0, torch.full_like(s, float("inf")), torch.full_like(s, float("-inf")))
    s = torch.where((err != 0) & even, torch.nextafter(s, toward), s)
    return s.to(torch.float32)


def ref_ll_combine(y: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """The low-latency combine of one rank, bit for bit: out[t] = bf16(acc), acc = 0 then, for k
    ascending over the slots with topk_idx[t, k] >= 0, acc = fma_f32(topk_weights[t, k], y[t, k], acc).
    y: [N, K, H] bf16, the expert output for token t's slot k (any value where the id is -1)."""
    n, k_num, hidden = y.shape
    acc = torch.zeros((n, hidden), dtype=torch.float32)
    for k in range(k_num):
        w = topk_weights[:, k].float().view(n, 1).expand(n, hidden)
        summed = fma_f32(w, y[:, k].float(), acc)
        acc = torch.where((topk_idx[:, k] >= 0).view(n, 1), summed, acc)
    return acc.to(torch.bfloat16)


def expert_scale(e: int) -> float:
    """The toy expert e multiplies by this (exact in bf16 and f32)."""
    return 1.0 + (e % 7) / 8.0


# ---- Comparison -----------------------------------------------------------------------------------

def expect_error(kind: str, *names: str):
    """Context manager: an epx.EpxError of `kind` whose message names each of `names`; the error is
    kept as `.error`."""
    import epx

    class _Ctx:
        def __enter__(self):
            return self

        def __exit__(self, exc_type, exc, tb):
            assert exc_type is not None, f"no EpxError({kind}) raised"
            assert issubclass(exc_type, epx.EpxError), f"{exc_type.__name__}: {exc}"
            assert exc.kind == kind, f"kind {exc.kind} != {kind}: {exc}"
            for n in names:
                assert n in str(exc), f"message does not name {n!r}: {exc}"
            self.error = exc
            return True
    return _Ctx()


def host(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of `t`, taken after the current stream is done (torch releases the GIL while it
    waits). CUDA serializes device-to-host copies into pageable memory across streams: a simulated
    rank's copy queued behind its kernel that waits for a peer would hold up every other rank's copy,
    the peer's included (a stall until the timeout; seen on an H200). Every test reads device
    tensors through this."""
    if t.is_cuda:
        torch.cuda.current_stream(t.device).synchronize()
    return t.detach().cpu()


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str, rows=None) -> None:
    """Bitwise equality (dtype and shape too); on failure names the first differing rows. `rows`: a
    RefDispatch whose rows these are (a received row is then named by its source rank and token) or a
    callable row -> name."""
    actual = host(actual)
    expected = host(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != expected {expected.dtype}"
    if actual.dtype.is_floating_point and actual.element_size() in (1, 2, 4, 8):
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
        a, b = actual.contiguous().view(bits), expected.contiguous().view(bits)
    else:
        a, b = actual, expected
    diff = a != b
    if diff.any():
        where = diff.nonzero()
        first = where[:5].tolist()
        detail = ""
        if actual.dtype.is_floating_point:
            d = (actual.float() - expected.float()).abs()
            detail = f", max |diff| {d.nan_to_num(float('inf')).max().item():.4g}"
        named = ""
        if rows is not None and actual.dim() >= 1:
            name = rows if callable(rows) else \
                (lambda i: f"row {i} = source rank {int(rows.src_rank[i])} token {int(rows.src_idx[i])}")
            named = "; " + ", ".join(dict.fromkeys(name(i[0]) for i in first))
        raise AssertionError(f"{what}: {int(diff.sum())} of {diff.numel()} elements differ{detail}; first at "
                             f"{first}: got {[actual[tuple(i)].item() for i in first]}, expected "
                             f"{[expected[tuple(i)].item() for i in first]}{named}")


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - cosine-like similarity (0 for identical), as DeepEP's tests use."""
    x, y = x.double(), y.double()
    denominator = (x * x + y * y).sum()
    if denominator == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denominator)


# ---- The binding's signatures (for the CPU tests' stand-ins of the C++ buffer) ----------------------

def binding_signature(fn) -> Tuple[Tuple[str, ...], Tuple[str, ...], frozenset]:
    """(positional parameter names after self, keyword-only names, required names) of a binding function,
    read from the signature on its docstring's first line (pybind11's, or the Buffer operations' own)."""
    import re
    sig = fn.__doc__.splitlines()[0]
    params = [p.strip() for p in re.split(r",\s*(?![^\[]*\])", sig[sig.index("(") + 1:sig.rindex(") ->")])]
    names = [p.split(":")[0].split("=")[0].strip() for p in params]
    required = frozenset(n for n, p in zip(names, params) if "=" not in p and n not in ("self", "*"))
    if names and names[0] == "self":
        names = names[1:]
    if "*" not in names:
        return tuple(names), (), required
    star = names.index("*")
    return tuple(names[:star]), tuple(names[star + 1:]), required


def check_binding_call(fn, args: tuple, kwargs: dict) -> None:
    """Fails the test unless `fn(*args, **kwargs)` matches the binding function's signature (what the binding
    would refuse with a TypeError): a stand-in that records calls checks each one with it."""
    positional, keywords, required = binding_signature(fn)
    name = fn.__doc__.split("(")[0]
    assert len(args) <= len(positional), f"{name}: {len(args)} positional arguments, takes {positional}"
    given = set(positional[:len(args)]) | set(kwargs)
    unknown = set(kwargs) - set(positional[len(args):]) - set(keywords)
    assert not unknown, f"{name}: no parameter {sorted(unknown)} (it takes {positional + keywords})"
    assert required <= given, f"{name}: missing {sorted(required - given)}"


def log_ordered_call(log: list, entry, kwargs: dict) -> None:
    """Appends a recorded binding call `entry` to `log` between the stream waits its call asks for, as
    ("wait", dst, src) entries: ("wait", stream, wait_stream) before, ("wait", join_stream, stream) after."""
    if kwargs.get("wait_stream") is not None:
        log.append(("wait", kwargs["stream"], kwargs["wait_stream"]))
    log.append(entry)
    if kwargs.get("join_stream") is not None:
        log.append(("wait", kwargs["join_stream"], kwargs["stream"]))
