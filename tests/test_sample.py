"""The sampler: cached decoding is exact, every strategy draws from the distribution it promises,
and bad input fails with one clear message."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config, train_run, write_corpus
from scipy import stats

import llm
from llm import model
from llm.data import tokenizer as tokenizer_lib
from llm.model import ModelConfig, sample
from llm.model.attention import KVCache
from llm.training import checkpoint

V, VOCAB_LIMIT, EOS = 24, 21, 2  # the last 3 ids stand in for vocabulary padding


@functools.lru_cache(maxsize=None)
def tiny_model(pos_encoding: str = "rope", scan_layers: bool = False, L: int = 48, remat: str = "none"):
    cfg = ModelConfig(V=V, D=32, F=64, N=2, H=4, G=2, L=L, pos_encoding=pos_encoding, scan_layers=scan_layers, remat=remat)
    params = nn.unbox(jax.jit(functools.partial(model.init, cfg))(jax.random.key(0)))
    # The 0.02 init gives near-uniform logits; larger weights give peaked, varied distributions to test.
    params = jax.tree.map(lambda p: 3.0 * p, params)
    return cfg, params


def random_prompts(lengths, seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB_LIMIT, n).tolist() for n in lengths]


@functools.lru_cache(maxsize=None)
def forward(cfg: ModelConfig):
    return jax.jit(lambda params, tokens_BxL: model.apply(cfg, params, tokens_BxL)[0])


def full_logits(cfg, params, rows: list[list[int]]) -> list[np.ndarray]:
    """Each row's [len(row), V] logits from a full forward pass: no cache, no left padding."""
    # Right-padded to the context so one compiled forward serves every length: attention is causal,
    # so what follows a position cannot change its logits.
    padded_BxL = np.zeros((len(rows), cfg.L), np.int32)
    for b, row in enumerate(rows):
        padded_BxL[b, : len(row)] = row
    logits_BxLxV = np.asarray(forward(cfg)(params, jnp.asarray(padded_BxL)))
    return [logits_BxLxV[b, : len(row)] for b, row in enumerate(rows)]


# One batch shape for the sampler tests below, so they share one compiled sampler.
PROMPTS = random_prompts([1, 3, 5, 7, 9, 11, 13, 16] * 2, seed=2)
NEW = 10


@pytest.mark.parametrize(
    "pos_encoding,scan_layers,remat",
    [("rope", False, "none"), ("rope", True, "none"), ("learned", False, "none"), ("rope", False, "block"), ("rope", True, "dots")],
)
def test_cached_decoding_matches_full_forward(pos_encoding, scan_layers, remat):
    cfg, params = tiny_model(pos_encoding, scan_layers, remat=remat)
    num_new = 6
    prompts = random_prompts([5, 1, 9])
    continuations = random_prompts([num_new] * 3, seed=1)
    tokens_BxP, start_B = sample.left_pad(prompts, pad_id=0)
    B, P = tokens_BxP.shape
    cache = KVCache.zeros(cfg.N, B, P + num_new, cfg.G, cfg.K, jnp.float32, jnp.asarray(start_B))
    apply = jax.jit(functools.partial(model.apply, cfg))
    prefill_BxPxV, cache = apply(params, jnp.asarray(tokens_BxP), cache=cache)
    decoded = []
    for t in range(num_new):
        logits_Bx1xV, cache = apply(params, jnp.asarray([[c[t]] for c in continuations]), cache=cache)
        decoded.append(np.asarray(logits_Bx1xV[:, 0]))
    for b in range(B):
        (expected_LxV,) = full_logits(cfg, params, [prompts[b] + continuations[b]])
        cached_LxV = np.concatenate([np.asarray(prefill_BxPxV[b, start_B[b] :])] + [d[b : b + 1] for d in decoded])
        np.testing.assert_allclose(cached_LxV, expected_LxV, atol=1e-5, rtol=0)
    assert np.std(expected_LxV) > 0.5  # logits of a real spread, so 1e-5 is a tight bound


def test_prefill_with_last_only_gives_the_last_positions_logits_and_the_same_cache():
    cfg, params = tiny_model()
    tokens_BxP, start_B = sample.left_pad(random_prompts([5, 1, 9]), pad_id=0)
    B, P = tokens_BxP.shape
    cache = KVCache.zeros(cfg.N, B, P + 2, cfg.G, cfg.K, jnp.float32, jnp.asarray(start_B))
    all_BxPxV, all_cache = model.apply(cfg, params, jnp.asarray(tokens_BxP), cache=cache)
    last_Bx1xV, last_cache = model.apply(cfg, params, jnp.asarray(tokens_BxP), cache=cache, last_only=True)
    assert last_Bx1xV.shape == (B, 1, cfg.V)
    np.testing.assert_allclose(last_Bx1xV, all_BxPxV[:, -1:], atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, last_cache, all_cache)


def test_greedy_equals_stepwise_argmax_of_full_forward():
    cfg, params = tiny_model()
    outputs = sample.generate(cfg, params, PROMPTS, max_new_tokens=NEW, eos_id=EOS, pad_id=0,
                              vocab_limit=VOCAB_LIMIT, temperature=0.0)
    expected = [[] for _ in PROMPTS]
    for _ in range(NEW):
        rows = [p + e for p, e in zip(PROMPTS, expected)]
        for new, logits_LxV in zip(expected, full_logits(cfg, params, rows)):
            if EOS not in new:
                new.append(int(np.argmax(logits_LxV[-1, :VOCAB_LIMIT])))
    assert outputs == expected


def allowed_tokens(logits_V: np.ndarray, top_k: int, top_p: float) -> set[int]:
    """The tokens top-k then top-p may emit, from first principles in float64."""
    order = np.argsort(-logits_V.astype(np.float64))
    if top_k:
        order = order[:top_k]
    probs = np.exp(logits_V[order] - logits_V[order].max())
    probs /= probs.sum()
    # The smallest prefix of the sorted tokens whose mass reaches top_p.
    size = int(np.searchsorted(np.cumsum(probs), top_p) + 1) if top_p < 1 else len(order)
    return set(order[:size].tolist())


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.6), (5, 0.8)])
def test_truncated_sampling_never_leaves_the_allowed_set(top_k, top_p):
    cfg, params = tiny_model()
    emitted_ranks = []
    for seed in range(4):
        outputs = sample.generate(cfg, params, PROMPTS, max_new_tokens=NEW, eos_id=-1, pad_id=0,
                                  vocab_limit=VOCAB_LIMIT, temperature=2.0, top_k=top_k, top_p=top_p, seed=seed)
        rows = [p + o for p, o in zip(PROMPTS, outputs)]
        for prompt, row, logits_LxV in zip(PROMPTS, rows, full_logits(cfg, params, rows)):
            for t in range(len(prompt), len(row)):
                logits_V = logits_LxV[t - 1, :VOCAB_LIMIT]
                assert row[t] in allowed_tokens(logits_V, top_k, top_p)
                emitted_ranks.append(int(np.sum(logits_V > logits_V[row[t]])))
    # Not vacuous: at temperature 2 the sampler does use more than the single most likely token.
    assert max(emitted_ranks) >= 1


def first_token_counts(temperature: float, num_seeds: int = 40, rows: int = 500):
    """How often each token is sampled first after one prompt, over num_seeds x rows draws."""
    cfg, params = tiny_model()
    prompt = random_prompts([5], seed=3)[0]
    tokens_BxP = jnp.asarray([prompt] * rows, jnp.int32)
    start_B = jnp.zeros((rows,), jnp.int32)
    counts = np.zeros(VOCAB_LIMIT, np.int64)
    for seed in range(num_seeds):
        out_BxM, _ = sample.generate_tokens(
            params, tokens_BxP, start_B, jax.random.key(seed), jnp.float32(temperature), jnp.float32(1.0),
            jnp.int32(-1), jnp.int32(VOCAB_LIMIT), cfg=cfg, max_new_tokens=1,
        )
        counts += np.bincount(np.asarray(out_BxM[:, 0]), minlength=VOCAB_LIMIT)[:VOCAB_LIMIT]
    logits_V = full_logits(cfg, params, [prompt])[0][-1, :VOCAB_LIMIT].astype(np.float64)
    return counts, logits_V


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_temperature_one_samples_match_softmax():
    counts, logits_V = first_token_counts(1.0)
    expected = softmax(logits_V) * counts.sum()
    assert expected.min() > 5  # the chi-square approximation holds
    assert stats.chisquare(counts, expected).pvalue > 1e-3


def test_chi_square_detects_a_wrong_temperature():
    counts, logits_V = first_token_counts(1.3)
    # Draws at 1.3 fit softmax(logits / 1.3) but are decisively rejected as draws at 1.0.
    assert stats.chisquare(counts, softmax(logits_V / 1.3) * counts.sum()).pvalue > 1e-3
    assert stats.chisquare(counts, softmax(logits_V) * counts.sum()).pvalue < 1e-9


def test_same_seed_same_samples_other_seed_other_samples():
    cfg, params = tiny_model()
    run = functools.partial(sample.generate, cfg, params, PROMPTS, max_new_tokens=NEW, eos_id=-1, pad_id=0,
                            vocab_limit=VOCAB_LIMIT, temperature=1.0, top_p=0.95)
    assert run(seed=7) == run(seed=7)
    assert run(seed=7) != run(seed=8)


def test_rows_stop_at_eos_and_loop_stops_when_all_rows_are_done():
    cfg, params = tiny_model()

    def greedy(prompts, eos_id):
        tokens_BxP, start_B = sample.left_pad(prompts, pad_id=0, width=16)  # one shape: one compile
        out_BxM, steps = sample.generate_tokens(
            params, jnp.asarray(tokens_BxP), jnp.asarray(start_B), jax.random.key(0), jnp.float32(0.0),
            jnp.float32(1.0), jnp.int32(eos_id), jnp.int32(VOCAB_LIMIT), cfg=cfg, max_new_tokens=NEW,
        )
        return np.asarray(out_BxM), int(steps)

    never_BxM, steps = greedy(PROMPTS, eos_id=-1)
    assert steps == NEW
    eos = int(never_BxM[0, 2])  # row 0 certainly emits it, within 3 tokens
    stops_B = [row.tolist().index(eos) if eos in row else None for row in never_BxM]
    assert None in stops_B, "pick a test where some row never emits eos"

    out_BxM, steps = greedy(PROMPTS, eos)
    for row, never, stop in zip(out_BxM, never_BxM, stops_B):
        if stop is None:
            np.testing.assert_array_equal(row, never)
        else:
            np.testing.assert_array_equal(row[: stop + 1], never[: stop + 1])  # identical up to its eos
            assert (row[stop:] == eos).all()  # then nothing but eos
    assert steps == NEW

    # When every row reaches eos early, the loop ends right after the last of them.
    out_BxM, steps = greedy([PROMPTS[0]] * len(PROMPTS), eos)
    assert steps == stops_B[0] + 1 < NEW
    assert (out_BxM[:, stops_B[0] :] == eos).all()


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(temperature=-0.5), r"temperature must be >= 0"),
        (dict(top_k=-1), r"top_k must be >= 0"),
        (dict(max_new_tokens=0), r"max_new_tokens must be >= 1"),
    ],
)
def test_bad_options_are_rejected_with_a_clear_message(options, message):
    full = dict(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=10) | options
    with pytest.raises(sample.SampleError, match=message):
        sample.check_options(**full)


def test_prompt_longer_than_context_is_rejected():
    cfg, params = tiny_model()
    with pytest.raises(sample.SampleError, match=r"prompt is 60 tokens long, but the model's context is 48"):
        sample.generate(cfg, params, random_prompts([60]), max_new_tokens=1, eos_id=EOS, pad_id=0, vocab_limit=VOCAB_LIMIT)
    with pytest.raises(sample.SampleError, match=r"exceeds the model's context of 48 tokens; ask for at most 8"):
        sample.generate(cfg, params, random_prompts([40]), max_new_tokens=20, eos_id=EOS, pad_id=0, vocab_limit=VOCAB_LIMIT)


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    """A char-level run trained for 2 steps: just enough for a checkpoint, a tokenizer and a config."""
    root = tmp_path_factory.mktemp("char_run")
    cfg = tiny_config(write_corpus(root / "corpus.txt", num_chars=3000), num_train_steps=2, checkpoint_every_steps=2)
    train_run(cfg, str(root / "run"), quiet=True)
    return llm.load(str(root / "run"))


def test_unencodable_prompt_names_the_characters(char_run):
    with pytest.raises(tokenizer_lib.TokenizerError, match=r"cannot encode 'Zé'"):
        char_run.generate("Zé the king", max_new_tokens=3)


def test_api_prompt_longer_than_context_is_rejected(char_run):
    with pytest.raises(sample.SampleError, match=r"prompt is 45 tokens long, but the model's context is 32"):
        char_run.generate("the king " * 5, max_new_tokens=3)


def test_api_cuts_max_new_tokens_to_the_context(char_run):
    with pytest.warns(UserWarning, match="generating 24 tokens"):
        (text,) = char_run.generate("the king", max_new_tokens=100, temperature=0.0)
    assert len(text) <= 24


def test_streamed_text_equals_returned_text(char_run):
    pieces = []
    (text,) = char_run.generate("the king", max_new_tokens=12, seed=3, stream=pieces.append)
    assert "".join(pieces) == text and len(pieces) > 1
    assert char_run.generate(["the king"], max_new_tokens=12, seed=3) == [text]


def test_workdir_without_checkpoint_is_rejected(char_run, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        llm.load(str(tmp_path / "missing"))
    with pytest.raises(checkpoint.CheckpointError, match=r"no config.json"):
        llm.load(str(tmp_path))
    # A run directory whose training never reached a checkpoint.
    for name in ("config.json", tokenizer_lib.FILENAME):
        (tmp_path / name).write_text(open(os.path.join(char_run.workdir, name)).read())
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoints/ directory: nothing to load"):
        llm.load(str(tmp_path))
