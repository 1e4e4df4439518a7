"""Head/neck and inner-mouth masks from face-parsing label maps, and alpha from matting or from parsing.

Label maps follow the CelebAMask-HQ 19-class convention, which is what the common face-parsing networks
(BiSeNet trained on CelebAMask-HQ, :mod:`flashavatar.data.face_parsing`) output: one class index per pixel.

Masks are written as 8-bit PNGs with values 0 and 255 (the reader thresholds at 127), alpha as grey JPGs
(``value / 255`` = alpha), the layout of SPEC §1.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..io_utils import atomic_write_with

# index -> name, CelebAMask-HQ order as used by the face-parsing networks
CELEBAMASK_CLASSES: tuple[str, ...] = (
    "background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
    "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat",
)
NUM_CLASSES = len(CELEBAMASK_CLASSES)  # 19
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CELEBAMASK_CLASSES)}

# head + neck + hair (+ hat, earrings, necklace, glasses): everything except background and clothes
NECKHEAD_LABELS: tuple[int, ...] = tuple(i for i in range(NUM_CLASSES) if i not in (0, 16))
# inner mouth (teeth, tongue, mouth cavity); the lips are classes 12/13 and are not included
MOUTH_LABELS: tuple[int, ...] = (11,)
# everything that is the person (alpha fallback): the head mask plus clothes
FOREGROUND_LABELS: tuple[int, ...] = tuple(range(1, NUM_CLASSES))

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def parse_label_set(text: str | Sequence[int | str], *, option: str = "labels") -> tuple[int, ...]:
    """Class names and/or indices (``"skin,nose,11"`` or a list) -> sorted unique indices.

    ``all`` means every class; a leading ``-`` removes a class (``"all,-background,-cloth"``).
    """
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else [str(s) for s in text]
    chosen: set[int] = set()
    for item in items:
        if not item:
            continue
        remove = item.startswith("-")
        name = item[1:].strip() if remove else item
        if name == "all":
            indices = set(range(NUM_CLASSES))
        elif name.isdigit():
            index = int(name)
            if index >= NUM_CLASSES:
                raise ValueError(f"--{option}: class index {index} out of range 0..{NUM_CLASSES - 1}")
            indices = {index}
        elif name in CLASS_INDEX:
            indices = {CLASS_INDEX[name]}
        else:
            raise ValueError(f"--{option}: unknown class {name!r}; classes are "
                             f"{', '.join(f'{i}={n}' for i, n in enumerate(CELEBAMASK_CLASSES))}")
        chosen = chosen - indices if remove else chosen | indices
    if not chosen:
        raise ValueError(f"--{option}: the label set {text!r} is empty")
    return tuple(sorted(chosen))


def labels_to_mask(label_map: np.ndarray, labels: Iterable[int]) -> np.ndarray:
    """``label_map [H, W]`` integer classes -> ``[H, W] uint8``, 255 where the class is in ``labels``."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2 or not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"label_map must be an integer array [H, W], got {label_map.dtype} "
                         f"{tuple(label_map.shape)}")
    lut = np.zeros(max(int(label_map.max(initial=0)) + 1, NUM_CLASSES), dtype=np.uint8)
    lut[np.asarray(list(labels), dtype=np.int64)] = 255
    return lut[label_map]


def masks_from_labels(label_map: np.ndarray, *, neckhead_labels: Iterable[int] = NECKHEAD_LABELS,
                      mouth_labels: Iterable[int] = MOUTH_LABELS) -> tuple[np.ndarray, np.ndarray]:
    """-> ``(neckhead [H, W] uint8, mouth [H, W] uint8)``, values 0/255."""
    return labels_to_mask(label_map, neckhead_labels), labels_to_mask(label_map, mouth_labels)


def alpha_from_labels(label_map: np.ndarray, *, foreground_labels: Iterable[int] = FOREGROUND_LABELS,
                      feather: float = 0.0) -> np.ndarray:
    """Fallback alpha when no matting output is given: the parsing foreground (every class but background).

    ``[H, W] uint8``, 255 = person. Hard-edged (hair strands and motion blur are lost), so a real matting
    result is better; ``feather`` > 0 softens the edge with a Gaussian of that many pixels (std-dev).
    """
    alpha = labels_to_mask(label_map, foreground_labels)
    if feather > 0:
        from scipy import ndimage

        alpha = np.clip(ndimage.gaussian_filter(alpha.astype(np.float32), feather) + 0.5, 0, 255).astype(np.uint8)
    return alpha


def read_label_map(path: str | os.PathLike, *, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """A label-map image (class index per pixel; 8/16-bit grey or palette PNG) -> ``[H, W] int64``.

    Colour-coded visualisations are refused (an RGB image whose channels differ), as are values outside
    ``0..num_classes-1``; the error names the file.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            mode = image.mode
            array = np.asarray(image)
    except (OSError, ValueError) as exc:
        raise ValueError(f"label map {path}: cannot read it ({exc})") from None
    if array.ndim == 3:
        if not (np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2])):
            raise ValueError(f"label map {path}: is a colour image (mode {mode}); expected one class index per "
                             "pixel (grey or palette PNG, as face-parsing networks save with argmax)")
        array = array[..., 0]
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        raise ValueError(f"label map {path}: values {int(array.min())}..{int(array.max())} outside the "
                         f"{num_classes} classes 0..{num_classes - 1}")
    return array


def read_alpha(path: str | os.PathLike) -> np.ndarray:
    """A matting output in any common format -> ``[H, W] uint8`` alpha.

    Grey images are used as they are; an image with an alpha channel that is not constant gives that channel
    (RGBA cut-outs); otherwise the luminance (mattes saved as RGB). 16-bit images are scaled to 8 bits.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image).astype(np.float64)
                top = 65535.0 if array.max(initial=0) > 255 else 255.0
                return np.clip(np.round(array / top * 255.0), 0, 255).astype(np.uint8)
            if image.mode == "F":
                array = np.asarray(image, dtype=np.float64)
                top = 1.0 if array.max(initial=0) <= 1.0 else 255.0
                return np.clip(np.round(array / top * 255.0), 0, 255).astype(np.uint8)
            if "A" in image.getbands():
                a = np.asarray(image.getchannel("A"))
                if a.min() != a.max():
                    return a.copy()
            return np.asarray(image.convert("L")).copy()
    except (OSError, ValueError) as exc:
        raise ValueError(f"alpha {path}: cannot read it ({exc})") from None


_NUMBER = re.compile(r"(\d+)(?!.*\d)")  # the last run of digits in a file stem


def numbered_images(folder: str | os.PathLike, *, what: str = "image") -> dict[int, Path]:
    """Images in ``folder`` keyed by the last number in their file name (``frame_0007.png`` -> 7).

    Two files with the same number (``0001.png`` and ``0001.jpg``) are an error naming both.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder}: no such directory")
    found: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or path.name.startswith("."):
            continue
        match = _NUMBER.search(path.stem)
        if match is None:
            continue
        number = int(match.group(1))
        if number in found:
            raise ValueError(f"{what} folder {folder}: {found[number].name} and {path.name} both have number "
                             f"{number}")
        found[number] = path
    return found


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an 8-bit image atomically (temp file in the same folder + ``os.replace``)."""
    _write_image(Path(path), array, format="PNG")


def write_jpg(path: str | os.PathLike, array: np.ndarray, *, quality: int = 95) -> None:
    """Write a JPG atomically (temp file in the same folder + ``os.replace``)."""
    _write_image(Path(path), array, format="JPEG", quality=quality)


def _write_image(path: Path, array: np.ndarray, *, format: str, **kwargs) -> None:
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"{path}: expected a uint8 image, got {array.dtype}")
    atomic_write_with(path, lambda tmp: Image.fromarray(array).save(tmp, format=format, **kwargs))
