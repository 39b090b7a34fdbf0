"""Dataset -> documents -> tokens -> packed rows -> deterministic, resumable batches.

    config.py     DataConfig, DataError, and what a data.dataset name is (streamed, examples, text)
    tokenizer.py  char, byte and SentencePiece tokenizers behind one interface
    template.py   the chat template: conversations <-> ids with role markers
    packing.py    the one packer (documents, examples, seq2seq pairs) and the packed-row batch layout
    epochs.py     the one epoch shuffler of in-memory data: order from (seed, epoch), resumable by position
    text.py       corpora in memory through a prepared TFDS builder (datasets/: the project's builders)
    sources.py    streamed corpora's shards (JSONL, .gz, .zst, Parquet): indexed, read one record at a time
    stream.py     streamed batches: Grain-shuffled documents, packed per row lane, tokenized by workers
    mixture.py    data.mixture: a streamed corpus's named domains, their splits, rows drawn at fixed weights
    corpus.py     a text corpus by name, whichever path reads it: prepare, documents, train and eval batches
    examples.py   post-training sets: SFT, preference pairs, RL prompts ('sft:', 'preference:', 'prompts:')
    seq2seq.py    {"input", "target"} pairs for an encoder-decoder or a decoder ('seq2seq:')
    denoise.py    T5's span corruption and BERT's masking of text rows
"""

from llm.data.config import DataConfig, DataError

__all__ = ["DataConfig", "DataError"]
