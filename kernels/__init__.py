"""Triton kernels of b2fast, one op per file (``kernels/<op>.py``), installed as ``b2fast.kernels``.

Only :mod:`b2fast.ops` imports them; each is tested against its reference in
:mod:`b2fast.reference` (on CPU under ``TRITON_INTERPRET=1``).
"""
