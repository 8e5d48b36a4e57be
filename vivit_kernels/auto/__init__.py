"""``attn="auto"``: choosing among an op's registered implementations on the user's device, one chain for ops and
for the whole model: look up (memory, the cache file) -> check against the op's reference -> time -> cache.

- ``choose``: per op call, the registry's implementations checked and timed (``choose.resolve``, the chain);
- ``cache``: the cache file and its keys;
- ``guard``: per input, the whole model on our modules against transformers' own, through the same chain;
- ``backends``: the tables of functions a ViViT layer calls ("triton": ours; "auto": asks ``choose``), with
  per-op switches;
- ``tune``: every op call of a model found on fake tensors and measured ahead of time (``vivit-kernels tune``).

Nothing is imported here: ``tune`` imports the model, which imports ``backends``.
"""
