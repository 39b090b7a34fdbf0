"""Local UTF-8 files as a TFDS dataset: one config per (glob, files, split fractions).

Each file is one document, split by position: its first 1 - validation - test fraction trains, then
validation, then test. The config name hashes the file list, sizes and mtimes, so editing a file
prepares a new version instead of silently reading a stale one.
"""

import dataclasses
import hashlib
import os

import tensorflow_datasets as tfds


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
    paths: tuple[str, ...] = ()
    validation_fraction: float = 0.1
    test_fraction: float = 0.0


def make_config(paths: list[str], validation_fraction: float, test_fraction: float) -> TextFilesConfig:
    fingerprint = hashlib.sha1()
    for p in paths:
        stat = os.stat(p)
        fingerprint.update(f"{os.path.abspath(p)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    fingerprint.update(f"{validation_fraction}:{test_fraction}".encode())
    return TextFilesConfig(
        name="files_" + fingerprint.hexdigest()[:16], description=f"{len(paths)} files, e.g. {paths[0]}",
        paths=tuple(os.path.abspath(p) for p in paths), validation_fraction=validation_fraction,
        test_fraction=test_fraction,
    )


def split_bounds(validation_fraction: float, test_fraction: float) -> dict[str, tuple[float, float]]:
    train_end = 1.0 - validation_fraction - test_fraction
    return {"train": (0.0, train_end), "validation": (train_end, 1.0 - test_fraction), "test": (1.0 - test_fraction, 1.0)}


class LlmTextFiles(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            disable_shuffling=True,  # documents keep the order of the files / works
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        bounds = split_bounds(cfg.validation_fraction, cfg.test_fraction)
        return {split: self._generate_examples(lo, hi) for split, (lo, hi) in bounds.items() if hi > lo}

    def _generate_examples(self, lo: float, hi: float):
        for path in self.builder_config.paths:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            part = text[int(len(text) * lo) : int(len(text) * hi)]
            if part:
                yield path, {"text": part, "path": path}
