"""The data stage's typed config (filled in by llm/spec.py from a run's `data.*` keys) and the facts
about a `data.dataset` name that are decided here once: which path reads it and what it holds."""

import dataclasses


class DataError(ValueError):
    pass


SPLITS = ("train", "validation", "test")
PACKINGS = ("concat", "documents")
SAMPLINGS = ("rows", "windows")
LOSS_ON = ("response", "all")  # 'sft:' data: the assistant's tokens, or every token of an example
STREAMED = ("jsonl:", "parquet:")
CHAT_KINDS = ("sft", "preference", "prompts")  # post-training sets rendered with the chat template
EXAMPLE_KINDS = CHAT_KINDS + ("seq2seq",)


def is_streamed(dataset: str) -> bool:
    """'jsonl:GLOB' and 'parquet:GLOB' stream (llm/data/stream.py); everything else is read in memory."""
    return dataset.startswith(STREAMED)


def kind_of(dataset: str) -> str | None:
    """'sft', 'preference', 'prompts' or 'seq2seq' for a set of examples (llm/data/examples.py), None for text."""
    prefix = dataset.split(":", 1)[0]
    return prefix if ":" in dataset and prefix in EXAMPLE_KINDS else None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "shakespeare"
    text_key: str = "text"
    data_dir: str = ""  # '' : TFDS's default (~/tensorflow_datasets)
    manual_dir: str = ""
    validation_fraction: float = 0.1
    test_fraction: float = 0.0
    packing: str = "concat"
    add_bos: bool = False
    validation_dataset: str = ""  # streamed: a separate corpus for validation ('' : a hold-out)
    num_workers: int = 0  # streamed: tokenizing processes (0: in the training process)
    mixture: str = ""  # streamed: 'NAME=WEIGHT,...' domains drawn at those weights (llm/data/mixture.py); '' : none
    domain_key: str = "domain"  # the record field naming a mixture domain's documents
    skip_bad_records: bool = False  # streamed: skip and count bad records instead of stopping
    sampling: str = "rows"  # concat in memory: 'rows' (shuffled per epoch) or 'windows' (nanoGPT's random windows)
    loss_on: str = "response"
    tokenizer: str = "char"
    tokenizer_path: str = ""
    vocab_size: int = 4096  # sentencepiece: pieces to train
    spm_model_type: str = "bpe"
    spm_input_sentences: int = 1_000_000
    noise_density: float = 0.15  # span corruption
    mean_noise_span_length: float = 3.0
    mask_fraction: float = 0.15  # BERT's masking

    @property
    def kind(self) -> str | None:
        return kind_of(self.dataset)

    @property
    def streamed(self) -> bool:
        return is_streamed(self.dataset)

    @property
    def chat(self) -> bool:
        return self.kind in CHAT_KINDS
