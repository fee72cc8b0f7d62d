"""Datasets, paired transforms, class names and palettes."""
from .classes import DATASET_META, default_palette, resolve_meta, set_meta
from .build import build_dataset
from .datasets import FileDataset, SegmentationDataset, colour_mask_to_index, read_image
from .synthetic import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE, SyntheticDataset, synthetic_sample_image, write_synthetic_folder
from .transforms import build_eval_transform, build_train_transform
