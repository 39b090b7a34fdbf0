"""Converters at the edge: a run directory to and from Hugging Face Llama files (hf.py), and an
lm-evaluation-harness evaluation of a run directory (harness.py, over llm/training/tasks.py's adapter, with its
local tasks in harness_tasks/)."""
