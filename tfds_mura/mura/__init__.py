"""MURA-v1.1 dataset (TFDS conventions: `mura_dataset_builder.py`, `dummy_data/`, builder test)."""
