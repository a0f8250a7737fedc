"""One module per ``morphnas bench`` part: its sizes, its workloads and its ``bench_*`` function.

A new part is a module here, one entry in ``morphnas.bench.PARTS`` and ``_run_part``, its default
repeats in ``REPEATS``/``QUICK_REPEATS``, and its table in ``morphnas.bench.tables``.
"""
