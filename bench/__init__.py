"""fastrank benchmarks (SPEC §4).

Run ``python bench/run.py`` (or ``make bench``) for the default CPU sweep; see
``python bench/run.py --help``. Modules:

    workloads  seeded inputs (``make_batch``) and their pair counts
    memory     peak-RSS measurement through /proc (VmHWM reset via clear_refs)
    measure    one benchmark point (run in a fresh process) and the sigmoid ceiling
    report     markdown table, CSV and plot
    run        the command-line driver
"""
