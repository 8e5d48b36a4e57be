"""Developer and GPU tooling, apart from the library: ``acceptance`` (the one-command GPU run), ``aot`` and
``aot_reference`` (the ahead-of-time sm_80 / sm_90 compile gate and its tutorial-like reference rows), ``measure``
(device-free counts: FLOPs, launches, bytes), ``bench_report`` (the benchmark report), ``demo`` and ``info`` (two
commands). Library code never imports this package (tests/test_architecture.py checks it); the command line does.
"""
