"""What the distillation needs from a classifier teacher, stated once (any object with these members will do: the
frozen :class:`~cls2det.teacher.Teacher`, or a user's own wrapper)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class TeacherLike(Protocol):
    """A frozen classifier that takes crops in 0..1 pixels and normalises them itself.

    * ``input_size``: S, the side of the crops its logits are computed on (KD_cls).
    * ``__call__(pixels [K, 3, S, S]) -> logits [K, C]``.
    * ``forward_taps(pixels [K, 3, s, s], taps) -> list of [K, M_l, H_l, W_l]``, the feature maps named by ``taps``
      (``"obj"`` = the crop itself, ``"l0"`` = the stem, ``"l1"``.. = later stages), in the order asked (KD_loc).
    """

    input_size: int

    def __call__(self, pixels: Tensor) -> Tensor: ...

    def forward_taps(self, pixels: Tensor, taps: Sequence[str]) -> list[Tensor]: ...
