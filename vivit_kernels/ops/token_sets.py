"""Token merging's two sets: where set A and set B lie among a layer's tokens ([CLS] first, in neither), as the
matching kernels, the eager reference, the merging state and the cost formulas all need it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MODES", "Split"]

MODES = ("temporal", "grouped", "alternate")


@dataclass(frozen=True)
class Split:
    """Where sets A and B lie among a layer's ``n`` tokens ([CLS] first, in neither set): ``temporal`` (A: the
    odd temporal slices of ``per_slice`` tokens each, B: the even ones), ``grouped`` (A: the ``odd`` tokens after
    [CLS], B: the rest) or ``alternate`` (ToMe's: A at odd positions, B at even ones)."""

    mode: str
    per_slice: int = 1
    odd: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"split mode must be one of {', '.join(MODES)}, got {self.mode!r}")

    @property
    def code(self) -> int:
        return MODES.index(self.mode)

    def sizes(self, n: int) -> tuple[int, int]:
        """(|A|, |B|) among ``n`` tokens."""
        rest = n - 1
        if self.mode == "temporal":
            slices = rest // self.per_slice
            na = (slices // 2) * self.per_slice
        elif self.mode == "grouped":
            na = self.odd
        else:
            na = n // 2
        return na, rest - na

    def positions(self, n: int, device):
        """(A's positions, B's positions) among ``n`` tokens, ascending within each set: two index tensors."""
        import torch

        position = torch.arange(n, device=device)
        if self.mode == "temporal":
            grid = position[1:].view(-1, self.per_slice)
            return grid[1::2].reshape(-1), grid[0::2].reshape(-1)
        if self.mode == "grouped":
            return position[1:1 + self.odd], position[1 + self.odd:]
        return position[1::2], position[2::2]
