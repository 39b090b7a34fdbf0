"""The project's own TFDS builders: prepared once into the data dir, then read like any TFDS dataset."""
