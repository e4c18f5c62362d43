"""Benchmarks of marginops: one registry, one runner, one CLI (``python -m benchmarks --help``).

* :mod:`benchmarks.registry`: problems, implementations (one name each) and their inputs;
* :mod:`benchmarks.runner`: every case in a fresh process (check against the reference, extra peak
  memory, time, the CPU share others took), or the cases of a shape interleaved in one process, or
  against another git revision; long-format records with the machine;
* :mod:`benchmarks.presets`: named case lists and the targets they check;
* :mod:`benchmarks.report`: the README and ``docs/benchmarks.md`` tables and the plots, from the records;
* :mod:`benchmarks.demo`, :mod:`benchmarks.gpu_check`, :mod:`benchmarks.distributed`,
  :mod:`benchmarks.perf_model`: the other subcommands;
* ``benchmarks/test_*.py``: their tests (collected by ``python -m pytest``) and the pytest-benchmark cases.
"""
