"""Fuzz test of the dataset validator: on any COCO JSON it either accepts the data, and then the split loads with
finite, positive-size boxes inside their images, or raises DatasetError with one line; never another exception."""

from __future__ import annotations

import io
import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cls2det.data import CocoDetection, DatasetError, check_dataset, load_split


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color=0).save(buffer, format="PNG")
    return buffer.getvalue()


# the image files every example may point at: name -> (bytes, real width, real height); "missing.png" does not exist
FILES = {
    "a.png": (_png(8, 6), 8, 6),
    "b.png": (_png(5, 7), 5, 7),
    "gray.png": (_png(4, 4, "L"), 4, 4),
    "broken.png": (_png(8, 6)[:40], 8, 6),  # cut short: only decoding finds it
}
NAMES = [*FILES, "missing.png"]

# any JSON value, for a field that gets the wrong type; huge ints exceed a float, NaN / Infinity are JSON extensions
# that Python's json module reads
_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
)
_json = st.recursive(
    _scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
# a box coordinate: mostly plausible for the images above, sometimes extreme
_coord = st.one_of(
    st.floats(-1.5, 9, allow_nan=False),
    st.integers(-2, 9),
    st.sampled_from([0, 1e-9, 1e-30, -1e-30, 1e308, -1e308, math.inf, -math.inf, math.nan, 10**400]),
)
# a plausible [x, y, w, h] inside the smallest image, or just over its edges (clipped), or tiny
_box = st.tuples(st.floats(-1, 3), st.floats(-1, 3), st.floats(1e-12, 3), st.floats(1e-12, 3)).map(list)


def _often(value, *others):
    """``value`` nine times out of ten, else one of ``others``."""
    return st.sampled_from([value] * 9 * len(others) + list(others))


@st.composite
def _documents(draw) -> dict | list | str:
    """A COCO document, mostly well-formed, with a few fields broken: missing, wrong-typed, duplicated, dangling."""
    if draw(st.integers(0, 9)) == 0:
        return draw(_json)  # anything at all
    names = draw(st.lists(st.sampled_from(NAMES), min_size=draw(_often(1, 0)), max_size=3))
    images = []
    for k, name in enumerate(names):
        _, width, height = FILES.get(name, (None, 6, 6))
        # sometimes the JSON size differs from the file's or is no size at all
        width, height = draw(
            _often((width, height), (height, width), (width + 1, height), (0, 3), (-4, 5), (6.5, 6), (2**63, 4))
        )
        images.append({"id": draw(_often(k + 1, 1, 2**63, -1)), "file_name": name, "width": width, "height": height})
    category_ids = draw(_often([1, 7], [], [2], [3, 3], [2**63]))
    categories = [{"id": c, "name": f"c{c}"} for c in category_ids]
    annotations = []
    for k in range(draw(st.integers(0, 4))):
        annotations.append(
            {
                "id": draw(_often(k + 10, 10, -(2**63) - 1)),
                "image_id": draw(_often(images[k % len(images)]["id"] if images else 1, 99)),  # 99: dangling
                "category_id": draw(_often(category_ids[k % len(category_ids)] if category_ids else 1, 5)),
                "bbox": draw(_box if draw(st.integers(0, 3)) else st.lists(_coord, max_size=5)),
                **draw(
                    st.fixed_dictionaries(
                        {}, optional={"iscrowd": st.sampled_from([0, 1, 2, True, None]), "area": _coord}
                    )
                ),
            }
        )
    doc = {"images": images, "annotations": annotations, "categories": categories}
    for _ in range(draw(_often(0, 1, 2))):  # break a field: drop it or give it any JSON value
        lists = [doc[key] for key in ("images", "annotations", "categories") if isinstance(doc.get(key), list)]
        record = draw(st.sampled_from([doc] + [r for r in sum(lists, []) if isinstance(r, dict) and r]))
        key = draw(st.sampled_from(sorted(record)))
        if draw(st.booleans()):
            del record[key]
        else:
            record[key] = draw(_json)
    return doc


def _write(root: Path, doc, text: str | None = None) -> None:
    """The train split: ``doc`` as JSON (NaN / Infinity written as such) or the raw ``text``, and FILES."""
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "train.json").write_text(json.dumps(doc) if text is None else text)
    (root / "images").mkdir()
    for name, (data, _, _) in FILES.items():
        (root / "images" / name).write_bytes(data)


def _assert_usable(root: Path) -> None:
    """What training reads of an accepted split: every target's boxes finite, inside the image, of positive size in
    float32 (torchvision's detectors refuse degenerate boxes), labels in range; every image decodes to its size."""
    split = load_split(root, "train")
    dataset = CocoDetection(split)
    for i, image in enumerate(split.images):
        pixels, target = dataset[i]
        height, width = pixels.shape[1:]
        assert (width, height) == (image["width"], image["height"])
        boxes = target["boxes"]  # [N, 4] xyxy float32
        assert boxes.isfinite().all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all(), boxes
        assert ((target["labels"] >= 0) & (target["labels"] < split.num_classes)).all()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_documents())
def test_validator_accepts_or_names_the_problem_in_one_line(doc):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write(root, doc)
        try:
            check_dataset(root, splits=("train",))
        except DatasetError as err:
            assert len(str(err).splitlines()) == 1, str(err)
            return
        _assert_usable(root)


# ----------------------------------------------------------------------------------------------- what it found
# Each escaped the validator before (OverflowError, TypeError) or passed it and broke training later (torch's int64
# ids, torchvision's refusal of zero-size boxes); a line break in a file name made a two-line message. The last case
# was found by reading the code, not by the fuzzer (json's RecursionError).


def _valid() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 6}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 7, "bbox": [1, 1, 3, 2]}],
        "categories": [{"id": 7, "name": "c7"}],
    }


FOUND = {  # name: (edit of _valid(), the message after "train.json: ")
    "int-beyond-float": (
        lambda d: d["images"][0].update(width=10**400),
        "image id 1 has invalid width/height 100000000000000000...0000000000000000000/6",
    ),
    "unhashable-image-id": (
        lambda d: d["annotations"][0].update(image_id=[1]),
        "annotation id 10 image_id must be an integer (int64), got [1]",
    ),
    "id-beyond-int64": (
        lambda d: d["images"][0].update(id=2**63),
        "images[0] id must be an integer (int64), got 9223372036854775808",
    ),
    "box-below-float32": (
        lambda d: d["annotations"][0].update(bbox=[1, 1, 1e-12, 2]),
        "annotation id 10 box is empty after clipping to image id 1 (in float32: [1, 1, 1e-12, 2] xywh)",
    ),
    "line-break-in-file-name": (
        lambda d: d["images"][0].update(file_name="a\n.png"),
        "image id 1 has invalid file_name 'a\\n.png'",
    ),
    "deep-json": (lambda d: None, "JSON nested too deeply"),  # with the text below
}


def test_valid_base_is_accepted(tmp_path):
    _write(tmp_path, _valid())
    assert check_dataset(tmp_path, splits=("train",))["splits"]["train"]["annotations"] == 1


@pytest.mark.parametrize("name", FOUND)
def test_fuzz_found_cases_name_the_culprit(name, tmp_path):
    doc = _valid()
    edit, message = FOUND[name]
    edit(doc)
    _write(tmp_path, doc, "[" * 100_000 if name == "deep-json" else None)
    with pytest.raises(DatasetError) as info:
        check_dataset(tmp_path, splits=("train",))
    assert str(info.value) == f"{tmp_path / 'annotations' / 'train.json'}: {message}"


def test_nan_clip_tolerance_is_refused(tmp_path):
    _write(tmp_path, _valid())
    with pytest.raises(ValueError, match="clip_tolerance must be >= 0, got nan"):
        check_dataset(tmp_path, splits=("train",), clip_tolerance=math.nan)


@pytest.mark.slow
def test_data_check_cli_prints_one_line(tmp_path, run_cli):
    doc = _valid()
    doc["annotations"][0]["image_id"] = [1]  # was: TypeError: unhashable type: 'list', with a traceback
    _write(tmp_path, doc)
    result = run_cli("data", "check", tmp_path, "--splits", "train")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"error: {tmp_path / 'annotations' / 'train.json'}: annotation id 10 image_id must be an integer (int64), "
        "got [1]"
    ]
