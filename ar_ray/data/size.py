"""How large a stored (decoded) image is: the one place that turns the training size into it.

Images are kept at the evaluation resize size of the ImageNet convention (resize to 256 for a
224 crop): the centre crop and TenCrop then take real pixels instead of an enlarged copy, and
training's RandomResizedCrop samples from the whole stored square, margins included.
"""

from __future__ import annotations

EVAL_CROP_RATIO = 0.875  # the crop keeps 87.5% of the stored side: 224 of 256


def stored_size(image_size: int) -> int:
    """The side of the stored square for a model trained and evaluated at `image_size`."""
    return round(image_size / EVAL_CROP_RATIO)
