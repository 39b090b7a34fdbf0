"""A trained run, loaded for notebooks and the eval/sample commands: `llm.load(workdir)`."""

import json
import os
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from llm import checkpoint, config as config_lib, data, evaluate as evaluate_lib, model, sample as sample_lib, tokenizer as tokenizer_lib


class Run:
    def __init__(self, workdir: str, step: int | None = None):
        config_path = os.path.join(workdir, "config.json")
        if not os.path.exists(config_path):
            raise checkpoint.CheckpointError(f"{workdir} is not a run directory (no config.json)")
        with open(config_path) as f:
            self.config = ml_collections.ConfigDict(json.load(f))
        self.workdir = workdir
        self.tokenizer = tokenizer_lib.load(workdir)
        self.model_config = config_lib.model_config(self.config, config_lib.padded_vocab_size(self.config, self.tokenizer.vocab_size))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = nn.unbox(jax.eval_shape(lambda: model.init(self.model_config, jax.random.key(0))))
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
        self.params, self.step = checkpoint.restore_params(workdir, abstract, step)
        self._logits = jax.jit(lambda params, tokens: model.apply(self.model_config, params, tokens)[0])
        self._eval_step = jax.jit(evaluate_lib.make_eval_step(self.model_config))

    def logits(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Next-token logits (float32) at every position of a [L] or [B, L] token array."""
        tokens = np.asarray(tokens, np.int32)
        batched = tokens if tokens.ndim == 2 else tokens[None]
        out = np.asarray(self._logits(self.params, jnp.asarray(batched)))[..., : self.tokenizer.vocab_size]
        return out if tokens.ndim == 2 else out[0]

    def encode_prompt(self, prompt: str) -> list[int]:
        # An empty prompt starts a fresh document: eos is the document separator the model was trained on.
        return [self.tokenizer.eos_id] + self.tokenizer.encode(prompt).tolist() if not prompt else self.tokenizer.encode(prompt).tolist()

    def generate(
        self, prompts: str | Sequence[str], max_new_tokens: int = 200, temperature: float = 1.0, top_k: int = 0,
        top_p: float = 1.0, seed: int = 0, stream: Callable[[str], None] | None = None,
    ) -> list[str]:
        """Continuations of each prompt; `stream` (single prompt only) receives text as it is generated."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        sample_lib.check_options(temperature, top_k, top_p, max_new_tokens)
        encoded = [self.encode_prompt(p) for p in prompts]
        on_token = None
        if stream is not None:
            if len(prompts) != 1:
                raise sample_lib.SampleError("streaming works for a single prompt")
            emitted: list[int] = []
            shown = [""]

            def on_token(token_B):
                token = int(np.asarray(token_B)[0])
                if token == self.tokenizer.eos_id:
                    return
                emitted.append(token)
                text = self.tokenizer.decode(emitted)
                # Byte-level tokens can end mid-character; hold back the replacement char until complete.
                stable = text.rstrip("\ufffd")
                stream(stable[len(shown[0]) :])
                shown[0] = stable

        tokens = sample_lib.generate(
            self.model_config, self.params, encoded, max_new_tokens=max_new_tokens, eos_id=self.tokenizer.eos_id,
            pad_id=self.tokenizer.pad_id, vocab_limit=self.tokenizer.vocab_size, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed, stream=on_token,
        )
        return [self.tokenizer.decode([t for t in row if t != self.tokenizer.eos_id]) for row in tokens]

    def evaluate(self, split: str = "validation", dataset: str | None = None, batch_size: int | None = None) -> dict:
        cfg = self.config
        docs = data.load_documents(dataset or cfg.data.dataset, split, cfg.data.validation_fraction, cfg.data.test_fraction)
        stream = data.tokenize(self.tokenizer, docs)
        batches = data.eval_batches(stream, batch_size or cfg.eval_batch_size, cfg.seq_len)
        put = lambda b: {k: jnp.asarray(v) for k, v in b.items()}
        result = evaluate_lib.evaluate(self._eval_step, self.params, batches, self.tokenizer.token_bytes(), put)
        return {"split": split, "step": int(self.step), **result}


def load(workdir: str, step: int | None = None) -> Run:
    return Run(workdir, step)
