"""fastrank benchmarks (docs/design.md §4, issue 3).

Run ``python bench/run.py`` (``make bench``) for the default CPU sweep, ``--full``
(``make bench-full``) for every workload x mode, ``--device cuda`` (``make gpu-bench``)
on a GPU; see ``python bench/run.py --help``. Modules:

    workloads   seeded inputs of the batch, xbm and dense workloads, and their pair counts
    memory      peak-RSS measurement through /proc (VmHWM reset via clear_refs)
    measure     the ops as benchmarked, one point (CPU: in a fresh process; GPU: in-process
                with CUDA events and max_memory_allocated), the sigmoid ceiling
    op_keys     the op keys older CSVs were written with, mapped to today's (the public function names)
    gpu         the GPU special-function-unit ceiling table (H100 / H200) and device names
    report      markdown tables, the long-format CSV and the plots
    run         the command-line driver: sweeps, guard (memory, time, budget), output files
    test_micro  pytest-benchmark micro-benchmarks (``make bench-micro``)
"""
