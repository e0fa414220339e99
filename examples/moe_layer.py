"""An expert-parallel MoE layer on epx, trained-style (forward + backward), checked against a
single-GPU reference MoE on every rank, in the high-throughput and the low-latency path.

    python examples/moe_layer.py [--num-processes N] [--tokens 2048] [--hidden 1024] ...

Spawns one process per GPU (all visible GPUs by default, at least 2). Finds epx in
EPX_BUILD_DIR/python, else build/python of this checkout, else the installed package.

The layer: router (top-k of a softmax over experts) -> get_dispatch_layout -> dispatch -> the
local experts' MLPs (silu(x W1) W2) -> combine. Dispatch and combine are torch.autograd.Functions
whose backward is the other one:
  - high-throughput: dispatch moves rows and their top-k weights (the backward combines the row
    gradients and the weight gradients); combine sums rows (the backward is a cached dispatch);
  - low-latency: fixed-size per-expert tensors; dispatch carries each token once per rank, so the
    token's top-k weights travel as 128 extra bf16 channels appended to the hidden state, the
    experts apply them, and combine sums with unit weights (backward: combine <-> dispatch). Rows
    keep that width through combine (a low-latency combine takes rows as wide as its dispatch's).

Checked: the layer's output and the gradients of the input, the router and the experts' weights
against the reference (fp32 math on all tokens of all ranks), as max |error| / max |reference|:
outputs within 2e-2 and gradients within 5e-2 (bf16 activations and bf16 transport; the
low-latency path also rounds the router weights to bf16). Prints the errors and tokens/s.
"""
import argparse
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _add_build_tree() -> None:
    build = os.environ.get("EPX_BUILD_DIR")
    path = (Path(build) if build else Path(__file__).resolve().parents[1] / "build") / "python"
    if (path / "epx" / "__init__.py").exists():
        sys.path.insert(0, str(path))


_add_build_tree()
import epx  # noqa: E402

OUTPUT_TOLERANCE = 2e-2
GRAD_TOLERANCE = 5e-2
WEIGHT_CHANNELS = 128  # extra channels carrying the top-k weights in the low-latency path


# ---- Model ------------------------------------------------------------------------------------------

def make_params(seed: int, hidden: int, ffn: int, num_experts: int, device):
    """Router and all experts' weights, identical on every rank (same seed)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    router = torch.randn((hidden, num_experts), generator=g) / hidden ** 0.5
    w1 = torch.randn((num_experts, hidden, ffn), generator=g) / hidden ** 0.5
    w2 = torch.randn((num_experts, ffn, hidden), generator=g) / ffn ** 0.5
    return router.to(device), w1.to(device), w2.to(device)


def make_tokens(seed: int, rank: int, num_tokens: int, hidden: int, device):
    g = torch.Generator(device="cpu").manual_seed(seed * 1000 + rank + 1)
    x = torch.randn((num_tokens, hidden), generator=g).to(torch.bfloat16)
    dout = torch.randn((num_tokens, hidden), generator=g)
    return x.to(device), dout.to(device)


def route(x: torch.Tensor, router: torch.Tensor, num_topk: int):
    """Top-k experts of a softmax router; fp64 logits so every rank picks the same experts for a token
    whatever the batch shape. Returns (topk_idx int64, topk_weights float32, differentiable)."""
    logits = x.double() @ router.double()
    probs = torch.softmax(logits, dim=-1)
    weights, topk_idx = probs.topk(num_topk, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return topk_idx, weights.float()


def expert_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x @ w1) @ w2


def apply_experts(xf, topk_idx, weights, w1, w2):
    """sum over k of weights[t, k] * expert_{topk_idx[t, k]}(xf[t]) for the experts w1/w2 hold (ids
    0..E-1 index them; other ids, -1 included, contribute nothing), in fp32."""
    out = torch.zeros_like(xf)
    for e in range(w1.size(0)):
        rows, slots = (topk_idx == e).nonzero(as_tuple=True)
        if rows.numel():
            out = out.index_add(0, rows, expert_mlp(xf[rows], w1[e], w2[e]) * weights[rows, slots].unsqueeze(1))
    return out


def reference_moe(x, router, w1, w2, num_topk):
    """Single-GPU MoE in fp32 over all experts."""
    topk_idx, weights = route(x, router, num_topk)
    return apply_experts(x.float(), topk_idx, weights, w1, w2)


# ---- High-throughput path ---------------------------------------------------------------------------

class Dispatch(torch.autograd.Function):
    """x [N, H] bf16, topk_weights [N, K] f32 -> the rows each local expert needs (backward: combine)."""

    @staticmethod
    def forward(ctx, x, topk_weights, topk_idx, buffer, num_experts, state):
        num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = \
            buffer.get_dispatch_layout(topk_idx, num_experts)
        recv_x, recv_topk_idx, recv_topk_weights, _, handle, _ = buffer.dispatch(
            x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, topk_weights=topk_weights)
        state["handle"], state["recv_topk_idx"] = handle, recv_topk_idx
        ctx.buffer, ctx.handle = buffer, handle
        ctx.save_for_backward(recv_topk_idx)
        return recv_x, recv_topk_weights

    @staticmethod
    def backward(ctx, grad_recv_x, grad_recv_weights):
        (recv_topk_idx,) = ctx.saved_tensors
        # Only the weights of local experts were received; the others are constant 0 here.
        grad_recv_weights = grad_recv_weights.masked_fill(recv_topk_idx < 0, 0).float().contiguous()
        grad_x, grad_weights, _ = ctx.buffer.combine(grad_recv_x.to(torch.bfloat16).contiguous(), ctx.handle,
                                                     topk_weights=grad_recv_weights)
        return grad_x, grad_weights, None, None, None, None


class Combine(torch.autograd.Function):
    """Expert outputs [Nr, H] bf16 -> summed at the tokens' ranks (backward: cached dispatch)."""

    @staticmethod
    def forward(ctx, y, buffer, handle):
        ctx.buffer, ctx.handle = buffer, handle
        combined, _, _ = buffer.combine(y, handle)
        return combined

    @staticmethod
    def backward(ctx, grad):
        grad_y, *_ = ctx.buffer.dispatch(grad.to(torch.bfloat16).contiguous(), handle=ctx.handle)
        return grad_y, None, None


def moe_high_throughput(x, router, w1_local, w2_local, buffer, num_experts, num_topk):
    topk_idx, topk_weights = route(x, router, num_topk)
    state = {}
    recv_x, recv_weights = Dispatch.apply(x, topk_weights, topk_idx, buffer, num_experts, state)
    y = apply_experts(recv_x.float(), state["recv_topk_idx"], recv_weights, w1_local, w2_local)
    return Combine.apply(y.to(torch.bfloat16), buffer, state["handle"])


# ---- Low-latency path -------------------------------------------------------------------------------

class LowLatencyDispatch(torch.autograd.Function):
    """x [N, H'] bf16 -> [E_loc, R*T, H'] per-expert rows (backward: combine with unit weights)."""

    @staticmethod
    def forward(ctx, x, topk_idx, buffer, num_max_tokens, num_experts, state):
        recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, num_max_tokens, num_experts,
                                                                       use_fp8=False)
        state["handle"], state["recv_count"] = handle, recv_count
        ctx.buffer, ctx.handle = buffer, handle
        ctx.save_for_backward(topk_idx)
        return recv_x

    @staticmethod
    def backward(ctx, grad_recv):
        (topk_idx,) = ctx.saved_tensors
        ones = (topk_idx >= 0).float()
        grad_x, _, _ = ctx.buffer.low_latency_combine(grad_recv.to(torch.bfloat16).contiguous(), topk_idx, ones,
                                                      ctx.handle)
        return grad_x, None, None, None, None, None


class LowLatencyCombine(torch.autograd.Function):
    """Weighted expert outputs [E_loc, R*T, H] -> summed per token (backward: dispatch of the gradient)."""

    @staticmethod
    def forward(ctx, y, topk_idx, buffer, handle, recv_count, num_max_tokens, num_experts):
        ctx.buffer, ctx.num_max_tokens, ctx.num_experts = buffer, num_max_tokens, num_experts
        ctx.save_for_backward(topk_idx, recv_count)
        combined, _, _ = buffer.low_latency_combine(y, topk_idx, (topk_idx >= 0).float(), handle)
        return combined

    @staticmethod
    def backward(ctx, grad):
        topk_idx, recv_count = ctx.saved_tensors
        grad_y, count, _, _, _ = ctx.buffer.low_latency_dispatch(grad.to(torch.bfloat16).contiguous(), topk_idx,
                                                                 ctx.num_max_tokens, ctx.num_experts, use_fp8=False)
        valid = torch.arange(grad_y.size(1), device=grad_y.device).view(1, -1) < count.view(-1, 1)
        return torch.where(valid.unsqueeze(-1), grad_y, torch.zeros_like(grad_y)), None, None, None, None, None, None


def moe_low_latency(x, router, w1_local, w2_local, buffer, num_experts, num_topk, num_max_tokens):
    topk_idx, topk_weights = route(x, router, num_topk)
    hidden = x.size(1)
    carried = torch.nn.functional.pad(topk_weights.to(torch.bfloat16), (0, WEIGHT_CHANNELS - num_topk))
    state = {}
    recv = LowLatencyDispatch.apply(torch.cat([x, carried], dim=1), topk_idx, buffer, num_max_tokens, num_experts,
                                    state)
    handle, recv_count = state["handle"], state["recv_count"]
    src_topk_slot = handle[5]
    rows = recv.size(1)
    outputs = []
    for j, n in enumerate(recv_count.detach().tolist()):
        xj = recv[j, :n, :hidden].float()
        wj = recv[j, :n, hidden:].gather(1, src_topk_slot[j, :n].long().unsqueeze(1)).float()
        yj = expert_mlp(xj, w1_local[j], w2_local[j]) * wj
        outputs.append(torch.cat([yj, yj.new_zeros((rows - n, hidden))]))
    # Combine takes rows of the dispatched width: the weight channels travel back as zeros.
    y = torch.nn.functional.pad(torch.stack(outputs), (0, WEIGHT_CHANNELS)).to(torch.bfloat16)
    combined = LowLatencyCombine.apply(y, topk_idx, buffer, handle, recv_count, num_max_tokens, num_experts)
    return combined[:, :hidden]


# ---- Check and time ---------------------------------------------------------------------------------

def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run_path(name, layer, args, rank, world, buffer, device):
    E = args.experts_per_rank * world
    E_loc = args.experts_per_rank
    num_tokens = args.tokens if name == "high-throughput" else args.ll_tokens
    router, w1, w2 = make_params(args.seed, args.hidden, args.ffn, E, device)
    router_p = router.clone().requires_grad_()
    w1_local = w1[rank * E_loc:(rank + 1) * E_loc].clone().requires_grad_()
    w2_local = w2[rank * E_loc:(rank + 1) * E_loc].clone().requires_grad_()
    x, dout = make_tokens(args.seed, rank, num_tokens, args.hidden, device)
    x = x.requires_grad_()

    def step():
        out = layer(x, router_p, w1_local, w2_local, buffer)
        (out.float() * dout).sum().backward()
        return out

    out = step()
    torch.cuda.synchronize()
    # The router is replicated: its gradient is the sum over ranks (as data parallelism would do).
    router_grad = router_p.grad.clone()
    dist.all_reduce(router_grad)

    # Reference: every rank's tokens (regenerated from the seeds) through all experts on this GPU.
    tokens = [make_tokens(args.seed, r, num_tokens, args.hidden, device) for r in range(world)]
    ref_x = torch.cat([t[0] for t in tokens]).requires_grad_()
    ref_router, ref_w1, ref_w2 = (t.clone().requires_grad_() for t in (router, w1, w2))
    ref_out = reference_moe(ref_x, ref_router, ref_w1, ref_w2, args.topk)
    (ref_out * torch.cat([t[1] for t in tokens])).sum().backward()
    mine = slice(rank * num_tokens, (rank + 1) * num_tokens)
    local = slice(rank * E_loc, (rank + 1) * E_loc)
    errors = {
        "output": (rel_error(out, ref_out[mine]), OUTPUT_TOLERANCE),
        "grad x": (rel_error(x.grad, ref_x.grad[mine]), GRAD_TOLERANCE),
        "grad router": (rel_error(router_grad, ref_router.grad), GRAD_TOLERANCE),
        "grad w1": (rel_error(w1_local.grad, ref_w1.grad[local]), GRAD_TOLERANCE),
        "grad w2": (rel_error(w2_local.grad, ref_w2.grad[local]), GRAD_TOLERANCE),
    }
    worst = torch.tensor([e for e, _ in errors.values()], device=device, dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    failed = [k for (k, (_, tol)), e in zip(errors.items(), worst.tolist()) if not e <= tol]

    # Throughput of forward + backward (all ranks in step).
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / args.iters
    elapsed_max = torch.tensor([elapsed], device=device, dtype=torch.float64)
    dist.all_reduce(elapsed_max, op=dist.ReduceOp.MAX)
    if rank == 0:
        detail = ", ".join(f"{k} {e:.2e}" for k, e in zip(errors, worst.tolist()))
        seconds = elapsed_max.item()
        print(f"[{name}] EP{world}, {num_tokens} tokens/rank, hidden {args.hidden}, {E} experts, top-{args.topk}: "
              f"max rel. error (all ranks): {detail} (tolerance output {OUTPUT_TOLERANCE}, grads {GRAD_TOLERANCE}) "
              f"-> {'OK' if not failed else 'FAILED: ' + ', '.join(failed)}", flush=True)
        print(f"[{name}] forward+backward {seconds * 1e3:.2f} ms: {num_tokens / seconds:,.0f} tokens/s per rank, "
              f"{world * num_tokens / seconds:,.0f} tokens/s in all", flush=True)
    return not failed


def worker(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    ok = False
    buffer = None
    try:
        E = args.experts_per_rank * world
        ll_hidden = args.hidden + WEIGHT_CHANNELS
        buffer = epx.Buffer(
            dist.group.WORLD,
            num_nvl_bytes=epx.Buffer.get_nvl_buffer_size_hint(world * args.tokens, args.hidden, world, args.topk),
            num_rdma_bytes=epx.Buffer.get_low_latency_rdma_size_hint(args.ll_tokens, ll_hidden, world, E, args.topk),
            low_latency_mode=True, explicitly_destroy=True)
        ok = run_path("high-throughput",
                      lambda x, r, w1, w2, b: moe_high_throughput(x, r, w1, w2, b, E, args.topk),
                      args, rank, world, buffer, device)
        ok &= run_path("low-latency",
                       lambda x, r, w1, w2, b: moe_low_latency(x, r, w1, w2, b, E, args.topk, args.ll_tokens),
                       args, rank, world, buffer, device)
    except BaseException:
        print(f"[rank {rank}] failed:\n{traceback.format_exc()}", flush=True)
        ok = False
    finally:
        if buffer is not None:
            try:
                buffer.destroy()
            except BaseException:
                pass
        dist.destroy_process_group()
    if not ok:
        sys.exit(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-processes", type=int, default=0, help="ranks (default: every visible GPU)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank, high-throughput path")
    parser.add_argument("--ll-tokens", type=int, default=128, help="tokens per rank, low-latency path")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (a multiple of 128)")
    parser.add_argument("--ffn", type=int, default=512, help="expert MLP inner size")
    parser.add_argument("--experts-per-rank", type=int, default=8)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(2), "little"))
    args = parser.parse_args()
    world = args.num_processes or torch.cuda.device_count()
    if world < 2 or world > torch.cuda.device_count():
        print(f"needs 2 to {torch.cuda.device_count()} GPUs (have {torch.cuda.device_count()}), asked for {world}")
        return 2
    for key, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                       ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(key, value)
    print(f"moe_layer: {world} ranks, seed {args.seed}", flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(worker, args=(world, port, args), nprocs=world)
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
        print(f"moe_layer: FAILED ({e})")
        return 1
    print("moe_layer: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
