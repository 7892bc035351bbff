"""Where a sweep's candidates run: in the run's own process (the default) or as Ray tasks
(`executor.kind: ray`, compress/executor/ray_run.py; plan and trade-offs in docs/ray.md)."""
