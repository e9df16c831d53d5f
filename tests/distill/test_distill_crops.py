"""crop_boxes (eq. 8-9) against hand cases and the replicate-the-image reference; sanitize_boxes."""

import math

import pytest
import torch
import torch.nn.functional as F

from cls2det.distill import box_affine_grids, box_grids, crop_boxes, crop_boxes_naive, sanitize_boxes


def _index_image(height=8, width=8, images=1):
    """[N, 3, H, W] with pixel (y, x) of image n, channel ch = 1000 n + 100 ch + 10 y + x."""
    y = torch.arange(height, dtype=torch.float64)[:, None]
    x = torch.arange(width, dtype=torch.float64)[None, :]
    base = 10 * y + x  # [H, W]
    return torch.stack([torch.stack([base + 100 * ch + 1000 * n for ch in range(3)]) for n in range(images)])


def test_integer_block_at_block_size_gives_the_pixels():
    # align_corners=False: output pixel j of box (x1..x2) samples x = x1 + (j + 0.5)(x2 - x1)/s, i.e. the centre of
    # pixel x1 + j when s = x2 - x1. Box (2, 1, 6, 5) at s=4 is rows 1..4, columns 2..5.
    img = _index_image()
    crop = crop_boxes(img, torch.tensor([[2.0, 1.0, 6.0, 5.0]], dtype=torch.float64), torch.tensor([0]), size=4)
    expected = torch.tensor([[12, 13, 14, 15], [22, 23, 24, 25], [32, 33, 34, 35], [42, 43, 44, 45]])
    assert torch.equal(crop[0, 0], expected.double())
    assert torch.equal(crop[0, 2], expected.double() + 200)


def test_whole_image_box_reproduces_the_image():
    # at the image's own size: every output pixel samples one pixel centre
    img = _index_image(8, 8)
    same = crop_boxes(img, torch.tensor([[0.0, 0.0, 8.0, 8.0]], dtype=torch.float64), torch.tensor([0]), size=8)
    assert torch.equal(same, img)
    # resized (6x8 -> 4x4): bilinear, align_corners=False, like F.interpolate (no sample falls outside when shrinking)
    img = _index_image(6, 8)
    crop = crop_boxes(img, torch.tensor([[0.0, 0.0, 8.0, 6.0]], dtype=torch.float64), torch.tensor([0]), size=4)
    resized = F.interpolate(img, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(crop, resized, rtol=0, atol=1e-12)
    # row 0 samples y = 0.5 * 6/4 - 0.5 = 0.25, column 0 samples x = 0.5 * 8/4 - 0.5 = 0.5: value 10*0.25 + 0.5
    assert crop[0, 0, 0, 0].item() == pytest.approx(3.0)


def test_outside_reads_zeros():
    img = torch.ones(1, 3, 4, 4, dtype=torch.float64)
    crop = crop_boxes(img, torch.tensor([[4.0, 0.0, 8.0, 4.0]], dtype=torch.float64), torch.tensor([0]), size=4)
    assert torch.equal(crop, torch.zeros_like(crop))  # box entirely right of the image: zero padding


def _random_case(seed, dtype=torch.float64, num_images=3, k=9, height=20, width=30):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(num_images, 3, height, width, generator=g, dtype=dtype)
    xy = torch.rand(k, 2, generator=g, dtype=dtype) * torch.tensor([width, height], dtype=dtype) - 3  # some outside
    wh = torch.rand(k, 2, generator=g, dtype=dtype) * 12 + 0.5
    boxes = torch.cat([xy, xy + wh], dim=1)
    index = torch.tensor([2, 0, 2, 2, 0, 0, 2, 0, 2][:k])  # unsorted, image 1 has no box
    return images, boxes, index


@pytest.mark.parametrize("order", ["shuffled", "grouped", "one_image"])
def test_matches_naive_values_and_box_gradients(order):
    images, boxes, index = _random_case(0)
    if order == "grouped":  # sorted by image: the fast path without the final gather
        index = index.sort().values
    elif order == "one_image":
        images, index = images[:1], torch.zeros_like(index)
    weight = torch.randn(9, 3, 7, 7, dtype=torch.float64)
    grads = []
    for fn in (crop_boxes, crop_boxes_naive):
        b = boxes.clone().requires_grad_()
        out = fn(images, b, index, size=7)
        (out * weight).sum().backward()
        grads.append((out.detach(), b.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=1e-10)
    assert grads[0][1].abs().sum() > 0


def test_each_output_is_its_own_box_in_input_order():
    images, boxes, index = _random_case(1)
    out = crop_boxes(images, boxes, index, size=5)
    for k in range(len(boxes)):
        alone = crop_boxes(images[index[k] : index[k] + 1], boxes[k : k + 1], torch.tensor([0]), size=5)
        torch.testing.assert_close(out[k : k + 1], alone, rtol=0, atol=1e-12)


def test_gradcheck_boxes():
    images, boxes, index = _random_case(2, k=4)
    assert torch.autograd.gradcheck(lambda b: crop_boxes(images, b, index, size=3), (boxes.requires_grad_(),))


def test_broadcast_grids_equal_affine_grid_values_and_gradients():
    """box_grids (broadcast, used by crop_boxes) vs F.affine_grid on eq. (8)'s theta, in float64: equal, and so are
    the box gradients of a random weighting of the grid; the hand case is x_j = 2 (x1 + (j + .5)/s (x2 - x1))/W - 1."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(5, 2, generator=g, dtype=torch.float64) * 20
    boxes = torch.cat([xy, xy + 1 + torch.rand(5, 2, generator=g, dtype=torch.float64) * 30], 1).requires_grad_()
    weights = torch.randn(5, 7, 7, 2, generator=g, dtype=torch.float64)
    ours, reference = box_grids(boxes, 40, 60, 7), box_affine_grids(boxes, 40, 60, 7)
    assert ours.shape == (5, 7, 7, 2) and torch.allclose(ours, reference, rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad((ours * weights).sum(), boxes)
    (expected,) = torch.autograd.grad((reference * weights).sum(), boxes)
    assert torch.allclose(grad, expected, rtol=0, atol=1e-10)
    one = box_grids(torch.tensor([[10.0, 4.0, 30.0, 8.0]], dtype=torch.float64), 40, 60, 4)[0]  # [s, s, 2]
    assert one[0, :, 0].tolist() == pytest.approx([2 * (10 + (j + 0.5) / 4 * 20) / 60 - 1 for j in range(4)])
    assert one[:, 0, 1].tolist() == pytest.approx([2 * (4 + (i + 0.5) / 4 * 4) / 40 - 1 for i in range(4)])
    assert torch.equal(one[:, :, 0], one[:1, :, 0].expand(4, 4))  # x depends on the column only


def test_one_grid_sample_per_image_without_replication(monkeypatch):
    images, boxes, index = _random_case(3)
    calls = []
    original = F.grid_sample

    def spy(inp, grid, *args, **kwargs):
        calls.append((tuple(inp.shape), tuple(grid.shape)))
        return original(inp, grid, *args, **kwargs)

    monkeypatch.setattr(F, "grid_sample", spy)
    crop_boxes(images, boxes, index, size=5)
    # images 0 and 2 have 4 and 5 boxes; image 1 none. Each call reads one image, grids stacked along the height
    assert calls == [((1, 3, 20, 30), (1, 4 * 5, 5, 2)), ((1, 3, 20, 30), (1, 5 * 5, 5, 2))]


def test_empty_boxes_and_float32():
    images = torch.rand(2, 3, 10, 10)
    boxes = torch.zeros(0, 4, requires_grad=True)
    out = crop_boxes(images, boxes, torch.zeros(0, dtype=torch.int64), size=6)
    assert out.shape == (0, 3, 6, 6) and out.dtype == torch.float32
    out.sum().backward()
    assert boxes.grad.shape == (0, 4)


@pytest.mark.parametrize(
    "boxes,index,message",
    [
        (torch.zeros(2, 4), torch.tensor([0, 2]), r"image_index must be in \[0, 2\), got values in \[0, 2\]"),
        (torch.zeros(2, 4), torch.tensor([-1, 0]), r"image_index must be in \[0, 2\)"),
        (torch.zeros(2, 5), torch.tensor([0, 0]), r"boxes must be \[K, 4\]"),
        (torch.zeros(2, 4), torch.tensor([0]), r"image_index must be \[K\]=2"),
        (torch.zeros(2, 4), torch.tensor([0.0, 1.0]), "image_index must be an integer tensor"),
    ],
)
def test_bad_inputs_raise(boxes, index, message):
    with pytest.raises(ValueError, match=message):
        crop_boxes(torch.zeros(2, 3, 8, 8), boxes, index, size=4)


# ---------------------------------------------------------------- sanitize_boxes


def test_sanitize_is_identity_with_unit_gradient_for_valid_boxes():
    boxes = torch.tensor([[0.0, 0.0, 40.0, 30.0], [3.5, 2.0, 4.5, 29.0], [10.0, 5.0, 20.0, 6.0]], requires_grad=True)
    out = sanitize_boxes(boxes, 30, 40)
    assert torch.equal(out, boxes)
    out.backward(torch.arange(12.0).view(3, 4))
    assert torch.equal(boxes.grad, torch.arange(12.0).view(3, 4))  # also on the image edges


def test_sanitize_hand_cases():
    inf, nan = math.inf, math.nan
    boxes = torch.tensor(
        [
            [5.0, 4.0, 2.0, 1.0],  # inverted -> ordered
            [nan, 2.0, 3.0, nan],  # NaN -> the image edge on its side
            [-inf, -1e30, inf, 1e30],  # infinite / huge -> the whole image
            [40.0, 3.0, 40.0, 3.0],  # zero size on the right edge -> 1 px, shifted inside
            [50.0, -9.0, 60.0, -2.0],  # entirely outside -> 1 px at the corner
            [10.0, 10.0, 10.2, 12.0],  # too narrow -> widened about its centre
        ]
    )
    out = sanitize_boxes(boxes, height=30, width=40)
    expected = torch.tensor(
        [
            [2.0, 1.0, 5.0, 4.0],
            [0.0, 2.0, 3.0, 30.0],
            [0.0, 0.0, 40.0, 30.0],
            [39.0, 2.5, 40.0, 3.5],
            [39.0, 0.0, 40.0, 1.0],
            [9.6, 10.0, 10.6, 12.0],
        ]
    )
    torch.testing.assert_close(out, expected)


def test_sanitize_random_garbage_gives_valid_boxes_and_finite_gradients():
    g = torch.Generator().manual_seed(0)
    boxes = torch.randn(200, 4, generator=g, dtype=torch.float64) * 1e3
    boxes[torch.rand(200, 4, generator=g) < 0.1] = math.nan
    boxes[torch.rand(200, 4, generator=g) < 0.1] = math.inf
    boxes[torch.rand(200, 4, generator=g) < 0.1] = -math.inf
    boxes.requires_grad_()
    out = sanitize_boxes(boxes, 64, 48, min_size=2.0)
    assert torch.isfinite(out).all()
    x1, y1, x2, y2 = out.detach().unbind(1)
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= 48).all() and (y2 <= 64).all()
    assert (x2 - x1 >= 2 - 1e-9).all() and (y2 - y1 >= 2 - 1e-9).all()
    out.sum().backward()
    assert torch.isfinite(boxes.grad).all()


def test_sanitize_rejects_min_size_larger_than_the_image():
    with pytest.raises(ValueError, match="min_size=8 exceeds the image size 4x20"):
        sanitize_boxes(torch.zeros(1, 4), 4, 20, min_size=8)
