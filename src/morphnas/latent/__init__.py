"""The latent space E2NAS searches in: a D-VAE over a supernet's discrete choices.

``codes.ChoiceTable`` lists what each node may choose, ``vae.GraphVae`` encodes and decodes those
choices, and ``cache.load_or_train`` trains a table's VAE once and keeps it on disk.
"""

from morphnas.latent.cache import cache_dir, cache_path, load_or_train
from morphnas.latent.codes import ChoiceTable
from morphnas.latent.vae import GraphVae, TrainConfig, suggested_nz, train_vae

__all__ = [
    "ChoiceTable",
    "GraphVae",
    "TrainConfig",
    "cache_dir",
    "cache_path",
    "load_or_train",
    "suggested_nz",
    "train_vae",
]
