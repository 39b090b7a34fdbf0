"""A trained run, loaded for notebooks and the eval/sample commands: `llm.load(workdir)`.

    run = llm.load("runs/default")
    run.generate("ROMEO:", max_new_tokens=100, temperature=0.8, top_k=40)
    run.evaluate("validation")           # {"split", "step", "tokens", "bytes", "loss", "perplexity", "bits_per_byte"}
    run.logits(run.tokenizer.encode("To be"))
    logits, cache = run.trace("To be", names="block_*/attn_probs*")   # llm/inspect: activations by name
    run.top_contexts(layer=1, neuron=7, k=10)   # the held-out contexts that fire one MLP neuron most
"""

import dataclasses
import functools
import json
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm import model, spec
from llm.data import examples, mixture, seq2seq, template
from llm.data.config import is_streamed, kind_of
from llm.inspect import InspectError, embeddings, intervene, lens, neurons, trace as trace_lib
from llm.model import sample as sample_lib
from llm.model.heads import rewards
from llm.run import chat as chat_lib
from llm.training import batches as batches_lib, checkpoint, evaluate as evaluate_lib, objectives, params as params_lib


@functools.lru_cache(maxsize=8)
def _jitted(cfg: model.ModelConfig) -> tuple[Callable, Callable]:
    """The forward pass and eval step, compiled once per model shape however many checkpoints are loaded."""
    logits = jax.jit(lambda params, tokens_BxL: model.apply(cfg, params, tokens_BxL)[0])
    return logits, jax.jit(evaluate_lib.make_eval_step(cfg))


@functools.lru_cache(maxsize=4)
def _jitted_reward(cfg: model.ModelConfig) -> Callable:
    return jax.jit(lambda params, tokens_BxL, last_B: rewards(cfg, params, tokens_BxL, last_B))


class Run:
    def __init__(self, workdir: str, step: int | None = None):
        loaded = params_lib.load(workdir, step)
        self.workdir, self.spec, self.tokenizer = workdir, loaded.run, loaded.tokenizer
        self.params, self.step = loaded.params, loaded.step
        with open(f"{workdir}/config.json") as f:
            self.config = spec.from_saved(json.load(f))  # the saved config, for a reader; the run is read from self.spec
        self.model_config = self.spec.model
        self._logits, self._eval_step = _jitted(self.model_config)
        self._sink: Callable[[np.ndarray], None] | None = None

    def require_arch(self, what: str, archs: tuple[str, ...] = ("decoder",)) -> None:
        if self.model_config.arch not in archs:
            raise sample_lib.SampleError(f"{what} needs model.arch={' or '.join(map(repr, archs))}; {self.workdir} is "
                                         f"model.arch={self.model_config.arch!r}")

    @property
    def context(self) -> int:
        return self.model_config.L

    @property
    def roles(self) -> template.RoleIds:
        """The chat template's role ids for this model (llm/data/template.py)."""
        return self.spec.vocab.require_roles()

    def chat(self, messages: Sequence[dict], max_new_tokens: int = 200, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stream: Callable[[str], None] | None = None) -> str:
        """The assistant's next message after `messages` ([{"role", "content"}, ...]), with the chat
        template applied and the oldest turns dropped to fit the context (llm/run/chat.py)."""
        self.require_arch("chat")
        return chat_lib.reply(self, messages, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed, on_text=stream)

    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 16) -> list[float]:
        """A reward model's (objective='reward') scalar score of each (prompt, response)."""
        if self.spec.objective.name != "reward":
            raise checkpoint.CheckpointError(f"{self.workdir} is not a reward model (its objective is {self.spec.objective.name!r})")
        if len(prompts) != len(responses):
            raise sample_lib.SampleError(f"{len(prompts)} prompts but {len(responses)} responses")
        return objectives.reward_scores(self.model_config, self.params, self.tokenizer, self.roles, prompts, responses, batch_size)

    def logits(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Next-token logits (float32) at every position of a [L] or [B, L] token array."""
        tokens = np.asarray(tokens, np.int32)
        batched = tokens if tokens.ndim == 2 else tokens[None]
        if batched.shape[1] > self.context:
            raise sample_lib.SampleError(f"{batched.shape[1]} tokens are longer than the model's context of {self.context}")
        out = np.asarray(self._logits(self.params, jnp.asarray(batched)))[..., : self.tokenizer.vocab_size]
        return out if tokens.ndim == 2 else out[0]

    def tokens_BxL(self, text_or_tokens) -> np.ndarray:
        """A prompt (encoded as sample does) or token ids as a [B, L] int32 batch that fits the context."""
        tokens = np.asarray(self.encode_prompt(text_or_tokens) if isinstance(text_or_tokens, str) else text_or_tokens, np.int32)
        tokens_BxL = tokens if tokens.ndim == 2 else tokens[None]
        if tokens_BxL.shape[1] > self.context:
            raise sample_lib.SampleError(f"{tokens_BxL.shape[1]} tokens are longer than the model's context of {self.context}")
        return tokens_BxL

    def _interventions(self, patch, ablate, mean_over) -> dict:
        means = None
        if ablate and mean_over is not None:
            means = intervene.means(self.model_config, self.params, self.tokens_BxL(mean_over))
        out = intervene.ablation(self.model_config, ablate or {}, means)
        for name, pair in intervene.patching(self.model_config, patch or {}).items():
            if name in out:
                raise InspectError(f"{name} is both patched and ablated")
            out[name] = pair
        return out

    def trace(self, text_or_tokens, names=None, patch: dict | None = None, ablate: dict | None = None,
              mean_over=None, segment_ids=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(logits [B, L, vocab], {name: activation}) of one forward pass; a 1-D input is a batch of one.

        names: globs, a predicate or None (all; see llm/inspect/trace.py). patch: {name: array} replaces
        activations; ablate: {"block_0/heads": [1, 3], "block_1/neurons": [5]} zeroes those units, or
        sets them to their mean over the text or tokens `mean_over`.
        """
        self.require_arch("trace", ("decoder", "encoder"))
        tokens_BxL = self.tokens_BxL(text_or_tokens)
        segments = None if segment_ids is None else jnp.asarray(np.broadcast_to(segment_ids, tokens_BxL.shape), jnp.int32)
        logits, cache = trace_lib.trace(self.model_config, self.params, tokens_BxL, segments, names,
                                        self._interventions(patch, ablate, mean_over))
        order = trace_lib.all_names(self.model_config)
        cache = {name: np.asarray(cache[name]) for name in sorted(cache, key=order.index)}
        return np.asarray(logits)[..., : self.tokenizer.vocab_size], cache

    def intervention_effect(self, text_or_tokens, patch: dict | None = None, ablate: dict | None = None, mean_over=None) -> dict:
        """Loss and logit change of the interventions (as in trace) against the clean run."""
        return intervene.effect(self.model_config, self.params, self.tokens_BxL(text_or_tokens),
                                self._interventions(patch, ablate, mean_over))

    def lens(self, prompt: str, k: int = 5) -> list[dict]:
        """Per layer (embed, block_0, ...): the loss over the prompt and the top-k next tokens after it."""
        tokens = self.tokens_BxL(prompt)[0]
        rows = lens.prompt_lens(self.model_config, self.params, tokens, k, self.tokenizer.vocab_size)
        return [{**row, "top": [self.tokenizer.decode([t]) for t in row["top_ids"]]} for row in rows]

    def lens_split(self, split: str = "validation", max_batches: int = 0, batch_size: int | None = None) -> dict[str, float]:
        """Per-layer logit-lens loss over a held-out split, read as evaluate() reads it."""
        return lens.layer_losses(self.model_config, self.params, self._eval_batches(split, batch_size), max_batches)

    @staticmethod
    def _scored_split(split: str, dataset: str | None) -> str:
        # An out-of-domain corpus is scored whole.
        return "all" if dataset and (is_streamed(dataset) or kind_of(dataset)) else split

    def _eval_batches(self, split: str, batch_size: int | None, dataset: str | None = None):
        if kind_of(dataset or self.spec.data.dataset) in ("preference", "prompts"):
            raise sample_lib.SampleError(f"{dataset or self.spec.data.dataset!r} holds no text to score token by token; a reward "
                                         f"model's eval is its pairwise accuracy (objective='reward')")
        return batches_lib.held_out(self.spec, self.tokenizer, self._scored_split(split, dataset),
                                    batch_size or self.spec.loop.eval_batch_size, dataset)

    def top_contexts(self, layer: int, neuron: int, split: str = "validation", k: int = 10, max_batches: int = 0,
                     batch_size: int | None = None) -> list[dict]:
        """The k held-out positions where MLP neuron `neuron` of block `layer` fires hardest, largest first:
        {"activation", "row", "position", "before", "token", "after", "text"}, the text with the token «marked»."""
        neurons.check_neuron(self.model_config, layer, neuron)  # before the split is read or anything compiles
        batches = self._eval_batches(split, batch_size)
        found = neurons.top_activations(self.model_config, self.params, batches, layer, neuron, k, max_batches)
        decode = self.tokenizer.decode
        for c in found:
            c["before"], c["token"], c["after"] = decode(c["before"]), decode([c["token"]]), decode(c["after"])
            c["text"] = f"{c['before']}«{c['token']}»{c['after']}"
        return found

    def neighbours(self, token: int, k: int = 10, table: str = "embed") -> list[tuple[int, float]]:
        """The k tokens whose `table` vector ("embed", or "unembed" when untied) is nearest in cosine."""
        tables = embeddings.tables(self.model_config, self.params)
        if table not in tables:
            raise InspectError(f"no {table!r} table: this model has {', '.join(tables)}")
        return embeddings.neighbours(tables[table], token, k, self.tokenizer.vocab_size)

    def encode_prompt(self, prompt: str) -> list[int]:
        if not prompt:
            # An empty prompt starts a fresh document: eos is the separator the model was trained on.
            return [self.tokenizer.eos_id]
        return self.tokenizer.encode(prompt).tolist()

    def _on_tokens(self, token_B: np.ndarray) -> None:
        # One bound method for every call: the sampler takes it as a static argument, so a new
        # closure per call would recompile the sampler each time.
        if self._sink is not None:
            self._sink(np.asarray(token_B))

    def answer(self, inputs: str | Sequence[str], max_new_tokens: int = 0, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, stream: Callable[[str], None] | None = None) -> list[str]:
        """A seq2seq model's answers (greedy by default): an encoder-decoder reads input + eos, a
        decoder-only model continues input + eos; both answer until eos. max_new_tokens 0: as long as
        the model allows (the decoder's length, or the context left after the input)."""
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        encoded = [self.tokenizer.encode(x).tolist() + [self.tokenizer.eos_id] for x in inputs]
        tokens = self._answers(encoded, max_new_tokens, temperature, top_k, top_p, seed, stream)
        return [self.tokenizer.decode([t for t in row if t != self.tokenizer.eos_id]) for row in tokens]

    def _answers(self, encoded: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, stream=None) -> list[list[int]]:
        cfg = self.model_config
        if cfg.arch == "encoder":
            raise sample_lib.SampleError("model.arch='encoder' predicts masked tokens; it does not answer inputs")
        if cfg.arch == "decoder":
            room = max(self.context - max(len(p) for p in encoded), 1)
            return self._sample(lambda **kw: sample_lib.generate(cfg, self.params, encoded, **kw), min(max_new_tokens or room, room),
                                temperature, top_k, top_p, seed, stream, len(encoded))
        return self._sample(lambda **kw: sample_lib.generate_seq2seq(cfg, self.params, encoded, bos_id=self.tokenizer.bos_id, **kw),
                            min(max_new_tokens or cfg.T, cfg.T), temperature, top_k, top_p, seed, stream, len(encoded))

    def _sample(self, generate: Callable, max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int,
                stream: Callable[[str], None] | None, rows: int) -> list[list[int]]:
        if stream is not None and rows != 1:
            raise sample_lib.SampleError("streaming works for a single prompt")
        self._sink = None if stream is None else self._text_sink(stream)
        try:
            # Span corruption's answers start with sentinels, the ids after the tokenizer's.
            vocab_limit = self.spec.vocab.sample_limit
            return generate(max_new_tokens=max_new_tokens, eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                            vocab_limit=vocab_limit, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                            stream=self._on_tokens if stream is not None else None)
        finally:
            self._sink = None

    def generate(
        self, prompts: str | Sequence[str], max_new_tokens: int = 200, temperature: float = 1.0, top_k: int = 0,
        top_p: float = 1.0, seed: int = 0, stream: Callable[[str], None] | None = None,
    ) -> list[str]:
        """Continuations of each prompt (see llm/model/sample.py for the order of top-k, top-p, temperature).

        max_new_tokens is cut (with a warning) to what fits in the model's context after the longest
        prompt. `stream` (single prompt only) receives the text piece by piece as it is generated.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        sample_lib.check_continues(self.model_config)
        sample_lib.check_options(temperature, top_k, top_p, max_new_tokens)
        encoded = [self.encode_prompt(p) for p in prompts]
        longest = max(len(p) for p in encoded)
        if longest < self.context and longest + max_new_tokens > self.context:
            warnings.warn(
                f"max_new_tokens={max_new_tokens} does not fit after a {longest}-token prompt in the model's "
                f"context of {self.context}; generating {self.context - longest} tokens", stacklevel=2,
            )
            max_new_tokens = self.context - longest
        tokens = self._sample(lambda **kw: sample_lib.generate(self.model_config, self.params, encoded, **kw), max_new_tokens,
                              temperature, top_k, top_p, seed, stream, len(prompts))
        return [self.tokenizer.decode([t for t in row if t != self.tokenizer.eos_id]) for row in tokens]

    def _text_sink(self, stream: Callable[[str], None]) -> Callable[[np.ndarray], None]:
        emitted: list[int] = []
        shown = [""]

        def on_tokens(token_B: np.ndarray) -> None:
            token = int(token_B[0])
            if token == self.tokenizer.eos_id:
                return
            emitted.append(token)
            # Byte-level tokens can end mid-character: hold back the replacement char until it completes.
            stable = self.tokenizer.decode(emitted).rstrip("\ufffd")
            if len(stable) > len(shown[0]):
                stream(stable[len(shown[0]) :])
                shown[0] = stable

        return on_tokens

    def evaluate(self, split: str = "validation", dataset: str | None = None, batch_size: int | None = None) -> dict:
        """One pass over `split` of the run's dataset, or of `dataset` (out-of-domain; a streamed one is
        scored whole), read as training read it."""
        if self.spec.objective.name == "reward":
            return self._pairwise_accuracy(split, dataset, batch_size)
        put = lambda b: {k: jnp.asarray(v) for k, v in b.items()}
        token_bytes = evaluate_lib.byte_table(self.tokenizer.token_bytes(), self.model_config.V)
        domains = [] if dataset else mixture.names(self.spec.data)
        if domains:
            # A mixture's split is its domains' splits: each scored alone, then pooled (as training's evals do).
            per_domain = {d: evaluate_lib.evaluate(self._eval_step, self.params, batches_lib.held_out(
                self.spec, self.tokenizer, split, batch_size or self.spec.loop.eval_batch_size, domain=d), token_bytes, put) for d in domains}
            return {"split": split, "step": int(self.step), **evaluate_lib.pooled(list(per_domain.values())), "domains": per_domain}
        batches = self._eval_batches(split, batch_size, dataset)
        result = evaluate_lib.evaluate(self._eval_step, self.params, batches, token_bytes, put)
        result = {"split": self._scored_split(split, dataset), "step": int(self.step), **result}
        if self._data(dataset).kind == "seq2seq":
            result.update(self.exact_match(split, dataset, batch_size))
        return result

    def _data(self, dataset: str | None):
        return dataclasses.replace(self.spec.data, dataset=dataset) if dataset else self.spec.data

    def exact_match(self, split: str = "validation", dataset: str | None = None, batch_size: int | None = None) -> dict:
        """The fraction of a seq2seq split's inputs whose greedy answer is exactly the target."""
        dc = self._data(dataset)
        pairs = seq2seq.load(dc.dataset, self._scored_split(split, dataset), self.tokenizer, dc.validation_fraction, dc.test_fraction)
        batch_size = batch_size or self.spec.loop.eval_batch_size
        longest = max(len(p.target) for p in pairs) + 1  # the answer's eos included
        right = 0
        for first in range(0, len(pairs), batch_size):
            chunk = pairs[first : first + batch_size]
            answers = self._answers([seq2seq.prompt(p, self.tokenizer.eos_id) for p in chunk], longest)
            eos = self.tokenizer.eos_id
            right += sum(a == p.target.tolist() + [eos] for a, p in zip(answers, chunk))
        return {"examples": len(pairs), "exact_match": right / len(pairs)}

    def _pairwise_accuracy(self, split: str, dataset: str | None, batch_size: int | None) -> dict:
        dc = self._data(dataset)
        pairs = examples.load_pairs(dc.dataset, self._scored_split(split, dataset), self.tokenizer, self.roles, self.spec.seq_len,
                                    dc.validation_fraction, dc.test_fraction)
        reward = _jitted_reward(self.model_config)
        margins = []
        for b in examples.pair_eval_batches(pairs, batch_size or self.spec.loop.eval_batch_size):
            r_c = np.asarray(reward(self.params, jnp.asarray(b["chosen_inputs"]), jnp.asarray(b["chosen_last"])))
            r_r = np.asarray(reward(self.params, jnp.asarray(b["rejected_inputs"]), jnp.asarray(b["rejected_last"])))
            margins += list((r_c - r_r)[b["valid"] > 0])
        margins = np.asarray(margins, np.float64)
        return {"split": self._scored_split(split, dataset), "step": int(self.step), "pairs": len(margins),
                "accuracy": float(np.mean(margins > 0)), "loss": float(np.mean(np.logaddexp(0.0, -margins))),
                "margin": float(np.mean(margins))}


def load(workdir: str, step: int | None = None) -> Run:
    return Run(workdir, step)
