"""Loads the task's items from the JSONL beside this file (no download)."""

import os

import datasets


def load(**kwargs) -> datasets.DatasetDict:
    path = os.path.join(os.path.dirname(__file__), "next_line.jsonl")
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(path)})
