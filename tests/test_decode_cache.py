"""Decoding a folder on the cluster, once per experiment: Ray tasks over shards give exactly
the in-process pixels, the cache in the experiment's storage is reused while the folder is
unchanged and redone when it changes, and `--skip-bad-images` travels from tune to ensemble."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml
from helpers import assert_user_error, make_image_folder, run_cli, write_image

from ar_ray import api
from ar_ray.data import DataError, decode_image, list_folder, load_listing
from ar_ray.data import decode as decode_module
from ar_ray.data import folder as folder_module
from ar_ray.data.cache import CACHE_DIR, MANIFEST
from ar_ray.data.decode import run_on_ray
from ar_ray.data.size import stored_size

pytestmark = pytest.mark.ray

SIZE = 20  # the training size: images are stored at stored_size(SIZE) = 23
QUICK = str(Path(__file__).parent.parent / "search_spaces" / "quick.yaml")


@pytest.fixture
def small_shards(monkeypatch):
    """Many shards, few in flight: shards finish out of order and the window refills."""
    monkeypatch.setattr(decode_module, "SHARD_FILES", 2)
    monkeypatch.setattr(decode_module, "IN_FLIGHT", 3)


@pytest.fixture
def decodes(monkeypatch):
    """How many times a folder was decoded (rather than taken from a cache)."""
    calls = []
    real = folder_module.decode_folder

    def counting(*args, **kwargs):
        calls.append(args[0].location)
        return real(*args, **kwargs)

    monkeypatch.setattr(folder_module, "decode_folder", counting)
    return calls


def _folder(root: Path) -> Path:
    """jpg + png in every split, and a grey and a transparent image among the train ones."""
    make_image_folder(root, per_class=3)
    write_image(root / "train" / "cat" / "grey.png", size=(30, 50), seed=7, mode="L")
    write_image(root / "train" / "dog" / "alpha.png", size=(50, 30), seed=8, mode="RGBA")
    return root


def _reference(root: Path, split: str, ids: list[str]) -> np.ndarray:
    """The images decoded one file at a time, as the old driver loop did."""
    return np.stack([decode_image(root / split / image_id, stored_size(SIZE)) for image_id in ids])


def _assert_same_splits(left, right) -> None:
    assert left.classes == right.classes and left.skipped == right.skipped
    for name in ("train", "val", "test"):
        a, b = getattr(left, name), getattr(right, name)
        assert a.ids == b.ids and np.array_equal(a.labels, b.labels)
        assert a.images.dtype == b.images.dtype == np.uint8
        assert np.array_equal(a.images, b.images)


def test_cluster_decode_equals_in_process_decode_bit_for_bit(
    ray_cluster, tmp_path, small_shards, capsys
):
    root = _folder(tmp_path / "data")
    listing = list_folder(root)
    on_ray = load_listing(listing, SIZE, runner=run_on_ray)
    count = listing.num_files
    assert f"decoded {count}/{count} images (100%)" in capsys.readouterr().out
    in_process = load_listing(listing, SIZE)
    _assert_same_splits(on_ray, in_process)
    assert on_ray.train.ids[:4] == ["cat/0.jpg", "cat/1.png", "cat/2.jpg", "cat/grey.png"]
    assert on_ray.train.labels.tolist() == [0] * 4 + [1] * 4
    for name in ("train", "val", "test"):
        split = getattr(on_ray, name)
        assert np.array_equal(split.images, _reference(root, name, split.ids))

    # a URI prefix: the tasks read the files themselves, through their node's filesystem
    by_uri = load_listing(list_folder(f"file://{root}"), SIZE, runner=run_on_ray)
    _assert_same_splits(by_uri, in_process)


def test_skipping_on_the_cluster_keeps_the_right_rows(ray_cluster, tmp_path, small_shards):
    root = _folder(tmp_path / "data")
    bad = [root / "train" / "cat" / "1.png", root / "train" / "dog" / "0.jpg"]
    for path in bad:
        path.write_bytes(b"\x89PNG not really")
    listing = list_folder(root)
    with pytest.raises(DataError) as caught:
        load_listing(listing, SIZE, runner=run_on_ray)
    message = str(caught.value)  # the first bad file to be found: shards finish in any order
    assert message.split(": ")[0] in map(str, bad) and "\n" not in message

    splits = load_listing(listing, SIZE, skip_bad_images=True, runner=run_on_ray)
    assert splits.skipped == [str(path) for path in bad]  # listing order, not finishing order
    assert "cat/1.png" not in splits.train.ids and len(splits.train) == 6
    assert np.array_equal(splits.train.images, _reference(root, "train", splits.train.ids))
    assert splits.train.labels.tolist() == [0] * 3 + [1] * 3


def _cache_files(cache: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in sorted(cache.iterdir())}


def _load(root, experiment, image_size=SIZE, **options):
    values = {"skip_bad_images": False, "limit_per_class": None, **options}
    return api.load_splits(list_folder(root), image_size, experiment=str(experiment), **values)


def test_cache_is_reused_until_the_folder_changes(ray_cluster, tmp_path, decodes):
    root = _folder(tmp_path / "data")
    experiment = tmp_path / "runs" / "x"
    first = _load(root, experiment)
    cache = experiment / CACHE_DIR
    written = _cache_files(cache)
    assert set(written) == {MANIFEST, "train.npy", "val.npy", "test.npy"}
    manifest = json.loads((cache / MANIFEST).read_text())
    assert manifest["data"] == str(root) and manifest["data_resolved"] == str(root.resolve())
    assert manifest["stored_size"] == stored_size(SIZE) and manifest["skip_bad_images"] is False
    assert manifest["classes"] == ["cat", "dog"] and manifest["skipped"] == []
    assert manifest["split_sizes"] == {"train": 8, "val": 6, "test": 6}
    grey = root / "train" / "cat" / "grey.png"
    assert ["train/cat/grey.png", grey.stat().st_size, grey.stat().st_mtime_ns] in manifest["files"]

    again = _load(root, experiment)
    assert len(decodes) == 1 and _cache_files(cache) == written  # not decoded, not rewritten
    _assert_same_splits(again, first)

    stat = grey.stat()
    os.utime(grey, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched
    _load(root, experiment)
    assert len(decodes) == 2 and _cache_files(cache)[MANIFEST] != written[MANIFEST]
    _load(root, experiment)
    assert len(decodes) == 2

    write_image(root / "val" / "dog" / "0.jpg", size=(44, 32), seed=99)  # other pixels
    changed = _load(root, experiment)
    assert len(decodes) == 3
    row = changed.val.ids.index("dog/0.jpg")
    assert not np.array_equal(changed.val.images[row], first.val.images[row])
    decoded = decode_image(root / "val/dog/0.jpg", stored_size(SIZE))
    assert np.array_equal(changed.val.images[row], decoded)

    (root / "test" / "cat" / "2.jpg").unlink()  # a file gone
    assert len(_load(root, experiment).test) == 5 and len(decodes) == 4
    _load(root, experiment, skip_bad_images=True)  # another flag: other files may be left out
    assert len(decodes) == 5


def test_a_cache_stored_at_another_size_is_decoded_again(ray_cluster, tmp_path, decodes):
    root = _folder(tmp_path / "data")
    experiment = tmp_path / "runs" / "x"
    first = _load(root, experiment)
    larger = _load(root, experiment, image_size=SIZE + 4)  # another model size, same folder
    assert len(decodes) == 2 and larger.stored_size == stored_size(SIZE + 4) != first.stored_size
    manifest = json.loads((experiment / CACHE_DIR / MANIFEST).read_text())
    assert manifest["stored_size"] == larger.stored_size  # the cache now holds the new size
    _assert_same_splits(_load(root, experiment, image_size=SIZE + 4), larger)
    assert len(decodes) == 2


def test_a_half_written_cache_is_not_used(ray_cluster, tmp_path, decodes):
    root = _folder(tmp_path / "data")
    experiment = tmp_path / "runs" / "x"
    _load(root, experiment)
    (experiment / CACHE_DIR / "val.npy").write_bytes(b"cut short")
    again = _load(root, experiment)
    assert len(decodes) == 2 and len(again.val) == 6


def test_cache_in_uri_storage(ray_cluster, tmp_path, decodes):
    root = _folder(tmp_path / "data")
    experiment = f"file://{tmp_path}/runs/u"
    first = _load(root, experiment)
    assert (tmp_path / "runs" / "u" / CACHE_DIR / MANIFEST).is_file()
    _assert_same_splits(_load(root, experiment), first)
    assert len(decodes) == 1


def test_bad_image_without_the_flag_is_one_line_and_caches_nothing(ray_cluster, tmp_path):
    root = _folder(tmp_path / "data")
    bad = root / "val" / "cat" / "2.jpg"
    bad.write_bytes(b"")
    experiment = tmp_path / "runs" / "x"
    with pytest.raises(DataError) as caught:
        _load(root, experiment)
    assert str(caught.value) == f"{bad}: image file is empty (0 bytes)"
    assert not (experiment / CACHE_DIR / MANIFEST).exists()


def test_tune_records_skip_bad_images_and_ensemble_skips_the_same_file(ray_cluster, tmp_path):
    data = _folder(tmp_path / "data")
    bad = data / "train" / "dog" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    address = ray.get_runtime_context().gcs_address
    tune = ["tune", "--space", QUICK, "--trials", "1", "--epochs", "1", "--data", "data"]
    tune += ["--storage", str(tmp_path / "runs"), "--name", "s", "--address", address]

    refused = run_cli(*tune, cwd=tmp_path)
    assert_user_error(refused, "data/train/dog/1.png")  # named as given, relative

    tuned = run_cli(*tune, "--skip-bad-images", cwd=tmp_path)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert "skipped unreadable image: data/train/dog/1.png" in tuned.stderr
    run = tmp_path / "runs" / "s"
    request = yaml.safe_load((run / "tune" / "request.yaml").read_text())["request"]
    assert request["data"] == "data" and request["data_resolved"] == str(data.resolve())
    assert request["skip_bad_images"] is True
    stored = yaml.safe_load((run / "tune" / "request.yaml").read_text())["stored_size"]
    assert stored == stored_size(28) == 32  # quick.yaml trains at 28 px
    cache = run / CACHE_DIR
    written = _cache_files(cache)
    assert json.loads((cache / MANIFEST).read_text())["skipped"] == ["train/dog/1.png"]

    # from another folder, with no data flags: the record says where and what to skip
    ensembled = run_cli(
        "ensemble", "--from", str(run), "--members", "1", "--epochs", "1", "--tta", "center",
        "--address", address,
    )  # fmt: skip
    assert ensembled.returncode == 0, ensembled.stderr[-3000:]
    assert f"skipped unreadable image: {bad}" in ensembled.stderr
    assert "reusing the images" in ensembled.stdout and "decoding" not in ensembled.stdout
    assert _cache_files(cache) == written
