"""The peak of memory held through torch's allocator over a block of code, on any device.

    with AllocationTrace() as trace:
        params = sharded.init(...)
    trace.peak      # bytes: the most held at once, above what was held when the block began
    trace.end       # bytes still held at the end (allocated inside the block, not yet freed)

On CUDA/NPU the caching allocator keeps these counts itself (`max_memory_allocated`); the CPU
has no such counter, and the resident set size mixes in the interpreter, libraries, file pages
and malloc's slack. torch's profiler records every allocation and free of its CPU allocator
(eager ops and compiled code alike) with a timestamp; summing them in time order gives the
peak of tensor memory exactly. It is slow (seconds to start, and per op): measure, not train.
"""
from __future__ import annotations

from torch.profiler import ProfilerActivity, profile


class AllocationTrace:
    """Context manager measuring the CPU allocator's peak (bytes) over its block."""

    def __init__(self) -> None:
        self.peak = 0
        self.end = 0
        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)

    def __enter__(self) -> AllocationTrace:
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profile.__exit__(*exc)
        # Allocations are the "self" memory of the op that made them (nested ops count once);
        # frees appear as "[memory]" events with negative sizes.
        events = sorted(self._profile.events(), key=lambda e: e.time_range.start)
        held = peak = 0
        for e in events:
            held += e.self_cpu_memory_usage
            peak = max(peak, held)
        self.peak, self.end = peak, held
