"""DataModules: labelled data sets with validation splits and evaluation protocols."""

from .base import PROTOCOLS, LabelledDataModule
from .digits import DigitsDataModule
from .fmnist import FashionMNISTDataModule
from .indexed import IndexedDataset

__all__ = ["PROTOCOLS", "DigitsDataModule", "FashionMNISTDataModule", "IndexedDataset",
           "LabelledDataModule"]
