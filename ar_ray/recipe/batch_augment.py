"""The training augmentation of `build_train_transform`, run on a whole uint8 batch at once.

On a GPU the per-image CPU pipeline cannot keep up with the model, so the stored images go
to the device once and are cropped, flipped, policy-augmented and erased there. Every image
still gets its own random draws, from the same distributions as the per-image pipeline:
crop boxes are sampled per image (as v2.RandomResizedCrop samples them) and resized in one
`roi_align`; a policy op and magnitude are drawn per image, and each op runs once per batch
on the images that drew it, with a per-image magnitude tensor (see `BatchedPolicy`).

All draws come from the caller's CPU generator, so a view is a pure function of its seed
(exact resume relies on it). They are a few numbers per image: packed into one tensor and
sent to the device in one non-blocking copy per view, so no op waits on the host. The
parameters are read off the per-image pipeline's own modules, so the two paths cannot drift.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ar_ray.config import RecipeConfig
from ar_ray.recipe.augment import build_train_transform

ATTEMPTS = 10  # box draws per image before the central fallback, as in torchvision
AUTOAUGMENT_BINS = 10  # v2.AutoAugment.forward's fixed magnitude table length
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def _private(owner: object, name: str) -> Any:
    """A torchvision internal the policies keep their parameters in (0.26 to 0.29 have them).

    A one-line error naming it, rather than an AttributeError deep in a training step, if a
    torchvision release renames it.
    """
    try:
        return getattr(owner, name)
    except AttributeError:
        raise RuntimeError(
            f"torchvision {type(owner).__name__}.{name} is missing: the batched policy reads it"
        ) from None


def _native_roi_align() -> Callable[..., Tensor]:
    """torchvision's compiled roi_align, called directly rather than through `ops.roi_align`.

    Under `torch.use_deterministic_algorithms(True)` the public wrapper sends CUDA inputs to
    a pure-Python `_roi_align` under torch.compile (for a deterministic *backward*): it
    samples every input pixel per output pixel and needs Triton, far too slow for a view.
    The native forward computes each output pixel on its own, without atomics, so it is
    deterministic already, and crops never need a backward.
    """
    try:
        return torch.ops.torchvision.roi_align
    except (AttributeError, RuntimeError):
        raise RuntimeError(
            "torch.ops.torchvision.roi_align is missing: torchvision's compiled ops did not load"
        ) from None


def _step(transform: v2.Compose, kind: type) -> nn.Module | None:
    return next((step for step in transform.transforms if isinstance(step, kind)), None)


def sample_boxes(
    count: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> Tensor:
    """[count, 4] long (top, left, box height, box width): RandomResizedCrop's draw.

    Up to ten (area, log-aspect) tries per image, the first that fits wins; an image with
    none falls back to the largest central box within `ratio`, as torchvision does.
    """
    area = height * width
    target = area * torch.empty(count, ATTEMPTS).uniform_(*scale, generator=generator)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.empty(count, ATTEMPTS).uniform_(*log_ratio, generator=generator).exp_()
    widths = torch.sqrt(target * aspect).round().long()
    heights = torch.sqrt(target / aspect).round().long()
    fits = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)
    first = fits.long().argmax(dim=1, keepdim=True)
    box_w = widths.gather(1, first).squeeze(1)
    box_h = heights.gather(1, first).squeeze(1)
    fallback_w, fallback_h = _central_box(height, width, ratio)
    fitted = fits.any(dim=1)
    box_w = torch.where(fitted, box_w, fallback_w)
    box_h = torch.where(fitted, box_h, fallback_h)
    top = (torch.rand(count, generator=generator) * (height - box_h + 1)).long()
    left = (torch.rand(count, generator=generator) * (width - box_w + 1)).long()
    top = torch.where(fitted, top, (height - box_h) // 2)
    left = torch.where(fitted, left, (width - box_w) // 2)
    return torch.stack([top, left, box_h, box_w], dim=1)


def _central_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    in_ratio = width / height
    if in_ratio < min(ratio):
        return width, int(round(width / min(ratio)))
    if in_ratio > max(ratio):
        return int(round(height * max(ratio))), height
    return width, height


def resized_crops(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Crop each image to its own box ([B, 4]: top, left, height, width) and resize it to
    size x size, in one call.

    roi_align's adaptive sampling averages ceil(box/size) samples per output pixel, so a
    downscale is antialiased as v2's resize(antialias=True) is; upscales are bilinear.
    """
    top, left, box_h, box_w = boxes.to(torch.float32).unbind(dim=1)
    index = torch.arange(len(images), device=images.device, dtype=torch.float32)
    rois = torch.stack([index, left, top, left + box_w, top + box_h], dim=1)
    crops = _native_roi_align()(images.float(), rois, 1.0, size, size, -1, True)
    return crops.round_().to(torch.uint8)  # averages of uint8 pixels: already in [0, 255]


def erase_boxes(
    count: int, size: int, eraser: v2.RandomErasing, generator: torch.Generator
) -> Tensor:
    """[count, 5] long (top, left, height, width, chosen): v2.RandomErasing's draw per image
    on a size x size image (p, then up to ten scale/ratio tries, the first that fits)."""
    target = size * size * torch.empty(count, ATTEMPTS).uniform_(*eraser.scale, generator=generator)
    log_ratio = (math.log(eraser.ratio[0]), math.log(eraser.ratio[1]))
    aspect = torch.empty(count, ATTEMPTS).uniform_(*log_ratio, generator=generator).exp_()
    heights = torch.sqrt(target * aspect).round().long()
    widths = torch.sqrt(target / aspect).round().long()
    fits = (heights < size) & (widths < size)
    first = fits.long().argmax(dim=1, keepdim=True)
    box_h = heights.gather(1, first).squeeze(1)
    box_w = widths.gather(1, first).squeeze(1)
    top = (torch.rand(count, generator=generator) * (size - box_h + 1)).long()
    left = (torch.rand(count, generator=generator) * (size - box_w + 1)).long()
    chosen = (torch.rand(count, generator=generator) < eraser.p) & fits.any(dim=1)
    return torch.stack([top, left, box_h, box_w, chosen.long()], dim=1)


def erase(images: Tensor, boxes: Tensor, value: float) -> Tensor:
    """Set each image's box ([B, 5] from `erase_boxes`, on the images' device) to value."""
    _, _, height, width = images.shape
    top, left, box_h, box_w, chosen = (part.view(-1, 1, 1) for part in boxes.long().unbind(1))
    rows = torch.arange(height, device=images.device).view(1, height, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, width)
    inside = (
        (rows >= top)
        & (rows < top + box_h)
        & (cols >= left)
        & (cols < left + box_w)
        & (chosen != 0)
    )
    return images.masked_fill(inside.unsqueeze(1), value)


def flip(images: Tensor, flipped: Tensor) -> Tensor:
    """Mirror the images whose `flipped` ([B, 1], nonzero = flip) is set."""
    return torch.where(flipped.view(-1, 1, 1, 1) != 0, images.flip(-1), images)


# Colour ops, batched: v2.functional's tensor kernels (torchvision/transforms/v2/functional/
# _color.py, the same in 0.26 and 0.29) with the scalar factor replaced by a per-image
# tensor. `magnitude` is the policy's signed magnitude per image (float64 [n]), mapped to
# the kernel's argument as `_apply_image_or_video_transform` maps it. Parameters are cast
# to float32 where the kernels' Python scalars meet float32 pixels, so the arithmetic is
# the same.


def _per_image(values: Tensor) -> Tensor:
    return values.to(torch.float32).view(-1, 1, 1, 1)


def _blend(images: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    """v2's `_blend`: ratio * images + (1 - ratio) * other, clamped, back to uint8.

    `addcmul` where v2 has `add_(other, alpha=1 - ratio)`: both fuse the multiply-add, so
    they round alike (a separate multiply and add differs by one grey level now and then).
    """
    mixed = images.mul(_per_image(ratio))
    return mixed.addcmul_(other, _per_image(1.0 - ratio)).clamp_(0, 255).to(torch.uint8)


def _grey(images: Tensor) -> Tensor:
    """v2's `_rgb_to_grayscale_image` in float, floored as it is for uint8 inputs."""
    red, green, blue = images.unbind(dim=-3)
    return red.mul(0.2989).add_(green, alpha=0.587).add_(blue, alpha=0.114).floor_().unsqueeze(-3)


def _brightness(images: Tensor, magnitude: Tensor) -> Tensor:
    return images.mul(_per_image(1.0 + magnitude)).clamp_(0, 255).to(torch.uint8)


def _saturation(images: Tensor, magnitude: Tensor) -> Tensor:
    return _blend(images, _grey(images), 1.0 + magnitude)


def _contrast(images: Tensor, magnitude: Tensor) -> Tensor:
    mean = _grey(images).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, 1.0 + magnitude)


def _sharpness(images: Tensor, magnitude: Tensor) -> Tensor:
    """v2's sharpness: inner pixels blended with a 3x3 smoothing (1s around a 5, / 13).

    v2 convolves in float32 and rounds; here the smoothing is summed in integers and rounded
    exactly, (2 * sum + 13) // 26. A sum over 13 is never halfway between two integers (13 is
    odd), so v2's float32 result, a hair from the exact one, rounds to the same value. The
    blend is v2's float32 arithmetic. Integer sums avoid a depthwise float convolution,
    which is the slowest op of the policies on a CPU.
    """
    wide = images.to(torch.int16)
    rows = wide[..., :-2, :] + wide[..., 1:-1, :] + wide[..., 2:, :]
    centre = wide[..., 1:-1, 1:-1]
    total = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:] + 4 * centre
    blurred = (2 * total + 13).div_(26, rounding_mode="floor")
    output = images.to(torch.float32)
    alpha = _per_image(1.0 - (1.0 + magnitude))
    output[..., 1:-1, 1:-1].addcmul_(blurred.sub_(centre).to(torch.float32), alpha)
    return output.clamp_(0, 255).to(torch.uint8)


def _posterize(images: Tensor, magnitude: Tensor) -> Tensor:
    """Keep the top int(magnitude) bits of each image (bits 8 keep all, 0 keep none)."""
    bits = magnitude.long()
    mask = torch.bitwise_left_shift(torch.bitwise_left_shift(1, bits) - 1, 8 - bits)
    return images & mask.to(torch.uint8).view(-1, 1, 1, 1)


def _solarize(images: Tensor, magnitude: Tensor) -> Tensor:
    """Invert pixels at or above 255 * magnitude. v2 compares with that threshold in float32;
    for integer pixels that is a comparison with its ceiling, kept in uint8 (no float copy)."""
    threshold = (255.0 * magnitude).to(torch.float32).ceil_().to(torch.uint8)
    return torch.where(images >= threshold.view(-1, 1, 1, 1), images.bitwise_not(), images)


def _unparameterised(op: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """v2 kernels that already treat each image of a batch on its own and take no factor."""
    return lambda images, _magnitude: op(images)


COLOUR_OPS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Brightness": _brightness,
    "Color": _saturation,
    "Contrast": _contrast,
    "Sharpness": _sharpness,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "AutoContrast": _unparameterised(TF.autocontrast),
    "Equalize": _unparameterised(TF.equalize),
    "Invert": _unparameterised(TF.invert),
}


def inverse_affine_matrices(
    ops: list[str], op_index: Tensor, magnitude: Tensor, size: int
) -> Tensor:
    """[n, 6] float32: the inverse affine matrix v2's tensor `affine`/`rotate` builds per image.

    `_get_inverse_affine_matrix` (v2/functional/_geometry.py) in float64, vectorised, with
    the arguments `_apply_image_or_video_transform` passes: shears of degrees(atan(m))
    about the corner, translations of int(m) pixels, rotations by -(m mod 360) about the
    centre. Images that drew no geometric op get the identity.
    """

    def drew(name: str) -> Tensor:
        return op_index == ops.index(name)

    zero = torch.zeros_like(magnitude)
    shear = torch.deg2rad(torch.rad2deg(torch.atan(magnitude)))
    shear_x = torch.where(drew("ShearX"), shear, zero)
    shear_y = torch.where(drew("ShearY"), shear, zero)
    tx = torch.where(drew("TranslateX"), magnitude.trunc(), zero)
    ty = torch.where(drew("TranslateY"), magnitude.trunc(), zero)
    rot = torch.deg2rad(torch.where(drew("Rotate"), -torch.remainder(magnitude, 360.0), zero))
    sheared = drew("ShearX") | drew("ShearY")
    centre = torch.where(sheared, -size * 0.5, zero)  # center=[0, 0] in v2's pixel frame
    cos_sy = torch.cos(shear_y)
    tan_sx = torch.tan(shear_x)
    a = torch.cos(rot - shear_y) / cos_sy
    b = -(a * tan_sx + torch.sin(rot))
    c = torch.sin(rot - shear_y) / cos_sy
    d = torch.cos(rot) - c * tan_sx
    cx_tx, cy_ty = centre + tx, centre + ty
    offset_x = centre - d * cx_tx - (-b) * cy_ty
    offset_y = centre - (-c) * cx_tx - a * cy_ty
    return torch.stack([d, -b, offset_x, -c, a, offset_y], dim=1).to(torch.float32)


def _affine(images: Tensor, matrices: Tensor) -> Tensor:
    """v2's tensor affine, nearest, with a per-image matrix ([n, 6], float32): one grid.

    The grid is built as `_affine_grid` builds it: the matrix acts on pixel coordinates
    centred on the image, the result is normalised by half the size. v2 then samples the
    float image with `grid_sample`, zero padding (the policies' fill=None), and rounds.
    For nearest sampling this samples a map of pixel numbers instead (exact in float32)
    and gathers the uint8 pixels it names: `grid_sample` makes the same nearest choice on
    any device, with one channel instead of three and no float copy of the images.
    """
    count, channels, height, width = images.shape
    device = images.device
    base = torch.empty(1, height, width, 3, device=device)
    base[..., 0].copy_(
        torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width, device=device)
    )
    base[..., 1].copy_(
        torch.linspace(
            (1.0 - height) * 0.5, (height - 1.0) * 0.5, height, device=device
        ).unsqueeze_(-1)
    )
    base[..., 2].fill_(1)
    theta = matrices.view(count, 2, 3).transpose(1, 2)
    theta = torch.stack([theta[..., 0] / (0.5 * width), theta[..., 1] / (0.5 * height)], -1)
    grid = base.view(1, height * width, 3).expand(count, -1, -1).bmm(theta)
    grid = grid.view(count, height, width, 2)
    numbers = torch.arange(1, height * width + 1, device=device, dtype=torch.float32)
    numbers = numbers.view(1, 1, height, width).expand(count, 1, height, width)
    source = F.grid_sample(numbers, grid, mode="nearest", align_corners=False).long()
    # pixel number 0 is the zero fill v2's zero padding gives outside the image
    pixels = F.pad(images.reshape(count, channels, height * width), (1, 0))
    return pixels.gather(2, source.view(count, 1, -1).expand(-1, channels, -1)).view_as(images)


Draw = tuple[Tensor, Tensor]  # per image: op index (long) and signed magnitude (float64)


@dataclass
class SlotPlan:
    """One policy slot of one view, prepared on the host.

    `params` ([B, 8] float64, CPU) is what the device needs: the order that sorts
    images by op group, and the magnitude and affine matrix in that order.
    `groups` are (op, start, stop) rows of the sorted batch, all known on the host because
    the draws are, so slicing them needs no device sync.
    """

    params: Tensor
    groups: list[tuple[str, int, int]]


class BatchedPolicy:
    """RandAugment, TrivialAugmentWide or AutoAugment with per-image ops on a batch.

    Draws follow the v2 classes' `forward` (op uniform over the class's augmentation space,
    magnitude bin, sign with probability 0.5 for signed ops; AutoAugment: a sub-policy per
    image and each of its ops with its probability). The batch is then sorted by op, and
    each op runs once on its contiguous rows with a per-image magnitude tensor; the five
    geometric ops share one per-image affine grid. So a slot costs at most one call per
    colour op plus one resampling, whatever the batch size (`op_calls` counts them).
    """

    def __init__(self, policy: nn.Module) -> None:
        self.policy = policy
        space = _private(policy, "_AUGMENTATION_SPACE")
        self.space_size = len(space)
        self.ops = list(space) + ([] if "Identity" in space else ["Identity"])
        unknown = set(self.ops) - set(GEOMETRIC) - set(COLOUR_OPS) - {"Identity"}
        if unknown:
            raise ValueError(f"no batched version of policy ops {sorted(unknown)}")
        fill = _private(policy, "_fill")
        if any(value is not None for value in fill.values()):
            raise ValueError("the batched policy fills with zeros only (v2's fill=None)")
        if InterpolationMode(policy.interpolation) != InterpolationMode.NEAREST:
            raise ValueError("the batched policy samples nearest only (the v2 policies' default)")
        self.signed = torch.tensor([space.get(op, (None, False))[1] for op in self.ops])
        colours = [op for op in self.ops if op in COLOUR_OPS]
        # sort key: Identity first, then all geometric ops together, then each colour op
        self.group_names = ["Identity", "geometric", *colours]
        self.group_of = torch.tensor(
            [self.group_names.index("geometric" if op in GEOMETRIC else op) for op in self.ops]
        )
        self.num_bins = AUTOAUGMENT_BINS if isinstance(policy, v2.AutoAugment) else None
        self.num_bins = self.num_bins or policy.num_magnitude_bins
        self._tables: dict[int, Tensor] = {}
        self.op_calls = 0

    def table(self, size: int) -> Tensor:
        """[ops, bins] float64: each op's magnitude per bin at this image size (0 if none).

        Built once per size: the v2 classes rebuild it per image.
        """
        if size not in self._tables:
            space = _private(self.policy, "_AUGMENTATION_SPACE")
            rows = []
            for op in self.ops:
                values = space[op][0](self.num_bins, size, size) if op in space else None
                rows.append(torch.zeros(self.num_bins) if values is None else values)
            self._tables[size] = torch.stack([row.to(torch.float64) for row in rows])
        return self._tables[size]

    def draw(self, count: int, size: int, generator: torch.Generator) -> list[Draw]:
        """Per slot, each image's op (index into `ops`) and signed magnitude, on the CPU."""
        if isinstance(self.policy, v2.AutoAugment):
            slots = self._autoaugment_slots(count, generator)
        else:
            slots = []
            for _ in range(getattr(self.policy, "num_ops", 1)):
                ops = torch.randint(self.space_size, (count,), generator=generator)
                if isinstance(self.policy, v2.RandAugment):
                    bins = torch.full((count,), self.policy.magnitude)
                else:
                    bins = torch.randint(self.num_bins, (count,), generator=generator)
                slots.append((ops, bins))
        return [self._signed(ops, bins, size, generator) for ops, bins in slots]

    def _autoaugment_slots(self, count: int, generator: torch.Generator) -> list[Draw]:
        """A sub-policy per image; each of its two ops applies with its own probability."""
        subpolicies = _private(self.policy, "_policies")
        ops = torch.tensor([[self.ops.index(op) for op, _, _ in pair] for pair in subpolicies])
        chance = torch.tensor([[p for _, p, _ in pair] for pair in subpolicies])
        bins = torch.tensor([[index or 0 for _, _, index in pair] for pair in subpolicies])
        picks = torch.randint(len(subpolicies), (count,), generator=generator)
        slots = []
        for slot in range(2):
            applied = torch.rand(count, generator=generator) <= chance[picks, slot]
            identity = torch.full_like(picks, self.ops.index("Identity"))
            slots.append((torch.where(applied, ops[picks, slot], identity), bins[picks, slot]))
        return slots

    def _signed(self, ops: Tensor, bins: Tensor, size: int, generator: torch.Generator) -> Draw:
        negative = torch.rand(len(ops), generator=generator) <= 0.5
        magnitude = self.table(size)[ops, bins]
        return ops, torch.where(self.signed[ops] & negative, -magnitude, magnitude)

    def plan(self, draw: Draw, size: int) -> SlotPlan:
        """Sort one slot's images by op group; the rows each group's call covers."""
        ops, magnitude = draw
        group = self.group_of[ops]
        order = torch.argsort(group, stable=True)
        counts = torch.bincount(group, minlength=len(self.group_names)).tolist()  # host
        bounds = torch.tensor([0, *counts]).cumsum(0).tolist()
        groups = [
            (name, bounds[k], bounds[k + 1])
            for k, name in enumerate(self.group_names)
            if name != "Identity" and counts[k] > 0
        ]
        matrices = inverse_affine_matrices(self.ops, ops[order], magnitude[order], size)
        columns = [order, magnitude[order]]
        params = torch.cat([torch.stack(columns, 1).double(), matrices.double()], dim=1)
        return SlotPlan(params, groups)

    def apply(self, images: Tensor, plan: SlotPlan, params: Tensor) -> Tensor:
        """One slot on the batch; `params` is `plan.params` on the images' device.

        Only the images that drew an op are gathered (AutoAugment leaves many alone), in
        op order, and written back by index: unique rows, so deterministic on CUDA too.
        """
        if not plan.groups:
            return images
        first = plan.groups[0][1]  # the rows before drew Identity
        params = params[first:]
        rows = params[:, 0].long()
        ranked = images[rows]
        magnitude, matrices = params[:, 1], params[:, 2:].to(torch.float32)
        for name, start, stop in plan.groups:
            start, stop = start - first, stop - first
            group = ranked[start:stop]
            if name == "geometric":
                group.copy_(_affine(group, matrices[start:stop]))
            else:
                group.copy_(COLOUR_OPS[name](group, magnitude[start:stop]))
            self.op_calls += 1
        out = images.clone()
        out[rows] = ranked
        return out


def to_device(params: Tensor, device: torch.device) -> Tensor:
    """One host-to-device copy per view. Pinned first on CUDA, so the copy is queued behind
    the running kernels instead of waiting for them (the pinned block is kept alive by
    torch's caching host allocator until the copy is done)."""
    if device.type == "cuda":
        params = params.pin_memory()
    return params.to(device, non_blocking=True)


class BatchAugment:
    """[B, C, H, W] uint8 on any device -> [B, V, C, S, S] uint8: `views` independent draws.

    The same layout AugmentedViews batches into, so the loss cannot tell the paths apart.
    Random parameters are drawn on the CPU from `generator` (a handful of numbers per image),
    cross to the device in one non-blocking copy per view, and only the pixel work runs on
    the images' device.
    """

    def __init__(self, config: RecipeConfig, views: int) -> None:
        transform = build_train_transform(config)
        self.crop: v2.RandomResizedCrop = _step(transform, v2.RandomResizedCrop)
        self.hflip = _step(transform, v2.RandomHorizontalFlip) is not None
        policy = next(
            (step for step in transform.transforms if hasattr(step, "_AUGMENTATION_SPACE")), None
        )
        self.policy = BatchedPolicy(policy) if policy is not None else None
        self.eraser: v2.RandomErasing | None = _step(transform, v2.RandomErasing)
        self.views = views
        _native_roi_align()  # fail at construction, not in the first step

    def view(self, images: Tensor, generator: torch.Generator) -> Tensor:
        count, _, height, width = images.shape
        size = self.crop.size[0]
        draws = [sample_boxes(count, height, width, self.crop.scale, self.crop.ratio, generator)]
        if self.hflip:
            draws.append((torch.rand(count, 1, generator=generator) < 0.5).long())
        plans = []
        if self.policy is not None:
            plans = [
                self.policy.plan(draw, size) for draw in self.policy.draw(count, size, generator)
            ]
            draws += [plan.params for plan in plans]
        if self.eraser is not None:
            draws.append(erase_boxes(count, size, self.eraser, generator))
        packed = to_device(torch.cat([part.double() for part in draws], dim=1), images.device)
        parts = iter(packed.split([part.shape[1] for part in draws], dim=1))
        out = resized_crops(images, next(parts), size)
        if self.hflip:
            out = flip(out, next(parts))
        for plan in plans:
            out = self.policy.apply(out, plan, next(parts))
        if self.eraser is not None:
            value = float(self.eraser.value[0]) if self.eraser.value is not None else 0.0
            out = erase(out, next(parts), value)
        return out

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return torch.stack([self.view(images, generator) for _ in range(self.views)], dim=1)
