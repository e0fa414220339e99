"""One-GPU development mode: R expert-parallel ranks as threads of this process on one GPU.

    import epx

    def step(group, hidden):                 # runs on every rank's thread
        buffer = epx.Buffer(group, num_nvl_bytes=...)
        ...                                  # the same code as on R GPUs
        return result

    results = epx.launch_sim(4, step, 7168)  # [rank 0's result, ..., rank 3's]

Each rank gets its own thread, current device (`device`), current stream and `SimGroup`; an
`epx.Buffer(group, ...)` on that group takes the rank's simulated communicator (no NCCL) and the
Buffers' windows are slices of one device allocation. Each rank owns SMs / R of the GPU, which
bounds its kernels' grids (the default `num_sms` fits the share; a larger explicit one is an error)
so every rank's blocks run at once and every protocol runs as on R GPUs, with the same results.
Timings are NOT NVLink numbers: the ranks share one GPU's SMs and memory bandwidth.

Code that runs on a rank (design.md 3; epx itself keeps these rules):
  - sync the rank's own stream (`group.synchronize()`), never the device (`torch.cuda.synchronize()`
    waits for every rank's kernels, which may be waiting for this rank's next step);
  - capture CUDA graphs with `group.graph(g)`, not `torch.cuda.graph(g)`: that one syncs the device
    on entry (an error while another rank captures, which breaks its capture), captures on a stream
    shared by all threads and in the global mode (which breaks the other ranks' allocations); and
    let no rank replay before every rank has captured (`group.barrier()`);
  - draw random numbers on the GPU from a generator of the rank's own: the device's default
    generator is shared by all ranks, and a rank's capture breaks the others' draws;
  - keep the ranks in step as on real GPUs: every rank issues the same collective operations in
    the same order.

A rank whose function raises leaves the world, so its peers' host collectives fail at once naming
it (device waits end by their own bounded timeout); the caller gets `SimRankError` naming every
failed rank with its traceback, the first failure first. A world that saw a failure refuses
further runs: make a new one.

torch's threaded process group (`torch.testing._internal.distributed.multi_threaded_pg`, backend
"threaded") works too: `epx.Buffer(group, ...)` on it makes one SimWorld per group (rank 0 makes
it, the others find it through one all-gather); a rank that fails there does not leave the world,
so its peers end by their timeout.
"""
import contextlib
import itertools
import os
import queue
import threading
import time
import traceback
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional

import torch

from . import _C
from .utils import _check_int, _error

__all__ = ["SimWorld", "SimGroup", "SimRankError", "launch_sim"]

# The simulated rank the current thread is (set on the rank threads of a SimWorld, and on a thread
# that made a Buffer on a threaded process group): Buffer's default config fits its SM share.
_local = threading.local()


def _rank_share() -> int:
    """SMs of the simulated rank this thread runs, 0 on any other thread."""
    return getattr(_local, "num_sms", 0)


def _thread_group() -> Optional["SimGroup"]:
    """The SimGroup of the SimWorld rank this thread runs, else None."""
    return getattr(_local, "group", None)


# Streams for simulated ranks, each used by one owner at a time. torch's pooled streams
# (torch.cuda.Stream()) repeat after 32 per priority, so two simulated ranks could get one stream
# and wait for each other's queued kernels. Never destroyed: a tensor freed late may still record
# an event on the stream it was used on.
_STREAMS_LOCK = threading.Lock()
_FREE_STREAMS: Dict[tuple, List[object]] = {}  # (device, priority) -> free _C.Stream


def _acquire_stream(device: int, priority: int = 0):
    """(torch stream, handle to give back with _release_stream): a stream no one else uses."""
    with _STREAMS_LOCK:
        free = _FREE_STREAMS.get((device, priority))
        owner = free.pop() if free else None
    if owner is None:
        owner = _C.Stream(device, priority)
    return torch.cuda.ExternalStream(owner.handle, device=torch.device("cuda", device)), (device, priority, owner)


def _release_stream(handle) -> None:
    device, priority, owner = handle
    with _STREAMS_LOCK:
        _FREE_STREAMS.setdefault((device, priority), []).append(owner)


class SimRankError(RuntimeError):
    """
    Ranks of a SimWorld failed. `errors` maps each failed rank to its exception, `first_rank` is the
    rank that failed first (the others usually failed because it left). The message has every
    failed rank's traceback.
    """

    def __init__(self, message: str, errors: Dict[int, BaseException], first_rank: int) -> None:
        super().__init__(message)
        self.errors = errors
        self.first_rank = first_rank


class SimGroup:
    """
    What a rank's function gets as its group: `rank()` and `size()` as a torch.distributed group's,
    and what `epx.Buffer(group, ...)` takes instead of a process group. Use it from its rank's
    thread only.

    Attributes:
        world: the SimWorld.
        device: the CUDA device index of every rank.
        num_sms: the SMs this rank owns (the device's SMs / R).
        stream: the rank's own stream (current on its thread while its function runs).
    """

    def __init__(self, world: "SimWorld", rank: int) -> None:
        self.world = world
        self.device = world.device
        self.num_sms = world.num_sms_per_rank
        self.stream: Optional[torch.cuda.ExternalStream] = None  # made on the rank's thread
        self._rank = rank
        self._comm = world._world.comm(rank)  # for barrier(); each Buffer gets a handle of its own
        self._buffers: List[weakref.ref] = []  # the Buffers made on this group, in creation order
        self._stream_owners: List[object] = []  # the streams of new_stream (and `stream`)
        self._capture_stream: Optional[torch.cuda.ExternalStream] = None  # of graph()

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self.world.num_ranks

    def barrier(self) -> None:
        """Host barrier over the ranks (bounded by the world's timeout)."""
        self._comm.barrier(self.world.timeout_s)

    def synchronize(self) -> None:
        """Waits for the rank's current stream (never the device: see the module docstring)."""
        torch.cuda.current_stream(self.device).synchronize()

    @contextlib.contextmanager
    def graph(self, cuda_graph: "torch.cuda.CUDAGraph", pool=None):
        """
        `with group.graph(g):` captures this rank's work into `g`, as `torch.cuda.graph(g)` does but
        fit for simulated ranks: on a stream of the rank's own, in thread-local mode, and without
        torch's device-wide sync on entry. `pool`: a graph memory pool (torch.cuda.graph_pool_handle()).
        """
        if self._capture_stream is None:
            self._capture_stream = self.new_stream()
        stream, current = self._capture_stream, torch.cuda.current_stream(self.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            cuda_graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                yield cuda_graph
            finally:
                cuda_graph.capture_end()
        current.wait_stream(stream)

    def new_stream(self, priority: int = 0) -> torch.cuda.ExternalStream:
        """A stream of this rank's own (for side streams and graph capture) until the world
        closes. torch.cuda.Stream() may hand two ranks the same stream (a pool of 32)."""
        stream, handle = _acquire_stream(self.device, priority)
        self._stream_owners.append(handle)
        return stream

    def _communicator(self, buffer: object) -> "_C.Communicator":
        """For epx.Buffer: a handle of this rank's communicator (Buffer.destroy() lets go of its
        own); the world frees `buffer` when it closes."""
        if self.world._world is None:
            raise _error("State", f"group: {self!r} belongs to a closed SimWorld")
        if threading.current_thread() is not self.world._threads[self._rank]:
            raise _error("InvalidArgument", f"group: SimGroup of rank {self._rank} used from thread "
                                            f"{threading.current_thread().name!r}; use it from its rank's thread")
        self._buffers.append(weakref.ref(buffer))
        return self.world._world.comm(self._rank)

    def __repr__(self) -> str:
        return f"epx.SimGroup(rank {self._rank}/{self.world.num_ranks}, cuda:{self.device})"


class SimWorld:
    """
    R simulated ranks on GPU `device`: one thread per rank, kept across `run` calls (so a rank's
    Buffers, streams and thread-local torch state persist), and the C++ SimWorld they share.

    Arguments:
        num_ranks: R, in [2, `SimWorld.max_world(device)`] (each rank needs a few SMs of its own).
        device: the CUDA device index.
        timeout_s: bound of every host collective of the ranks (Buffer creation, reset, ...);
            0 = EPX_TIMEOUT_S (100 s by default).

    Use as a context manager, or call `close()`: it frees the ranks' Buffers (on their threads, in
    creation order, as a real run would) and ends the threads.
    """

    def __init__(self, num_ranks: int, device: int = 0, timeout_s: float = 0.0) -> None:
        _check_int("num_ranks", num_ranks, 2, _C.MAX_WORLD_RANKS)
        _check_int("device", device, 0)
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s < 0:
            raise _error("InvalidArgument", f"timeout_s: expected a number of seconds >= 0, got {timeout_s!r}")
        self.num_ranks = num_ranks
        self.device = device
        self.timeout_s = float(timeout_s)
        self.broken: Optional[str] = None  # why the world refuses runs (a rank failed, a run timed out)
        self._closed = False
        self._threads: List[threading.Thread] = []
        if torch.cuda.is_initialized():
            if "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ:
                warnings.warn("epx.SimWorld: CUDA was initialized before the first SimWorld without "
                              "CUDA_DEVICE_MAX_CONNECTIONS: the ranks share the default 8 hardware queues, where one "
                              "rank's queued work can hold back a peer's (a stall until the timeout); export "
                              "CUDA_DEVICE_MAX_CONNECTIONS=32 before starting Python", stacklevel=2)
            if os.environ.get("CUDA_MODULE_LOADING", "LAZY") != "EAGER":
                warnings.warn("epx.SimWorld: CUDA was initialized with lazy kernel loading: a kernel's first "
                              "launch may wait for every running kernel, a peer rank's waiting one included (a "
                              "stall until the timeout); export CUDA_MODULE_LOADING=EAGER before starting Python, "
                              "or run each kernel once before the ranks' first op", stacklevel=2)
        else:
            # Read when CUDA creates its context (PyTorch sets LAZY then, unless set).
            os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
        # Sets CUDA_DEVICE_MAX_CONNECTIONS=32 unless set (effective when no CUDA context exists yet).
        self._world = _C.SimWorld(num_ranks, device, self.timeout_s)
        self.num_sms_per_rank = self._world.num_sms_per_rank
        self._groups = [SimGroup(self, r) for r in range(num_ranks)]
        self._inboxes = [queue.SimpleQueue() for _ in range(num_ranks)]
        self._outbox: "queue.SimpleQueue" = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._rank_main, args=(r,), name=f"epx-sim-rank{r}", daemon=True)
                         for r in range(num_ranks)]
        for t in self._threads:
            t.start()
        try:
            self._collect("starting the rank threads", None)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def max_world(device: int = 0) -> int:
        """The most simulated ranks `device` holds (its SMs / the smallest share a rank may own), at
        most MAX_WORLD_RANKS; a world of more than MAX_RANKS ranks needs Buffers split into
        (virtual) nodes (`node_size=`, `num_rdma_bytes`)."""
        return min(_C.MAX_WORLD_RANKS, _C.SimWorld.max_world(_check_int("device", device, 0)))

    # ---- Rank threads ---------------------------------------------------------------------------

    def _rank_main(self, rank: int) -> None:
        group = self._groups[rank]
        try:
            torch.cuda.set_device(self.device)
            group.stream = group.new_stream()
            _local.group, _local.num_sms = group, group.num_sms
        except BaseException as e:  # noqa: B902 (reported to the caller)
            self._fail(rank, e)
            return
        self._outbox.put((rank, True, None))
        with torch.cuda.stream(group.stream):
            while True:
                job = self._inboxes[rank].get()
                if job is None:
                    break
                fn, args = job
                try:
                    result = fn(group, *args)
                    group.synchronize()
                except BaseException as e:  # noqa: B902 (reported to the caller)
                    self._fail(rank, e)
                    continue
                self._outbox.put((rank, True, result))

    def _fail(self, rank: int, error: BaseException) -> None:
        """The rank leaves the world (its peers stop waiting for it) and reports `error` (called in
        the handler of `error`)."""
        report = (error, traceback.format_exc(), time.monotonic())
        first_line = (str(error).splitlines() or [""])[0][:200]
        try:
            self._world.leave(rank, f"{type(error).__name__}: {first_line}")
        except Exception:  # the report below matters more
            pass
        self._outbox.put((rank, False, report))

    def _collect(self, what: str, timeout_s: Optional[float]) -> List[Any]:
        """Every rank's answer to the job just sent, or SimRankError naming the failed ranks."""
        results: Dict[int, Any] = {}
        errors: Dict[int, tuple] = {}  # rank -> (exception, traceback text, time of the failure)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while len(results) + len(errors) < self.num_ranks:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    rank, ok, payload = self._outbox.get(timeout=wait)
                except queue.Empty:
                    break
                if ok:
                    results[rank] = payload
                else:
                    errors[rank] = payload
        except BaseException:  # KeyboardInterrupt while waiting: no rank may wait for the others
            self._abandon([r for r in range(self.num_ranks) if r not in results and r not in errors],
                          f"{what}: interrupted")
            raise
        missing = [r for r in range(self.num_ranks) if r not in results and r not in errors]
        if missing:
            self._abandon(missing, f"{what}: no answer within {timeout_s} s")
        if not errors and not missing:
            return [results[r] for r in range(self.num_ranks)]
        order = sorted(errors, key=lambda r: errors[r][2])
        if order:
            self.broken = self.broken or f"rank {order[0]} failed ({type(errors[order[0]][0]).__name__})"
        lines = [f"{what} failed on {len(errors)} of {self.num_ranks} simulated ranks"
                 + (f" (rank {order[0]} first)" if order else "")
                 + (f"; ranks {missing} gave no answer within {timeout_s} s" if missing else "") + ":"]
        for r in order:
            lines.append(f"--- rank {r}:\n{errors[r][1]}")
        error = SimRankError("\n".join(lines), {r: errors[r][0] for r in order}, order[0] if order else missing[0])
        raise error from (errors[order[0]][0] if order else None)

    def _abandon(self, ranks: List[int], reason: str) -> None:
        """Ranks that did not answer leave the world, so the ones that wait for them end."""
        self.broken = self.broken or reason
        for r in ranks:
            try:
                self._world.leave(r, reason)
            except Exception:
                pass

    # ---- Public ---------------------------------------------------------------------------------

    def run(self, fn: Callable, *args, timeout_s: Optional[float] = None) -> List[Any]:
        """
        Runs `fn(group, *args)` on every rank's thread (group: the rank's SimGroup, its stream
        current), then waits for the rank's stream. Returns the results by rank, or raises
        SimRankError naming every rank that raised (those ranks leave the world first, so their
        peers do not wait for them) or gave no answer within `timeout_s` (None: no bound beyond
        the ranks' own bounded waits).
        """
        if not callable(fn):
            raise _error("InvalidArgument", f"fn: expected a callable, got {type(fn).__name__}")
        if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                      or timeout_s <= 0):
            raise _error("InvalidArgument", f"timeout_s: expected a number of seconds > 0 or None, got {timeout_s!r}")
        if self._closed:
            raise _error("State", "SimWorld.run: the world is closed")
        if self.broken:
            raise _error("State", f"SimWorld.run: the world is broken ({self.broken}); make a new SimWorld")
        if _thread_group() is not None:
            raise _error("State", "SimWorld.run: called from a simulated rank's thread (a rank cannot wait for "
                                  "a world of its own)")
        for q in self._inboxes:
            q.put((fn, args))
        return self._collect(f"{getattr(fn, '__qualname__', repr(fn))}", timeout_s)

    def close(self, timeout_s: float = 60.0) -> None:
        """
        Frees every rank's Buffers on its thread (collective, in creation order), ends the threads
        and lets go of the world. A broken world's Buffers are freed too, as far as the ranks can;
        a rank thread that does not end within `timeout_s` keeps the world alive (it may still be
        inside it).
        """
        if self._closed:
            return
        self._closed = True
        if self._threads and all(t.is_alive() for t in self._threads):
            for q in self._inboxes:
                q.put((_free_buffers, ()))
            try:
                self._collect("SimWorld.close (freeing the ranks' Buffers)", timeout_s)
            except SimRankError:
                pass  # a broken world: what could not be freed, the world frees at its end
        for q in self._inboxes:
            q.put(None)
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [r for r, t in enumerate(self._threads) if t.is_alive()]
        if stuck:
            _STUCK_WORLDS.append(self._world)  # a thread may still be in it: never free it under one
            self._abandon(stuck, "SimWorld.close: rank thread still running")
        for g in self._groups:
            if not stuck:
                for handle in g._stream_owners:
                    _release_stream(handle)
            g._comm, g.stream, g._stream_owners, g._capture_stream = None, None, [], None
        self._groups, self._world = [], None

    def __enter__(self) -> "SimWorld":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"broken: {self.broken}" if self.broken else "running"
        return (f"epx.SimWorld({self.num_ranks} ranks on cuda:{self.device}, {self.num_sms_per_rank} SMs each, "
                f"{state})")


# Worlds whose rank threads did not end: kept alive for the rest of the process.
_STUCK_WORLDS: List[object] = []


def _free_buffers(group: SimGroup) -> None:
    """On a rank's thread: frees the Buffers still alive on `group`, in creation order."""
    alive = [b for b in (ref() for ref in group._buffers) if b is not None]
    group._buffers.clear()
    for b in alive:
        if b.runtime is not None:
            b.runtime.destroy()
            b.runtime = None


def launch_sim(num_ranks: int, fn: Callable, *args, device: int = 0, timeout_s: float = 0.0) -> List[Any]:
    """
    Runs `fn(group, *args)` on `num_ranks` simulated ranks on GPU `device` (one SimWorld for the
    call; see the module docstring) and returns the results by rank. The Buffers made on the ranks
    are freed before it returns. Raises SimRankError naming the ranks that failed.
    """
    _check_int("num_ranks", num_ranks, 2, _C.MAX_WORLD_RANKS)
    if not callable(fn):
        raise _error("InvalidArgument", f"fn: expected a callable, got {type(fn).__name__}")
    with SimWorld(num_ranks, device, timeout_s) as world:
        return world.run(fn, *args)


# ---- torch's threaded process group -------------------------------------------------------------

_THREADED_LOCK = threading.Lock()
_THREADED_TOKENS = itertools.count(1)
_THREADED_PENDING: Dict[int, list] = {}  # token -> [the _C.SimWorld, ranks yet to take their communicator]
_THREADED_WORLDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # group -> its _C.SimWorld


def _is_threaded_process_group(group: object) -> bool:
    """True for torch's threaded process group (its ranks are threads of this process)."""
    backend_name = getattr(type(group), "getBackendName", None)
    if backend_name is None:
        return False
    try:
        return backend_name(group) == "threaded"
    except Exception:
        return False


def _threaded_group_communicator(group, device: int) -> "_C.Communicator":
    """A handle of this rank's simulated communicator in the SimWorld of a threaded process group
    (collective the first time on each group: rank 0 makes the world)."""
    world = _THREADED_WORLDS.get(group)
    if world is not None:
        return world.comm(group.rank())
    import torch.distributed as dist
    rank, size = group.rank(), group.size()
    token, failure = 0, None
    if rank == 0:
        try:
            world = _C.SimWorld(size, device, 0.0)
            with _THREADED_LOCK:
                token = next(_THREADED_TOKENS)
                _THREADED_PENDING[token] = [world, size]
        except Exception as e:  # the peers learn it from the token 0, then rank 0 raises
            failure = e
    mine = torch.tensor([token, device], dtype=torch.int64, device="cpu")
    parts = [torch.zeros_like(mine) for _ in range(size)]
    dist.all_gather(parts, mine, group=group)
    if failure is not None:
        raise failure
    token, world_device = (int(v) for v in parts[0].tolist())
    if token == 0:
        raise _error("State", "group: rank 0 of the threaded process group could not make the SimWorld (its "
                              "error says why)")
    with _THREADED_LOCK:
        entry = _THREADED_PENDING[token]
        entry[1] -= 1
        if entry[1] == 0:
            del _THREADED_PENDING[token]
    world = entry[0]
    if device != world_device:
        world.leave(rank, f"current device cuda:{device}, the world's is cuda:{world_device}")
        raise _error("InvalidArgument", f"group: rank {rank} of the threaded process group is on cuda:{device}, "
                                        f"rank 0 made its SimWorld on cuda:{world_device}: every simulated rank "
                                        "uses one GPU")
    _THREADED_WORLDS[group] = world
    _local.num_sms = world.num_sms_per_rank
    return world.comm(rank)


def _is_simulated(group) -> bool:
    """True when the ranks of `group` are threads of this process (a SimGroup, or torch's threaded
    process group): epx.Buffer then runs them as a SimWorld."""
    return isinstance(group, SimGroup) or _is_threaded_process_group(group)


def _group_communicator(group, buffer: object, device: int) -> Optional["_C.Communicator"]:
    """For epx.Buffer: a handle of this rank's simulated communicator when `group` is simulated
    (collective for a threaded process group's first Buffer), else None (a real group; refused on
    a SimWorld rank's thread)."""
    if isinstance(group, SimGroup):
        if device != group.device:
            raise _error("InvalidArgument", f"group: the SimWorld of {group!r} runs on cuda:{group.device}, the "
                                            f"current device is cuda:{device}")
        return group._communicator(buffer)
    if _is_threaded_process_group(group):
        return _threaded_group_communicator(group, device)
    own = _thread_group()
    if own is not None:
        raise _error("InvalidArgument", f"group: {type(group).__name__} is not the simulated group of this thread "
                                        f"(rank {own.rank()} of a SimWorld of {own.size()}); pass the SimGroup the "
                                        "rank's function received, not a real process group")
    return None
