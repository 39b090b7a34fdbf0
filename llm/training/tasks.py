"""lm-evaluation-harness (`lm_eval`) tasks scored on a decoder's params: the lm_eval model adapter and one
evaluation, shared by `eval --tasks` (llm/interop/harness.py, over a run directory) and the loop's evals
(`eval_tasks`, over the params in training). lm_eval (the harness extra) is imported only when a task runs.
"""

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm import model
from llm.data.tokenizer import Tokenizer
from llm.model import ModelConfig, sample as sample_lib

# The project's local tasks live with the harness adapter at the edge (llm/interop/); this is only their folder.
TASKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "interop", "harness_tasks")


class HarnessError(ValueError):
    pass


@functools.partial(jax.jit, static_argnums=(0, 1))
def _score(cfg: ModelConfig, vocab_limit: int, params, inputs_BxL, targets_BxL, weights_BxL):
    """Per row: the summed log-probability of the weighted targets, and whether each is the argmax."""
    logits_BxLxV = model.apply(cfg, params, inputs_BxL)[0]
    logprobs_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)  # the full vocabulary, as the eval's loss
    target_BxL = jnp.take_along_axis(logprobs_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    greedy_BxL = jnp.argmax(logits_BxLxV[..., :vocab_limit], axis=-1) == targets_BxL
    return jnp.sum(target_BxL * weights_BxL, axis=-1), jnp.all(greedy_BxL | (weights_BxL == 0), axis=-1)


def _harness():
    try:
        import lm_eval
    except ImportError as e:
        raise HarnessError("--tasks needs the harness extra: pip install -e '.[harness]' (lm_eval)") from e
    return lm_eval


def adapter(model_config: ModelConfig, params, tokenizer: Tokenizer, batch_size: int = 16):
    """An lm_eval LM that scores with a decoder's params (of a run directory, or of a run in training)."""
    _harness()
    from lm_eval.api.model import LM

    class RunLM(LM):
        def __init__(self):
            super().__init__()
            self.model_config, self.params, self.tokenizer, self.batch_size = model_config, params, tokenizer, batch_size
            self.context = model_config.L

        def _encode(self, text: str) -> list[int]:
            return self.tokenizer.encode(text).tolist() if text else []

        def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
            """(log p(continuation | context), greedy) for token-id pairs; the context is cut from the left
            to fit the model's window, and an empty one becomes eos, the document separator."""
            L, eos = self.context, self.tokenizer.eos_id
            rows = []
            for context, continuation in pairs:
                if not continuation:
                    raise HarnessError("a continuation with no tokens has no likelihood")
                full = ((context or [eos]) + continuation)[-(L + 1):]
                rows.append((full, min(len(continuation), len(full) - 1)))
            results = []
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start:start + self.batch_size]
                # Widths rounded up to a power of two: few compiled shapes, little padding.
                width = min(L, 1 << max(4, (max(len(f) - 1 for f, _ in chunk) - 1).bit_length()))
                B = self.batch_size
                inputs, targets, weights = (np.zeros((B, width), np.int32) for _ in range(3))
                for b, (full, scored) in enumerate(chunk):
                    n = len(full) - 1
                    inputs[b, :n], targets[b, :n] = full[:-1], full[1:]
                    weights[b, n - scored:n] = 1
                logp_B, greedy_B = _score(self.model_config, self.tokenizer.vocab_size, self.params,
                                          jnp.asarray(inputs), jnp.asarray(targets), jnp.asarray(weights, jnp.float32))
                results += [(float(lp), bool(g)) for lp, g in zip(np.asarray(logp_B)[:len(chunk)], np.asarray(greedy_B)[:len(chunk)])]
            return results

        def loglikelihood(self, requests):
            return self.score([(self._encode(r.args[0]), self._encode(r.args[1])) for r in requests])

        def loglikelihood_rolling(self, requests):
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            totals = []
            for r in requests:
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    self._encode(r.args[0]), prefix_token=self.tokenizer.eos_id, max_seq_len=self.context, context_len=1)]
                totals.append(sum(lp for lp, _ in self.score(windows)))
            return totals

        def generate_until(self, requests):
            outputs = []
            for r in requests:
                context, options = r.args
                until = options.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = min(int(options.get("max_gen_toks", 256)), self.context - 1)
                prompt = (self._encode(context) or [self.tokenizer.eos_id])[-(self.context - max_new):]
                tokens = sample_lib.generate(
                    self.model_config, self.params, [prompt], max_new_tokens=max_new, eos_id=self.tokenizer.eos_id,
                    pad_id=self.tokenizer.pad_id, vocab_limit=self.tokenizer.vocab_size, temperature=0.0)[0]
                text = self.tokenizer.decode([t for t in tokens if t != self.tokenizer.eos_id])
                cut = min([text.index(u) for u in until if u in text], default=len(text))
                outputs.append(text[:cut])
            return outputs

    return RunLM()


@functools.lru_cache(maxsize=4)
def find_tasks(tasks: tuple[str, ...], task_dirs: tuple[str, ...] = ()):
    """The lm_eval TaskManager that knows `tasks`, or one clear error naming those it does not know."""
    _harness()
    from lm_eval.tasks import TaskManager

    # Indexing lm_eval's ~15k built-in tasks takes a quarter of a minute: only when a task is not local.
    manager = TaskManager(include_path=[TASKS_DIR, *task_dirs], include_defaults=False)
    if not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=[TASKS_DIR, *task_dirs])
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise HarnessError(f"unknown task(s) {', '.join(unknown)}: not in {TASKS_DIR}, --task_dir or lm_eval's own tasks")
    return manager


def evaluate(lm, tasks: Sequence[str], manager, limit: int | None = None, num_fewshot: int | None = None) -> dict:
    """lm_eval's numeric metrics for each task: {task: {"acc,none": ..., ...}}."""
    import lm_eval

    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                      log_samples=False, bootstrap_iters=0)
    return {task: {k: v for k, v in values.items() if k != "alias" and isinstance(v, (int, float))}
            for task, values in results["results"].items()}


def accuracies(metrics: dict) -> dict:
    """The tasks' accuracies as flat metric names: eval_acc_TASK, eval_acc_norm_TASK (where the task has them)."""
    return {f"eval_{name}_{task}": float(values[f"{name},none"]) for task, values in metrics.items()
            for name in ("acc", "acc_norm") if f"{name},none" in values}
