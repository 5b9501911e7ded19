"""Views of one image for each method (as in the MAE, MoCo-v3 and DINO papers), plus the plain
resize used for evaluation. Randomness comes from torch's global generator, which the loader seeds
per sample."""

from __future__ import annotations

from torchvision import transforms as T

from cpia_assets.core.training.datasets import Transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's ViT defaults


def _to_tensor() -> list[T.ToTensor | T.Normalize]:
    return [T.ToTensor(), T.Normalize(MEAN, STD)]


def _crop(size: int, scale: tuple[float, float]) -> T.RandomResizedCrop:
    return T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC)


def _colour(strength: float = 1.0) -> list[T.RandomApply | T.RandomGrayscale]:
    """Colour jitter and grey-scale as in MoCo-v3/DINO; pathology slides also flip vertically."""
    jitter = T.ColorJitter(0.4 * strength, 0.4 * strength, 0.2 * strength, 0.1 * strength)
    return [T.RandomVerticalFlip(), T.RandomApply([jitter], p=0.8), T.RandomGrayscale(p=0.2)]


def _blur(p: float) -> T.RandomApply:
    return T.RandomApply([T.GaussianBlur(9, sigma=(0.1, 2.0))], p=p)


def mae_views(size: int) -> Transform:
    """One random resized crop (scale 0.2-1) with flips."""
    pipeline = T.Compose([_crop(size, (0.2, 1.0)), T.RandomHorizontalFlip(), *_to_tensor()])
    return lambda image: [pipeline(image)]


def moco_views(size: int) -> Transform:
    """Two asymmetric crops (blur 1.0 / 0.1, solarize 0 / 0.2), as in MoCo-v3."""
    common = [_crop(size, (0.08, 1.0)), T.RandomHorizontalFlip(), *_colour()]
    first = T.Compose([*common, _blur(1.0), *_to_tensor()])
    second = T.Compose([*common, _blur(0.1), T.RandomSolarize(128, p=0.2), *_to_tensor()])
    return lambda image: [first(image), second(image)]


def dino_views(size: int, local_size: int, local_crops: int) -> Transform:
    """Two global crops (scale 0.4-1) and `local_crops` small ones (scale 0.05-0.4)."""
    common = [T.RandomHorizontalFlip(), *_colour()]
    first = T.Compose([_crop(size, (0.4, 1.0)), *common, _blur(1.0), *_to_tensor()])
    second = T.Compose(
        [_crop(size, (0.4, 1.0)), *common, _blur(0.1), T.RandomSolarize(128, p=0.2),
         *_to_tensor()]
    )  # fmt: skip
    local = T.Compose([_crop(local_size, (0.05, 0.4)), *common, _blur(0.5), *_to_tensor()])
    return lambda image: [first(image), second(image)] + [local(image) for _ in range(local_crops)]


def eval_transform(size: int) -> T.Compose:
    return T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
                      *_to_tensor()])  # fmt: skip


def finetune_transform(size: int) -> T.Compose:
    return T.Compose([_crop(size, (0.5, 1.0)), T.RandomHorizontalFlip(), T.RandomVerticalFlip(),
                      *_to_tensor()])  # fmt: skip
