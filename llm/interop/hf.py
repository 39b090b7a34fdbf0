"""A run directory <-> Hugging Face files in the Llama format (`LlamaForCausalLM`): config.json,
model.safetensors (sharded with an index past a size limit), generation_config.json and a tokenizer
that `AutoTokenizer` loads. The model code knows nothing of this module.

The rotary, grouped-query, SwiGLU, RMSNorm configuration here is Llama's, including the layout of the
rotary dimensions (the first and second half of each head rotate together, as in HF's
`rotate_half`), so weights map one to one: torch's `Linear` stores [out, in], ours [in, out].
Needs the `hf` extra (`pip install -e '.[hf]'`; `./run.sh setup` installs it).
"""

import copy
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm import model, spec
from llm.data import tokenizer as tokenizer_lib
from llm.model import ModelConfig, parametrization
from llm.training import checkpoint, guard, optimizer

LLM_TOKENIZER_DIR = "llm_tokenizer"  # this project's own tokenizer files, for an exact round trip
SPECIAL_PIECES = {"pad": "<pad>", "bos": "<s>", "eos": "</s>"}


class HFError(ValueError):
    pass


def _transformers():
    try:
        import safetensors.numpy  # noqa: F401
        import transformers
    except ImportError as e:
        raise HFError("export/import needs the hf extra: pip install -e '.[hf]' (torch, transformers, safetensors)") from e
    return transformers


def llama_problems(mc: ModelConfig) -> list[str]:
    """The settings of a run that LlamaForCausalLM cannot express; empty when it exports exactly."""
    problems = []
    if mc.pos_encoding != "rope":
        problems.append(f"model.pos_encoding={mc.pos_encoding!r} (Llama has rotary positions only)")
    if mc.norm != "rmsnorm":
        bias = " with model.norm_bias=True" if mc.norm == "layernorm" and mc.norm_bias else ""
        problems.append(f"model.norm={mc.norm!r}{bias} (Llama normalises with RMSNorm, which has no bias)")
    if mc.mlp != "swiglu":
        problems.append(f"model.mlp={mc.mlp!r} (Llama's MLP is SwiGLU)")
    if mc.F == 0:
        problems.append("model.d_ff=0 (blocks without an MLP sublayer, which every Llama layer has)")
    if mc.arch != "decoder":
        problems.append(f"model.arch={mc.arch!r} (a Llama model is a decoder)")
    return problems


def _layer(params: dict, mc: ModelConfig, i: int) -> dict:
    if mc.scan_layers:
        return jax.tree.map(lambda x: x[i], params["blocks"])
    return params[f"block_{i}"]


def _fold_parametrization(params: dict, mc: ModelConfig) -> dict:
    """mup/completep's forward multipliers moved into the weights they follow, so that Llama's plain
    forward pass computes the same function: the query scale into wq (RoPE is linear), the residual
    branches' into each output projection, the logits' into the final norm's scale (the head may be
    the tied embedding, which the input also reads)."""
    p = mc.parametrization
    qk, branch, logits = parametrization.qk_scale(p), parametrization.residual_scale(p), parametrization.logit_scale(p)
    if (qk, branch, logits) == (1.0, 1.0, 1.0):
        return params
    scaled = lambda x, s: (x * s).astype(x.dtype)
    blocks = {name: block for name, block in params.items() if name == "blocks" or name.startswith("block_")}
    out = {**params, "final_norm": {**params["final_norm"], "scale": scaled(params["final_norm"]["scale"], logits)}}
    for name, block in blocks.items():
        attn = {**block["attn"], "wq": scaled(block["attn"]["wq"], qk), "wo": scaled(block["attn"]["wo"], branch)}
        out[name] = {**block, "attn": attn, "mlp": {**block["mlp"], "wo": scaled(block["mlp"]["wo"], branch)}}
    return out


def to_llama(params: dict, mc: ModelConfig) -> dict[str, np.ndarray]:
    """Our params (scanned or not) as HF tensor names and [out, in] layouts."""
    D, H, G, K = mc.D, mc.H, mc.G, mc.K
    params = _fold_parametrization(jax.tree.map(np.asarray, params), mc)
    tensors = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]["scale"]}
    if not mc.tie_embeddings:
        tensors["lm_head.weight"] = params["head"].T
    for i in range(mc.N):
        p, prefix = _layer(params, mc, i), f"model.layers.{i}."
        attn, mlp = p["attn"], p["mlp"]
        tensors.update({
            prefix + "input_layernorm.weight": p["attn_norm"]["scale"],
            prefix + "self_attn.q_proj.weight": attn["wq"].reshape(D, H * K).T,
            prefix + "self_attn.k_proj.weight": attn["wk"].reshape(D, G * K).T,
            prefix + "self_attn.v_proj.weight": attn["wv"].reshape(D, G * K).T,
            prefix + "self_attn.o_proj.weight": attn["wo"].reshape(H * K, D).T,
            prefix + "post_attention_layernorm.weight": p["mlp_norm"]["scale"],
            prefix + "mlp.gate_proj.weight": mlp["wg"].T,
            prefix + "mlp.up_proj.weight": mlp["wi"].T,
            prefix + "mlp.down_proj.weight": mlp["wo"].T,
        })
    return {name: np.ascontiguousarray(t) for name, t in tensors.items()}


def from_llama(tensors: dict[str, np.ndarray], mc: ModelConfig) -> dict:
    """HF tensors as our param tree (stacked under `blocks` for a scanned model)."""
    D, F, H, G, K, V = mc.D, mc.F, mc.H, mc.G, mc.K, mc.V

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise HFError(f"the checkpoint has no tensor {name!r}, which its config.json implies")
        if tuple(tensors[name].shape) != shape:
            raise HFError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}; its config.json implies {shape}")
        return np.asarray(tensors[name], np.dtype(mc.param_dtype))

    layers = []
    for i in range(mc.N):
        prefix = f"model.layers.{i}."
        layers.append({
            "attn_norm": {"scale": get(prefix + "input_layernorm.weight", (D,))},
            "attn": {
                "wq": get(prefix + "self_attn.q_proj.weight", (H * K, D)).T.reshape(D, H, K),
                "wk": get(prefix + "self_attn.k_proj.weight", (G * K, D)).T.reshape(D, G, K),
                "wv": get(prefix + "self_attn.v_proj.weight", (G * K, D)).T.reshape(D, G, K),
                "wo": get(prefix + "self_attn.o_proj.weight", (D, H * K)).T.reshape(H, K, D),
            },
            "mlp_norm": {"scale": get(prefix + "post_attention_layernorm.weight", (D,))},
            "mlp": {"wg": get(prefix + "mlp.gate_proj.weight", (F, D)).T, "wi": get(prefix + "mlp.up_proj.weight", (F, D)).T,
                    "wo": get(prefix + "mlp.down_proj.weight", (D, F)).T},
        })
    params = {"embed": get("model.embed_tokens.weight", (V, D)), "final_norm": {"scale": get("model.norm.weight", (D,))}}
    if mc.scan_layers:
        params["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    else:
        params.update({f"block_{i}": layer for i, layer in enumerate(layers)})
    if not mc.tie_embeddings:
        params["head"] = get("lm_head.weight", (V, D)).T
    return params


def _hf_tokenizer(tok: tokenizer_lib.Tokenizer):
    """The tokenizer as a `tokenizers` pipeline that encodes every text to the same ids as ours."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if isinstance(tok, tokenizer_lib.SentencePieceTokenizer):
        from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

        proto = import_protobuf().ModelProto()
        proto.ParseFromString(tok.model_proto)
        pieces = [p.piece for p in proto.pieces]
        # SpmConverter follows the model's own normaliser spec (no dummy prefix, identity normalisation,
        # byte fallback, the newline piece), so it encodes as SentencePieceProcessor does.
        vocab = {p: i for i, p in enumerate(pieces)} if proto.trainer_spec.model_type == 2 else [(p.piece, p.score) for p in proto.pieces]
        hf = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=False)
        if hf is None:
            raise HFError("this SentencePiece model type cannot be converted (only BPE and unigram can)")
        return hf, {name: pieces[i] for name, i in (("pad", tok.pad_id), ("bos", tok.bos_id), ("eos", tok.eos_id)) if i >= 0}
    if isinstance(tok, tokenizer_lib.CharTokenizer):
        symbols = list(tok.chars)
        pre, decoder = None, decoders.Fuse()
    else:  # bytes: GPT-2's printable stand-ins for the 256 byte values, then one token per byte
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        stand_in = bytes_to_unicode()
        symbols = [stand_in[b] for b in range(256)]
        pre, decoder = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), decoders.ByteLevel()
    vocab = {SPECIAL_PIECES["pad"]: tok.pad_id, SPECIAL_PIECES["bos"]: tok.bos_id, SPECIAL_PIECES["eos"]: tok.eos_id}
    vocab.update({s: tokenizer_lib.NUM_SPECIAL + i for i, s in enumerate(symbols)})
    hf = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: every symbol is a token of its own
    if pre is not None:
        hf.pre_tokenizer = pre
    hf.decoder = decoder
    return hf, dict(SPECIAL_PIECES)


def _generation_config(tok: tokenizer_lib.Tokenizer, V: int):
    """Greedy by default, as ours; the rows past the tokenizer's ids (vocab_multiple's padding, or a chat
    template's role markers, which the exported tokenizer has no text for) are suppressed, as our
    sampler never emits them, so a plain `generate` gives our tokens."""
    return _transformers().GenerationConfig(
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, do_sample=False,
        suppress_tokens=list(range(tok.vocab_size, V)) or None)


def _write_tokenizer(tok: tokenizer_lib.Tokenizer, out: str) -> None:
    transformers = _transformers()
    hf, specials = _hf_tokenizer(tok)
    options = {f"{name}_token": piece for name, piece in specials.items()} | {"clean_up_tokenization_spaces": False}
    if isinstance(tok, tokenizer_lib.SentencePieceTokenizer):
        # A Llama tokenizer (transformers 5 saves the class as "LlamaTokenizer", which 4.x reads as
        # LlamaTokenizerFast). add_prefix_space=False keeps our pipeline: Llama's default prepends "▁"
        # to every text, which our SentencePiece models (no dummy prefix) do not. No bos is added,
        # as our encode adds none.
        fast = transformers.LlamaTokenizerFast(tokenizer_object=hf, legacy=False, add_prefix_space=False, add_bos_token=False,
                                               add_eos_token=False, **options)
    else:  # char and byte vocabularies are not SentencePiece models: a generic tokenizer.json
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=hf, **options)
    fast.save_pretrained(out)
    if isinstance(tok, tokenizer_lib.SentencePieceTokenizer):
        with open(os.path.join(out, tok.MODEL_FILENAME), "wb") as f:  # for tools that read SentencePiece directly
            f.write(tok.model_proto)
    os.makedirs(os.path.join(out, LLM_TOKENIZER_DIR), exist_ok=True)
    tokenizer_lib.save(tok, os.path.join(out, LLM_TOKENIZER_DIR))


def _write_safetensors(tensors: dict[str, np.ndarray], out: str, max_shard_bytes: int) -> list[str]:
    from safetensors.numpy import save_file

    shards, size = [[]], 0
    for name in tensors:
        if shards[-1] and size + tensors[name].nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += tensors[name].nbytes
    if len(shards) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, names in zip(files, shards):
        save_file({n: tensors[n] for n in names}, os.path.join(out, file), metadata={"format": "pt"})
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": {n: file for file, names in zip(files, shards) for n in names}}
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    return files


def export(workdir: str, out: str, step: int | None = None, max_shard_bytes: int = 5 << 30) -> dict:
    """Writes the run's checkpoint (the newest readable one, or `step`) as a Llama model directory."""
    from llm.run import api

    transformers = _transformers()
    run = api.load(workdir, step)
    mc = run.model_config
    problems = llama_problems(mc)
    if run.spec.objective.name == "reward":
        problems.append("objective='reward' (a scalar head, not a causal LM: LlamaForCausalLM has no place for it)")
    if problems:
        raise HFError(f"{workdir} cannot be written as a Llama model: {'; '.join(problems)}")
    if os.path.exists(out) and os.listdir(out):
        raise HFError(f"{out} exists and is not empty; export into a new directory")
    os.makedirs(out, exist_ok=True)
    tok = run.tokenizer
    hf_config = transformers.LlamaConfig(
        vocab_size=mc.V, hidden_size=mc.D, intermediate_size=mc.F, num_hidden_layers=mc.N, num_attention_heads=mc.H,
        num_key_value_heads=mc.G, head_dim=mc.K, max_position_embeddings=mc.L, rms_norm_eps=mc.norm_eps or 1e-6,
        rope_theta=mc.rope_theta, tie_word_embeddings=mc.tie_embeddings, hidden_act="silu", attention_bias=False,
        mlp_bias=False, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
        architectures=["LlamaForCausalLM"], dtype=mc.param_dtype,
    )
    hf_config.save_pretrained(out)
    _generation_config(tok, mc.V).save_pretrained(out)
    files = _write_safetensors(to_llama(run.params, mc), out, max_shard_bytes)
    _write_tokenizer(tok, out)
    return {"workdir": workdir, "step": int(run.step), "out": out, "files": files, "tokenizer": tok.kind}


def _rope_theta(hf_config) -> float:
    rope = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise HFError(f"rope_type={kind!r} (scaled rotary positions) has no equivalent here; only the default rotary encoding imports")
    return float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def _import_tokenizer(hf_dir: str, tokenizer_path: str) -> tokenizer_lib.Tokenizer:
    if tokenizer_path:
        return tokenizer_lib.train("sentencepiece", [], tokenizer_path=tokenizer_path)
    if os.path.exists(os.path.join(hf_dir, LLM_TOKENIZER_DIR, tokenizer_lib.FILENAME)):
        return tokenizer_lib.load(os.path.join(hf_dir, LLM_TOKENIZER_DIR))
    if os.path.exists(os.path.join(hf_dir, tokenizer_lib.SentencePieceTokenizer.MODEL_FILENAME)):
        with open(os.path.join(hf_dir, tokenizer_lib.SentencePieceTokenizer.MODEL_FILENAME), "rb") as f:
            return tokenizer_lib.SentencePieceTokenizer(f.read())
    raise HFError(f"{hf_dir} has no SentencePiece tokenizer.model; pass --tokenizer=PATH.model "
                  f"(a tokenizer.json without it, e.g. Llama 3's, cannot be used here)")


def _read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise HFError(f"{hf_dir} holds neither model.safetensors nor model.safetensors.index.json")
    tensors = {}
    for file in files:
        tensors.update(load_file(os.path.join(hf_dir, file)))
    return tensors


def import_run(hf_dir: str, workdir: str, base: dict, tokenizer_path: str = "") -> dict:
    """Makes a run directory from a local Llama checkpoint: the architecture comes from its config.json,
    everything else (scan_layers, dtype, the optimizer and data a fine-tune would use) from `base`, a
    run config as a plain dict (the CLI's --config with its overrides)."""
    transformers = _transformers()
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        raise HFError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    try:
        hf = transformers.AutoConfig.from_pretrained(hf_dir)
    except (ValueError, KeyError, OSError) as e:
        raise HFError(f"cannot read {os.path.join(hf_dir, 'config.json')}: {e}") from e
    if hf.model_type != "llama":
        raise HFError(f"{hf_dir} is a {hf.model_type!r} model; only the Llama format imports")
    problems = [f"{key}={getattr(hf, key)!r}" for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu"))
                if getattr(hf, key, ok) != ok]
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if head_dim * hf.num_attention_heads != hf.hidden_size:
        problems.append(f"head_dim={head_dim} with {hf.num_attention_heads} heads != hidden_size={hf.hidden_size}")
    if problems:
        raise HFError(f"{hf_dir} uses settings this model does not have: {'; '.join(problems)}")
    config = copy.deepcopy(base)
    config["model"].update(
        d_model=hf.hidden_size, num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads, d_ff=hf.intermediate_size, vocab_size=hf.vocab_size,
        rope_theta=_rope_theta(hf), pos_encoding="rope", norm="rmsnorm", mlp="swiglu", norm_eps=float(hf.rms_norm_eps),
        tie_embeddings=bool(hf.tie_word_embeddings),
        parametrization="sp", depth_parametrization="none", output_multiplier=1.0)  # Llama's plain forward pass
    config["seq_len"] = int(hf.max_position_embeddings)
    config["name"] = os.path.basename(os.path.normpath(hf_dir))
    tok = _import_tokenizer(hf_dir, tokenizer_path)
    config["data"]["tokenizer"] = tok.kind
    if tok.vocab_size > hf.vocab_size:
        raise HFError(f"the tokenizer has {tok.vocab_size} ids but the model only {hf.vocab_size}")
    run = spec.resolve(spec.from_config(config), tok)
    mc = run.model
    try:
        params = from_llama(_read_tensors(hf_dir), mc)
    except HFError as e:
        raise HFError(f"{hf_dir}: {e}") from e
    expected = jax.eval_shape(lambda: nn.unbox(model.init(mc, jax.random.key(0))))
    params = jax.tree.map(lambda x, e: jnp.asarray(x, e.dtype), params, expected)  # the same tree, or this raises
    opt_state = optimizer.make(run.opt).init(params)
    with guard.hold_workdir(workdir):
        if checkpoint.latest_step(workdir) is not None:
            raise HFError(f"{workdir} already holds checkpoints; import into a new workdir")
        tokenizer_lib.save(tok, workdir)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(run.saved(), f, indent=2)
        mngr = checkpoint.manager(workdir, run.loop.keep_checkpoints, async_save=False)
        checkpoint.save(mngr, 0, params, opt_state, {"step": 0, "data": {"epoch": 0, "batch_in_epoch": 0}})
        mngr.wait_until_finished()
        mngr.close()
    return {"hf": hf_dir, "workdir": workdir, "params": model.param_counts(mc)["total"], "tokenizer": tok.kind}
