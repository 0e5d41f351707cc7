"""Compute kernels, imported as ``spmd_rl.kernels``.

Each kernel file holds a plain torch reference (the CPU path and the test oracle); Triton
versions live beside their references.
"""
