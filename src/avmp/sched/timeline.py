"""Pool capacity and running requests over a run, sampled evenly whatever its length:
what the simulator's report and the engine's stats plot."""

from __future__ import annotations

from typing import Any

from avmp.memory.spec import MemoryUsage


class TimelineRecorder:
    """Keeps at most ``2 x target`` evenly spaced samples while the number of steps is
    unknown: it samples every ``stride`` steps and, when full, drops every other sample
    and doubles the stride. `samples()` thins the result to ``target`` points."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.stride = 1
        self._samples: list[dict[str, Any]] = []

    def should_sample(self, step: int) -> bool:
        return self.target > 0 and step % self.stride == 0

    def add(self, now_s: float, usage: MemoryUsage, num_running: int, num_waiting: int) -> None:
        self._samples.append(
            {
                "t_s": now_s,
                "kv_capacity_bytes": usage.kv_capacity_bytes,
                "state_capacity_bytes": usage.state_capacity_bytes,
                "kv_used_bytes": usage.kv_used_bytes,
                "state_used_bytes": usage.state_used_bytes,
                "num_running": num_running,
                "num_waiting": num_waiting,
            }
        )
        if len(self._samples) >= 2 * self.target:
            self._samples = self._samples[::2]
            self.stride *= 2

    def samples(self) -> list[dict[str, Any]]:
        count = len(self._samples)
        if count <= self.target:
            return list(self._samples)
        picks = sorted({round(i * (count - 1) / (self.target - 1)) for i in range(self.target)})
        return [self._samples[i] for i in picks]
