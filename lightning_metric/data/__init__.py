"""DataModules: labelled data sets with validation splits and evaluation protocols."""

from .base import PROTOCOLS, Items, LabelledDataModule
from .digits import DigitsDataModule
from .fmnist import FashionMNISTDataModule
from .fmnist_captions import FashionMNISTCaptionsDataModule
from .fmnist_instances import FashionMNISTInstancesDataModule
from .format_check import FormatProblem, check_manifest
from .image_folder import ImageFolderDataModule, check_image_folder, folder_class_names
from .indexed import IndexedDataset
from .items import ImageFiles, TextCollate, TextItems
from .manifest import ManifestDataModule, manifest_class_names
from .pairs import PairDataModule
from .roles import EvalRoles

__all__ = ["PROTOCOLS", "DigitsDataModule", "EvalRoles", "FashionMNISTCaptionsDataModule",
           "FashionMNISTDataModule", "FashionMNISTInstancesDataModule", "FormatProblem",
           "ImageFiles", "ImageFolderDataModule", "IndexedDataset", "Items", "LabelledDataModule",
           "ManifestDataModule", "PairDataModule", "TextCollate", "TextItems",
           "check_image_folder", "check_manifest", "folder_class_names", "manifest_class_names"]
