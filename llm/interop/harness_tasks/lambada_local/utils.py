
import datasets

from llm.interop.harness import load_jsonl


def load(**kwargs) -> datasets.DatasetDict:
    return load_jsonl("LLM_LAMBADA", "test", "LAMBADA's test JSONL (lambada_test.jsonl)")
