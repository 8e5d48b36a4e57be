"""vivit_kernels' ops, one module per op: Triton kernels -> launcher -> ``torch.library`` custom op (fake +
autograd) -> functional API, with its eager reference beside it.

- ``registry``: the one table of ops (implementations, reference, cost, AOT cases, tests, benchmark);
- ``attention``, ``layer_norm``, ``linear`` (the GEMM engine and the qkv / linear / mlp ops), ``patch_embed``;
  ``gelu`` and ``preprocess`` (the C++/CUDA extension's ops); ``activations``; ``_triton`` (interpreter detection,
  configs, autotuning, launch); ``_costs`` (FLOP formulas of the custom ops); ``_extension`` (loading csrc/).

The functions themselves are imported from ``vivit_kernels.functional`` (here a module name like ``linear``
would be shadowed by a function of the same name).
"""
