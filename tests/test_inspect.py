"""llm/inspect: traced activations, interventions, the logit lens, induction scores, embedding neighbours."""

import dataclasses
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_cli, tiny_config, train_run, write_corpus

import llm
from llm import model, spec as config_lib
from llm.data import text as text_lib, tokenizer as tokenizer_lib
from llm.inspect import InspectError, attribution, embeddings, induction, intervene, lens, neurons, patching, trace as trace_lib
from llm.inspect.trace import all_names
from llm.model import attention as attention_lib
from llm.training import checkpoint, evaluate as evaluate_lib, optimizer as optim, sharding, state as state_lib

PROMPT = "The king hath thou sweet love."


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained char model with an untied head (so both embedding tables exist)."""
    root = tmp_path_factory.mktemp("inspect")
    corpus = write_corpus(root / "corpus.txt", 20_000)
    train_run(tiny_config(corpus, num_train_steps=20, model__tie_embeddings=False), str(root / "run"), quiet=True)
    return llm.load(str(root / "run"))


@pytest.fixture(scope="module")
def scanned_run(run, tmp_path_factory):
    """The trained run saved again as model.scan_layers=True writes it (blocks stacked on a layer axis),
    through the library's own checkpoint writer: a scanned checkpoint without a second training run."""
    workdir = tmp_path_factory.mktemp("scanned")
    config = run.config.copy_and_resolve_references()
    config.model.scan_layers = True
    params = dict(run.params)
    blocks = [params.pop(f"block_{i}") for i in range(run.model_config.N)]
    params["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    tokenizer_lib.save(run.tokenizer, str(workdir))
    (workdir / "config.json").write_text(json.dumps(config.to_dict()))
    mngr = checkpoint.manager(str(workdir), async_save=False)
    opt_state = optim.make(config_lib.from_config(config).opt).init(params)
    checkpoint.save(mngr, int(run.step), params, opt_state, {"step": int(run.step), "data": {"epoch": 0, "batch_in_epoch": 0}})
    mngr.wait_until_finished()
    mngr.close()
    return llm.load(str(workdir))  # restores onto the scanned model's own param shapes, or raises


def tiny_model(**overrides) -> tuple[model.ModelConfig, dict]:
    cfg = model.ModelConfig(**{**dict(V=64, D=32, F=64, N=2, H=4, G=2, L=32), **overrides})
    return cfg, nn.unbox(model.init(cfg, jax.random.key(0)))


def test_trace_names_every_activation_with_its_shape(run):
    logits, cache = run.trace(PROMPT)
    cfg, L = run.model_config, len(PROMPT)
    assert list(cache) == all_names(cfg)
    assert logits.shape == (1, L, run.tokenizer.vocab_size)
    assert cache["block_1/attn_probs_BxHxLxS"].shape == (1, cfg.H, L, L)
    assert cache["block_0/head_out_BxLxHxK"].shape == (1, L, cfg.H, cfg.K)
    assert cache["block_0/mlp_hidden_BxLxF"].shape == (1, L, cfg.F)
    assert cache["final_resid_BxLxD"].shape == (1, L, cfg.D)
    np.testing.assert_array_equal(cache["final_resid_BxLxD"], cache["block_1/resid_post_BxLxD"])
    np.testing.assert_array_equal(cache["block_1/resid_pre_BxLxD"], cache["block_0/resid_post_BxLxD"])
    _, some = run.trace(PROMPT, names=["block_1/attn*", "final_*"])
    assert list(some) == ["block_1/attn_probs_BxHxLxS", "final_resid_BxLxD"]
    _, some = run.trace(PROMPT, names=lambda name: name.endswith("mlp_hidden_BxLxF"))
    assert list(some) == ["block_0/mlp_hidden_BxLxF", "block_1/mlp_hidden_BxLxF"]
    with pytest.raises(InspectError):
        run.trace(PROMPT, names="block_9/*")


def test_cached_final_residual_through_unembed_reproduces_the_logits_exactly(run):
    logits, cache = run.trace(PROMPT, names="final_resid_BxLxD")
    unembedded = jax.jit(lambda x: model.unembed(run.model_config, run.params, x))(cache["final_resid_BxLxD"])
    np.testing.assert_array_equal(np.asarray(unembedded)[..., : run.tokenizer.vocab_size], logits)
    # and the traced forward is the model's forward (another attention path: float rounding only)
    np.testing.assert_allclose(logits[0], run.logits(run.encode_prompt(PROMPT)), atol=1e-5)


def test_logit_lens_at_the_last_layer_is_the_model_logits(run):
    cfg = run.model_config
    logits, cache = run.trace(PROMPT, names=lens.stream_names(cfg))
    lens_NxBxLxV = np.asarray(jax.jit(lambda c: lens.lens_logits(cfg, run.params, c))(cache))
    assert lens_NxBxLxV.shape[0] == cfg.N + 1
    np.testing.assert_allclose(lens_NxBxLxV[-1][..., : run.tokenizer.vocab_size], logits, atol=1e-6)
    rows = run.lens(PROMPT, k=3)
    assert [r["layer"] for r in rows] == ["embed", "block_0", "block_1"]
    assert all(len(r["top"]) == 3 and np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["top_ids"][0] == int(np.argmax(logits[0, -1]))


def test_logit_lens_over_a_split_ends_at_the_evaluated_loss(run):
    losses = run.lens_split("validation", max_batches=2, batch_size=4)
    assert list(losses) == ["embed", "block_0", "block_1"]
    full = lens.layer_losses(run.model_config, run.params, _batches(run, 4), max_batches=2)
    assert losses == full
    step = jax.jit(evaluate_lib.make_eval_step(run.model_config))
    result = evaluate_lib.evaluate(step, run.params, _batches(run, 4), run.tokenizer.token_bytes(),
                                   lambda b: {k: jnp.asarray(v) for k, v in b.items()}, max_batches=2)
    assert losses["block_1"] == pytest.approx(result["loss"], abs=1e-5)
    assert losses["embed"] > losses["block_1"]  # a trained model's last layer predicts better than its embedding


def _batches(run, batch_size):
    dc = run.spec.data
    stream = text_lib.token_stream(dc, "validation", run.tokenizer)
    return text_lib.eval_batches(stream, batch_size, run.config.seq_len, dc.packing, run.tokenizer.eos_id)


def test_scanned_and_unscanned_models_trace_the_same_arrays():
    scanned_cfg, scanned_params = tiny_model(scan_layers=True)
    cfg, params = trace_lib.unscanned(scanned_cfg, scanned_params)
    assert not cfg.scan_layers and "block_1" in params
    tokens_BxL = jax.random.randint(jax.random.key(1), (2, 32), 0, 64)
    logits_a, a = trace_lib.trace(scanned_cfg, scanned_params, tokens_BxL)
    logits_b, b = trace_lib.trace(cfg, params, tokens_BxL)
    assert sorted(a) == sorted(b) == sorted(all_names(cfg))
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-6, err_msg=name)
    np.testing.assert_allclose(logits_a, logits_b, atol=1e-6)


def test_a_scanned_checkpoint_traces_and_ablates_as_its_unscanned_twin(run, scanned_run):
    assert scanned_run.model_config.scan_layers and "blocks" in scanned_run.params and "block_0" not in scanned_run.params
    logits, cache = run.trace(PROMPT)
    scanned_logits, scanned_cache = scanned_run.trace(PROMPT)
    assert list(scanned_cache) == list(cache)
    for name in cache:
        np.testing.assert_allclose(scanned_cache[name], cache[name], atol=1e-5, err_msg=name)
    np.testing.assert_allclose(scanned_logits, logits, atol=1e-5)
    ablate = {"block_1/heads": [0, 2], "block_0/neurons": [3, 7]}
    ablated, _ = run.trace(PROMPT, names=[], ablate=ablate)
    scanned_ablated, _ = scanned_run.trace(PROMPT, names=[], ablate=ablate)
    assert not np.allclose(ablated, logits, atol=1e-3)  # the ablation does something, and the same on both
    np.testing.assert_allclose(scanned_ablated, ablated, atol=1e-5)
    effect, scanned_effect = run.intervention_effect(PROMPT, ablate=ablate), scanned_run.intervention_effect(PROMPT, ablate=ablate)
    assert scanned_effect["loss_change"] == pytest.approx(effect["loss_change"], abs=1e-5)


def test_patching_a_run_with_its_own_activations_changes_nothing(run):
    logits, cache = run.trace(PROMPT)
    for name in ("block_1/resid_mid_BxLxD", "block_0/head_out_BxLxHxK", "block_1/mlp_hidden_BxLxF", "block_0/attn_probs_BxHxLxS"):
        patched, _ = run.trace(PROMPT, patch={name: cache[name]}, names=[])
        np.testing.assert_array_equal(patched, logits, err_msg=name)


def test_patching_from_another_input_carries_its_activation(run):
    other = "Good night sweet lady, the crown."[: len(PROMPT)]
    _, donor = run.trace(other, names="block_0/resid_post_BxLxD")
    _, cache = run.trace(PROMPT, patch={"block_0/resid_post_BxLxD": donor["block_0/resid_post_BxLxD"]})
    np.testing.assert_array_equal(cache["block_0/resid_post_BxLxD"], donor["block_0/resid_post_BxLxD"])
    np.testing.assert_array_equal(cache["block_1/resid_pre_BxLxD"], donor["block_0/resid_post_BxLxD"])
    effect = run.intervention_effect(PROMPT, patch={"block_0/resid_post_BxLxD": donor["block_0/resid_post_BxLxD"]})
    assert effect["max_abs_logit_change"] > 0


def test_ablating_nothing_changes_nothing(run):
    logits, _ = run.trace(PROMPT, names=[])
    ablated, _ = run.trace(PROMPT, names=[], ablate={"block_0/heads": [], "block_1/neurons": []})
    np.testing.assert_array_equal(ablated, logits)
    effect = run.intervention_effect(PROMPT, ablate={"block_0/heads": []})
    assert effect["loss_change"] == 0 and effect["max_abs_logit_change"] == 0


def test_zero_ablating_every_head_of_a_layer_removes_its_attention_output(run):
    cfg = run.model_config
    _, clean = run.trace(PROMPT)
    _, cache = run.trace(PROMPT, ablate={"block_1/heads": list(range(cfg.H))})
    np.testing.assert_array_equal(cache["block_1/resid_mid_BxLxD"], cache["block_1/resid_pre_BxLxD"])
    np.testing.assert_array_equal(cache["block_1/resid_pre_BxLxD"], clean["block_1/resid_pre_BxLxD"])
    assert not np.array_equal(cache["block_1/resid_post_BxLxD"], clean["block_1/resid_post_BxLxD"])


def test_ablating_some_heads_and_neurons_touches_only_those(run):
    _, clean = run.trace(PROMPT)
    _, cache = run.trace(PROMPT, ablate={"block_0/heads": [1, 3], "block_0/neurons": [5]})
    head_out, mlp = cache["block_0/head_out_BxLxHxK"], cache["block_0/mlp_hidden_BxLxF"]
    assert np.all(head_out[:, :, [1, 3]] == 0) and np.all(mlp[..., 5] == 0)
    np.testing.assert_array_equal(head_out[:, :, [0, 2]], clean["block_0/head_out_BxLxHxK"][:, :, [0, 2]])
    donor_text = "Thou lord, the queen hath my"
    _, mean_cache = run.trace(PROMPT, ablate={"block_0/heads": [2], "block_1/neurons": [4, 9]}, mean_over=donor_text)
    _, donor = run.trace(donor_text, names=["block_0/head_out_BxLxHxK", "block_1/mlp_hidden_BxLxF"])
    mean_K = donor["block_0/head_out_BxLxHxK"][:, :, 2].mean(axis=(0, 1))
    np.testing.assert_allclose(mean_cache["block_0/head_out_BxLxHxK"][0, :, 2], np.broadcast_to(mean_K, (len(PROMPT), mean_K.size)), atol=1e-6)
    mean_2 = donor["block_1/mlp_hidden_BxLxF"][..., [4, 9]].mean(axis=(0, 1))
    assert not np.allclose(mean_2, 0, atol=1e-3)  # a mean, not a zero-ablation in disguise
    np.testing.assert_allclose(mean_cache["block_1/mlp_hidden_BxLxF"][0][:, [4, 9]], np.broadcast_to(mean_2, (len(PROMPT), 2)), atol=1e-6)
    others = [f for f in range(run.model_config.F) if f not in (4, 9)]
    assert not np.allclose(mean_cache["block_1/mlp_hidden_BxLxF"][0][:, others], mean_cache["block_1/mlp_hidden_BxLxF"][0][:1, others])
    with pytest.raises(InspectError):
        run.trace(PROMPT, ablate={"block_0/heads": [run.model_config.H]})


def test_attention_probabilities_sum_to_one_are_causal_and_stay_in_their_document():
    cfg, params = tiny_model(attention="dot_product")  # traced probabilities come from the einsum path whatever the kernel
    tokens_BxL = jax.random.randint(jax.random.key(2), (2, 32), 0, 64)
    segment_ids_BxL = jnp.asarray([[1] * 10 + [2] * 22, [1] * 32], jnp.int32)
    _, cache = trace_lib.trace(cfg, params, tokens_BxL, segment_ids_BxL, names="block_*/attn_probs*")
    same_document_BxLxS = np.asarray(segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])
    for probs_BxHxLxS in map(np.asarray, cache.values()):
        np.testing.assert_allclose(probs_BxHxLxS.sum(-1), 1.0, atol=1e-5)
        assert np.all(np.triu(probs_BxHxLxS, k=1) == 0)
        assert np.all(probs_BxHxLxS[~np.broadcast_to(same_document_BxLxS[:, None], probs_BxHxLxS.shape)] == 0)
        assert np.all(probs_BxHxLxS[0, :, 10, 10] == 1.0)  # a document's first token sees only itself


def _train_step_hlo(cfg, mc: model.ModelConfig) -> str:
    """The StableHLO of state_lib.setup's jitted train step, the one train() runs, lowered on shapes only."""
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    run = config_lib.from_config(cfg)
    built = state_lib.setup(mc, run.opt, mesh, run.mesh.rules)
    state = state_lib.TrainState(jax.ShapeDtypeStruct((), jnp.int32), built.abstract_params, built.abstract_opt)
    rows = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32)
    batch = {"inputs": rows, "targets": rows, "weights": jax.ShapeDtypeStruct(rows.shape, jnp.float32)}
    return built.train_step.lower(state, batch).as_text()


class _Tapped(Exception):
    pass


@pytest.mark.parametrize("scan_layers", [False, True])
def test_tracing_off_leaves_the_train_step_hlo_unchanged(scan_layers, monkeypatch, tmp_path):
    cfg = tiny_config(tmp_path / "unread.txt", model__scan_layers=scan_layers)
    mc = config_lib.resolve(config_lib.from_config(cfg), 64).model  # as train() builds it: nothing in a run's config turns trace on
    assert not mc.trace
    plain = _train_step_hlo(cfg, mc)

    def absent(module, name, x):
        raise _Tapped(name)

    # The program without tapping: any tap the train step reached would raise here.
    monkeypatch.setattr(model, "tap", absent)
    monkeypatch.setattr(attention_lib, "tap", absent)
    assert _train_step_hlo(cfg, mc) == plain
    traced = dataclasses.replace(mc, trace=True)
    with pytest.raises(_Tapped):  # the tripwire sits where the modules call tap
        _train_step_hlo(cfg, traced)
    monkeypatch.undo()
    assert _train_step_hlo(cfg, traced) != plain  # a train step that traced would show in its HLO


def _induction_model(T: int) -> tuple[model.ModelConfig, dict]:
    """A hand-set 2-layer, 1-head model: block_0 copies the previous token into a 'prev' subspace,
    block_1 attends from the current token to the position whose previous token matches it and
    writes that position's token into an 'out' subspace the untied head reads. MLPs are zero.
    Residual layout: [token (V) | position (L) | previous token (V) | output (V)]."""
    V, L = 16, 2 * T
    D = 3 * V + L
    tok, pos, prev, out = 0, V, V + L, 2 * V + L
    cfg = model.ModelConfig(V=V, D=D, F=8, N=2, H=1, G=1, L=L, pos_encoding="learned", tie_embeddings=False)
    params = jax.tree.map(np.zeros_like, nn.unbox(model.init(cfg, jax.random.key(0))))
    params = jax.tree.map(np.array, params)
    eye = np.eye(V)
    params["embed"][:, tok:tok + V] = eye
    params["pos_embed"][:, pos:pos + L] = np.eye(L)
    for name in ("attn_norm", "mlp_norm"):
        for b in ("block_0", "block_1"):
            params[b][name]["scale"][:] = 1.0
    params["final_norm"]["scale"][:] = 1.0
    a0, a1 = params["block_0"]["attn"], params["block_1"]["attn"]
    sharp = 4.0
    for i in range(L):  # query at i meets the key of i - 1
        a0["wq"][pos + i, 0, i] = sharp
        if i + 1 < L:
            a0["wk"][pos + i, 0, i + 1] = sharp
    a0["wv"][tok:tok + V, 0, :V] = eye * 0.2
    a0["wo"][0, :V, prev:prev + V] = eye
    a1["wq"][tok:tok + V, 0, :V] = eye * sharp  # query: the current token; key: the previous token
    a1["wk"][prev:prev + V, 0, :V] = eye * sharp
    a1["wv"][tok:tok + V, 0, :V] = eye
    a1["wo"][0, :V, out:out + V] = eye * 4.0
    params["head"][out:out + V, :] = eye * 4.0
    return cfg, jax.tree.map(jnp.asarray, params)


def test_a_hand_set_induction_model_scores_high_and_a_random_model_low():
    T = 8
    tokens_Bx2T = induction.repeated_tokens(seed=0, batch=4, half=T, low=0, high=16)
    cfg, params = _induction_model(T)
    scores_NxH = induction.prefix_matching_scores(cfg, params, tokens_Bx2T)
    assert scores_NxH[1, 0] > 0.9, scores_NxH
    losses = induction.repeated_tokens_loss(cfg, params, tokens_Bx2T)
    assert losses["second_copy"] < 0.1 < 2.0 < losses["first_copy"], losses
    assert induction.in_context_score(cfg, params, tokens_Bx2T, early=2, late=2 * T - 2) < -1.0

    random_cfg, random_params = tiny_model()
    tokens_Bx32 = induction.repeated_tokens(seed=0, batch=4, half=16, low=0, high=64)
    assert induction.prefix_matching_scores(random_cfg, random_params, tokens_Bx32).max() < 0.3
    random_losses = induction.repeated_tokens_loss(random_cfg, random_params, tokens_Bx32)
    assert abs(random_losses["second_copy"] - random_losses["first_copy"]) < 0.1


def test_neighbours_of_a_token_start_with_itself_and_skip_padding(run):
    vocab = run.tokenizer.vocab_size
    assert run.model_config.V > vocab  # padded
    for table in ("embed", "unembed"):
        for token in (5, vocab - 1):
            near = run.neighbours(token, k=5, table=table)  # every id ranked by cosine, the token's own among them
            assert near[0][0] == token and near[0][1] == pytest.approx(1.0, abs=1e-12) and len(near) == 5
            assert all(i < vocab for i, _ in near) and len({i for i, _ in near}) == 5
            assert [c for _, c in near] == sorted((c for _, c in near), reverse=True)
    table_VxD = embeddings.tables(run.model_config, run.params)["embed"]
    best = embeddings.analogy(table_VxD, 5, 6, 7, k=3, vocab_size=vocab)
    assert len(best) == 3 and not {5, 6, 7} & {i for i, _ in best}


def test_analogy_finds_the_known_answer_of_a_hand_made_table():
    # king - man + woman = queen exactly; "crown" is near king, "girl" near woman, "lad" near man.
    words = ["king", "man", "woman", "queen", "crown", "girl", "lad", "padding"]
    table_VxD = np.asarray([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 1, 0],
                            [1, 0.9, 0, 0.2], [0, 0, 1, 0.3], [1, 0, 0, 0.3], [0, 1, 1, 0]], np.float32)
    best = embeddings.analogy(table_VxD, words.index("king"), words.index("man"), words.index("woman"), k=3, vocab_size=7)
    assert best[0][0] == words.index("queen") and best[0][1] == pytest.approx(1.0)
    assert words.index("padding") not in {i for i, _ in best}  # its row equals queen's, but it is not a token
    # a - b + c lands on c's own row when a == b; c is left out, so its nearest other row answers
    best = embeddings.analogy(table_VxD, 0, 0, words.index("woman"), k=1, vocab_size=7)
    assert best[0][0] == words.index("girl")
    # neighbours rank the token itself, not put it first by construction: queen's identical row ties
    # with padding's own and, the lower id, comes first
    near = embeddings.neighbours(table_VxD, words.index("padding"), k=3, vocab_size=8)
    assert [i for i, _ in near] == [words.index("queen"), words.index("padding"), words.index("woman")]


def test_attention_only_models_trace_without_mlp_and_refuse_neuron_ablation():
    cfg, params = tiny_model(F=0)
    tokens_BxL = jax.random.randint(jax.random.key(3), (2, 32), 0, 64)
    logits_BxLxV, cache = trace_lib.trace(cfg, params, tokens_BxL)
    assert sorted(cache) == sorted(all_names(cfg)) and not [n for n in cache if "mlp" in n]
    for i in range(cfg.N):  # residual = x + attention, nothing after it
        np.testing.assert_array_equal(cache[f"block_{i}/resid_post_BxLxD"], cache[f"block_{i}/resid_mid_BxLxD"])
    heads = intervene.ablation(cfg, {"block_1/heads": [0]}, intervene.means(cfg, params, tokens_BxL))
    assert not np.allclose(trace_lib.trace(cfg, params, tokens_BxL, names=[], interventions=heads)[0], logits_BxLxV)
    with pytest.raises(InspectError, match="attention-only"):
        intervene.ablation(cfg, {"block_0/neurons": [1]})
    with pytest.raises(InspectError, match="attention-only"):
        neurons.check_neuron(cfg, 0, 0)
    with pytest.raises(InspectError, match="mlp_hidden"):
        trace_lib.trace(cfg, params, tokens_BxL, names="block_0/mlp_hidden_BxLxF")


def test_inspect_cli_prints_a_table_then_json_and_refuses_bad_input_in_one_line(run):
    out = run_cli("inspect", "lens", f"--workdir={run.workdir}", f"--prompt={PROMPT}", "--k=3")
    assert out.returncode == 0, out.stderr
    *table, last = out.stdout.strip().splitlines()
    assert table[0].startswith("layer") and [line.split()[0] for line in table[1:]] == ["embed", "block_0", "block_1"]
    rows, expected = json.loads(last)["lens"], run.lens(PROMPT, k=3)
    assert [(r["layer"], r["top_ids"]) for r in rows] == [(r["layer"], r["top_ids"]) for r in expected]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in expected], abs=1e-6)
    token = int(run.tokenizer.encode("k")[0])
    out = run_cli("inspect", "neighbours", f"--workdir={run.workdir}", "--prompt=k", "--k=3")
    assert out.returncode == 0, out.stderr
    *table, last = out.stdout.strip().splitlines()
    listed = json.loads(last)
    for line, name in zip(table, ("embed", "unembed"), strict=True):  # untied: both tables
        near = [(i, c) for i, c in run.neighbours(token, 4, name) if i != token][:3]
        assert [n["id"] for n in listed[name]] == [i for i, _ in near]
        assert [n["cosine"] for n in listed[name]] == pytest.approx([c for _, c in near], abs=1e-6)
        assert line == f"{name}: " + "  ".join(f"{run.tokenizer.decode([i])!r} {c:.3f}" for i, c in near)
    bad = run_cli("inspect", "neighbours", f"--workdir={run.workdir}", "--prompt=two tokens")
    assert bad.returncode != 0 and bad.stdout == ""
    assert [line for line in bad.stderr.splitlines() if line.startswith("error:")] == [
        "error: --prompt must be one token for neighbours, and 'two tokens' is 10"]


def test_top_contexts_are_the_true_maxima_in_order_and_mark_their_token(run):
    layer, neuron = 1, 7
    # brute force: every position of the same batches, traced whole
    everything, rows = [], []
    for i, batch in enumerate(_batches(run, 4)):
        if i == 3:
            break
        _, cache = run.trace(batch["inputs"], names=f"block_{layer}/mlp_hidden_BxLxF")
        act_BxL = cache[f"block_{layer}/mlp_hidden_BxLxF"][..., neuron]
        for r, p in zip(*np.nonzero(batch["weights"] > 0)):
            everything.append((float(act_BxL[r, p]), len(rows) + int(r), int(p)))
        rows.extend(batch["inputs"])
    ranked = sorted(everything, key=lambda e: (-e[0], e[1], e[2]))
    decode = run.tokenizer.decode
    for k in (6, 150):  # 150: more than one batch holds (4 x 32), so the running top-k must merge across batches
        contexts = run.top_contexts(layer, neuron, k=k, max_batches=3, batch_size=4)
        assert [c["activation"] for c in contexts] == pytest.approx([e[0] for e in ranked[:k]], abs=1e-5)
        at = {(r, p): a for a, r, p in everything}
        assert all(c["activation"] == pytest.approx(at[c["row"], c["position"]], abs=1e-5) for c in contexts)
        if k == 6:  # deep in the ranking, near-ties could swap under float rounding
            assert [(c["row"], c["position"]) for c in contexts] == [(e[1], e[2]) for e in ranked[:k]]
        assert [c["activation"] for c in contexts] == sorted((c["activation"] for c in contexts), reverse=True)
        for c in contexts:
            inputs_L = rows[c["row"]]
            assert c["token"] == decode([int(inputs_L[c["position"]])])
            assert c["before"] == decode([int(t) for t in inputs_L[max(0, c["position"] - 40) : c["position"]]])
            assert f"{c['before']}«{c['token']}»" in c["text"]
    with pytest.raises(InspectError):
        run.top_contexts(run.model_config.N, 0)
    with pytest.raises(InspectError):
        run.top_contexts(0, run.model_config.F)


def test_inspect_neurons_cli_lists_the_top_contexts_and_refuses_bad_units_in_one_line(run):
    out = run_cli("inspect", "neurons", f"--workdir={run.workdir}", "--layer=0", "--neuron=3", "--k=3")
    assert out.returncode == 0, out.stderr
    *table, last = out.stdout.strip().splitlines()
    assert len(table) == 4 and table[0].startswith("block_0 neuron 3")
    listed, expected = json.loads(last)["contexts"], run.top_contexts(0, 3, k=3)
    assert [c["text"] for c in listed] == [c["text"] for c in expected]
    assert [c["activation"] for c in listed] == pytest.approx([c["activation"] for c in expected], abs=1e-5)
    F = run.model_config.F
    refusals = [(["--layer=0", f"--neuron={F}"], f"error: neuron must lie in 0..{F - 1} (the MLP's hidden width), not {F}"),
                (["--neuron=1"], "error: inspect neurons needs --layer"),
                (["--layer=0", "--neuron=1", "--out=x"], "error: --out draws lens, attention, heads, patch, attribute; inspect neurons has no plot")]
    for flags_, message in refusals:
        bad = run_cli("inspect", "neurons", f"--workdir={run.workdir}", *flags_)
        assert bad.returncode != 0 and bad.stdout == ""
        assert [line for line in bad.stderr.splitlines() if line.startswith("error:")] == [message]


@pytest.mark.parametrize("kind", ["lens", "attention", "heads", "attribute"])
def test_inspect_out_writes_a_readable_png_and_lists_it(run, kind, tmp_path):
    from matplotlib import image

    out = run_cli("inspect", kind, f"--workdir={run.workdir}", f"--prompt={PROMPT}", f"--out={tmp_path / 'plots'}")
    assert out.returncode == 0, out.stderr
    *table, last = out.stdout.strip().splitlines()
    if kind != "lens":  # the lens table is checked above
        _check_table(kind, run, table, json.loads(last))
    plots = json.loads(last)["plots"]
    assert plots == [str(tmp_path / "plots" / f"{kind}.png")]
    pixels_HxWxC = image.imread(plots[0])
    assert pixels_HxWxC.shape[0] > 100 and pixels_HxWxC.shape[1] > 100
    assert pixels_HxWxC[..., :3].std() > 0  # something is drawn, not a blank canvas


def _check_table(kind: str, run, table: list[str], result: dict) -> None:
    """inspect attention / heads printed what the library computes in this process."""
    cfg = run.model_config
    if kind == "attention":
        assert table[0] == "where the last token ('.') attends, per layer and head"
        _, cache = run.trace(PROMPT, names="block_*/attn_probs_BxHxLxS")
        assert len(table[1:]) == len(result["attention"]) == cfg.N * cfg.H
        for line, row in zip(table[1:], result["attention"]):
            assert line.split()[:3] == [row["layer"], "head", str(row["head"])]
            printed = re.findall(r"(\d+):('(?:[^'\\]|\\.)*'|\"[^\"]*\") (\d\.\d\d)", line)
            assert [int(i) for i, _, _ in printed] == row["positions"] and len(printed) == 5
            assert [text for _, text, _ in printed] == [repr(PROMPT[i]) for i in row["positions"]]
            probs_S = cache[f"{row['layer']}/attn_probs_BxHxLxS"][0, row["head"], -1]
            # the listed positions are the k most attended (in an order that near-ties may swap)
            assert sorted(probs_S[row["positions"]]) == pytest.approx(sorted(probs_S)[-5:], abs=1e-6)
            assert [float(p) for _, _, p in printed] == pytest.approx(probs_S[row["positions"]], abs=0.0051)
    elif kind == "attribute":
        expected = run.attribute(PROMPT)
        assert table[0].startswith(f"direct logit attribution of {expected['text']!r}")
        assert np.asarray(result["heads"]) == pytest.approx(np.asarray(expected["heads"]), abs=1e-5)
        printed_NxC = [[float(c) for c in line.split()[1:]] for line in table[2:]]
        assert np.asarray(printed_NxC) == pytest.approx(np.concatenate([expected["heads"], np.asarray(expected["mlps"])[:, None]], 1), abs=5.1e-5)
    else:
        assert table[0] == "prompt loss change when one head is zero-ablated" and result["ablation"] == "zero"
        assert table[1].split() == [w for h in range(cfg.H) for w in ("head", str(h))]
        assert [line.split()[0] for line in table[2:]] == [f"block_{i}" for i in range(cfg.N)]
        printed_NxH = [[float(c) for c in line.split()[1:]] for line in table[2:]]
        change_NxH = result["head_ablation_loss_change"]
        assert np.asarray(printed_NxH) == pytest.approx(np.asarray(change_NxH), abs=5.1e-5)
        expected = run.intervention_effect(PROMPT, ablate={"block_1/heads": [2]})
        assert change_NxH[1][2] == pytest.approx(expected["loss_change"], abs=1e-6) and expected["loss_change"] != 0


@pytest.fixture(scope="module")
def packed_runs(tmp_path_factory):
    """Two tiny runs on many short documents packed with packing='documents' (so rows hold several
    documents, each numbered from 0), one with learned and one with sinusoidal positions."""
    root = tmp_path_factory.mktemp("packed")
    rng = np.random.default_rng(0)
    for i in range(60):
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(["the", "king", "sweet", "love", "hath"], rng.integers(8, 30))) + "\n")
    runs = {}
    for pos in ("learned", "sinusoidal"):
        cfg = tiny_config(root / "doc00.txt", num_train_steps=2, checkpoint_every_steps=2, model__pos_encoding=pos, data__packing="documents")
        cfg.data.dataset = f"text:{root}/doc*.txt"
        train_run(cfg, str(root / pos), quiet=True)
        runs[pos] = llm.load(str(root / pos))
    return runs


@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
def test_trace_of_packed_documents_reproduces_the_eval_steps_logits(packed_runs, pos):
    run = packed_runs[pos]
    batch = next(iter(run._eval_batches("validation", 4)))
    assert (batch["positions"] != np.arange(batch["inputs"].shape[1])).any()  # rows hold several documents
    eval_logits = np.asarray(jax.jit(lambda p, b: model.forward(run.model_config, p, b))(run.params, batch))[..., : run.tokenizer.vocab_size]
    real = batch["weights"] > 0
    logits, _ = run.trace(batch["inputs"], names=[], segment_ids=batch["segment_ids"])
    np.testing.assert_allclose(logits[real], eval_logits[real], atol=1e-5)
    # positions 0..L-1 (what trace used before) give other logits: the check above can fail
    wrong, _ = run.trace(batch["inputs"], names=[], segment_ids=batch["segment_ids"], positions=np.arange(batch["inputs"].shape[1]))
    assert np.abs(wrong[real] - eval_logits[real]).max() > 1e-3
    losses = run.lens_split("validation", max_batches=2, batch_size=4)
    result = evaluate_lib.evaluate(jax.jit(evaluate_lib.make_eval_step(run.model_config)), run.params, run._eval_batches("validation", 4),
                                   run.tokenizer.token_bytes(), lambda b: {k: jnp.asarray(v) for k, v in b.items()}, max_batches=2)
    assert losses["block_1"] == pytest.approx(result["loss"], abs=1e-5)


def _induction_prompts(T: int = 8):
    """The hand-set induction model, a prompt ending one token into... the repeat's last token but one,
    and its corruption: the token before the answer's source in the first copy replaced."""
    cfg, params = _induction_model(T)
    tokens = induction.repeated_tokens(seed=0, batch=1, half=T, low=0, high=16)
    clean_1xL = tokens[:, :-1]  # the last token's answer is tokens[0, -1], whose source is position T - 1
    corrupted_1xL = clean_1xL.copy()
    corrupted_1xL[0, T - 2] = next(t for t in range(16) if t not in tokens[0])
    return cfg, params, clean_1xL, corrupted_1xL, patching.Metric(int(tokens[0, -1]))


def test_patching_with_its_own_activations_changes_nothing_and_a_whole_layer_is_the_other_run():
    cfg, params, clean_1xL, corrupted_1xL, metric = _induction_prompts()
    same = patching.patch(cfg, params, corrupted_1xL, corrupted_1xL, metric, patching.parse_site(cfg, "k"), "positions")
    assert np.all(np.asarray(same["patched"]) == same["corrupted"])
    # every position of a layer's input from the clean run: from that layer on it is the clean run
    whole = patching.patch(cfg, params, clean_1xL, corrupted_1xL, metric, patching.parse_site(cfg, "resid_pre"), "layers")
    np.testing.assert_allclose(whole["patched"], [[whole["clean"]]] * cfg.N, atol=1e-5)
    assert whole["corrupted"] - whole["clean"] > 5  # the corruption breaks the copy


def test_the_hand_set_induction_models_heads_are_found_by_patching():
    cfg, params, clean_1xL, corrupted_1xL, metric = _induction_prompts()
    heads = patching.patch(cfg, params, clean_1xL, corrupted_1xL, metric, patching.parse_site(cfg, "head_out"), "heads")
    assert np.asarray(heads["restored"]).min() > 0.9  # each layer's one head carries the circuit
    positions = patching.patch(cfg, params, clean_1xL, corrupted_1xL, metric, patching.parse_site(cfg, "block_0/resid_pre"), "positions")
    T = clean_1xL.shape[1] // 2 + 1
    assert np.argmax(positions["restored"][0]) == T - 2  # only the corrupted position matters at the embedding
    via = {v: patching.path_patch(cfg, params, clean_1xL, corrupted_1xL, metric, (0, 0), (1, 0), v)["restored"] for v in "qkv"}
    assert via["k"] > 0.9 and abs(via["q"]) < 0.05 and abs(via["v"]) < 0.05, via  # the previous-token head feeds the keys


def test_attribution_patching_equals_real_patching_where_the_metric_is_linear_in_the_activation():
    # attention only, and a final norm whose huge epsilon makes it a fixed scale: from the last layer's
    # head outputs to a logit difference everything is linear, so the first-order estimate is exact
    cfg, params = tiny_model(F=0, norm_eps=1e8)
    block_1 = {**params["block_1"], "attn": {**params["block_1"]["attn"], "wo": params["block_1"]["attn"]["wo"] * 1e5}}
    params = {**params, "block_1": block_1, "final_norm": {"scale": params["final_norm"]["scale"] * 1e6}}  # logits of order 1
    tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, 64)
    clean_1xL, corrupted_1xL = np.asarray(tokens[:1]), np.asarray(tokens[1:])
    metric = patching.Metric(3, against=7)
    for what in ("heads", "positions"):
        site = patching.parse_site(cfg, "block_1/head_out")
        real = patching.patch(cfg, params, clean_1xL, corrupted_1xL, metric, site, what)
        estimate = attribution.attribution_patch(cfg, params, clean_1xL, corrupted_1xL, metric, site, what)["estimate"]
        effect = np.asarray(real["patched"]) - real["corrupted"]
        assert np.abs(effect).max() > 1e-4
        np.testing.assert_allclose(estimate, effect, rtol=1e-3, atol=1e-3 * np.abs(effect).max(), err_msg=what)


def test_direct_logit_attributions_sum_to_the_logit_less_the_embedding_and_bias(run):
    tokens_1xL = run.tokens_BxL(PROMPT)[:1]
    for cfg, params in ((run.model_config, run.params), tiny_model(norm="layernorm")):
        token = 11
        d = attribution.direct_logit_attribution(cfg, params, tokens_1xL % cfg.V, token)
        assert len(d["heads"]) == len(d["mlps"]) == cfg.N and len(d["heads"][0]) == cfg.H
        assert np.sum(d["heads"]) + np.sum(d["mlps"]) == pytest.approx(d["logit"] - d["embed"] - d["bias"], abs=1e-4)
        assert np.abs(d["heads"]).max() > 1e-3
    assert run.attribute(PROMPT)["token"] == int(np.argmax(run.logits(run.encode_prompt(PROMPT))[-1]))


def test_composition_scores_find_the_hand_set_key_composition():
    cfg, params = _induction_model(8)
    scores = attribution.composition_scores(cfg, params)
    assert scores["k"][0][0] > 0.2 and scores["q"][0][0] < 1e-6 and scores["v"][0][0] < 1e-6, scores


def test_resample_ablation_is_the_mean_of_patching_each_held_out_row(run):
    tokens = run.tokens_BxL(PROMPT)
    values = run.ablation_values("resample", tokens.shape[1], rows=4)
    name = "block_1/head_out_BxLxHxK"
    effect = run.intervention_effect(PROMPT, ablate={"block_1/heads": [2]}, values=values)
    each = []
    for row in values[name]:
        patched = np.array(run.trace(PROMPT, names=[name])[1][name])
        patched[0, :, 2] = row[:, 2]
        each.append(run.intervention_effect(PROMPT, patch={name: patched})["loss"])
    assert effect["loss"] == pytest.approx(np.mean(each), abs=1e-5) and effect["loss_change"] != 0


def test_inspect_patch_cli_prints_json_and_a_heatmap_and_refuses_a_bad_site_in_one_line(run, tmp_path):
    clean, corrupted = "The king hath thou sweet", "The lord hath thou sweet"
    out = run_cli("inspect", "patch", f"--workdir={run.workdir}", f"--clean={clean}", f"--corrupted={corrupted}", "--what=heads",
                  "--token=e", f"--out={tmp_path}")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    expected = run.patch(clean, corrupted, what="heads", token="e")
    assert np.asarray(result["patched"]) == pytest.approx(np.asarray(expected["patched"]), abs=1e-5)
    assert np.asarray(result["attribution"]).shape == (run.model_config.N, run.model_config.H)
    assert result["plots"] == [str(tmp_path / "patch_heads.png")]
    path = run_cli("inspect", "patch", f"--workdir={run.workdir}", f"--clean={clean}", f"--corrupted={corrupted}", "--token=e",
                   "--sender=block_0:1", "--receiver=block_1:0", "--via=k")
    assert path.returncode == 0, path.stderr
    expected = run.path_patch(clean, corrupted, (0, 1), (1, 0), "k", token="e")
    assert json.loads(path.stdout.strip().splitlines()[-1])["patched"] == pytest.approx(expected["patched"], abs=1e-5)
    mean = run_cli("inspect", "heads", f"--workdir={run.workdir}", f"--prompt={clean}", "--ablation=mean")
    assert mean.returncode == 0, mean.stderr
    *table, last = mean.stdout.strip().splitlines()
    values = run.ablation_values("mean", len(run.tokenizer.encode(clean)))
    by_mean = run.intervention_effect(clean, ablate={"block_1/heads": [0]}, values=values)["loss_change"]
    assert table[0] == "prompt loss change when one head is mean-ablated" and json.loads(last)["ablation"] == "mean"
    assert json.loads(last)["head_ablation_loss_change"][1][0] == pytest.approx(by_mean, abs=1e-6)
    H = run.model_config.H
    bad = run_cli("inspect", "patch", f"--workdir={run.workdir}", f"--clean={clean}", f"--corrupted={corrupted}", f"--at=block_1/head_out:{H}")
    assert bad.returncode != 0 and bad.stdout == ""
    assert [line for line in bad.stderr.splitlines() if line.startswith("error:")] == [
        f"error: --at='block_1/head_out:{H}': the head must lie in 0..{H - 1}"]
    for at, message in (("block_0/attention", "is not [block_I/]LEAF[:HEAD]"), ("block_2/resid_pre", "the layer must lie in 0..1"),
                        ("resid_pre:1", "resid_pre has no heads to pick")):
        with pytest.raises(InspectError, match=re.escape(message)):
            run.patch(clean, corrupted, at=at)
