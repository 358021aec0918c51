"""Where a run executes: the device and its precision, processes (torchrun), CPU threads, the allocator."""
