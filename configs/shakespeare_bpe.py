"""The default run with a 4096-piece SentencePiece BPE vocabulary instead of characters.

Same corpus, model, batch and step budget as configs/default.py, so the held-out bits per byte of the
two runs show what the tokenizer buys.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.name = "shakespeare_bpe"
    c.data.tokenizer = "sentencepiece"
    c.data.spm_model_type = "bpe"
    c.data.vocab_size = 4096
    c.sample_prompt = "ROMEO:\n"
    c.sample_tokens = 60
    return c
