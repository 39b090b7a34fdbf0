"""Converters at the edge: a run directory to and from Hugging Face Llama files (hf.py), and an
lm-evaluation-harness model over a run (harness.py, with its local tasks in harness_tasks/)."""
