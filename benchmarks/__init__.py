"""Benchmarks for marginops: run the entry points as modules from the repository root.

* ``python -m benchmarks.report [--quick]``: the benchmark report, marginops against its peers over
  sweeps of C, B and D, one fresh process per case (records, Markdown tables, plots).
* ``python -m benchmarks.plot [report.json]``: the report's plots, from its records.
* ``python -m benchmarks.cpu_targets [--quick]``: the CPU target table.
* ``python -m benchmarks.memory --impl marginops --batch 512 --dim 256 --classes 1000000``:
  extra peak memory of one forward+backward, in a fresh process.
* ``pytest benchmarks/ --benchmark-only``: the pytest-benchmark cases.

The case list and the code that runs each implementation live in
:mod:`benchmarks.cases`; timing, checks, machine facts and result records in
:mod:`benchmarks.harness`.
"""
