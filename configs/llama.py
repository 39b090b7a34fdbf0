"""The Llama recipe the ladder configs share (configs/llama_*.py): RoPE, RMSNorm, SwiGLU, grouped-query
attention, an untied head, bf16 compute over float32 params, a 32k SentencePiece vocabulary, AdamW
(0.9, 0.95) with weight decay 0.1 and a cosine schedule, 20 tokens per parameter (Hoffmann et al.),
and FSDP over every device (mesh.fsdp=-1: params and optimizer state sharded, ZeRO-3)."""

from configs import default


def config(name: str, d_model: int, num_layers: int, num_heads: int, num_kv_heads: int, d_ff: int, params: float,
           seq_len: int = 2048, batch_size: int = 256, learning_rate: float = 3e-4):
    c = default.get_config()
    c.name = name
    c.model.d_model, c.model.num_layers, c.model.num_heads = d_model, num_layers, num_heads
    c.model.num_kv_heads, c.model.d_ff = num_kv_heads, d_ff
    c.model.pos_encoding, c.model.norm, c.model.mlp = "rope", "rmsnorm", "swiglu"
    c.model.tie_embeddings = False
    c.model.dtype, c.model.param_dtype = "bfloat16", "float32"
    c.model.scan_layers = True  # one block compiled whatever the depth
    c.model.remat = "block"  # at these batches the stored activations (and XLA attention's L x L scores) would not fit
    c.data.tokenizer, c.data.vocab_size = "sentencepiece", 32000
    c.seq_len, c.batch_size = seq_len, batch_size
    c.num_train_steps = round(20 * params / (seq_len * batch_size))
    c.eval_every_steps = c.checkpoint_every_steps = 2000
    c.eval_max_batches, c.eval_batch_size = 50, 32
    c.sample_prompt = "The "
    c.opt.learning_rate, c.opt.warmup_steps, c.opt.schedule = learning_rate, 2000, "cosine"
    c.opt.b1, c.opt.b2, c.opt.weight_decay, c.opt.clip_norm = 0.9, 0.95, 0.1, 1.0
    c.mesh.data, c.mesh.fsdp = 1, -1
    return c
