"""A JAX/Flax codebase for training, evaluating, sampling and scaling decoder-only language models."""


def load(workdir: str, step: int | None = None):
    """Loads a trained run: `.config`, `.tokenizer`, `.logits(tokens)`, `.generate(prompts)`, `.evaluate(split)`,
    `.trace(text)` and the rest of llm/inspect (`.lens`, `.intervention_effect`, `.neighbours`, `.top_contexts`)."""
    from llm.run.api import load as _load

    return _load(workdir, step)
