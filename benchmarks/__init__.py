"""fastpref benchmark suite.

* :mod:`benchmarks.harness` — the one harness: cases, providers, timing, peak memory, bytes moved,
  device facts (copy bandwidth and launch latency measured in the same run), CSV rows.
* :mod:`benchmarks.sweep` — ``python -m benchmarks.sweep --preset cpu|gpu|full|smoke``: runs a preset
  through the harness and writes ``benchmarks/results/<preset>-<device>.{csv,md,png}``.
* ``benchmarks/test_bench_losses.py`` — the same providers as pytest-benchmark tests
  (``pytest benchmarks --benchmark-only``; not collected by ``make test``).

Results and the commands that produced them: ``benchmarks/RESULTS.md``.
"""
