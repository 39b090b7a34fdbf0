"""Hugging Face interop: a random LlamaForCausalLM imports with its logits, one of our runs exports to
files transformers loads with our logits, greedy tokens and token ids, and what Llama cannot express
is refused by name."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import cli_overrides, run_cli, tiny_config, train_run, write_corpus

import llm
from configs import default
from llm import model, spec as config_lib
from llm.data import tokenizer as tokenizer_lib
from llm.interop import hf
from llm.model import heads, sample
from llm.training import checkpoint, optimizer as optim

torch = pytest.importorskip("torch", reason="the hf extra (pip install -e '.[hf]') is not installed")
transformers = pytest.importorskip("transformers", reason="the hf extra (pip install -e '.[hf]') is not installed")

V = 320


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> tokenizer_lib.SentencePieceTokenizer:
    root = tmp_path_factory.mktemp("spm")
    return tokenizer_lib.SentencePieceTokenizer.train([write_corpus(root / "corpus.txt", 20_000).read_text()], 300)


def random_llama(directory, spm, num_kv_heads: int, tie: bool):
    torch.manual_seed(num_kv_heads)
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=num_kv_heads, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=tie,
        max_position_embeddings=64)
    llama = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1: move them so that a missing or swapped norm shows
        for name, p in llama.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    llama.save_pretrained(directory)
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(spm.model_proto)
    return llama


def torch_logits(llama, tokens_BxL: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return llama(torch.tensor(tokens_BxL)).logits.numpy()


def our_logits(workdir, tokens_BxL: np.ndarray) -> np.ndarray:
    run = llm.load(str(workdir))
    return np.asarray(model.apply(run.model_config, run.params, tokens_BxL)[0])


# num_kv_heads 4 / 2 / 1: multi-head, grouped-query, multi-query attention.
@pytest.mark.parametrize("num_kv_heads,scan_layers,tie", [(4, False, False), (2, True, True), (1, False, True)])
def test_an_imported_llama_gives_its_logits(tmp_path, spm, num_kv_heads, scan_layers, tie):
    llama = random_llama(tmp_path / "hf", spm, num_kv_heads, tie)
    cfg = default.get_config()
    cfg.model.scan_layers = scan_layers
    hf.import_run(str(tmp_path / "hf"), str(tmp_path / "run"), cfg)
    tokens = np.random.default_rng(0).integers(0, V, (2, 24))
    expected = torch_logits(llama, tokens)
    assert np.std(expected) > 0.1
    np.testing.assert_allclose(our_logits(tmp_path / "run", tokens), expected, atol=1e-4, rtol=0)
    run = llm.load(str(tmp_path / "run"))
    assert run.model_config.norm_eps == 1e-5 and run.model_config.rope_theta == 500000.0 and run.step == 0
    assert run.tokenizer.encode("the king").tolist() == spm.encode("the king").tolist()


def test_an_imported_run_evaluates_samples_and_fine_tunes_like_any_run(tmp_path, spm, corpus):
    random_llama(tmp_path / "hf", spm, 2, tie=True)
    result = run_cli("import", f"--hf={tmp_path / 'hf'}", f"--workdir={tmp_path / 'run'}", f"--config.data.data_dir={tmp_path / 'tfds'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["tokenizer"] == "sentencepiece"
    # eval and sample through the API their commands call (one CLI start-up each saved).
    imported = llm.load(str(tmp_path / "run"))
    assert imported.evaluate(dataset=f"text:{corpus}")["step"] == 0
    # Greedy sampling from the imported weights takes the argmax of their own logits.
    prompt = imported.tokenizer.encode("the king").tolist()
    first = imported.generate("the king", max_new_tokens=1, temperature=0.0)[0]
    assert imported.tokenizer.encode(first).tolist() == [int(np.argmax(imported.logits(prompt)[-1]))]
    # inspect and chat through the API their commands call: the last lens layer is the model's own output,
    # and the imported vocabulary (320 rows, 300 pieces) leaves the chat template room for its role ids.
    logits_BxLxV, activations = imported.trace("the king hath", names="block_*/attn_probs*")
    assert sorted(activations) == ["block_0/attn_probs_BxHxLxS", "block_1/attn_probs_BxHxLxS"]
    assert imported.lens("the king hath", k=3)[-1]["top_ids"][0] == int(np.argmax(logits_BxLxV[0, -1]))
    assert isinstance(imported.chat([{"role": "user", "content": "good night"}], max_new_tokens=2), str)
    fine = run_cli("train", f"--workdir={tmp_path / 'fine'}", *cli_overrides(
        corpus, init_from=str(tmp_path / "run"), data__tokenizer="sentencepiece", num_train_steps=2, seq_len=32,
        model__d_model=64, model__num_layers=2, model__num_heads=4, model__num_kv_heads=2, model__d_ff=128,
        model__vocab_size=V, model__norm_eps=1e-5, model__rope_theta=500000.0))
    assert fine.returncode == 0, fine.stderr[-2000:]
    assert "initialised from" in fine.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Four small runs of Llama's architecture: char tokenizer with a tied head (checkpoints at steps 5
    and 10), byte tokenizer with an untied one, SentencePiece with scanned layers, and a char run under
    mup and completep away from their base shape (every forward multiplier other than 1)."""
    root = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(root / "corpus.txt", 20_000)
    runs = {}
    for kind, extra in (("char", {"checkpoint_every_steps": 5}), ("byte", {"model__tie_embeddings": False}),
                        ("sentencepiece", {"data__vocab_size": 300, "model__scan_layers": True}),
                        ("mup", {"model__parametrization": "mup", "model__base_width": 16, "model__output_multiplier": 2.0,
                                 "model__depth_parametrization": "completep", "model__base_depth": 1})):
        workdir = root / kind
        tokenizer = "char" if kind == "mup" else kind
        train_run(tiny_config(corpus, num_train_steps=10, data__tokenizer=tokenizer, opt__learning_rate=1e-2, **extra), str(workdir), quiet=True)
        runs[kind] = workdir
    return runs


@pytest.mark.parametrize("kind", ["char", "byte", "sentencepiece"])
def test_an_exported_run_gives_our_logits_greedy_tokens_and_token_ids_in_transformers(tmp_path, trained, kind):
    out = tmp_path / "hf"
    summary = hf.export(str(trained[kind]), str(out), max_shard_bytes=40_000)  # small shards: exercises the index
    assert len(summary["files"]) > 1 and (out / "model.safetensors.index.json").exists()
    run = llm.load(str(trained[kind]))
    llama = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = np.random.default_rng(1).integers(3, run.tokenizer.vocab_size, (2, 24))
    expected = our_logits(trained[kind], tokens)
    assert np.std(expected) > 0.1
    np.testing.assert_allclose(torch_logits(llama, tokens), expected, atol=1e-4, rtol=0)

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert isinstance(tokenizer, transformers.LlamaTokenizerFast) == (kind == "sentencepiece")
    text = "Good night, sweet lord;\n  the crown hath hearts!" + (" 12 é ü 😀" if kind != "char" else "")  # char: the corpus's characters
    ids = run.tokenizer.encode(text).tolist()
    assert tokenizer.encode(text, add_special_tokens=False) == ids
    assert tokenizer.decode(ids) == text

    # A plain greedy generate with the saved generation_config.json: it stops at our eos and never
    # chooses the vocabulary's padding ids, as ours never does.
    assert llama.generation_config.suppress_tokens == list(range(run.tokenizer.vocab_size, run.model_config.V))
    for text in ("The king ", "Good night", "Sweet lady, my "):
        prompt = run.tokenizer.encode(text).tolist()
        ours = sample.generate(run.model_config, run.params, [prompt], max_new_tokens=12, eos_id=run.tokenizer.eos_id,
                               pad_id=run.tokenizer.pad_id, vocab_limit=run.tokenizer.vocab_size, temperature=0.0)[0]
        theirs = llama.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
        assert theirs[0, len(prompt):].tolist() == list(ours)

    reimported = tmp_path / "back"
    hf.import_run(str(out), str(reimported), default.get_config())
    jax.tree.map(np.testing.assert_array_equal, llm.load(str(reimported)).params, _unscanned(run))


def test_export_through_the_cli_writes_the_chosen_step_as_one_safetensors_file(tmp_path, trained):
    out = tmp_path / "hf"
    result = run_cli("export", f"--workdir={trained['char']}", f"--out={out}", "--step=5")  # 10 is the latest
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["files"] == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    from safetensors.numpy import load_file

    written = load_file(out / "model.safetensors")
    step5, latest = llm.load(str(trained["char"]), 5), llm.load(str(trained["char"]))
    assert step5.step == 5 and latest.step == 10
    want = hf.to_llama(step5.params, step5.model_config)
    assert written.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(written[name], want[name])
    assert not np.array_equal(written["model.embed_tokens.weight"], np.asarray(latest.params["embed"]))


def test_a_mup_completep_run_exports_with_its_multipliers_folded_into_the_weights(tmp_path, trained):
    """Llama has no query, branch or logit multipliers: export moves them into wq, the output projections
    and the final norm's scale, so that transformers computes our logits."""
    run = llm.load(str(trained["mup"]))
    p = run.model_config.parametrization
    assert (p.width_mult, p.depth_mult, p.output_multiplier) == (2.0, 2.0, 2.0)
    hf.export(str(trained["mup"]), str(tmp_path / "hf"))
    llama = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = np.random.default_rng(1).integers(3, run.tokenizer.vocab_size, (2, 24))
    expected = our_logits(trained["mup"], tokens)
    assert np.std(expected) > 0.1
    np.testing.assert_allclose(torch_logits(llama, tokens), expected, atol=1e-4, rtol=0)
    # Imported back, the Llama files are an sp model (their forward pass has no multipliers), whatever
    # parametrization the importing config names.
    mup_config = default.get_config()
    mup_config.model.parametrization, mup_config.model.depth_parametrization = "mup", "completep"
    hf.import_run(str(tmp_path / "hf"), str(tmp_path / "back"), mup_config.to_dict())
    assert llm.load(str(tmp_path / "back")).model_config.parametrization.width == "sp"
    np.testing.assert_allclose(our_logits(tmp_path / "back", tokens), expected, atol=1e-4, rtol=0)


def _unscanned(run):
    if not run.model_config.scan_layers:
        return run.params
    params = {k: v for k, v in run.params.items() if k != "blocks"}
    for i in range(run.model_config.N):
        params[f"block_{i}"] = jax.tree.map(lambda x: x[i], run.params["blocks"])
    return params


def test_what_llama_cannot_express_is_refused_by_name_and_nothing_is_written(tmp_path, corpus):
    train_run(tiny_config(corpus, num_train_steps=2, model__pos_encoding="learned", model__norm="layernorm", model__mlp="gelu"),
                str(tmp_path / "run"), quiet=True)
    result = run_cli("export", f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'hf'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "cannot be written as a Llama model: " in last
    for named in ("model.pos_encoding='learned'", "model.norm='layernorm'", "model.mlp='gelu'"):
        assert named in last
    assert not (tmp_path / "hf").exists()


def untrained_run(workdir, corpus, **overrides):
    """A run directory as train writes one (config.json, tokenizer, checkpoint) for `overrides`, its
    params and optimizer state zeros of their true shapes: export reads and refuses it as a trained
    one, and no init (seconds of eager ops per architecture) or train step runs."""
    cfg = tiny_config(corpus, data__tokenizer="byte", model__vocab_size=512, **overrides)  # room for any reserved ids
    tok = tokenizer_lib.train("byte", [])
    run = config_lib.resolve(config_lib.from_config(cfg), tok)
    mc = run.model
    zeros = lambda tree: jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), tree)
    params = zeros(jax.eval_shape(lambda: nn.unbox(heads.init_params(mc, jax.random.key(0), cfg.objective == "reward"))))
    opt_state = zeros(jax.eval_shape(optim.make(run.opt).init, params))
    os.makedirs(workdir)
    tokenizer_lib.save(tok, str(workdir))
    (workdir / "config.json").write_text(json.dumps(cfg.to_dict()))
    mngr = checkpoint.manager(str(workdir), 1, async_save=False)
    checkpoint.save(mngr, 0, params, opt_state, {"step": 0, "data": {"epoch": 0, "batch_in_epoch": 0}})
    mngr.close()


@pytest.mark.parametrize("overrides,named", [
    (dict(model__pos_encoding="sinusoidal"), "model.pos_encoding='sinusoidal'"),
    (dict(model__norm="layernorm", model__norm_bias=True), "model.norm='layernorm' with model.norm_bias=True"),
    (dict(model__arch="encoder"), "model.arch='encoder'"),
    (dict(model__arch="encoder_decoder"), "model.arch='encoder_decoder'"),
    (dict(objective="reward", data__dataset="preference:/nowhere/*.jsonl", init_from="/nowhere/run"), "objective='reward'"),
    (dict(model__d_ff=0), "model.d_ff=0"),
])
def test_each_setting_llama_cannot_express_is_refused_alone_by_name(tmp_path, corpus, overrides, named):
    untrained_run(tmp_path / "run", corpus, **overrides)
    with pytest.raises(hf.HFError, match="cannot be written as a Llama model") as refused:
        hf.export(str(tmp_path / "run"), str(tmp_path / "hf"))
    problems = str(refused.value).split("cannot be written as a Llama model: ", 1)[1].split("; ")
    assert len(problems) == 1 and problems[0].startswith(named), problems
    assert not (tmp_path / "hf").exists()


def test_llama_settings_this_model_lacks_are_refused_on_import(tmp_path, spm):
    llama = random_llama(tmp_path / "hf", spm, 2, tie=True)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for change, named in ((dict(attention_bias=True), "attention_bias=True"),
                          (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192, "rope_theta": 500000.0}), "rope_type='llama3'")):
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(hf.HFError, match=named):
            hf.import_run(str(tmp_path / "hf"), str(tmp_path / "run"), default.get_config())
    assert not (tmp_path / "run").exists() and llama is not None


def test_a_checkpoint_with_a_missing_tensor_or_a_wrong_shape_is_one_clear_error(tmp_path, spm):
    from safetensors.numpy import load_file, save_file

    random_llama(tmp_path / "hf", spm, 2, tie=True)
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}, path, metadata={"format": "pt"})
    result = run_cli("import", f"--hf={tmp_path / 'hf'}", f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "has no tensor 'model.layers.1.mlp.up_proj.weight'" in result.stderr.strip().splitlines()[-1]
    save_file({**tensors, "model.layers.0.self_attn.k_proj.weight": tensors["model.layers.0.self_attn.q_proj.weight"]}, path,
              metadata={"format": "pt"})
    result = run_cli("import", f"--hf={tmp_path / 'hf'}", f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "tensor 'model.layers.0.self_attn.k_proj.weight' has shape (64, 64); its config.json implies (32, 64)" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
