"""Downstream evaluation with the lm-evaluation-harness (`lm_eval`) over a run directory. The model adapter
and the evaluation itself are llm/training/tasks.py's, which the loop's `eval_tasks` share. Needs the `harness` extra.

    ./run.sh eval --workdir=DIR --tasks=shakespeare_next_line [--task_dir=DIR] [--limit=N] [--num_fewshot=K]

Tasks come from local files only: the ones in llm/interop/harness_tasks/ and any folder of task YAMLs given
with --task_dir (see docs/interop.md for HellaSwag and LAMBADA from their local JSONL files).
"""

import os
from typing import Sequence

from llm.run import api
from llm.training import tasks as tasks_lib
from llm.training.tasks import TASKS_DIR, HarnessError  # noqa: F401 (the names `eval --tasks` and the task files use)


def load_jsonl(variable: str, split: str, what: str):
    """A task's rows from the local JSONL that environment variable `variable` names (lm_eval has no flag for it)."""
    import datasets

    path = os.environ.get(variable, "")
    if not os.path.isfile(path):
        raise HarnessError(f"{variable} must name {what} (now {path or 'unset'})")
    return datasets.DatasetDict({split: datasets.Dataset.from_json(path)})


def adapter(run: api.Run, batch_size: int = 16):
    """An lm_eval LM that scores with `run`."""
    return tasks_lib.adapter(run.model_config, run.params, run.tokenizer, batch_size)


def find_tasks(tasks: Sequence[str], task_dirs: Sequence[str] = ()):
    return tasks_lib.find_tasks(tuple(tasks), tuple(task_dirs))


def evaluate(run: api.Run, tasks: Sequence[str], task_dirs: Sequence[str] = (), limit: int | None = None,
             num_fewshot: int | None = None, batch_size: int = 16, manager=None) -> dict:
    """lm_eval's metrics for each task: {"step", "tasks": {task: {"acc,none": ..., ...}}}."""
    run.require_arch("lm_eval tasks (log-likelihoods of continuations)")
    manager = manager or find_tasks(tasks, task_dirs)
    return {"step": int(run.step), "tasks": tasks_lib.evaluate(adapter(run, batch_size), tasks, manager, limit, num_fewshot)}
