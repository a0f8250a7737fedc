"""Image-classification datasets as fixed, stratified, normalised tensor splits.

Three sources:
- `digits`: scikit-learn's 1797 8x8 handwritten digits (bundled with scikit-learn, no download);
- `fashion-mnist`: the Debian package `dataset-fashion-mnist` (its IDX files, read with numpy),
  or a folder named by `MORPHNAS_FASHION_MNIST`;
- a user's path (`load_image_file`): a folder with one sub-folder of images per class, or an
  `.npz` file holding arrays `x` and `y`.

The splits never depend on a run's seed: they are drawn once with a generator seeded 0 and
stratified by class (every class in every split, in its share), so searches with different
seeds are scored on the same test images. Pixels are scaled to [0, 1] first, then normalised
per channel by the train split's mean and std (only train pixels are looked at, so nothing of
the valid or test images leaks into the scaling); a constant channel is centred, not divided by
zero. Everything is done on whole numpy arrays: a large dataset costs about its float32 size
once more, not a Python loop per pixel.
"""

from __future__ import annotations

import errno
import gzip
import os
import stat
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from morphnas.data.series import _check_fractions, _safe_scale
from morphnas.errors import LINK_LOOP, UserError, check_count, dangling_link

IMAGE_DATASETS: tuple[str, ...] = ("digits", "fashion-mnist")

FASHION_MNIST_ENV = "MORPHNAS_FASHION_MNIST"
# Where the Debian package `dataset-fashion-mnist` puts its IDX files (`dpkg -L`), then the same
# layout under /usr/local for a hand install.
_FASHION_MNIST_DIRS: tuple[Path, ...] = (
    Path("/usr/share/datasets/fashion-mnist"),
    Path("/usr/local/share/datasets/fashion-mnist"),
)
_FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_INSTALL_IMAGES = "pip install 'morphnas[images]' (or make setup)"
_SPLIT_SEED = 0  # the splits are part of the dataset, not of a run: never a run's seed
_MIN_PER_CLASS = 3  # one image for each of train, valid and test
# Files a class folder may hold besides its images, skipped by name (besides any hidden file,
# whose name starts with a dot: .DS_Store, ._photo.png from macOS, .ipynb_checkpoints).
_SKIPPED_NAMES = frozenset({"thumbs.db", "desktop.ini"})
_SHOW = 10  # how many names an error message lists before abbreviating


@dataclass
class ImageSplits:
    """Train, valid and test images with their labels, ready for a classifier.

    Each split is `(x, y)`: `x` float32 of shape (N, C, H, W), normalised with the train
    split's per-channel `mean` and `std`; `y` int64 of shape (N,) in 0..n_classes-1, where
    label i names `classes[i]`. `mean` and `std` describe the raw train pixels scaled to [0, 1]
    (a constant channel's std is given as 1.0, the divisor used), so a new image is prepared as
    `(pixels_in_0_1 - mean) / std`. `source` is the dataset name or the user's path.
    """

    train: tuple[Tensor, Tensor] = field(repr=False)
    valid: tuple[Tensor, Tensor] = field(repr=False)
    test: tuple[Tensor, Tensor] = field(repr=False)
    classes: tuple[str, ...]
    source: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return int(self.train[0].shape[1])

    @property
    def height(self) -> int:
        return int(self.train[0].shape[2])

    @property
    def width(self) -> int:
        return int(self.train[0].shape[3])

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def load_image_dataset(
    name: str,
    *,
    split: tuple[float, float, float] = (0.6, 0.2, 0.2),
    limit: int | None = None,
) -> ImageSplits:
    """One of `IMAGE_DATASETS`, split and normalised (see the module docstring).

    `digits` is split by the `split` fractions; `fashion-mnist` keeps its official 10,000 test
    images as the test split and divides its 60,000 training images into train and valid in the
    ratio `split[0]:split[1]`. `limit` caps the training images (see `load_image_file`).
    """
    fractions = _check_fractions(split)
    if name == "digits":
        x, y = _digits()
        return _make_splits(x, y, tuple(str(i) for i in range(10)), "digits", fractions, limit)
    if name == "fashion-mnist":
        train_x, train_y, test_x, test_y = _fashion_mnist()
        return _make_splits(
            train_x,
            train_y,
            FASHION_MNIST_CLASSES,
            "fashion-mnist",
            fractions,
            limit,
            test=(test_x, test_y),
        )
    raise UserError(
        f"unknown image dataset {name!r}; choose one of {', '.join(IMAGE_DATASETS)}, or give "
        "the path of an image folder (one sub-folder per class) or an .npz file"
    )


def load_image_file(
    path: str | os.PathLike[str],
    *,
    split: tuple[float, float, float] = (0.6, 0.2, 0.2),
    limit: int | None = None,
) -> ImageSplits:
    """A user's images: a folder with one sub-folder per class, or an `.npz` file.

    Folder: the class names are the sub-folder names, sorted; each sub-folder holds that
    class's images, read with Pillow, all of one size and all grayscale or all colour.
    Grayscale modes (1, L, LA, I;16, and I within 0..65535) give 1 channel, colour ones (RGB,
    RGBA, P, PA, CMYK, YCbCr, ...) give 3: an alpha channel is dropped (the colour is kept as
    stored, not blended onto a background) and a palette is expanded to RGB. 8-bit images are
    divided by 255, 16-bit ones by 65535; floating-point images (mode F) are refused. Hidden
    files (a name starting with a dot, such as .DS_Store), Thumbs.db and desktop.ini are
    skipped, as are files beside the class folders (a README); any other file that is not an
    image is an error naming it, as is a folder inside a class folder.

    `.npz`: `x` of shape (N, H, W) or (N, C, H, W) and integer labels `y` of shape (N,). A float
    `x` is taken as already scaled (usually to [0, 1]) and used as is; an integer or boolean `x`
    is divided by 1 when its values are 0..1, by 255 when 0..255 and by 65535 when 0..65535.
    Labels are mapped to 0..K-1 in sorted order; the class names are the original labels as text.

    Every class needs at least 3 images, so that each split gets one. The split is stratified,
    by the `split` fractions, with a fixed generator (seed 0). `limit` keeps at most that many
    training images (a stratified subset drawn with the same generator) and caps the valid
    split in the same proportion, `round(limit * split[1] / split[0])`, but never below one
    image per class; the test split is never capped, so results stay comparable.
    """
    fractions = _check_fractions(split)
    shown = str(path)
    file = Path(path)
    info = _stat(file, shown)
    if stat.S_ISDIR(info.st_mode):
        x, y, classes = _read_folder(file, shown)
    elif file.suffix.lower() == ".npz":
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{shown} is not a regular file; give the path of an .npz file")
        x, y, classes = _read_npz(file, shown)
    else:
        raise UserError(
            f"{shown} is neither a folder nor an .npz file; give a folder with one sub-folder "
            "of images per class, or an .npz file holding arrays x (images) and y (labels)"
        )
    return _make_splits(x, y, classes, shown, fractions, limit)


def fashion_mnist_dir() -> Path | None:
    """The folder holding Fashion-MNIST's four IDX files (gzipped or not), or None.

    When `MORPHNAS_FASHION_MNIST` is set, only the folder it names is considered (a wrong
    setting is reported, not silently replaced by another copy); else the Debian package's
    folder and its /usr/local twin are looked at.
    """
    chosen = os.environ.get(FASHION_MNIST_ENV)
    folders = (Path(chosen).expanduser(),) if chosen else _FASHION_MNIST_DIRS
    for folder in folders:
        if all(_idx_file(folder, stem) is not None for stem in _FASHION_MNIST_FILES.values()):
            return folder
    return None


# --- the built-in datasets -------------------------------------------------------------------


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (1797, 1, 8, 8) float32 in [0, 1] (the pixels count 0..16)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError(
            f"the digits dataset needs scikit-learn, which is not installed: {_INSTALL_IMAGES}"
        ) from None
    bunch: Any = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32).reshape(-1, 1, 8, 8) / np.float32(16.0)
    return x, np.asarray(bunch.target, dtype=np.int64)


def _fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST's official train and test parts, images as uint8 (N, 1, 28, 28)."""
    folder = fashion_mnist_dir()
    if folder is None:
        chosen = os.environ.get(FASHION_MNIST_ENV)
        if chosen:
            missing = [
                stem
                for stem in _FASHION_MNIST_FILES.values()
                if _idx_file(Path(chosen).expanduser(), stem) is None
            ]
            raise UserError(
                f"{FASHION_MNIST_ENV}={chosen} lacks {', '.join(missing)} (.gz or not); point "
                "it at a folder with Fashion-MNIST's four IDX files, or unset it"
            )
        raise UserError(
            "fashion-mnist is not installed: sudo apt-get install dataset-fashion-mnist "
            f"(Debian/Ubuntu; or set {FASHION_MNIST_ENV} to a folder with its four IDX files)"
        )
    parts: dict[str, np.ndarray] = {}
    for key, stem in _FASHION_MNIST_FILES.items():
        file = _idx_file(folder, stem)
        assert file is not None  # fashion_mnist_dir() checked all four
        parts[key] = _read_idx(file, ndim=3 if key.endswith("_x") else 1)
    for part in ("train", "test"):
        x, y = parts[f"{part}_x"], parts[f"{part}_y"]
        labels_file = _idx_file(folder, _FASHION_MNIST_FILES[f"{part}_y"])
        if len(x) != len(y):
            raise UserError(
                f"{labels_file} holds {len(y)} labels but its images file {len(x)} images; "
                "reinstall dataset-fashion-mnist (the files do not belong together)"
            )
        if y.size and int(y.max()) >= len(FASHION_MNIST_CLASSES):
            raise UserError(
                f"{labels_file} holds label {int(y.max())}, but Fashion-MNIST has labels 0..9; "
                "reinstall dataset-fashion-mnist"
            )
    return (
        parts["train_x"][:, None],
        parts["train_y"].astype(np.int64),
        parts["test_x"][:, None],
        parts["test_y"].astype(np.int64),
    )


def _idx_file(folder: Path, stem: str) -> Path | None:
    """`stem.gz` or `stem` in `folder`, whichever is a file; None when neither is."""
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (the MNIST format) with `ndim` dimensions, as uint8.

    The header is 2 zero bytes, a type byte (0x08: unsigned byte), the number of dimensions,
    then each dimension as a big-endian 32-bit count; the values follow.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(
            f"cannot read {path}: {err}; reinstall dataset-fashion-mnist or replace the file"
        ) from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes((0, 0, 0x08, ndim)):
        raise UserError(
            f"{path} is not an IDX file of {ndim}-dimensional unsigned bytes (its magic number "
            f"is {raw[:4].hex() or 'missing'}, expected 000008{ndim:02x}); reinstall "
            "dataset-fashion-mnist or replace the file"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(dims)):
        raise UserError(
            f"{path} declares shape {dims} ({int(np.prod(dims))} values) but holds "
            f"{len(raw) - header}; the file is truncated or damaged, reinstall or replace it"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


# --- a user's folder of images ---------------------------------------------------------------


def _stat(path: Path, shown: str) -> os.stat_result:
    """The path's status, or a `UserError` saying why it cannot be used."""
    try:
        return os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UserError(f"{shown} {LINK_LOOP}; give the path of the real data") from None
        if err.errno != errno.ENOENT:
            raise UserError(
                f"cannot read {shown}: {err.strerror or err}; check that it is readable"
            ) from None
        if dangling := dangling_link(path):
            raise UserError(f"{shown} {dangling}; fix the link or give the real path") from None
        raise UserError(
            f"image data not found: {shown}; check the path (working directory: {Path.cwd()})"
        ) from None


def _skipped(entry: Path) -> bool:
    return entry.name.startswith(".") or entry.name.lower() in _SKIPPED_NAMES


def _read_folder(folder: Path, shown: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Images (N, C, H, W) float32 in [0, 1], labels and class names from class sub-folders."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise UserError(
            f"reading image folders needs Pillow, which is not installed: {_INSTALL_IMAGES}"
        ) from None
    try:
        entries = sorted(e for e in folder.iterdir() if not _skipped(e))
    except OSError as err:
        raise UserError(f"cannot list {shown}: {err.strerror or err}") from None
    class_dirs = [e for e in entries if e.is_dir()]
    if len(class_dirs) < 2:
        loose = [e for e in entries if e.is_file()]
        has = (
            f"only one class folder ({class_dirs[0].name!r})"
            if class_dirs
            else f"no class folders{f' ({len(loose)} loose files)' if loose else ''}"
        )
        raise UserError(
            f"{shown} has {has}; a classifier needs at least 2 classes: put each class's "
            "images in a sub-folder named after the class"
        )
    files: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        try:
            inside = sorted(e for e in class_dir.iterdir() if not _skipped(e))
        except OSError as err:
            raise UserError(f"cannot list {class_dir}: {err.strerror or err}") from None
        nested = [e for e in inside if e.is_dir()]
        if nested:
            raise UserError(
                f"{nested[0]} is a folder inside class folder {class_dir}; put each class's "
                "images directly in its folder (one level of class folders)"
            )
        if len(inside) < _MIN_PER_CLASS:
            raise UserError(
                f"class folder {class_dir} holds {len(inside)} image(s); each class needs at "
                f"least {_MIN_PER_CLASS} (one for each of train, valid and test): add images "
                "or remove the folder"
            )
        files.extend(inside)
        labels.extend([label] * len(inside))
    first: tuple[Path, tuple[int, int], int] | None = None  # file, (width, height), channels
    x = np.empty((0,), dtype=np.float32)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as image:
                size, mode = image.size, image.mode
                channels, scale, image_mode = _image_layout(mode, file)
                pixels = np.asarray(image.convert(image_mode) if image_mode != mode else image)
        except UnidentifiedImageError:
            raise UserError(
                f"{file} is not an image Pillow can read; remove it from {file.parent} or "
                "convert it to PNG"
            ) from None
        except (OSError, ValueError, SyntaxError) as err:  # truncated or damaged image data
            raise UserError(f"cannot read image {file}: {err}; replace or remove it") from None
        if first is None:
            first = (file, size, channels)
            x = np.empty((len(files), channels, size[1], size[0]), dtype=np.float32)
        elif size != first[1]:
            (w0, h0), (w1, h1) = first[1], size
            raise UserError(
                f"{first[0]} is {w0}x{h0} pixels but {file} is {w1}x{h1}; resize the images "
                "to one size"
            )
        elif channels != first[2]:
            kinds = {1: "grayscale", 3: "colour"}
            raise UserError(
                f"{first[0]} is {kinds[first[2]]} but {file} is {kinds[channels]} ({mode}); "
                "convert the images to one mode (all grayscale or all RGB)"
            )
        if mode == "I" and pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise UserError(
                f"{file} has 32-bit integer pixels beyond 0..65535; convert the images to 8-bit "
                "grayscale or RGB (e.g. PNG)"
            )
        pixels = pixels.reshape(size[1], size[0], -1)[..., :channels]  # drop an alpha channel
        x[i] = np.moveaxis(pixels, -1, 0) / np.float32(scale)
    return x, np.asarray(labels, dtype=np.int64), tuple(d.name for d in class_dirs)


def _image_layout(mode: str, file: Path) -> tuple[int, float, str]:
    """(channels, divisor to [0, 1], mode to convert to) for a Pillow image mode."""
    if mode in ("L", "LA"):
        return 1, 255.0, mode
    if mode == "1":
        return 1, 255.0, "L"
    if mode.startswith("I;16") or mode == "I":  # a 16-bit PNG opens as "I" in some Pillows
        return 1, 65535.0, mode
    if mode in ("RGB", "RGBA"):
        return 3, 255.0, mode
    if mode == "F":
        raise UserError(
            f"{file} has floating-point pixels (mode F); convert the images to 8-bit grayscale "
            "or RGB (e.g. PNG)"
        )
    return 3, 255.0, "RGB"  # P, PA, CMYK, YCbCr, LAB, HSV, RGBX...: as RGB colours


# --- a user's .npz file ----------------------------------------------------------------------


def _read_npz(path: Path, shown: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Images (N, C, H, W) float32 in [0, 1], labels 0..K-1 and class names from `x` and `y`."""
    try:
        with path.open("rb") as handle:
            is_zip = handle.read(4) == b"PK\x03\x04"
    except OSError as err:
        raise UserError(f"cannot read {shown}: {err.strerror or err}") from None
    if not is_zip:
        raise UserError(
            f"{shown} is not an .npz file (not a zip archive); save it with "
            "numpy.savez(path, x=images, y=labels)"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = sorted(archive.files)
            if "x" not in keys or "y" not in keys:
                lacking = " and ".join(k for k in ("x", "y") if k not in keys)
                raise UserError(
                    f"{shown} has no array {lacking} (it holds {', '.join(keys) or 'no arrays'}); "
                    "save it with numpy.savez(path, x=images, y=labels)"
                )
            x, y = archive["x"], archive["y"]
    except ValueError as err:  # an object array, which needs pickle: refused, it can run code
        raise UserError(
            f"cannot read {shown}: {err}; save plain numeric arrays with numpy.savez"
        ) from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:  # damaged archive
        raise UserError(
            f"cannot read {shown} as an .npz file ({err}); save it again with "
            "numpy.savez(path, x=images, y=labels)"
        ) from None
    if x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] > 4:  # (N, H, W, C)
        raise UserError(
            f"{shown}: x has shape {x.shape}, channels last; store it as (N, C, H, W), e.g. "
            "x.transpose(0, 3, 1, 2)"
        )
    if x.ndim not in (3, 4):
        raise UserError(f"{shown}: x has shape {x.shape}; give images as (N, H, W) or (N, C, H, W)")
    if y.ndim != 1:
        raise UserError(f"{shown}: y has shape {y.shape}; give one label per image, shape (N,)")
    if len(x) != len(y):
        raise UserError(
            f"{shown}: x holds {len(x)} images but y holds {len(y)} labels; give one label "
            "per image"
        )
    if x.ndim == 3:
        x = x[:, None]
    x = _npz_pixels(x, shown)
    labels = _npz_labels(y, shown)
    values, codes = np.unique(labels, return_inverse=True)
    if len(values) < 2:
        raise UserError(
            f"{shown}: y holds {len(values)} distinct label(s); a classifier needs at least 2 "
            "classes"
        )
    return x, codes.astype(np.int64), tuple(str(int(v)) for v in values)


def _npz_pixels(x: np.ndarray, shown: str) -> np.ndarray:
    """`x` as float32 in [0, 1] for integer pixels; float pixels as given, if finite."""
    if x.dtype.kind == "f":
        out = x.astype(np.float32)
        if not np.isfinite(out).all():
            bad = int(np.count_nonzero(~np.isfinite(out)))
            raise UserError(
                f"{shown}: x holds {bad} NaN or infinite value(s) (in float32); replace them "
                "with pixel values"
            )
        return out
    if x.dtype.kind == "b":
        return x.astype(np.float32)
    if x.dtype.kind not in "iu":
        raise UserError(
            f"{shown}: x has dtype {x.dtype}, not numbers; give pixel values as integers "
            "(0..255) or floats"
        )
    low, high = (int(x.min()), int(x.max())) if x.size else (0, 0)
    if low < 0 or high > 65535:
        raise UserError(
            f"{shown}: x holds integers from {low} to {high}; integer pixels must lie in "
            "0..255 (or 0..65535); give floats for other ranges"
        )
    scale = 1.0 if high <= 1 else 255.0 if high <= 255 else 65535.0
    return x.astype(np.float32) / np.float32(scale)


def _npz_labels(y: np.ndarray, shown: str) -> np.ndarray:
    """`y` as int64 when its values are whole, non-negative numbers."""
    if y.dtype.kind == "f":
        whole = np.isfinite(y).all() and bool((y == np.round(y)).all())
        if not whole:
            raise UserError(
                f"{shown}: y holds non-integer labels (such as {_first_bad(y)}); give class "
                "labels as integers 0, 1, 2, ..."
            )
    elif y.dtype.kind not in "iu":
        raise UserError(
            f"{shown}: y has dtype {y.dtype}; give class labels as integers 0, 1, 2, ... "
            "(map names to numbers first)"
        )
    labels = y.astype(np.int64)
    if labels.size and int(labels.min()) < 0:
        raise UserError(
            f"{shown}: y holds negative label {int(labels.min())}; give class labels as "
            "integers 0, 1, 2, ..."
        )
    return labels


def _first_bad(y: np.ndarray) -> str:
    bad = y[~(np.isfinite(y) & (y == np.round(y)))]
    return repr(float(bad[0]))


# --- splitting and normalising ---------------------------------------------------------------


def _make_splits(
    x: np.ndarray,
    y: np.ndarray,
    classes: Sequence[str],
    source: str,
    fractions: tuple[float, float, float],
    limit: int | None,
    test: tuple[np.ndarray, np.ndarray] | None = None,
) -> ImageSplits:
    """Split (train/valid/test, or train/valid when `test` is given), cap, normalise."""
    if limit is not None:
        check_count("limit", limit, 1)
    rng = np.random.default_rng(_SPLIT_SEED)
    n_classes = len(classes)
    counts = np.bincount(y, minlength=n_classes)
    needed = _MIN_PER_CLASS if test is None else _MIN_PER_CLASS - 1
    short = np.flatnonzero(counts < needed)
    if short.size:
        c = int(short[0])
        raise UserError(
            f"{source}: class {classes[c]!r} has {int(counts[c])} image(s); each class needs at "
            f"least {needed} so that every split gets one; add images or leave the class out"
        )
    parts = fractions if test is None else (fractions[0], fractions[1])
    pieces = _stratified(y, n_classes, parts, rng)  # per split, per class: shuffled indices
    if limit is not None:
        if limit < n_classes:
            raise UserError(
                f"limit {limit} is below the {n_classes} classes of {source}; give at least "
                f"{n_classes} so that every class has a training image"
            )
        valid_cap = max(round(limit * fractions[1] / fractions[0]), n_classes)
        pieces[0] = _subset(pieces[0], limit)
        pieces[1] = _subset(pieces[1], valid_cap)
    index = [_join(per_class, part) for part, per_class in enumerate(pieces)]
    train_x = x[index[0]]
    mean, std = _channel_stats(train_x)
    splits = [(train_x, y[index[0]]), (x[index[1]], y[index[1]])]
    splits.append((x[index[2]], y[index[2]]) if test is None else test)
    tensors = [_normalised(px, labels, mean, std) for px, labels in splits]
    return ImageSplits(
        train=tensors[0],
        valid=tensors[1],
        test=tensors[2],
        classes=tuple(classes),
        source=source,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )


def _stratified(
    y: np.ndarray, n_classes: int, fractions: Sequence[float], rng: np.random.Generator
) -> list[list[np.ndarray]]:
    """For each part, for each class, that class's indices in the part (in shuffled order).

    A class of n items gets `n * fraction` items per part, rounded by largest remainder, then
    one moved from the largest part to any part left empty (classes have at least one item
    per part).
    """
    order = np.argsort(y, kind="stable")
    starts = np.searchsorted(y[order], np.arange(n_classes + 1))
    pieces: list[list[np.ndarray]] = [[] for _ in fractions]
    for c in range(n_classes):
        members = rng.permutation(order[starts[c] : starts[c + 1]])
        sizes = _largest_remainder(len(members), np.asarray(fractions, dtype=np.float64), c)
        for part in np.flatnonzero(sizes == 0):
            sizes[int(np.argmax(sizes))] -= 1
            sizes[part] = 1
        bounds = np.cumsum(sizes)[:-1]
        for part, chunk in enumerate(np.split(members, bounds)):
            pieces[part].append(chunk)
    return pieces


def _subset(per_class: list[np.ndarray], total: int) -> list[np.ndarray]:
    """At most `total` indices, shared over the classes in proportion to their sizes and at
    least one per class (each list is already shuffled, so its head is a random subset)."""
    sizes = np.asarray([len(chunk) for chunk in per_class], dtype=np.int64)
    if total >= sizes.sum():
        return per_class
    base = np.minimum(sizes, 1)
    extra = _largest_remainder(total - int(base.sum()), (sizes - base).astype(np.float64))
    return [chunk[: int(k)] for chunk, k in zip(per_class, base + extra, strict=True)]


def _largest_remainder(total: int, weights: np.ndarray, turn: int = 0) -> np.ndarray:
    """`total` shared out in proportion to `weights` as integers (Hamilton's method); a part
    never gets more than `ceil(total * weight / sum)`.

    Equal remainders (6 images split 3:1 is 4.5 and 1.5) go first to part `turn` (modulo the
    number of parts), then the next: called with each class's index, ties alternate between
    the parts, so the splits' sizes stay in proportion over all classes, not just within one.
    """
    share = total * weights / weights.sum()
    sizes = np.floor(share).astype(np.int64)
    left = total - int(sizes.sum())
    if left > 0:
        remainder = np.round(share - sizes, 9)  # 4.4999999 and 4.5 are the same tie
        priority = (np.arange(len(weights)) - turn) % len(weights)
        sizes[np.lexsort((priority, -remainder))[:left]] += 1
    return sizes


def _join(per_class: list[np.ndarray], part: int) -> np.ndarray:
    """One index array with the classes mixed, so a loader without shuffling sees all classes.

    Each part is shuffled by its own generator (seeded 0 and the part's number), so the test
    split's order does not depend on how many training images `limit` kept.
    """
    return np.random.default_rng((_SPLIT_SEED, part)).permutation(np.concatenate(per_class))


def _channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (population) of pixels scaled to [0, 1], in float64.

    Accumulated one channel at a time in float64, so a uint8 Fashion-MNIST array is not copied
    whole; a (numerically) constant channel gets std 1.0: it is centred, not divided by zero.
    """
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    mean = np.empty(x.shape[1])
    std = np.empty(x.shape[1])
    for c in range(x.shape[1]):
        channel = x[:, c]
        mean[c] = channel.mean(dtype=np.float64) / scale
        std[c] = channel.std(dtype=np.float64) / scale
    return mean, _safe_scale(std, mean)


def _normalised(
    pixels: np.ndarray, labels: np.ndarray, mean: np.ndarray, std: np.ndarray
) -> tuple[Tensor, Tensor]:
    """(x, y) tensors: x = (pixels in [0, 1] - mean) / std per channel, float32; y int64."""
    x = pixels.astype(np.float32)
    if pixels.dtype == np.uint8:
        x /= np.float32(255.0)
    x -= mean.astype(np.float32)[None, :, None, None]
    x /= std.astype(np.float32)[None, :, None, None]
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(
        np.ascontiguousarray(labels, dtype=np.int64)
    )
