"""The scheduler that the simulator and the engine share: requests, continuous batching,
chunked prefill, admission and preemption over any `CacheAllocator`."""
