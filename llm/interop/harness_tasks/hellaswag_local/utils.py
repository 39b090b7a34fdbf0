import re

import datasets

from llm.interop.harness import load_jsonl


def load(**kwargs) -> datasets.DatasetDict:
    return load_jsonl("LLM_HELLASWAG", "validation", "HellaSwag's validation JSONL (hellaswag_val.jsonl)")


def _clean(text: str) -> str:
    # WikiHow rows carry " [title]" and other bracketed markup that is not part of the text.
    text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
    return text.replace("  ", " ")


def process_docs(rows: datasets.Dataset) -> datasets.Dataset:
    def one(row: dict) -> dict:
        context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        return {"query": _clean(f"{row['activity_label']}: {context}"), "choices": [_clean(e) for e in row["endings"]],
                "gold": int(row["label"])}

    return rows.map(one)
