"""An objective's side of the train loop: its host batches (llm/training/batches.py), how a host batch
becomes the train step's device batch (the frozen reference's log-probs for DPO, sampled and scored
answers for GRPO in llm/training/rl.py) and its held-out evaluation."""

import collections
import dataclasses
import functools
from typing import Callable, Iterator, Protocol, Sequence

import jax

from llm.data import examples, mixture
from llm.data.tokenizer import Tokenizer
from llm.model import ModelConfig
from llm.spec import RunSpec
from llm.training import batches as batches_lib, evaluate, objectives, sharding, tasks as tasks_lib
from llm.training.state import Setup, TrainState


class Batches(Protocol):
    """Endless, resumable host batches: the data position is all the state a checkpoint keeps of them."""

    def __next__(self) -> dict: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...

    def merge_states(self, states: Sequence[dict]) -> dict: ...  # every host's state as one (multi-host)

    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class Job:
    """What a run has built before its loop: handed to the objective's Feed."""

    run: RunSpec  # resolved: its vocabulary and model are complete
    workdir: str
    mesh: jax.sharding.Mesh
    tok: Tokenizer
    built: Setup  # what the run compiles
    reference: Callable[[], dict]  # the frozen reference params (init_from's), loaded on first use
    quiet: bool

    def put(self, batch: dict, rows: int | None = None) -> dict:
        """This host's rows of a global batch (of `rows`, default batch_size) as sharded device arrays."""
        return sharding.global_batch(batch, self.mesh, rows or self.run.batch_size)

    @property
    def rows(self) -> tuple[int, int]:
        """This host's rows of each global training batch."""
        return sharding.host_rows(self.mesh, self.run.batch_size)

    @property
    def says(self) -> bool:
        """Whether this process prints what it notices about the data (the first host, not quiet)."""
        return not self.quiet and jax.process_index() == 0


@dataclasses.dataclass
class Feed:
    """An objective's data side: host batches, how a host batch becomes the step's device batch (the
    reference's log-probs, sampled answers), and the held-out evaluation."""

    batches: Batches
    prepare: Callable[[TrainState, dict, int], tuple[dict, dict]]  # (state, host batch, step) -> (device batch, host metrics)
    evaluate: Callable[[dict], dict] | None  # params -> {"eval_...": value}
    check: Callable[[], object] = lambda: None  # reads the held-out split once, so that a missing one fails before compiling


def _lm_eval(job: Job, batches: Callable[[str], Iterator[dict]]) -> Callable[[dict], dict]:
    """`batches(domain)`: the held-out batches of one domain of a mixture ('' : of the whole split). A mixture's
    eval_loss pools its domains' passes, so each held-out token is scored once."""
    run = job.run
    eval_lo, eval_hi = sharding.host_rows(job.mesh, run.loop.eval_batch_size)
    put_eval = lambda b: job.put({k: v[eval_lo:eval_hi] for k, v in b.items()}, run.loop.eval_batch_size)
    token_bytes = evaluate.byte_table(job.tok.token_bytes(), run.model.V)
    domains = mixture.names(run.data)

    def one(params, domain: str) -> dict:
        return evaluate.evaluate(job.built.eval_step, params, batches(domain), token_bytes, put_eval, run.loop.eval_max_batches)

    def evaluate_lm(params):
        if domains:
            out = evaluate.by_domain({d: one(params, d) for d in domains})
        else:
            result = one(params, "")
            out = {"eval_loss": result["loss"], "eval_perplexity": result["perplexity"], "eval_bits_per_byte": result["bits_per_byte"]}
        if run.loop.tasks:
            lm = tasks_lib.adapter(run.model, params, job.tok, run.loop.eval_batch_size)
            out.update(tasks_lib.accuracies(tasks_lib.evaluate(lm, run.loop.tasks, tasks_lib.find_tasks(run.loop.tasks),
                                                               run.loop.eval_tasks_limit or None)))
        return out

    return evaluate_lm


def _objective_eval(job: Job, batches: Callable[[], Iterator[dict]]) -> Callable[[dict], dict]:
    """Held-out means of the objective's metrics (reward, dpo), weighted by each batch's units."""
    run = job.run
    eval_lo, eval_hi = sharding.host_rows(job.mesh, run.loop.eval_batch_size)

    def evaluate_objective(params):
        sums, units = collections.defaultdict(float), 0.0
        for i, b in enumerate(batches()):
            if run.loop.eval_max_batches and i >= run.loop.eval_max_batches:
                break
            batch = job.put({k: v[eval_lo:eval_hi] for k, v in b.items()}, run.loop.eval_batch_size)
            if run.objective.name == "dpo":
                batch.update(_reference_logprobs(run.model)(job.reference(), batch))
            batch_sums, batch_units = jax.device_get(job.built.objective_step(params, batch))
            for name, v in batch_sums.items():
                sums[name] += float(v)
            units += float(batch_units)
        return {f"eval_{name}": v / units for name, v in sums.items()}

    return evaluate_objective


@functools.lru_cache(maxsize=4)
def _reference_logprobs(mc: ModelConfig) -> Callable:
    """DPO's frozen inputs: the reference's summed answer log-probs, jitted once per model shape."""
    return jax.jit(lambda params, batch: objectives.answer_logprobs(mc, params, batch))


def make(job: Job) -> Feed:
    """The feed of the objectives and archs trained here (grpo's is llm/training/rl.py's)."""
    run, tok = job.run, job.tok
    batches = batches_lib.train_batches(run, tok, job.rows, quiet=not job.says)
    put = lambda state, b, step: (job.put(b), {})
    evaluating = bool(run.loop.eval_every_steps)
    if run.data.kind == "preference":
        held = lambda: examples.pair_eval_batches(batches_lib.preference_pairs(run, tok, "validation"), run.loop.eval_batch_size)
        prepare = put
        if run.objective.name == "dpo":
            def prepare(state, b, step):
                batch = job.put(b)
                batch.update(_reference_logprobs(run.model)(job.reference(), batch))
                return batch, {}
        return Feed(batches, prepare, _objective_eval(job, held) if evaluating else None,
                    check=lambda: batches_lib.preference_pairs(run, tok, "validation"))
    held = lambda domain="": batches_lib.held_out(run, tok, "validation", run.loop.eval_batch_size, domain=domain)
    if run.data.kind == "sft":
        check = lambda: batches_lib.sft_examples(run, tok, "validation", quiet=not job.says)
    elif run.data.kind == "seq2seq" or run.objective.pretext:
        check = lambda: next(iter(held()))
    elif run.data.mixture:
        check = lambda: mixture.check(run.data)
    else:
        check = held
    return Feed(batches, put, _lm_eval(job, held) if evaluating else None, check=check)

