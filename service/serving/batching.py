"""Dynamic batching: concurrent requests' kernel calls coalesced into one, as inference
servers batch model calls.

Request threads plan their own batches (and on the CPU stage their cutouts), then hand
their kernel inputs to :meth:`KernelBatcher.execute` (an engine ``execute`` hook) and
wait. One batcher thread takes the first waiting call, gathers the calls that arrive
within ``max_wait_seconds`` (or until ``max_objects`` objects are waiting), groups the
compatible ones (same kernel settings and cutout sizes), runs each group as one kernel
call and hands every caller its own rows. With device-resident exposures a group's
calls share one upload of their windows and positions; each gathers its cutouts on the
device from its own exposure's planes. Kernels thus run on one thread: on a GPU that is one stream of large
launches; on a CPU it overlaps one request's kernels with other requests' staging.
"""

from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
import queue
import threading
import time

from forcedphot.photometry.runner import KernelInputs, KernelResults, KernelRunner, Scope


@dataclass
class _Call:
    runner: KernelRunner
    inputs: KernelInputs
    scope: Scope
    future: Future = field(default_factory=Future)

    @property
    def group(self) -> tuple:
        return (self.runner.key, self.inputs.shape_key, self.scope)


@dataclass
class BatchStats:
    """What the batcher has done, for metrics and benchmarks."""

    kernel_calls: int = 0  # kernel invocations made
    requests: int = 0  # execute() calls served
    objects: int = 0


class KernelBatcher:
    """Coalesces the kernel calls of concurrent measurements (see the module docstring)."""

    def __init__(self, max_wait_seconds: float = 0.002, max_objects: int = 50_000):
        if max_wait_seconds < 0 or max_objects < 1:
            raise ValueError("max_wait_seconds must be >= 0 and max_objects >= 1")
        self.max_wait_seconds, self.max_objects = max_wait_seconds, max_objects
        self.stats = BatchStats()
        self._queue: queue.Queue[_Call | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="kernel-batcher", daemon=True)
        self._thread.start()

    def execute(self, runner: KernelRunner, inputs: KernelInputs, scope: Scope) -> KernelResults:
        """Queue one kernel call and wait for its results (the engine's ``execute``)."""
        call = _Call(runner, inputs, scope)
        self._queue.put(call)
        return call.future.result()

    def close(self) -> None:
        """Finish the queued calls, then stop the batcher thread."""
        self._queue.put(None)
        self._thread.join()

    def _gather(self, first: _Call) -> tuple[list[_Call], bool]:
        """The first call plus those arriving within the wait; True when asked to stop."""
        calls, waiting = [first], len(first.inputs)
        deadline = time.monotonic() + self.max_wait_seconds
        while waiting < self.max_objects:
            try:
                call = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if call is None:
                return calls, True
            calls.append(call)
            waiting += len(call.inputs)
        return calls, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            calls, stop = self._gather(first)
            groups: dict[tuple, list[_Call]] = defaultdict(list)
            for call in calls:
                groups[call.group].append(call)
            for group in groups.values():
                self._run(group)

    def _run(self, group: list[_Call]) -> None:
        """One kernel call for a group of compatible calls."""
        head = group[0]
        try:
            parts = head.runner.run([c.inputs for c in group], head.scope)
        except Exception as exc:  # hand the failure to every waiting caller
            for call in group:
                call.future.set_exception(exc)
            return
        self.stats.kernel_calls += 1
        self.stats.requests += len(group)
        self.stats.objects += sum(len(c.inputs) for c in group)
        for call, part in zip(group, parts):
            call.future.set_result(part)
