"""Benchmark scripts (run as ``python benchmarks/<name>.py`` from the repository root) and their shared plumbing,
``benchmarks.common``. Not installed with the library: the scripts and the recipes put the repository root on
``sys.path`` to import it."""
