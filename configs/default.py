"""The default run: a ~1M-parameter character-level model on the built-in Shakespeare corpus."""

import ml_collections

from configs import sizes


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "default"
    c.seed = 0
    c.batch_size = 16  # global, per optimizer step (split into opt.grad_accum_steps micro-batches)
    c.seq_len = 128  # the context (model.arch='encoder_decoder': the encoder's input)
    c.target_len = 0  # encoder_decoder on 'seq2seq:' data: the decoder's length (0: seq_len); span corruption derives it
    c.num_train_steps = 1200
    c.log_every_steps = 50
    c.eval_every_steps = 400
    c.eval_batch_size = 64
    c.eval_max_batches = 0  # 0: the whole validation split (a mixture: of each domain)
    # comma-separated lm-evaluation-harness tasks (llm/interop/harness_tasks/ or lm_eval's) run at every eval,
    # their accuracy logged beside the loss as eval_acc_TASK (needs the harness extra); eval_tasks_limit: documents per task (0: all)
    c.eval_tasks = ""
    c.eval_tasks_limit = 0
    c.checkpoint_every_steps = 400
    c.keep_checkpoints = 3
    c.init_from = ""  # another run's workdir: start from its params (fine-tuning; the frozen reference of dpo/grpo)
    # 'lm': next-token (pretraining; SFT with data.dataset='sft:GLOB'); 'reward': a scalar head with the
    # Bradley-Terry loss on 'preference:GLOB'; 'dpo' on 'preference:GLOB'; 'grpo' on 'prompts:GLOB'
    # (llm/training/objectives.py, llm/training/rl.py). reward, dpo and grpo start from init_from.
    c.objective = "lm"
    c.peak_tflops = 0.0  # for MFU, per device (on CPU per host); 0: measure a large matmul at start
    c.sample_prompt = "ROMEO:\n"
    c.sample_tokens = 120  # printed after training; 0 to skip

    c.data = ml_collections.ConfigDict()
    # or 'text:GLOB', 'tfds:NAME[/CONFIG][:VERSION]', or streamed: 'jsonl:GLOB' (.jsonl, .jsonl.gz, .jsonl.zst),
    # 'parquet:GLOB' (local paths or fsspec URLs such as gs://...)
    c.data.dataset = "shakespeare"
    c.data.text_key = "text"  # the TFDS feature, JSON field or Parquet column holding the text
    c.data.validation_dataset = ""  # streamed: a separate corpus for validation ('' : hold out validation_fraction)
    c.data.num_workers = 0  # streamed: tokenizing processes (0: in the training process); batches never depend on it
    # streamed: domains drawn at fixed weights, 'NAME=WEIGHT,...' by the records' data.domain_key field, or
    # 'NAME=WEIGHT@jsonl:GLOB' a glob per domain; eval reports loss and bits per byte per domain (docs/data.md)
    c.data.mixture = ""
    c.data.domain_key = "domain"
    c.data.skip_bad_records = False  # streamed: skip (and count, data_skipped_records) bad records instead of stopping
    c.data.data_dir = ""  # TFDS data dir ('' : ~/tensorflow_datasets); token caches live beside each dataset
    c.data.manual_dir = ""  # TFDS manual_dir (files TFDS would otherwise download)
    c.data.validation_fraction = 0.1  # 'text:': the tail of each file; streamed: whole documents (llm/data/sources.py)
    c.data.test_fraction = 0.0
    c.data.tokenizer = "char"  # 'char' | 'byte' | 'sentencepiece'
    c.data.tokenizer_path = ""  # sentencepiece: an existing .model file instead of training one
    c.data.vocab_size = 4096  # sentencepiece: pieces to train
    c.data.spm_model_type = "bpe"  # 'bpe' | 'unigram'
    c.data.spm_input_sentences = 1_000_000  # sentencepiece: at most this many training lines
    c.data.packing = "concat"  # 'concat': one stream; 'documents': no attention or loss across documents
    c.data.add_bos = False  # put bos before every document (eos always follows one)
    c.data.loss_on = "response"  # 'sft:' data: 'response' (the assistant's tokens) | 'all' (every token of an example)
    c.data.noise_density = 0.15  # encoder_decoder on a text corpus: T5's span corruption, the fraction of tokens dropped
    c.data.mean_noise_span_length = 3.0  # ... in spans of this mean length, each replaced by one sentinel id
    c.data.mask_fraction = 0.15  # encoder: BERT's masked tokens per row (of them 80% [MASK], 10% random, 10% kept)
    c.data.sampling = "rows"  # concat only: 'rows' shuffles packed rows per epoch; 'windows' draws random windows (nanoGPT)

    c.model = ml_collections.ConfigDict()
    # 'decoder' (causal, next token) | 'encoder' (bidirectional, masked tokens on a text corpus) |
    # 'encoder_decoder' (span corruption on a text corpus, or 'seq2seq:GLOB' {"input", "target"} lines)
    c.model.arch = "decoder"
    c.model.num_encoder_layers = 0  # encoder_decoder: 0 = num_layers
    c.model.vocab_size = 0  # 0: the tokenizer's, padded up to vocab_multiple
    c.model.vocab_multiple = 128  # padded ids are never sampled
    c.model.d_model = 0
    c.model.num_layers = 0
    c.model.num_heads = 0
    c.model.num_kv_heads = 0
    c.model.d_ff = 0
    sizes.apply_size(c, "tiny")
    c.model.pos_encoding = "rope"  # 'sinusoidal' | 'learned' | 'rope'
    c.model.rope_theta = 10000.0
    c.model.norm = "rmsnorm"  # 'layernorm' | 'rmsnorm'
    c.model.norm_bias = True  # layernorm's additive bias
    c.model.norm_eps = 0.0  # 0: 1e-6 for rmsnorm, 1e-5 for layernorm
    c.model.mlp = "swiglu"  # 'gelu' | 'swiglu'
    c.model.tie_embeddings = True
    c.model.dtype = "float32"  # compute dtype; softmax and loss always run in float32
    c.model.param_dtype = "float32"
    c.model.remat = "none"  # 'none' | 'block' | 'dots'
    c.model.scan_layers = False
    # 'auto' | 'xla' | 'dot_product' | 'cudnn' (llm/model/attention.py). auto: cuDNN's flash attention on an
    # NVIDIA GPU with bf16/fp16 compute and a head dim it takes, the XLA einsum everywhere else.
    c.model.attention = "auto"
    # 'sp' (GPT-2's init, one learning rate) | 'mup' (Tensor Programs V, Table 8: the optimal learning rate
    # and init do not move with width; llm/model/parametrization.py). mup equals sp at base_width.
    c.model.parametrization = "sp"
    c.model.base_width = 256  # mup: the d_model at which it equals sp (the width hyper-parameters were tuned at)
    c.model.base_head_dim = 0  # mup: attention logits sqrt(base_head_dim) / d_head (0: base_width / num_heads)
    c.model.output_multiplier = 1.0  # mup's alpha_out: the logits are multiplied by it / (d_model / base_width)
    # 'none' | 'completep' (Dey et al. 2025, alpha = 1: residual branches x base_depth / layers)
    c.model.depth_parametrization = "none"
    c.model.base_depth = 2  # completep: the depth at which it equals none

    c.opt = ml_collections.ConfigDict()
    # 'adamw' | 'muon': Muon (Newton-Schulz orthogonalized momentum) on the hidden matrices, AdamW with the
    # keys below on embeddings, norms, biases and the head (llm/training/optimizer.py)
    c.opt.optimizer = "adamw"
    c.opt.learning_rate = 3e-3
    c.opt.warmup_steps = 100
    c.opt.schedule = "cosine"  # 'cosine' | 'linear' | 'constant' | 'wsd'
    c.opt.final_lr_ratio = 0.1
    c.opt.decay_fraction = 0.2  # wsd: the last fraction of steps decays
    c.opt.b1 = 0.9
    c.opt.b2 = 0.99
    c.opt.eps = 1e-8
    c.opt.weight_decay = 0.1
    c.opt.decay_embeddings = False
    c.opt.clip_norm = 1.0  # 0 disables
    c.opt.grad_accum_steps = 1
    c.opt.z_loss = 0.0
    c.opt.muon_learning_rate = 0.02  # muon: the hidden matrices' peak rate (the schedule's shape is shared)
    c.opt.muon_weight_decay = 0.0
    c.opt.muon_momentum = 0.95

    c.dpo = ml_collections.ConfigDict()
    c.dpo.beta = 0.1  # the implicit reward's scale: beta * log(pi / pi_ref)

    c.grpo = ml_collections.ConfigDict()
    c.grpo.group_size = 8  # answers sampled per prompt; batch_size counts prompts
    c.grpo.max_new_tokens = 32
    c.grpo.temperature = 1.0
    c.grpo.top_k = 0
    c.grpo.clip_eps = 0.2  # PPO's ratio clip
    c.grpo.kl_coef = 0.04  # the KL penalty to the frozen reference (init_from)
    c.grpo.reward_fn = ""  # 'module:function' (record: dict, answer: str) -> float; or:
    c.grpo.reward_run = ""  # the workdir of an objective='reward' run
    c.grpo.eval_prompts = 0  # held-out prompts answered greedily at each eval (0: all)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: the rest of the devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # On a CPU host, the CLI splits the cores into this many JAX devices before JAX starts, so the
    # data-parallel mesh uses every core; -1: one per core (reduced to divide the batches; default mesh
    # only); 0: JAX's one CPU device. XLA_FLAGS=--xla_force_host_platform_device_count=N wins.
    c.mesh.cpu_devices = -1
    # logical axis -> mesh axes (None: replicated): the model names logical axes only, and
    # llm/training/sharding.py maps them with these rules. Dimensions a mesh axis does not divide evenly
    # (e.g. a vocabulary of 65) are replicated.
    c.mesh.rules = (
        ("batch", ("data", "fsdp")),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("kv", None),
        ("layers", None),
        ("norm", None),
        ("pos", None),
    )
    return c
