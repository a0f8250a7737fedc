"""Image datasets (morphnas.data.images): fixed stratified splits, normalisation, and one-line
errors for every bad input. Fashion-MNIST is faked with tiny IDX files; digits is bundled with
scikit-learn, so nothing here downloads."""

from __future__ import annotations

import builtins
import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from morphnas.data import images
from morphnas.data.images import (
    IMAGE_DATASETS,
    ImageSplits,
    fashion_mnist_dir,
    load_image_dataset,
    load_image_file,
)
from morphnas.errors import UserError

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("sklearn")


def _splits(data: ImageSplits) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [data.train, data.valid, data.test]


def _check_layout(data: ImageSplits) -> None:
    """Shapes, dtypes, labels in range, every class in every split, train normalised."""
    for x, y in _splits(data):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (data.channels, data.height, data.width)
        assert len(x) == len(y)
        assert set(y.tolist()) == set(range(data.n_classes))
        assert torch.isfinite(x).all()
    x = data.train[0].double()
    assert torch.allclose(
        x.mean(dim=(0, 2, 3)), torch.zeros(data.channels, dtype=torch.float64), atol=1e-5
    )
    assert torch.allclose(
        x.std(dim=(0, 2, 3), unbiased=False),
        torch.ones(data.channels, dtype=torch.float64),
        atol=1e-4,
    )
    assert len(data.mean) == len(data.std) == data.channels


# --- digits ----------------------------------------------------------------------------------


def test_digits_shapes_normalisation_and_stratification() -> None:
    data = load_image_dataset("digits")
    assert "digits" in IMAGE_DATASETS
    assert (data.channels, data.height, data.width, data.n_classes) == (1, 8, 8, 10)
    assert data.classes == tuple(str(i) for i in range(10))
    assert data.source == "digits"
    assert sum(len(y) for _, y in _splits(data)) == 1797
    assert len(data.train[1]) == pytest.approx(0.6 * 1797, abs=10)
    assert len(data.valid[1]) == pytest.approx(0.2 * 1797, abs=10)
    _check_layout(data)
    assert 0 < data.mean[0] < 1 and 0 < data.std[0] < 1
    # each class is split 60/20/20 within itself
    for c in range(10):
        n = [int((y == c).sum()) for _, y in _splits(data)]
        assert abs(n[0] / sum(n) - 0.6) < 0.02
    # classes are mixed, not in blocks
    assert len(set(data.train[1][:50].tolist())) > 5


def test_digits_split_is_fixed_and_ignores_torch_and_numpy_seeds() -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    first = load_image_dataset("digits")
    torch.manual_seed(2)
    np.random.seed(2)
    second = load_image_dataset("digits")
    for (x1, y1), (x2, y2) in zip(_splits(first), _splits(second), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_digits_split_fractions() -> None:
    data = load_image_dataset("digits", split=(0.8, 0.1, 0.1))
    assert len(data.train[1]) == pytest.approx(0.8 * 1797, abs=10)
    _check_layout(data)


def test_digits_limit_is_stratified_and_leaves_test_whole() -> None:
    full = load_image_dataset("digits")
    data = load_image_dataset("digits", limit=100)
    assert len(data.train[1]) == 100
    assert len(data.valid[1]) == round(100 * 0.2 / 0.6)
    assert torch.bincount(data.train[1]).tolist() == [10] * 10
    assert torch.equal(data.test[1], full.test[1])  # same test images, never capped
    _check_layout(data)
    # a limit beyond the data changes nothing
    assert len(load_image_dataset("digits", limit=10**6).train[1]) == len(full.train[1])


def test_limit_below_the_class_count_is_refused() -> None:
    with pytest.raises(UserError, match="limit 5 is below the 10 classes"):
        load_image_dataset("digits", limit=5)


def test_unknown_dataset_lists_the_choices() -> None:
    with pytest.raises(UserError, match=r"unknown image dataset 'mnist'.*digits, fashion-mnist"):
        load_image_dataset("mnist")


def test_bad_split_fractions_are_refused() -> None:
    with pytest.raises(UserError, match="sum to"):
        load_image_dataset("digits", split=(0.5, 0.2, 0.2))


def test_digits_without_scikit_learn_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_sklearn(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    monkeypatch.delitem(sys.modules, "sklearn.datasets", raising=False)
    with pytest.raises(UserError, match=r"scikit-learn.*pip install 'morphnas\[images\]'"):
        load_image_dataset("digits")


# --- fashion-mnist ---------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray, zipped: bool = True) -> None:
    header = bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if zipped:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def _fake_fashion(folder: Path, n_train: int = 60, n_test: int = 20, zipped: bool = True) -> Path:
    """Four small IDX files with Fashion-MNIST's names: 10 classes, 28x28 bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for part, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        pixels = rng.integers(0, 256, size=(n, 28, 28)) // (1 + labels[:, None, None])
        _write_idx(folder / f"{part}-images-idx3-ubyte", pixels, zipped)
        _write_idx(folder / f"{part}-labels-idx1-ubyte", labels, zipped)
    return folder


@pytest.mark.parametrize("zipped", [True, False])
def test_fashion_mnist_from_the_environment_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zipped: bool
) -> None:
    folder = _fake_fashion(tmp_path / "fm", zipped=zipped)
    monkeypatch.setenv("MORPHNAS_FASHION_MNIST", str(folder))
    assert fashion_mnist_dir() == folder
    data = load_image_dataset("fashion-mnist", split=(0.6, 0.2, 0.2))
    assert (data.channels, data.height, data.width, data.n_classes) == (1, 28, 28, 10)
    assert data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot"
    assert data.source == "fashion-mnist"
    # the official test part stays the test split; train is split 3:1 into train/valid
    assert len(data.test[1]) == 20
    assert (len(data.train[1]), len(data.valid[1])) == (45, 15)
    _check_layout(data)
    again = load_image_dataset("fashion-mnist")
    assert torch.equal(again.train[0], data.train[0])


def test_fashion_mnist_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MORPHNAS_FASHION_MNIST", str(_fake_fashion(tmp_path / "fm", 200, 30)))
    data = load_image_dataset("fashion-mnist", limit=20)
    assert len(data.train[1]) == 20
    assert len(data.valid[1]) == 10  # round(20 * 0.2 / 0.6) = 7, raised to one per class
    assert len(data.test[1]) == 30
    _check_layout(data)


def test_fashion_mnist_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MORPHNAS_FASHION_MNIST", raising=False)
    monkeypatch.setattr(images, "_FASHION_MNIST_DIRS", (tmp_path / "nowhere",))
    assert fashion_mnist_dir() is None
    with pytest.raises(UserError) as err:
        load_image_dataset("fashion-mnist")
    message = str(err.value)
    assert "fashion-mnist is not installed" in message
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert "MORPHNAS_FASHION_MNIST" in message and "\n" not in message


def test_fashion_mnist_environment_folder_incomplete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _fake_fashion(tmp_path / "fm")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv("MORPHNAS_FASHION_MNIST", str(folder))
    assert fashion_mnist_dir() is None
    with pytest.raises(UserError, match="lacks t10k-labels-idx1-ubyte"):
        load_image_dataset("fashion-mnist")


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda p: p.write_bytes(gzip.compress(b"\x00\x00\x09\x03" + bytes(20))), "magic number"),
        (lambda p: p.write_bytes(b"not gzip at all"), "cannot read"),
        (lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-5])), "truncated"),
    ],
)
def test_fashion_mnist_bad_idx_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: object, words: str
) -> None:
    folder = _fake_fashion(tmp_path / "fm")
    target = folder / "train-images-idx3-ubyte.gz"
    damage(target)  # type: ignore[operator]
    monkeypatch.setenv("MORPHNAS_FASHION_MNIST", str(folder))
    with pytest.raises(UserError, match=words) as err:
        load_image_dataset("fashion-mnist")
    assert str(target) in str(err.value)


def test_fashion_mnist_labels_that_do_not_match(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _fake_fashion(tmp_path / "fm")
    _write_idx(folder / "train-labels-idx1-ubyte", np.arange(50) % 10)
    monkeypatch.setenv("MORPHNAS_FASHION_MNIST", str(folder))
    with pytest.raises(UserError, match="50 labels but its images file 60 images"):
        load_image_dataset("fashion-mnist")


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="the Debian package dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_real_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MORPHNAS_FASHION_MNIST", raising=False)
    data = load_image_dataset("fashion-mnist", limit=200)
    assert len(data.test[1]) == 10_000
    assert torch.bincount(data.test[1]).tolist() == [1000] * 10
    assert len(data.train[1]) == 200
    assert 0.25 < data.mean[0] < 0.32  # Fashion-MNIST's well-known mean, 0.286


# --- a folder of images ----------------------------------------------------------------------


def _image_folder(
    root: Path, mode: str = "L", size: tuple[int, int] = (6, 5), per_class: int = 4
) -> Path:
    rng = np.random.default_rng(0)
    channels = 3 if mode == "RGB" else 1
    for name in ("cat", "dog", "ant"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
            Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(
                root / name / f"{i}.png"
            )
    return root


@pytest.mark.parametrize(("mode", "channels"), [("L", 1), ("RGB", 3)])
def test_image_folder(tmp_path: Path, mode: str, channels: int) -> None:
    root = _image_folder(tmp_path / "pics", mode)
    (root / "cat" / ".DS_Store").write_bytes(b"\x00\x01junk")  # hidden: skipped
    (root / "README.txt").write_text("beside the class folders: skipped")
    data = load_image_file(root)
    assert data.classes == ("ant", "cat", "dog")  # sorted folder names
    assert (data.channels, data.height, data.width) == (channels, 5, 6)
    assert data.source == str(root)
    assert sum(len(y) for _, y in _splits(data)) == 12
    _check_layout(data)


def test_image_folder_palette_and_alpha_become_rgb(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "pics", "RGB")
    Image.new("RGBA", (6, 5), (10, 20, 30, 0)).save(root / "cat" / "alpha.png")
    Image.new("RGB", (6, 5), (200, 0, 0)).convert("P").save(root / "dog" / "palette.png")
    data = load_image_file(root)
    assert data.channels == 3
    assert sum(len(y) for _, y in _splits(data)) == 14


def test_image_folder_of_mixed_sizes(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "pics", size=(28, 28))
    Image.new("L", (32, 32)).save(root / "dog" / "big.png")
    with pytest.raises(UserError, match=r"is 28x28 pixels but .*big.png is 32x32; resize"):
        load_image_file(root)


def test_image_folder_of_mixed_modes(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "pics", "L")
    Image.new("RGB", (6, 5)).save(root / "dog" / "colour.png")
    with pytest.raises(UserError, match=r"grayscale but .*colour.png is colour"):
        load_image_file(root)


def test_image_folder_with_a_file_that_is_not_an_image(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "pics")
    (root / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match=r"notes.txt is not an image"):
        load_image_file(root)


def test_image_folder_with_a_truncated_image(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "pics", size=(40, 40))
    broken = root / "cat" / "0.png"
    broken.write_bytes(broken.read_bytes()[:60])
    with pytest.raises(UserError, match=r"0.png"):
        load_image_file(root)


def test_image_folder_with_an_empty_class(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "pics")
    (root / "eel").mkdir()
    with pytest.raises(UserError, match=r"class folder .*eel holds 0 image\(s\).*at least 3"):
        load_image_file(root)


def test_image_folder_with_a_small_class(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "pics", per_class=2)
    with pytest.raises(UserError, match=r"ant holds 2 image\(s\).*at least 3"):
        load_image_file(root)


def test_image_folder_with_one_class(tmp_path: Path) -> None:
    root = tmp_path / "pics"
    (root / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match=r"only one class folder \('cat'\).*at least 2 classes"):
        load_image_file(root)


def test_image_folder_without_class_folders(tmp_path: Path) -> None:
    root = tmp_path / "pics"
    root.mkdir()
    Image.new("L", (4, 4)).save(root / "a.png")
    with pytest.raises(UserError, match=r"no class folders \(1 loose files\).*sub-folder"):
        load_image_file(root)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no class folders"):
        load_image_file(empty)


def test_image_folder_with_nested_folders(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "pics")
    (root / "cat" / "more").mkdir()
    with pytest.raises(UserError, match="is a folder inside class folder"):
        load_image_file(root)


# --- an .npz file ----------------------------------------------------------------------------


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_grayscale_with_labels_remapped(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([3, 7, 9], 5)
    path = _npz(tmp_path / "d.npz", x=rng.integers(0, 256, (15, 4, 5), dtype=np.uint8), y=y)
    data = load_image_file(path)
    assert data.classes == ("3", "7", "9")
    assert (data.channels, data.height, data.width) == (1, 4, 5)
    assert data.source == str(path)
    _check_layout(data)
    assert 0.3 < data.mean[0] < 0.7  # uint8 pixels were divided by 255


def test_npz_float_colour(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((12, 3, 4, 4)).astype(np.float32)
    path = _npz(tmp_path / "d.npz", x=x, y=np.arange(12) % 2)
    data = load_image_file(str(path))
    assert data.channels == 3 and data.n_classes == 2
    # float pixels are used as given: uniform [0, 1) has mean 1/2 and std 0.29
    assert all(0.4 < m < 0.6 for m in data.mean) and all(0.2 < s < 0.4 for s in data.std)
    _check_layout(data)


def test_npz_constant_channel_gives_no_nan(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((12, 2, 3, 3))
    x[:, 1] = 0.5
    data = load_image_file(_npz(tmp_path / "d.npz", x=x, y=np.arange(12) % 2))
    assert data.std[1] == 1.0 and data.mean[1] == pytest.approx(0.5)
    for px, _ in _splits(data):
        assert torch.isfinite(px).all() and float(px[:, 1].abs().max()) < 1e-6


@pytest.mark.parametrize(
    ("arrays", "words"),
    [
        ({"images": np.zeros((6, 2, 2)), "y": np.arange(6) % 2}, "no array x.*holds images, y"),
        ({"x": np.zeros((6, 2, 2))}, "no array y .*holds x"),
        ({"x": np.zeros((6, 4)), "y": np.arange(6) % 2}, r"x has shape \(6, 4\)"),
        ({"x": np.zeros((6, 5, 5, 3)), "y": np.arange(6) % 2}, "channels last.*transpose"),
        ({"x": np.zeros((6, 2, 2)), "y": np.zeros((6, 1))}, r"y has shape \(6, 1\)"),
        ({"x": np.zeros((6, 2, 2)), "y": np.arange(5) % 2}, "6 images but y holds 5 labels"),
        ({"x": np.full((6, 2, 2), np.nan), "y": np.arange(6) % 2}, "NaN or infinite"),
        ({"x": np.zeros((6, 2, 2)), "y": np.arange(6) * 0.5}, "non-integer labels"),
        ({"x": np.zeros((6, 2, 2)), "y": np.array(list("ababab"))}, "integers 0, 1, 2"),
        ({"x": np.zeros((6, 2, 2)), "y": np.arange(6) % 2 - 1}, "negative label -1"),
        ({"x": np.zeros((6, 2, 2)), "y": np.zeros(6, dtype=int)}, "at least 2 classes"),
        ({"x": np.zeros((6, 2, 2)), "y": np.array([0, 0, 0, 1, 1, 2])}, "class '1' has 2 image"),
        ({"x": np.full((6, 2, 2), -3), "y": np.arange(6) % 2}, "integers from -3"),
    ],
)
def test_npz_bad_contents(tmp_path: Path, arrays: dict[str, np.ndarray], words: str) -> None:
    path = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError, match=words) as err:
        load_image_file(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_npz_with_whole_float_labels_is_accepted(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((9, 2, 2))
    data = load_image_file(_npz(tmp_path / "d.npz", x=x, y=np.arange(9) % 3 * 1.0))
    assert data.classes == ("0", "1", "2")


def test_npz_that_is_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "fake.npz"
    path.write_text("hello")
    with pytest.raises(UserError, match=r"not an .npz file"):
        load_image_file(path)


def test_npz_with_object_arrays_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([None] * 6, dtype=object), y=np.arange(6) % 2)
    with pytest.raises(UserError, match=r"cannot read .*obj.npz"):
        load_image_file(path)


# --- paths that are neither ------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"image data not found: .*nope; check the path"):
        load_image_file(tmp_path / "nope")


def test_other_file_type(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match=r"neither a folder nor an .npz file"):
        load_image_file(path)


@pytest.mark.parametrize(
    ("mode", "channels"),
    [("1", 1), ("LA", 1), ("I;16", 1), ("P", 3), ("RGBA", 3), ("CMYK", 3)],
)
def test_image_folder_modes(tmp_path: Path, mode: str, channels: int) -> None:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(3):
            rgb = Image.fromarray(rng.integers(0, 256, (5, 4, 3), dtype=np.uint8), "RGB")
            image = rgb.convert("L").convert(mode) if mode in ("1", "LA", "I;16") else rgb
            image = image.convert(mode) if mode != image.mode else image
            image.save(tmp_path / name / f"{i}.{'jpg' if mode == 'CMYK' else 'png'}")
    data = load_image_file(tmp_path)
    assert (data.channels, data.height, data.width) == (channels, 5, 4)
    _check_layout(data)


def test_image_folder_of_float_images_is_refused(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("F", (4, 4), 0.5).save(tmp_path / name / f"{i}.tif")
    with pytest.raises(UserError, match=r"floating-point pixels.*convert the images to 8-bit"):
        load_image_file(tmp_path)
