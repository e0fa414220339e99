"""GPU tests of the one-GPU development mode itself (epx.sim): simulated ranks' threads, streams and
SM share, a failing rank, the checks on groups, and torch's threaded process group. Every test here
is simulated (marker `sim`) and needs one GPU; the operations themselves are tested in test_ht.py
and test_ll.py (real and simulated).
"""
import threading
import time

import pytest

from conftest import require_epx

torch, epx = require_epx()
from epx_test_utils import RankContext, num_gpus, sim_max_world  # noqa: E402

pytestmark = [pytest.mark.sim,
              pytest.mark.skipif(num_gpus() < 1, reason="sim: needs a GPU")]

HIDDEN = 512


def _identity(group):
    stream = torch.cuda.current_stream()
    return (group.rank(), group.size(), threading.current_thread().name, torch.cuda.current_device(),
            stream.cuda_stream, group.stream.cuda_stream, group.num_sms)


def test_launch_sim_runs_every_rank_on_its_own_thread_and_stream():
    world = 3
    results = epx.launch_sim(world, _identity)
    assert [r[:2] for r in results] == [(r, world) for r in range(world)]
    assert len({r[2] for r in results}) == world and threading.current_thread().name not in {r[2] for r in results}
    assert all(r[3] == 0 for r in results)
    streams = [r[4] for r in results]
    assert streams == [r[5] for r in results], "the rank's own stream is current while its function runs"
    assert len(set(streams)) == world and 0 not in streams, "one non-default stream per rank"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert all(r[6] == sms // world for r in results)


def _buffer_configs(group, share_plus_one):
    buf = epx.Buffer(group, num_nvl_bytes=epx.Buffer.get_nvl_buffer_size_hint(256, HIDDEN, group.size()))
    default = buf.runtime.config()[0]
    dispatch_default = epx.Buffer.get_dispatch_config(group.size()).num_sms
    topk = torch.zeros((4, 2), dtype=torch.int64, device="cuda")
    x = torch.zeros((4, HIDDEN), dtype=torch.bfloat16, device="cuda")
    ntpr, _, ntpe, itir, _ = buf.get_dispatch_layout(topk, 2 * group.size())
    try:
        buf.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe, topk_idx=topk,
                     config=epx.Config(share_plus_one))
    except epx.EpxError as e:
        refused = (e.kind, str(e))
    else:
        refused = None
    # Every rank refused the same way before any launch: the ranks are still in step.
    buf.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe, topk_idx=topk)
    return default, dispatch_default, refused


def test_num_sms_fit_the_share():
    world = min(8, sim_max_world())
    share = torch.cuda.get_device_properties(0).multi_processor_count // world
    for default, dispatch_default, refused in epx.launch_sim(world, _buffer_configs, share + 1):
        assert default == dispatch_default == min(epx.Config.defaults(world).num_sms, share)
        assert refused is not None, f"Config(num_sms={share + 1}) was accepted with a share of {share} SMs"
        kind, message = refused
        assert kind == "InvalidArgument" and "Config.num_sms" in message and str(share) in message, message


def _fail_on_rank_1(group):
    if group.rank() == 1:
        raise ValueError("rank 1 gives up")
    # The peers wait in a host collective (Buffer creation) for rank 1, which has left the world.
    epx.Buffer(group, num_nvl_bytes=epx.Buffer.get_nvl_buffer_size_hint(64, HIDDEN, group.size()))


def test_failing_rank_is_named_and_peers_do_not_wait():
    world = epx.SimWorld(3, timeout_s=120)
    try:
        start = time.monotonic()
        with pytest.raises(epx.SimRankError) as info:
            world.run(_fail_on_rank_1)
        elapsed = time.monotonic() - start
        e = info.value
        assert e.first_rank == 1 and isinstance(e.errors[1], ValueError), str(e)
        assert "rank 1" in str(e) and "rank 1 gives up" in str(e)
        assert isinstance(e.__cause__, ValueError)
        for r in (0, 2):  # the peers fail at once, naming the rank that left
            assert isinstance(e.errors.get(r), epx.EpxError) and "1" in str(e.errors[r]), str(e)
        assert elapsed < 30, f"the peers waited {elapsed:.1f} s for a rank that had left"
        assert world.broken
        with pytest.raises(epx.EpxError, match="broken"):
            world.run(_identity)
    finally:
        world.close()


def _real_group_on_a_rank(group):
    class _NcclLikeGroup:
        def rank(self):
            return group.rank()

        def size(self):
            return group.size()

    try:
        epx.Buffer(_NcclLikeGroup(), num_nvl_bytes=1 << 22)
    except epx.EpxError as e:
        return e.kind, str(e)
    return None


def test_real_group_on_a_simulated_rank_is_refused():
    for result in epx.launch_sim(2, _real_group_on_a_rank):
        assert result is not None and result[0] == "InvalidArgument" and "_NcclLikeGroup" in result[1], result


def _sim_world_from_a_rank(group):
    try:
        epx.launch_sim(2, _identity)
    except epx.EpxError as e:
        return e.kind
    return None


def test_sim_world_refuses_runs_from_its_ranks():
    assert epx.launch_sim(2, _sim_world_from_a_rank) == ["State", "State"]


def test_buffers_are_freed_when_the_world_closes():
    kept = []

    def make(group):
        buf = epx.Buffer(group, num_nvl_bytes=epx.Buffer.get_nvl_buffer_size_hint(64, HIDDEN, group.size()))
        kept.append(buf)

    epx.launch_sim(2, make)
    assert len(kept) == 2 and all(b.runtime is None for b in kept)


# ---- torch's threaded process group -----------------------------------------------------------------------

def test_threaded_process_group():
    """epx.Buffer on torch's threaded process group: the high-throughput checks of test_ht."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.multi_threaded_pg import _install_threaded_pg, _uninstall_threaded_pg
    import test_ht
    from epx import sim

    world, seed = 2, 1234
    errors, done = {}, []
    store = dist.HashStore()

    def rank_main(rank):
        try:
            dist.init_process_group("threaded", rank=rank, world_size=world, store=store)
            torch.cuda.set_device(0)
            stream, handle = sim._acquire_stream(0)
            try:
                with torch.cuda.stream(stream):
                    ctx = RankContext(rank, world, dist.group.WORLD, torch.device("cuda", 0), simulated=True)
                    ctx.synchronize = stream.synchronize
                    test_ht._dispatch_combine(ctx, seed, False, False, True, 1, False)
                    for b in ctx.buffers.values():
                        b.destroy()
                    stream.synchronize()
            finally:
                sim._release_stream(handle)
            done.append(rank)
        except BaseException as e:  # noqa: B902 (reported below)
            import traceback
            errors[rank] = traceback.format_exc()
        finally:
            try:
                dist.destroy_process_group()
            except Exception:
                pass

    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    _install_threaded_pg()
    try:
        threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    finally:
        _uninstall_threaded_pg()
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
    assert not errors, "\n".join(f"--- rank {r}:\n{tb}" for r, tb in sorted(errors.items()))
    assert sorted(done) == list(range(world))
