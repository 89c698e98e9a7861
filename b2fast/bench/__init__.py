"""Speed benchmarks, ``python -m b2fast.bench <suite>``: one module per suite.

``cli`` parses and checks the arguments (no torch import, so ``--help`` is instant) and runs a
suite; ``common`` holds the timer, summary statistics, matmul ceiling and FLOP counter every
suite shares; ``sd`` what the Stable Diffusion suites (``sample``, ``train``, ``stage``) share.
Suites: ``kernels``, ``rewards``, ``sample``, ``train``, ``stage``, ``all``.
"""
