"""Benchmarks stage: `facemark bench` -- latency and accuracy of every model variant against eager PyTorch.

`run_benchmark(BenchConfig(...))` measures and returns a `BenchReport`; `write_reports` writes report.md,
report.json and chart.png. Training throughput: `python -m facemark.benchmarks.train_throughput`.
"""
