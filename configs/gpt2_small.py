"""GPT-2 small (124M with GPT-2's 50257 tokens; 110M here with 32k): 12 layers, d_model 768, 12 heads,
context 1024, learned positions, GELU, LayerNorm, tied embeddings, with nanoGPT's / llm.c's recipe.

The vocabulary comes from the tokenizer: a 32768-piece SentencePiece BPE trained on the run's training
split (data.tokenizer_path takes an existing .model). Point data.dataset at a real corpus
(tfds:c4/en, text:GLOB); the built-in Shakespeare is 5M characters.

Memory and speed knobs, all off here:
  --config.model.remat=block|dots   recompute each block (or all but its matmuls) in the backward pass
  --config.model.scan_layers=True   compile one block and scan it: compile time independent of depth
  --config.opt.grad_accum_steps=K   K micro-batches per step (same result as one K-times-larger batch)
  --config.mesh.fsdp=-1             shard params and optimizer state over the devices (ZeRO-3)
"""

from configs import default, sizes


def get_config():
    c = default.get_config()
    c.name = "gpt2_small"
    sizes.apply_size(c, "gpt2-small")
    c.seq_len = 1024
    c.batch_size = 32  # x 1024 tokens; GPT-2 used 512 rows, which --config.opt.grad_accum_steps=16 gives
    # 20 tokens per parameter (Hoffmann et al.): 2.2B tokens at 32k tokens per step.
    c.num_train_steps = 68_000
    c.eval_every_steps = 2000
    c.eval_max_batches = 100
    c.eval_batch_size = 32
    c.checkpoint_every_steps = 2000
    c.log_every_steps = 50
    c.sample_prompt = "The "
    c.data.tokenizer = "sentencepiece"
    c.data.spm_model_type = "bpe"
    c.data.vocab_size = 32768
    c.model.pos_encoding = "learned"
    c.model.norm = "layernorm"
    c.model.mlp = "gelu"
    c.model.tie_embeddings = True
    c.model.dtype = "bfloat16"  # compute; params and optimizer state stay float32, softmax and loss float32
    c.model.param_dtype = "float32"
    c.model.vocab_multiple = 128
    c.opt.learning_rate = 6e-4
    c.opt.warmup_steps = 700
    c.opt.schedule = "cosine"
    c.opt.final_lr_ratio = 0.1
    c.opt.b1 = 0.9
    c.opt.b2 = 0.95
    c.opt.weight_decay = 0.1
    c.opt.clip_norm = 1.0
    return c
