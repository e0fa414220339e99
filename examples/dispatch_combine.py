"""A high-throughput dispatch and combine with epx on every GPU of this machine, checked.

    torchrun --nproc-per-node=2 examples/dispatch_combine.py      (one process per GPU, 2 to 8)

Each rank routes its tokens to top-k experts, dispatches them (a token goes once to every rank
that holds one of its experts), keeps the received rows as they are (the identity "expert") and
combines them back. Combine sums the copies a token's receiving ranks send back, so the result is
x times the number of ranks the token went to, exactly. Uses epx from `pip install .`, or from
the build tree when EPX_BUILD_DIR (or build/) holds one.
"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

_build = Path(os.environ.get("EPX_BUILD_DIR", Path(__file__).resolve().parents[1] / "build")) / "python"
if (_build / "epx" / "__init__.py").exists():
    sys.path.insert(0, str(_build))
import epx  # noqa: E402  (or: import epx as deep_ep, the same API as DeepEP's)


def main() -> None:
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    rank, world = dist.get_rank(), dist.get_world_size()
    num_tokens, hidden, num_topk, num_experts = 512, 2048, 4, 4 * world

    # x [N, H] bf16 of small integers (sums stay exact in bf16); top-k distinct experts per token.
    x = (torch.arange(num_tokens * hidden, device="cuda") % 32).to(torch.bfloat16).view(num_tokens, hidden)
    scores = torch.rand(num_tokens, num_experts, device="cuda", generator=torch.Generator(device="cuda").manual_seed(rank))
    topk_idx = scores.topk(num_topk, dim=1).indices  # int64, as epx.topk_idx_t
    topk_weights = torch.full((num_tokens, num_topk), 1.0 / num_topk, device="cuda")

    # Room for every token of every rank: the most rows one rank can receive.
    num_nvl_bytes = epx.Buffer.get_nvl_buffer_size_hint(num_tokens * world, hidden, world)
    buffer = epx.Buffer(dist.group.WORLD, num_nvl_bytes=num_nvl_bytes, explicitly_destroy=True)

    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buffer.get_dispatch_layout(
        topk_idx, num_experts)
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, topk_weights=topk_weights)
    # The local experts would run here on recv_x (recv_topk_idx: local expert ids, -1 elsewhere;
    # num_recv_tokens_per_expert: rows per local expert), weighting rows by recv_topk_weights.
    combined_x, _, _ = buffer.combine(recv_x, handle)

    expected = x.float() * is_token_in_rank.sum(dim=1, keepdim=True)
    torch.testing.assert_close(combined_x.float(), expected, rtol=0, atol=0)
    print(f"[rank {rank}/{world}] epx {epx.__version__}: received {recv_x.shape[0]} rows; "
          f"combine matches for all {num_tokens} tokens")
    buffer.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
