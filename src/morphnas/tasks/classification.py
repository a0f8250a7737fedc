"""Image classification: a CNN network (the ``darts_cnn`` supernet, a derived network, or a
hand-designed baseline) under a linear classifier, cross-entropy, accuracy, parameters and FLOPs.

Data: ``digits`` (scikit-learn's 8×8 digits), ``fashion-mnist`` (the Debian package's IDX files),
or the user's images (``--images``: a folder with one sub-folder per class, or an ``.npz``); the
splits are fixed and stratified (``data.images``), so runs of different seeds are scored on the
same test images, which neither the search nor early stopping ever sees.

Baselines: ``lenet``, ``resnet20`` and ``vgg_small`` (``cells.image_baselines``'s
``IMAGE_BASELINES``, all trained by default), each as wide as brings its parameters closest to
the searched network's (a comparison at equal size), or at ``space.hidden`` when there is no
searched network to match.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from morphnas import cells
from morphnas.cells.image_baselines import IMAGE_BASELINES, count_flops, image_baseline
from morphnas.data.images import (
    IMAGE_DATASETS,
    ImageSplits,
    load_image_dataset,
    load_image_file,
)
from morphnas.engine.runtime import resolve_device
from morphnas.tasks.base import PairStream, batches, predict
from morphnas.tasks.kinds import TaskKind

if TYPE_CHECKING:
    from morphnas.config import RunConfig
    from morphnas.genotype import Genotype

Batch = tuple[Tensor, Tensor]
# The widest baseline tried when matching the searched network's parameters.
MAX_BASELINE_WIDTH = 256


class ImageModel(nn.Module):
    """``cell`` (images → ``(features, _)``) under a linear head to the classes' logits."""

    def __init__(self, cell: nn.Module, classes: int) -> None:
        super().__init__()
        self.cell = cell
        self.head = nn.Linear(cell.features, classes)

    def forward(self, x: Tensor, **cell_kwargs: Any) -> Tensor:
        return self.head(self.cell(x, **cell_kwargs)[0])


class ClassifyTask:
    """Images → class logits under cross-entropy: the ``Task`` the engine runs."""

    probe_size = 32
    eval_batch = 256

    def __init__(self, train: Batch, valid: Batch, batch_size: int) -> None:
        self.train, self.valid, self.batch_size = train, valid, batch_size

    def epoch_batches(self, generator: torch.Generator, fraction: float = 1.0) -> list[Batch]:
        x, y = self.train
        n = max(1, round(len(x) * fraction))
        return [(x[idx], y[idx]) for idx in batches(n, self.batch_size, generator)]

    def valid_stream(self, generator: torch.Generator) -> PairStream:
        return PairStream(self.valid, self.batch_size, generator)

    def loss(self, model: nn.Module, batch: Batch, **model_kwargs: Any) -> Tensor:
        return F.cross_entropy(model(batch[0], **model_kwargs), batch[1])

    def batch_weight(self, batch: Batch) -> int:
        return len(batch[0])

    def valid_loss(self, model: nn.Module, **model_kwargs: Any) -> float:
        logits = predict(model, self.valid[0], self.eval_batch, **model_kwargs)
        return float(F.cross_entropy(logits, self.valid[1]))

    def probe(self) -> tuple[Tensor, Tensor]:
        """Fixed validation images: the model's input and the network's are the same."""
        images = self.valid[0][: self.probe_size]
        return images, images

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).double().mean())


class Classification(TaskKind):
    """Image classification: a searched CNN cell (``darts_cnn``) against LeNet, a ResNet-20 and
    a VGG-small (``IMAGE_BASELINES``), scored by accuracy, with parameters and FLOPs beside it."""

    name = "classify"
    modality = "images"
    baselines = IMAGE_BASELINES
    # The CPU budget: five cells of C = 8 on the 8×8 digits search in about two minutes. α's
    # learning rate gives its Adam steps the displacement DARTS's CIFAR search gives them (3e-4
    # over ~10,000 steps): ~100 steps here, so 3e-2; at DARTS's rate α would stay within a few
    # percent of uniform and the derived cell would be close to a random one.
    defaults: ClassVar[Mapping[str, Any]] = {
        "data": {"dataset": "digits", "split": (0.6, 0.2, 0.2)},
        "space": {"name": "darts_cnn", "nodes": 5, "hidden": 8},
        "search": {"epochs": 6, "batch_size": 64, "lr": 3e-3, "arch_lr": 3e-2, "clip": 5.0},
        "train": {
            "epochs": 30, "batch_size": 64, "lr": 3e-3, "clip": 5.0, "patience": 6,
            "baselines": list(IMAGE_BASELINES),
        },
    }  # fmt: skip

    @classmethod
    def check(cls, config: RunConfig) -> None:
        if config.data.csv is not None:
            raise ValueError("--csv is for series; give images with --images FOLDER_OR_NPZ")
        if config.data.images is None and config.data.dataset not in IMAGE_DATASETS:
            raise ValueError(
                f"{config.data.dataset!r} is not an image dataset; --task classify reads "
                f"{', '.join(IMAGE_DATASETS)} or --images"
            )
        foreign = [name for name in config.train.baselines if name not in IMAGE_BASELINES]
        if foreign:
            raise ValueError(
                f"baselines {foreign} are not image models; --task classify trains "
                f"{', '.join(IMAGE_BASELINES)}"
            )

    # --- data --------------------------------------------------------------------------------

    def load(self) -> ImageSplits:
        cfg = self.config.data
        split = tuple(cfg.split)
        if cfg.images is not None:
            data = load_image_file(cfg.images, split=split, limit=cfg.limit)
        else:
            data = load_image_dataset(cfg.dataset, split=split, limit=cfg.limit)
        device = resolve_device(self.config.device)
        for part in ("train", "valid", "test"):
            x, y = getattr(data, part)
            setattr(data, part, (x.to(device), y.to(device)))
        return data

    def data_file(self) -> Path | None:
        return self.config.data.images

    def budget(self) -> str:
        limit = self.config.data.limit
        return "all images" if limit is None else f"at most {limit} training images"

    def summary(self, data: ImageSplits) -> dict[str, Any]:
        return {
            "images": {part: len(getattr(data, part)[0]) for part in ("train", "valid", "test")},
            "image_shape": [data.channels, data.height, data.width],
            "classes": list(data.classes),
        }

    # --- model -------------------------------------------------------------------------------

    def input_size(self, data: ImageSplits) -> int:
        """Image channels."""
        return data.channels

    def wrap(self, cell: nn.Module | None, data: ImageSplits, hidden: int) -> nn.Module:
        if cell is None:
            raise ValueError("an image model needs a network")
        return ImageModel(cell, data.n_classes).to(resolve_device(self.config.device))

    def baseline(self, name: str, data: ImageSplits, hidden: int) -> nn.Module:
        return image_baseline(name, data.channels, hidden, (data.height, data.width))

    def baseline_hidden(self, name: str, data: ImageSplits, reference: Genotype | None) -> int:
        """The width whose parameter count is closest to the searched network's (both with
        their heads), or ``space.hidden`` without a searched network."""
        if reference is None:
            return self.config.space.hidden
        network = cells.build(
            reference,
            data.channels,
            self.config.space.hidden,
            **cells.options_for(reference, self.config),
        )
        target = _params(self.wrap(network, data, 0))
        best, best_gap = 1, None
        for width in range(1, MAX_BASELINE_WIDTH + 1):
            size = _params(self.wrap(self.baseline(name, data, width), data, width))
            gap = abs(size - target)
            if best_gap is None or gap < best_gap:
                best, best_gap = width, gap
            if size > target:
                break
        return best

    # --- training and scoring ----------------------------------------------------------------

    def engine_task(self, data: ImageSplits, batch_size: int) -> ClassifyTask:
        return ClassifyTask(data.train, data.valid, batch_size)

    def score(self, model: nn.Module, data: ImageSplits) -> dict[str, float]:
        valid = predict(model, data.valid[0], ClassifyTask.eval_batch)
        test = predict(model, data.test[0], ClassifyTask.eval_batch)
        return {
            "valid_accuracy": accuracy(valid, data.valid[1]),
            "valid_loss": float(F.cross_entropy(valid, data.valid[1])),
            "test_accuracy": accuracy(test, data.test[1]),
            "test_loss": float(F.cross_entropy(test, data.test[1])),
            "flops": count_flops(model, data.test[0][:1]),
        }


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
