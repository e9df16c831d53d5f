"""Differentiable box crops with a spatial transformer (Guo et al. 2021, eq. 8-9), and box sanitising.

``crop_boxes`` samples each box onto a ``size x size`` grid with one bilinear ``grid_sample`` per image: the boxes of
an image have their sampling grids stacked along the height axis, so the image is never copied once per box.
``crop_boxes_naive`` is the textbook version (replicate the image per box, ``F.affine_grid`` on eq. (8)'s theta, one
``grid_sample``); it is kept as the reference for tests and ``benchmarks/bench_crops.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_crop_inputs(images: Tensor, boxes: Tensor, image_index: Tensor, size: int) -> None:
    if images.dim() != 4:
        raise ValueError(f"images must be [N, 3, H, W], got shape {tuple(images.shape)}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [K, 4] xyxy, got shape {tuple(boxes.shape)}")
    if image_index.shape != (boxes.shape[0],):
        raise ValueError(f"image_index must be [K]={boxes.shape[0]}, got shape {tuple(image_index.shape)}")
    if image_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"image_index must be an integer tensor, got {image_index.dtype}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")


def box_affine_grids(boxes: Tensor, height: int, width: int, size: int, *, dtype: torch.dtype | None = None) -> Tensor:
    """Sampling grids of boxes, eq. (8): ``theta_k = [[(x2-x1)/W, 0, -1+(x1+x2)/W], [0, (y2-y1)/H, -1+(y1+y2)/H]]``.

    Args:
        boxes: [K, 4] xyxy in pixels of an image of ``height x width`` (pixel i spans [i, i+1]).
        height, width: the image size in pixels.
        size: s, the crop side in pixels.
        dtype: dtype of the grid (default: the boxes' dtype).

    Returns:
        [K, s, s, 2] grids in grid_sample's normalised (x, y) coordinates, ``align_corners=False``: output pixel j of
        a crop samples the image at x = x1 + (j + 0.5) / s * (x2 - x1). Differentiable w.r.t. ``boxes``.
    """
    boxes = boxes.to(dtype or boxes.dtype)
    x1, y1, x2, y2 = boxes.unbind(1)  # each [K]
    zero = torch.zeros_like(x1)
    theta = torch.stack(
        [(x2 - x1) / width, zero, (x1 + x2) / width - 1, zero, (y2 - y1) / height, (y1 + y2) / height - 1], dim=1
    ).view(-1, 2, 3)  # [K, 2, 3]
    return F.affine_grid(theta, [boxes.shape[0], 1, size, size], align_corners=False)  # [K, s, s, 2]


def box_grids(boxes: Tensor, height: int, width: int, size: int, *, dtype: torch.dtype | None = None) -> Tensor:
    """The grids of :func:`box_affine_grids`, built by broadcasting: eq. (8)'s theta has no shear, so a grid's x
    depends on the column only and its y on the row only, ``x_j = 2 (x1 + (j + 0.5) / s (x2 - x1)) / W - 1``; no
    [K, s², 3] matmul, and the backward is a sum over the broadcast axis.

    Args/returns: as :func:`box_affine_grids`, [K, 4] boxes -> [K, s, s, 2] grids; equal to it up to float rounding.
    """
    boxes = boxes.to(dtype or boxes.dtype)
    centres = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) + 0.5) / size  # [s] in (0, 1)
    x1, y1, x2, y2 = (c[:, None] for c in boxes.unbind(1))  # each [K, 1]
    xs = (x1 + centres * (x2 - x1)) * (2 / width) - 1  # [K, s], by column
    ys = (y1 + centres * (y2 - y1)) * (2 / height) - 1  # [K, s], by row
    k = boxes.shape[0]
    return torch.stack([xs[:, None, :].expand(k, size, size), ys[:, :, None].expand(k, size, size)], dim=3)


def crop_boxes(images: Tensor, boxes: Tensor, image_index: Tensor, *, size: int = 112) -> Tensor:
    """Crop boxes from a batch of images with bilinear sampling, eq. (8)-(9) of Guo et al. (2021).

    Each image is read once: its k boxes' grids are stacked into one [1, k*s, s, 2] grid and sampled with a single
    ``grid_sample`` (bilinear, zero padding, ``align_corners=False``), so memory is O(K·s²), not O(K·H·W).

    Args:
        images: [N, 3, H, W] float images (any normalisation; sampled as is).
        boxes: [K, 4] xyxy boxes in pixels of ``images``; may require grad. Parts outside the image read zeros.
        image_index: [K] int64, the image of each box, in [0, N).
        size: s, the side of the square crops in pixels.

    Returns:
        [K, 3, s, s] crops in the input order, in ``images.dtype``; differentiable w.r.t. ``boxes`` (and ``images``).
    """
    _check_crop_inputs(images, boxes, image_index, size)
    num_images, channels, height, width = images.shape
    num_boxes = boxes.shape[0]
    if num_boxes == 0:
        return images.new_zeros(0, channels, size, size) + boxes.sum().to(images.dtype) * 0
    order = torch.argsort(image_index, stable=True)  # [K] boxes grouped by image
    sorted_index = image_index[order]
    is_sorted = (image_index[1:] >= image_index[:-1]).all()  # positives usually come image by image
    lo, hi, is_sorted = torch.stack([sorted_index[0], sorted_index[-1], is_sorted.long()]).tolist()  # one host sync
    if lo < 0 or hi >= num_images:
        raise ValueError(f"image_index must be in [0, {num_images}), got values in [{lo}, {hi}]")
    counts = torch.bincount(sorted_index, minlength=num_images).tolist()  # boxes per image

    # one grid per image from its own boxes (slicing one [K, s, s, 2] grid would cost a K-sized zero tensor per
    # image in the backward)
    crops = []
    for n, image_boxes in enumerate((boxes if is_sorted else boxes[order]).split(counts)):
        k = image_boxes.shape[0]
        if k == 0:
            continue
        grid = box_grids(image_boxes, height, width, size, dtype=images.dtype).view(1, k * size, size, 2)  # stacked
        out = F.grid_sample(images[n : n + 1], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        crops.append(out.view(channels, k, size, size).transpose(0, 1))  # [1, 3, k*s, s] -> [k, 3, s, s]
    crops_sorted = torch.cat(crops)  # [K, 3, s, s] in image order
    if is_sorted:
        return crops_sorted  # the stable sort was the identity
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(num_boxes, device=order.device)
    return crops_sorted[inverse]  # back to the input order


def crop_boxes_naive(images: Tensor, boxes: Tensor, image_index: Tensor, *, size: int = 112) -> Tensor:
    """Reference implementation of :func:`crop_boxes`: replicates the image per box (``images[image_index]``, a
    [K, 3, H, W] copy) and calls ``grid_sample`` once. Same arguments, same result; O(K·H·W) memory."""
    _check_crop_inputs(images, boxes, image_index, size)
    _, channels, height, width = images.shape
    grids = box_affine_grids(boxes, height, width, size, dtype=images.dtype)  # [K, s, s, 2]
    if boxes.shape[0] == 0:
        return images.new_zeros(0, channels, size, size) + grids.sum() * 0
    return F.grid_sample(images[image_index], grids, mode="bilinear", padding_mode="zeros", align_corners=False)


def _clamp_passthrough(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``clamp(x, lo, hi)`` whose gradient is 1 wherever lo <= x <= hi (torch.clamp gives 0 or 1/2 at the bounds)."""
    return torch.where(x < lo, lo, torch.where(x > hi, hi, x))


def sanitize_boxes(boxes: Tensor, height: float | Tensor, width: float | Tensor, min_size: float = 1.0) -> Tensor:
    """Turn any [K, 4] xyxy boxes into valid boxes of at least ``min_size`` pixels inside a ``height x width`` image.

    Steps: NaN coordinates become the image edge on their side (x1, y1 -> 0; x2, y2 -> W, H); each pair is ordered
    (x1 <= x2, y1 <= y2); coordinates are clamped into [0, W] x [0, H] (±inf and huge values land on the edge); a side
    shorter than ``min_size`` is widened about its centre to ``min_size`` and shifted back inside the image.
    A box that is already valid (finite, ordered, inside, sides >= min_size) is returned unchanged with gradient 1,
    so KD_loc (eq. 10) never sees a degenerate box while valid predicted boxes keep their exact gradient.

    Args:
        boxes: [K, 4] xyxy in pixels, floating point.
        height, width: image size in pixels (Python numbers, or tensors broadcastable to [K]).
        min_size: minimum box side in pixels; must not exceed the image size.

    Returns:
        [K, 4] finite, valid boxes, same dtype and device as ``boxes``.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [K, 4] xyxy, got shape {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError(f"boxes must be floating point, got {boxes.dtype}")
    h = torch.as_tensor(height, dtype=boxes.dtype, device=boxes.device)
    w = torch.as_tensor(width, dtype=boxes.dtype, device=boxes.device)
    if bool((h < min_size).any()) or bool((w < min_size).any()):
        raise ValueError(f"min_size={min_size} exceeds the image size {height}x{width}")
    zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)

    def fix_side(a: Tensor, b: Tensor, limit: Tensor) -> tuple[Tensor, Tensor]:
        a = torch.where(torch.isnan(a), zero, a)
        b = torch.where(torch.isnan(b), limit.expand_as(b), b)
        swap = a > b  # where, not minimum/maximum: those split the gradient on ties
        a, b = torch.where(swap, b, a), torch.where(swap, a, b)
        a, b = _clamp_passthrough(a, zero, limit), _clamp_passthrough(b, zero, limit)
        small = (b - a) < min_size
        start = _clamp_passthrough((a + b) / 2 - min_size / 2, zero, limit - min_size)  # widened, shifted inside
        return torch.where(small, start, a), torch.where(small, start + min_size, b)

    x1, y1, x2, y2 = boxes.unbind(1)
    x1, x2 = fix_side(x1, x2, w)
    y1, y2 = fix_side(y1, y2, h)
    return torch.stack([x1, y1, x2, y2], dim=1)
