"""Init images and inpainting masks of DiT requests: their sizes, and the mask check both engines run."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

MASK_FORMS = "a PIL image (any mode: read as grayscale) or an (H, W) numpy array or tensor in [0, 1]"


def image_size(image: Any) -> tuple[int, int]:
    """(height, width) of an init image: a PIL image, an (N)HWC numpy array or a (1)CHW tensor."""
    if hasattr(image, "size") and not isinstance(image, (torch.Tensor, np.ndarray)):
        width, height = image.size  # PIL
        return height, width
    if isinstance(image, np.ndarray) and image.ndim in (3, 4):
        return image.shape[-3], image.shape[-2]  # (N)HWC
    if isinstance(image, torch.Tensor) and image.ndim in (3, 4) and (image.ndim == 3 or image.shape[0] == 1):
        return image.shape[-2], image.shape[-1]  # (1)CHW
    raise ValueError("image must be a PIL image, an HWC numpy array or a CHW tensor (values in [0, 1])")


def check_mask(mask: Any, image: Any) -> None:
    """Refuse (``ValueError`` naming ``mask_image``) a mask that is not one of ``MASK_FORMS`` or whose size
    differs from the init image's. Diffusers' inpaint pipelines would resize such a mask silently; a mask
    drawn for another image is a mistake, so it is refused (as OpenAI's edits API does)."""
    if isinstance(mask, (np.ndarray, torch.Tensor)):
        if mask.ndim != 2:
            raise ValueError(f"mask_image must be {MASK_FORMS}; got an array of shape {tuple(mask.shape)}")
        size = tuple(mask.shape)
    elif hasattr(mask, "getbands"):
        size = (mask.height, mask.width)
    else:
        raise ValueError(f"mask_image must be {MASK_FORMS}; got {type(mask).__name__}")
    height, width = image_size(image)
    if size != (height, width):
        raise ValueError(
            f"mask_image is {size[1]}x{size[0]} (WxH), the init image {width}x{height}: the mask must have "
            "the image's size"
        )
