"""Data loading: the bundled few-shot split, the folder layout, and every user-facing error."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from ar_ray.data import (
    DataError,
    ImageSplit,
    decode_image,
    load_builtin,
    load_dataset,
    load_folder,
)
from ar_ray.data.builtin import BUILTIN_PATH
from ar_ray.data.size import stored_size
from ar_ray.data.splits import STATS_CHUNK

SIZE = 16  # the training size the folder tests load at
STORED = stored_size(SIZE)  # the side of the squares they are stored as


@pytest.fixture(scope="module")
def builtin():
    return load_builtin()


def _save(path: Path, size: tuple[int, int] = (20, 30), mode: str = "RGB", fmt: str | None = None):
    """A real encoded image of noise, so every decoder has genuine content to chew on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name) + size[0])
    pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    image.save(path, format=fmt)
    return path


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _tree(root: Path, classes=("cat", "dog"), per_class: int = 2, splits=("train", "val")):
    for split in splits:
        for name in classes:
            for i in range(per_class):
                _save(root / split / name / f"{i}.jpg", size=(20 + 7 * i, 30))
    return root


# ---------------------------------------------------------------- built-in


def test_builtin_shapes_and_classes(builtin):
    assert builtin.num_classes == 10
    assert builtin.classes[0] == "T-shirt/top" and builtin.classes[-1] == "Ankle boot"
    for split, count in ((builtin.train, 500), (builtin.val, 500), (builtin.test, 10000)):
        assert split.images.shape == (count, 3, 32, 32)  # 28 px originals, stored at 28 / 0.875
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int64
        assert len(split) == len(split.ids) == count
        assert np.array_equal(split.images[:, 0], split.images[:, 2])  # grey -> 3 equal channels
    assert np.bincount(builtin.train.labels).tolist() == [50] * 10
    assert np.bincount(builtin.val.labels).tolist() == [50] * 10
    assert builtin.test.ids[42] == "builtin-test-00042"
    assert builtin.skipped == []


def test_builtin_train_and_val_are_disjoint():
    with np.load(BUILTIN_PATH) as data:
        train, val = data["train_source_indices"], data["val_source_indices"]
    assert len(set(train.tolist())) == 500 and len(set(val.tolist())) == 500
    assert not set(train.tolist()) & set(val.tolist())


def test_builtin_resize():
    splits = load_dataset(None, image_size=36)
    assert splits.train.images.shape == (500, 3, 41, 41)  # round(36 / 0.875)
    assert splits.test.images.shape == (10000, 3, 41, 41) and splits.stored_size == 41
    assert splits.train.images.dtype == np.uint8


def test_limit_per_class(builtin):
    small = builtin.limit_per_class(3, seed=1)
    assert np.bincount(small.train.labels).tolist() == [3] * 10
    assert len(small.val) == 30 and len(small.test) == 30
    assert small.train.ids == builtin.limit_per_class(3, seed=1).train.ids  # seeded
    assert small.train.ids != builtin.limit_per_class(3, seed=2).train.ids
    assert small.train.ids == sorted(small.train.ids)  # original order kept
    assert builtin.limit_per_class(None) is builtin


def test_limit_per_class_unlabelled_keeps_n_times_classes():
    images = np.zeros((10, 3, 2, 2), dtype=np.uint8)
    split = ImageSplit(images, None, [str(i) for i in range(10)])
    assert len(split.limit_per_class(2, num_classes=3)) == 6
    with pytest.raises(ValueError):
        split.limit_per_class(0)


def _direct_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The whole set as float64 at once: the reference the streaming statistics must match."""
    pixels = images.astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1) / 255.0
    return pixels.mean(axis=1), pixels.std(axis=1, ddof=1)


def test_streaming_channel_stats_equal_direct_float64():
    rng = np.random.default_rng(0)
    count = 2 * STATS_CHUNK + 7  # several chunks, the last one partial
    channels = [  # a different distribution per channel, so a channel mix-up shows
        rng.integers(0, 256, (count, 5, 6)),
        rng.integers(0, 40, (count, 5, 6)),
        rng.binomial(255, 0.9, (count, 5, 6)),
    ]
    images = np.stack(channels, axis=1).astype(np.uint8)
    stats = ImageSplit(images, None, [str(i) for i in range(count)]).channel_stats
    mean, std = _direct_stats(images)
    assert np.allclose(stats.mean, mean, rtol=1e-12, atol=0)
    assert np.allclose(stats.std, std, rtol=1e-12, atol=0)


def test_stats_are_the_limited_train_sets_and_travel_with_the_splits(builtin):
    small = builtin.limit_per_class(3, seed=1)
    mean, std = _direct_stats(small.train.images)
    assert np.allclose(small.train.channel_stats.mean, mean, rtol=1e-12, atol=0)
    assert np.allclose(small.train.channel_stats.std, std, rtol=1e-12, atol=0)
    assert small.train.channel_stats != builtin.train.channel_stats
    shipped = pickle.loads(pickle.dumps(small.for_training()))
    assert "channel_stats" in vars(shipped.train)  # computed at build time, not by each trial
    assert shipped.train.channel_stats == small.train.channel_stats


def test_for_training_drops_only_the_test_split(builtin):
    training = builtin.for_training()
    assert training.test is None
    assert training.train is builtin.train and training.val is builtin.val
    assert training.classes == builtin.classes


def test_a_chunk_pickles_as_only_its_rows(builtin):
    test = builtin.test
    chunk = np.ascontiguousarray(test.images[:64])
    assert len(pickle.dumps(chunk)) <= 1.1 * chunk.nbytes
    rows = test.rows(64, 128)
    assert np.array_equal(rows.images, test.images[64:128]) and rows.ids == test.ids[64:128]
    assert np.array_equal(rows.labels, test.labels[64:128])
    assert rows.images.flags.writeable and not np.shares_memory(rows.images, test.images)
    assert len(pickle.dumps(rows)) <= 1.1 * (rows.images.nbytes + rows.labels.nbytes)


# ---------------------------------------------------------------- folder layout


def test_folder_mixed_images(tmp_path):
    root = _tree(tmp_path)
    _save(root / "train" / "cat" / "grey.png", size=(50, 10), mode="L", fmt="PNG")
    _save(root / "train" / "dog" / "alpha.PNG", size=(12, 40), mode="RGBA", fmt="PNG")
    _save(root / "train" / "dog" / "palette.gif", mode="P", fmt="GIF")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0\1\2")
    (root / "train" / "dog" / "._0.jpg").write_bytes(b"macOS resource fork")

    splits = load_folder(root, SIZE)
    assert splits.classes == ["cat", "dog"] and splits.test is None
    assert splits.train.images.shape == (7, 3, STORED, STORED)
    assert splits.train.images.dtype == np.uint8
    assert splits.train.ids == [
        "cat/0.jpg", "cat/1.jpg", "cat/grey.png", "dog/0.jpg", "dog/1.jpg", "dog/alpha.PNG",
        "dog/palette.gif",
    ]  # fmt: skip
    assert splits.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert splits.val.labels.tolist() == [0, 0, 1, 1]


def test_png_named_jpg_is_reported_or_skipped(tmp_path):
    root = _tree(tmp_path)
    disguised = root / "val" / "dog" / "really_png.jpg"
    _save(disguised, fmt="PNG")
    message = _error(root)
    assert str(disguised) in message and "holds PNG data but is named .jpg" in message
    assert load_folder(root, SIZE, skip_bad_images=True).skipped == [str(disguised)]


def test_resize_shorter_side_then_centre_crop(tmp_path):
    root = _tree(tmp_path)
    wide = Image.new("RGB", (300, 100), (0, 0, 255))
    wide.paste((255, 0, 0), (100, 0, 200, 100))  # only the red middle square survives the crop
    wide.save(root / "train" / "cat" / "wide.png")
    splits = load_folder(root, SIZE)
    image = splits.train.images[splits.train.ids.index("cat/wide.png")]
    inner = image[:, :, 2:-2]  # bicubic lets the blue bleed into the outermost columns only
    assert inner[0].min() > 200 and inner[2].max() < 50


def _resized(image: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def _centre(image: np.ndarray, side: int) -> np.ndarray:
    """The centre square of an HWC image."""
    top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
    return image[top : top + side, left : left + side].astype(int)


def test_a_folder_image_is_stored_at_the_eval_resize_size_with_its_real_pixels(tmp_path):
    """Stored at 18 px for a 16 px model: the centre crop is the source's centre downsampled,
    not a crop of a 16 px copy enlarged to 18 (which is what evaluation used to see)."""
    root = _tree(tmp_path)
    rng = np.random.default_rng(3)
    source = rng.integers(0, 256, (3 * STORED, 2 * STORED, 3), dtype=np.uint8)  # fine detail
    Image.fromarray(source).save(root / "train" / "cat" / "tall.png")  # 36 wide, 54 tall
    splits = load_folder(root, SIZE)
    stored = splits.train.images[splits.train.ids.index("cat/tall.png")].transpose(1, 2, 0)
    assert stored.shape == (STORED, STORED, 3) and splits.stored_size == STORED

    crop = _centre(stored, SIZE)  # what the centre crop and TenCrop's centre see
    real = _centre(_resized(source, STORED, 3 * STORED // 2), SIZE)
    assert np.abs(crop - real).max() <= 1  # the real pixels, downsampled once
    small = _centre(_resized(source, SIZE, 3 * SIZE // 2), SIZE).astype(np.uint8)
    enlarged = _centre(_resized(small, STORED, STORED), SIZE)
    assert np.abs(crop - enlarged).mean() > 10  # the test tells the two apart


def test_flat_and_labelled_test(tmp_path):
    flat = _tree(tmp_path / "flat")
    for name in ("b.jpg", "a.png"):
        _save(flat / "test" / name)
    test = load_folder(flat, SIZE).test
    assert test.labels is None and test.ids == ["a.png", "b.jpg"]
    assert test.images.shape == (2, 3, STORED, STORED)

    labelled = _tree(tmp_path / "labelled", splits=("train", "val", "test"))
    test = load_dataset(str(labelled), SIZE).test
    assert test.labels.tolist() == [0, 0, 1, 1] and test.ids[0] == "cat/0.jpg"


def test_folder_limit_per_class_flat_test(tmp_path):
    root = _tree(tmp_path, per_class=3)
    for i in range(9):
        _save(root / "test" / f"{i}.jpg")
    small = load_folder(root, SIZE).limit_per_class(1)
    assert len(small.train) == len(small.val) == 2 and len(small.test) == 2


# ---------------------------------------------------------------- real-world image files

RED, GREEN, BLUE, YELLOW, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255,) * 3


def _pixel(image, row: int, col: int) -> np.ndarray:
    return image[:, row, col].astype(int)


def _near(pixel: np.ndarray, colour: tuple[int, ...], tolerance: int = 30) -> bool:
    return bool(np.abs(pixel - np.array(colour)).max() <= tolerance)


def test_phone_mpo_jpeg_is_a_jpeg_and_its_first_frame_is_used(tmp_path):
    root = _tree(tmp_path)
    phone = root / "train" / "cat" / "phone.jpg"
    depth = Image.new("RGB", (40, 30), BLUE)
    Image.new("RGB", (40, 30), RED).save(phone, format="MPO", save_all=True, append_images=[depth])
    with Image.open(phone) as opened:
        assert opened.format == "MPO"
    splits = load_folder(root, SIZE)
    image = splits.train.images[splits.train.ids.index("cat/phone.jpg")]
    assert _near(image[:, STORED // 2, STORED // 2].astype(int), RED)


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (80, 40))  # quadrants of 40 x 20
    for colour, box in ((RED, (0, 0)), (BLUE, (40, 0)), (GREEN, (0, 20)), (YELLOW, (40, 20))):
        stored.paste(colour, (*box, box[0] + 40, box[1] + 20))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # shown rotated 90 degrees clockwise: 40 wide, 80 tall
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)
    image = decode_image(path, SIZE)  # the centre square of the upright photo
    low, high = SIZE // 4, 3 * SIZE // 4
    assert _near(_pixel(image, low, low), GREEN) and _near(_pixel(image, low, high), RED)
    assert _near(_pixel(image, high, low), YELLOW) and _near(_pixel(image, high, high), BLUE)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(path, quality=95)  # red ink
    with Image.open(path) as opened:
        assert opened.mode == "CMYK"
    assert _near(_pixel(decode_image(path, SIZE), SIZE // 2, SIZE // 2), RED)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "scan.png"
    pixels = np.full((SIZE, SIZE), 0x40FF, dtype=np.uint16)
    pixels[:, SIZE // 2 :] = 0xC000
    Image.fromarray(pixels).save(path)
    with Image.open(path) as opened:
        assert opened.mode == "I;16"
    image = decode_image(path, SIZE)
    assert _pixel(image, 0, 0).tolist() == [0x40] * 3
    assert _pixel(image, 0, SIZE - 1).tolist() == [0xC0] * 3  # PIL's convert alone gives 255


def _half_transparent(mode: str, opaque: tuple[int, ...]) -> Image.Image:
    """Left half fully transparent (black underneath), right half the opaque colour."""
    if mode == "P":
        image = Image.new("P", (20, 20), 0)
        image.putpalette([0, 0, 0, *opaque])
        image.paste(1, (10, 0, 20, 20))
        image.info["transparency"] = 0
        return image
    image = Image.new(mode, (20, 20), (0,) * len(mode))
    image.paste(opaque, (10, 0, 20, 20))
    return image


@pytest.mark.parametrize(
    ("mode", "opaque", "shown"),
    [("P", RED, RED), ("RGBA", (*GREEN, 255), GREEN), ("LA", (100, 255), (100,) * 3)],
)
def test_transparent_png_is_composited_on_white(tmp_path, mode, opaque, shown):
    path = tmp_path / "logo.png"
    _half_transparent(mode, opaque).save(path)
    with Image.open(path) as opened:
        assert opened.mode == mode
    image = decode_image(path, SIZE)
    assert _pixel(image, SIZE // 2, 2).tolist() == list(WHITE)
    assert _near(_pixel(image, SIZE // 2, SIZE - 3), shown, tolerance=2)


# ---------------------------------------------------------------- errors


def _error(root: Path, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        load_folder(root, SIZE, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_root_missing_or_a_file(tmp_path):
    assert str(tmp_path / "nope") in _error(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    assert str(tmp_path / "file") in _error(tmp_path / "file")


def test_missing_split(tmp_path):
    root = _tree(tmp_path, splits=("train",))
    assert str(root / "val") in _error(root)


def test_split_without_class_folders(tmp_path):
    root = _tree(tmp_path, splits=("train",))
    _save(root / "val" / "loose.jpg")  # images straight in val/, not in class folders
    message = _error(root)
    assert str(root / "val") in message and "no class folders" in message


def test_empty_class_folder(tmp_path):
    root = _tree(tmp_path)
    (root / "train" / "bird").mkdir()
    (root / "train" / "bird" / "readme.txt").write_text("no images here")
    assert str(root / "train" / "bird") in _error(root)


def test_class_name_with_the_top5_separator(tmp_path):
    root = _tree(tmp_path)
    _save(root / "train" / "cat|dog" / "0.jpg")
    message = _error(root)
    assert str(root / "train" / "cat|dog") in message and "'|'" in message


def test_class_only_in_val(tmp_path):
    root = _tree(tmp_path)
    _save(root / "val" / "bird" / "0.jpg")
    message = _error(root)
    assert "bird" in message and "train" in message


def test_class_missing_from_val(tmp_path):
    root = _tree(tmp_path)
    _save(root / "train" / "bird" / "0.jpg")
    message = _error(root)
    assert "'bird'" in message and "missing from val" in message


JPEG = _jpeg_bytes()
BAD_FILES = {
    "corrupt.jpg": np.random.default_rng(0).bytes(2000),
    "empty.jpg": b"",
    "truncated.jpg": JPEG[: len(JPEG) // 2],
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_image_names_the_file(tmp_path, name):
    root = _tree(tmp_path)
    bad = root / "train" / "dog" / name
    bad.write_bytes(BAD_FILES[name])
    assert str(bad) in _error(root)


def test_skip_bad_images(tmp_path):
    root = _tree(tmp_path)
    bad = [root / "train" / "dog" / name for name in sorted(BAD_FILES)]
    for path in bad:
        path.write_bytes(BAD_FILES[path.name])
    splits = load_folder(root, SIZE, skip_bad_images=True)
    assert splits.skipped == [str(path) for path in bad]
    assert splits.train.ids == ["cat/0.jpg", "cat/1.jpg", "dog/0.jpg", "dog/1.jpg"]


def test_class_emptied_by_skipping_is_still_an_error(tmp_path):
    root = _tree(tmp_path, per_class=1)
    (root / "val" / "dog" / "0.jpg").write_bytes(b"")
    assert str(root / "val" / "dog") in _error(root, skip_bad_images=True)
