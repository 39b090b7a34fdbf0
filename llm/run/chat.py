"""Chat with a run: the template applied (llm/data/template.py), history kept within the context, answers
streamed token by token, and Ctrl-C stopping the current answer rather than the program.

Decoding here is a host loop over one jitted step per token (prefill once, then the KV cache), not
llm/model/sample.py's while_loop: the host sees every token as it comes and can stop between any two, which
an interactive user needs; batch sampling and RL keep the while_loop.
"""

import functools
import sys
import warnings
from typing import Callable, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from llm import model
from llm.data import template
from llm.model import ModelConfig, sample
from llm.model.attention import NEG_INF, KVCache

HELP = "(Ctrl-C stops an answer; /reset clears the history; /exit or Ctrl-D quits)"


@functools.partial(jax.jit, static_argnames=("cfg",))
def _prefill(params, tokens_1xP, start_1, cfg: ModelConfig):
    cache = KVCache.zeros(cfg.N, 1, cfg.L, cfg.G, cfg.K, jnp.dtype(cfg.dtype), start_1)
    logits_1x1xV, cache = model.apply(cfg, params, tokens_1xP, cache=cache, last_only=True)
    return logits_1x1xV[:, 0], cache


@functools.partial(jax.jit, static_argnames=("cfg",))
def _step(params, token_1, cache, cfg: ModelConfig):
    logits_1x1xV, cache = model.apply(cfg, params, token_1[:, None], cache=cache)
    return logits_1x1xV[:, 0], cache


@jax.jit
def _choose(logits_1xV, rng, vocab_limit, temperature, top_k, top_p):
    logits_1xV = jnp.where(jnp.arange(logits_1xV.shape[-1]) < vocab_limit, logits_1xV.astype(jnp.float32), NEG_INF)
    return sample.choose(logits_1xV, rng, temperature, top_k, top_p)


def decode(cfg: ModelConfig, params, prompt: Sequence[int], *, max_new_tokens: int, stop_id: int, vocab_limit: int,
           temperature: float, top_k: int, top_p: float, seed: int):
    """Yields the new tokens one at a time, up to and including stop_id."""
    # Pad the prompt to a multiple of 16 on the left so prompts of similar lengths share one prefill.
    width = min(-(-len(prompt) // 16) * 16, cfg.L - max_new_tokens)
    tokens_1xP, start_1 = sample.left_pad([list(prompt)], 0, width)
    logits_1xV, cache = _prefill(params, jnp.asarray(tokens_1xP), jnp.asarray(start_1), cfg=cfg)
    rng = jax.random.key(seed)
    options = (jnp.int32(vocab_limit), jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    for i in range(max_new_tokens):
        token_1 = _choose(logits_1xV, jax.random.fold_in(rng, i), *options)
        token = int(token_1[0])
        yield token
        if token == stop_id or i == max_new_tokens - 1:
            return
        logits_1xV, cache = _step(params, token_1, cache, cfg=cfg)


def fit(run, messages: Sequence[dict], max_new_tokens: int) -> tuple[list[dict], np.ndarray]:
    """The newest messages whose prompt leaves room for an answer of min(max_new_tokens, half the
    context) tokens (a system message is kept), and that prompt's tokens; the last message alone is
    kept while it leaves room for one token."""
    messages = list(messages)
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    budget = run.context - min(max_new_tokens, run.context // 2)
    while True:
        tokens, _ = template.render(run.tokenizer, run.roles, system + turns, add_generation_prompt=True)
        if len(tokens) <= budget or (len(turns) <= 1 and len(tokens) < run.context):
            return system + turns, tokens
        if len(turns) <= 1:
            raise sample.SampleError(f"the last message alone is {len(tokens)} tokens with the template, and the model's context "
                                     f"of {run.context} leaves no room for an answer; write a shorter message")
        turns = turns[1:]


def reply(run, messages: Sequence[dict], *, max_new_tokens: int = 200, temperature: float = 0.0, top_k: int = 0,
          top_p: float = 1.0, seed: int = 0, on_text: Callable[[str], None] | None = None) -> str:
    """The assistant's answer to `messages`; on_text receives it piece by piece. max_new_tokens is cut
    (with a warning) to what fits after the prompt, as run.generate does. A KeyboardInterrupt while it
    is being written propagates with the text so far in its args[0]."""
    sample.check_options(temperature, top_k, top_p, max_new_tokens)
    roles, tok = run.roles, run.tokenizer
    _, prompt = fit(run, messages, max_new_tokens)
    if len(prompt) + max_new_tokens > run.context:
        warnings.warn(f"max_new_tokens={max_new_tokens} does not fit after a {len(prompt)}-token conversation in the model's "
                      f"context of {run.context}; answering in at most {run.context - len(prompt)} tokens", stacklevel=2)
        max_new_tokens = run.context - len(prompt)
    emitted, shown = [], ""
    try:
        for token in decode(run.model_config, run.params, prompt.tolist(), max_new_tokens=max_new_tokens, stop_id=roles.end,
                            vocab_limit=roles.limit, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed):
            if token == roles.end:
                break
            emitted.append(token)
            # Byte-level tokens can end mid-character: hold back the replacement char until it completes.
            stable = tok.decode([t for t in emitted if t < tok.vocab_size]).rstrip("\ufffd")
            if on_text is not None and len(stable) > len(shown):
                on_text(stable[len(shown):])
            shown = stable
    except KeyboardInterrupt:
        raise KeyboardInterrupt(shown) from None
    return tok.decode([t for t in emitted if t < tok.vocab_size])


def interactive(run, system: str = "", max_new_tokens: int = 200, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                seed: int = 0, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> list[dict]:
    """The conversation loop; returns the history when the user quits."""
    run.roles  # a model without room for the role ids fails here, before the first prompt
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    print(f"chatting with {run.workdir} (step {run.step}) {HELP}", file=stdout, flush=True)
    turn = 0
    while True:
        try:
            print("you> ", end="", file=stdout, flush=True)
            line = stdin.readline()
        except KeyboardInterrupt:
            print(f"\n{HELP}", file=stdout, flush=True)
            continue
        if not line or line.strip() == "/exit":
            print(file=stdout, flush=True)
            return history
        if line.strip() == "/reset":
            history = history[:1] if system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        print("model> ", end="", file=stdout, flush=True)
        write = lambda piece: print(piece, end="", file=stdout, flush=True)
        try:
            answer = reply(run, history, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed + turn, on_text=write)
            print(file=stdout, flush=True)
        except KeyboardInterrupt as stopped:
            answer = stopped.args[0] if stopped.args else ""
            print(" [stopped]", file=stdout, flush=True)
        except sample.SampleError as e:
            history.pop()
            print(f"\nerror: {e}", file=stdout, flush=True)
            continue
        history.append({"role": "assistant", "content": answer})
        turn += 1
