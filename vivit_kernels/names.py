"""The names a user picks among, each list written once. Plain Python, no imports: the command line's ``--help``
lists them without importing torch, and the modules that act on a name check it against the same list.

- ``ATTN``: what ``attn=`` (and ``--attn``) accepts: transformers' own attention ("eager", "sdpa") or our kernels
  behind transformers' modules ("triton": always ours; "auto": per op the fastest correct implementation, measured,
  and the whole model never slower than transformers' path). ``auto/backends.py`` turns a name into a table.
- ``DECODERS``: what ``decode=`` (and ``--decode``) accepts (``video.py`` says what each one runs).
- ``DTYPES``: the short dtype names of tables and reports -> torch's names (``--dtype`` takes torch's).
"""

from __future__ import annotations

__all__ = ["ATTN", "DECODERS", "DTYPES", "dtype_name"]

ATTN = ("eager", "sdpa", "triton", "auto")
DECODERS = ("auto", "pyav", "torchcodec", "cuda")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def dtype_name(dtype) -> str:
    """The short name ("bf16") of a torch dtype or of torch's name for one ("bfloat16", "torch.bfloat16")."""
    long = str(dtype).removeprefix("torch.")
    for short, name in DTYPES.items():
        if name == long:
            return short
    raise ValueError(f"no short name for dtype {dtype}; known: {', '.join(DTYPES.values())}")
