"""What crosses process boundaries on the way to the inference actors."""

import pickle

import numpy as np

from ar_ray.inference import InferenceOptions, row_blocks
from ar_ray.resources import Resources


def test_blocks_carry_only_their_own_rows_and_know_where_they_belong():
    val = np.random.default_rng(0).integers(0, 256, (1000, 3, 28, 28), dtype=np.uint8)
    test = val[:130] // 2
    blocks = row_blocks([val, test], block_rows=64)
    rows_bytes = 64 * 3 * 28 * 28
    assert all(len(pickle.dumps(block)) <= 1.1 * rows_bytes for block in blocks)
    index = np.concatenate([block["index"].to_numpy() for block in blocks])
    assert np.array_equal(index, np.arange(1130))
    images = np.concatenate([block["image"].chunk(0).to_numpy() for block in blocks])
    assert np.array_equal(images[:1000], val) and np.array_equal(images[1000:], test)


def test_actor_batch_follows_the_device_the_actor_holds_unless_stated():
    """A GPU actor answers 256 images (2,560 TenCrop crops) per call, a CPU actor 64."""
    assert InferenceOptions(actor=Resources(cpus=4, gpus=1)).images_per_call == 256
    assert InferenceOptions(actor=Resources(cpus=4, gpus=0.5)).images_per_call == 256
    assert InferenceOptions(actor=Resources(cpus=4)).images_per_call == 64
    stated = InferenceOptions(actor=Resources(cpus=4, gpus=1), batch_size=16)
    assert stated.images_per_call == 16 == stated.map_batches_args()["batch_size"]


def test_a_recorded_batch_is_inherited_and_an_unrecorded_one_follows_the_device():
    recorded = {"cpus_per_actor": 2.0, "gpus_per_actor": 1.0, "max_actors": 3}
    assert InferenceOptions.from_record(recorded).images_per_call == 256
    stated = InferenceOptions.from_record(recorded | {"images_per_call": 32})
    assert stated.images_per_call == 32 and stated.max_actors == 3
