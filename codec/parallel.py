"""A small thread pool that runs decode *plans*: CPU decoding in parallel over tensors and chunks.

The heavy steps of decoding (rANS chunks, float-split joins, lossy reconstruction,
zstd frames, CRC-32) are numba ``nogil`` kernels or C calls that release the GIL, so
plain Python threads run them on all cores. Unlike numba's ``parallel=True`` (an
OpenMP team with a barrier per call, which stalls whenever one of its threads is
descheduled on a busy machine), a task here is an independent piece of work picked
up by whichever worker is free, and tasks of different tensors overlap.

A plan is a generator that yields *stages*: lists of zero-argument callables that may
run in any order, in parallel. The next stage starts when every task of the previous
one has finished (so a stage may use what the previous one computed); the
generator's return value is the plan's result::

    def plan():
        table = build_table()          # runs in the scheduling thread: keep it light
        yield [lambda a=a: decode(a) for a in ranges]
        return out

    result = run(plan(), threads=2)          # blocking
    future = submit(plan(), threads=2)       # concurrent.futures.Future

``threads=1`` (or a call from inside a worker thread) runs the plan inline in the
calling thread, stage by stage.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generator, Iterable

Task = Callable[[], object]
Plan = Generator[list, None, object]

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
_local = threading.local()


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """Worker threads used when a caller passes ``threads=None``: ``ACZ_THREADS`` if set, else the CPUs."""
    env = os.environ.get("ACZ_THREADS", "").strip()
    if env:
        try:
            v = int(env)
        except ValueError:
            raise ValueError(f"ACZ_THREADS must be a positive integer, not {env!r}") from None
        if v < 1:
            raise ValueError(f"ACZ_THREADS must be a positive integer, not {env!r}")
        return v
    return cpu_count()


@contextlib.contextmanager
def threads_override(threads: int | None):
    """Inside this block, ``threads=None`` in this thread means ``threads`` (None: no change)."""
    if threads is None:
        yield
        return
    threads = resolve_threads(threads)
    old = getattr(_local, "threads", None)
    _local.threads = threads
    try:
        yield
    finally:
        _local.threads = old


def set_thread_default(threads: int) -> None:
    """From now on, ``threads=None`` in this thread means ``threads`` (a worker thread's setting
    for its life; :func:`threads_override` for a block of code)."""
    _local.threads = resolve_threads(threads)


def resolve_threads(threads: int | None) -> int:
    if threads is None:
        return getattr(_local, "threads", None) or default_threads()
    threads = int(threads)
    if threads < 1:
        raise ValueError("threads must be >= 1")
    return threads


def in_worker() -> bool:
    """True inside a pool worker thread (nested plans then run inline: a worker never blocks on the pool)."""
    return getattr(_local, "worker", False)


def _mark_worker() -> None:
    _local.worker = True


def pool(threads: int) -> ThreadPoolExecutor:
    """The shared pool with ``threads`` workers (created on first use, daemon threads)."""
    with _pools_lock:
        p = _pools.get(threads)
        if p is None:
            p = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"acz-decode{threads}", initializer=_mark_worker)
            _pools[threads] = p
        return p


def run_inline(plan: Plan) -> object:
    """Run a plan in this thread, stage by stage, task by task."""
    try:
        tasks = next(plan)
        while True:
            for t in tasks:
                t()
            tasks = plan.send(None)
    except StopIteration as stop:
        return stop.value


class _Run:
    """One plan in flight on a pool: the last task of a stage to finish advances the plan."""

    __slots__ = ("plan", "pool", "future", "left", "error", "lock")

    def __init__(self, plan: Plan, pool: ThreadPoolExecutor, future: Future):
        self.plan = plan
        self.pool = pool
        self.future = future
        self.left = 0
        self.error: BaseException | None = None
        self.lock = threading.Lock()

    def advance(self, first: bool = False) -> None:
        while True:
            try:
                tasks = next(self.plan) if first else self.plan.send(None)
            except StopIteration as stop:
                self.future.set_result(stop.value)
                return
            except BaseException as exc:  # noqa: BLE001 - handed to the future
                self.future.set_exception(exc)
                return
            first = False
            tasks = list(tasks)
            if not tasks:
                continue
            if len(tasks) == 1:  # nothing to overlap: run it here (saves a hand-off)
                try:
                    tasks[0]()
                except BaseException as exc:  # noqa: BLE001
                    self._fail(exc)
                    return
                continue
            self.left = len(tasks)
            for t in tasks[1:]:
                self.pool.submit(self._task, t)
            self._task(tasks[0])  # the scheduling thread takes a share of the stage
            return

    def _fail(self, exc: BaseException) -> None:
        self.plan.close()
        self.future.set_exception(exc)

    def _task(self, t: Task) -> None:
        try:
            if self.error is None:
                t()
        except BaseException as exc:  # noqa: BLE001
            with self.lock:
                if self.error is None:
                    self.error = exc
        with self.lock:
            self.left -= 1
            last = self.left == 0
        if last:
            if self.error is not None:
                self._fail(self.error)
            else:
                self.advance()


def submit(plan: Plan, threads: int | None = None) -> Future:
    """Start a plan on the pool; its result (or first error) arrives in the returned future.
    With one thread, or from inside a worker, the plan runs now, in this thread."""
    n = resolve_threads(threads)
    fut: Future = Future()
    if n == 1 or in_worker():
        try:
            fut.set_result(run_inline(plan))
        except BaseException as exc:  # noqa: BLE001
            fut.set_exception(exc)
        return fut
    p = pool(n)
    run = _Run(plan, p, fut)
    p.submit(run.advance, True)
    return fut


def run(plan: Plan, threads: int | None = None) -> object:
    """Run a plan to completion (blocking) and return its result."""
    n = resolve_threads(threads)
    if n == 1 or in_worker():
        return run_inline(plan)
    return submit(plan, n).result()


def split_ranges(n: int, parts: int, multiple: int = 1, minimum: int = 1) -> list[tuple[int, int]]:
    """[0, n) cut into at most ``parts`` contiguous ranges, each a multiple of ``multiple`` long
    (but the last) and at least ``minimum`` long (but the last)."""
    if n <= 0:
        return []
    size = -(-n // max(1, parts))
    size = max(size, minimum)
    size = -(-size // multiple) * multiple
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def stage(fn: Callable, ranges: Iterable[tuple[int, int]]) -> list[Task]:
    """One task per range: ``fn(a, b)``."""
    return [lambda a=a, b=b: fn(a, b) for a, b in ranges]


def together(plans: Iterable[Plan]) -> Plan:
    """One plan running several in lock step (stage k of each in one stage); returns their results."""
    plans = list(plans)
    results: list = [None] * len(plans)
    active = list(range(len(plans)))
    while active:
        tasks: list = []
        still = []
        for i in active:
            try:
                st = plans[i].send(None)
            except StopIteration as stop:
                results[i] = stop.value
                continue
            tasks += list(st)
            still.append(i)
        active = still
        if tasks:
            yield tasks
    return results


# ----------------------------------------------------------------- the encoders' fan-out


def inner_threads() -> int:
    """Threads a computation started in this thread may fan out to: the :func:`threads_override`
    in force in this thread, else 1 (the encoders fan out only where their caller asked for it;
    the stream encoder sets it to its thread count in its scheduling thread, to 1 in its workers)."""
    return getattr(_local, "threads", None) or 1


def _spawn(target, init, threads_in_child: int) -> threading.Thread:
    def body():
        _local.threads = threads_in_child
        if init is not None:
            init()
        target()

    t = threading.Thread(target=body, daemon=True, name="acz-encode")
    t.start()
    return t


def run_tasks(tasks: list[Task], threads: int, init: Callable[[], None] | None = None) -> list:
    """Run independent callables on up to ``threads`` threads (the calling thread one of them;
    the others started for the call and run ``init`` first); their results in order. The first
    error is raised after every thread has stopped taking tasks."""
    tasks = list(tasks)
    t = min(max(1, threads), len(tasks))
    if t <= 1:
        return [f() for f in tasks]
    results: list = [None] * len(tasks)
    lock = threading.Lock()
    nxt = [0]
    errors: list[BaseException] = []

    def loop():
        while True:
            with lock:
                if errors or nxt[0] >= len(tasks):
                    return
                i = nxt[0]
                nxt[0] += 1
            try:
                results[i] = tasks[i]()
            except BaseException as exc:  # noqa: BLE001 - raised in the calling thread
                with lock:
                    errors.append(exc)
                return

    others = [_spawn(loop, init, 1) for _ in range(t - 1)]
    try:
        loop()
    finally:
        for th in others:
            th.join()
    if errors:
        raise errors[0]
    return results


def pipeline(plans: list[Callable[[], Generator]], threads: int, init: Callable[[], None] | None = None) -> list:
    """Run step-wise plans in a wavefront: ``plans[c]()`` makes a generator whose every
    ``next()`` does one step (and whose return value is the plan's result); step k of plan c
    runs after step k of plan c − 1, its end after plan c − 1's end (the dependence of the
    row chunks of one tcq search: batch k of a chunk needs the trellis states that batch k of
    the chunk above ends in). Plan c runs on thread c mod T (T = min(threads, plans)), plans of
    one thread one after another: at most T plans are open at a time. The results, in order,
    are those of running the plans one after another. The other threads run ``init`` first."""
    n = len(plans)
    t = min(max(1, threads), n)
    results: list = [None] * n
    if t <= 1:
        for c, mk in enumerate(plans):
            g = mk()
            while True:
                try:
                    next(g)
                except StopIteration as stop:
                    results[c] = stop.value
                    break
        return results
    done = [0] * n  # steps finished per plan
    ended = [False] * n
    errors: list[BaseException] = []
    cond = threading.Condition()

    def chain(j: int) -> None:
        for c in range(j, n, t):
            g = None
            k = 0
            try:
                g = plans[c]()
                while True:
                    if c:
                        with cond:
                            while not errors and not (ended[c - 1] or done[c - 1] > k):
                                cond.wait()
                            if errors:
                                return
                    try:
                        next(g)
                    except StopIteration as stop:
                        results[c] = stop.value
                        with cond:
                            ended[c] = True
                            cond.notify_all()
                        break
                    k += 1
                    with cond:
                        done[c] = k
                        cond.notify_all()
            except BaseException as exc:  # noqa: BLE001 - raised in the calling thread
                with cond:
                    errors.append(exc)
                    cond.notify_all()
                return
            finally:
                if g is not None:
                    g.close()

    others = [_spawn(lambda j=j: chain(j), init, 1) for j in range(1, t)]
    try:
        chain(0)
    finally:
        if sys.exc_info()[0] is not None:  # interrupted in this thread: the others stop at their next step
            with cond:
                errors.append(sys.exc_info()[1])
                cond.notify_all()
        for th in others:
            th.join()
    if errors:
        raise errors[0]
    return results
