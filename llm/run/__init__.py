"""Using a trained run: `llm.load(workdir)` (api.py) for logits, generation, evaluation, chat and
reward scores, and the interactive chat loop (chat.py)."""
