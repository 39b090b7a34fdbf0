"""The run spec: one conversion of a config, one rule for the vocabulary that every stage uses, and
imports that point one way (the package layout the README's map shows)."""

import ast
import json
import pathlib

import ml_collections
import pytest
from conftest import REPO, tiny_config, train_run, write_corpus

import llm
from llm import bench, spec
from llm.data import tokenizer as tokenizer_lib
from llm.scaling import points as points_lib

BYTE_IDS = tokenizer_lib.NUM_SPECIAL + 256


def _runs(root: pathlib.Path) -> dict[str, ml_collections.ConfigDict]:
    """A plain, a span-corruption and a chat (SFT) run on bytes, each with vocab_multiple=1 so that every
    id a run reserves shows in its vocabulary size."""
    corpus = write_corpus(root / "corpus.txt", num_chars=8000)
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"{a}+{a}", "response": str(2 * a)}) + "\n" for a in range(200)))
    common = dict(data__tokenizer="byte", model__vocab_multiple=1, num_train_steps=1, checkpoint_every_steps=1)
    return {
        "plain": tiny_config(corpus, **common),
        "span_corruption": tiny_config(corpus, model__arch="encoder_decoder", **common),
        "chat": tiny_config(corpus, data__dataset=f"sft:{sft}", **common),
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    configs = _runs(root)
    for name, cfg in configs.items():
        train_run(cfg, root / name, quiet=True)
    return root, configs


def _expected(name: str, cfg: ml_collections.ConfigDict) -> int:
    if name == "plain":
        return BYTE_IDS
    if name == "chat":
        return BYTE_IDS + 4  # <|system|> <|user|> <|assistant|> <|end|>
    return BYTE_IDS + spec.span_lengths(cfg.seq_len, cfg.data.noise_density, cfg.data.mean_noise_span_length)[2]


@pytest.mark.parametrize("name", ["plain", "span_corruption", "chat"])
def test_train_bench_sweep_api_and_hf_agree_on_the_vocabulary(trained, name, tmp_path):
    root, configs = trained
    cfg, expected = configs[name], _expected(name, configs[name])
    run = llm.load(str(root / name))
    # train: the embedding it built and saved; api: the model it loads.
    assert run.params["embed"].shape[0] == expected
    assert run.model_config.V == run.spec.vocab.size == expected
    # bench: its synthetic batch has no tokenizer, only the tokenizer's size.
    assert bench.bench_train(cfg, steps=1, peak_tflops=1.0)["vocab_size"] == expected
    # sweep: a point's params and FLOPs are counted with the vocabulary the point trains.
    assert points_lib._model_config(cfg).V == expected
    if name != "span_corruption":  # hf: an encoder-decoder is not a Llama model
        from llm.interop import hf

        hf.export(str(root / name), str(tmp_path / "hf"))
        assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == expected


def test_a_model_vocab_size_too_small_for_the_reserved_ids_is_one_config_error(tmp_path):
    cfg = _runs(tmp_path)["chat"]
    cfg.model.vocab_size = BYTE_IDS + 2
    with pytest.raises(spec.ConfigError, match="leaves no room for the 4 ids this run reserves after the tokenizer's 259"):
        spec.resolve(spec.from_config(cfg), BYTE_IDS)
    cfg.model.vocab_size = BYTE_IDS - 1
    with pytest.raises(spec.ConfigError, match="is smaller than the tokenizer's 259 ids"):
        spec.resolve(spec.from_config(cfg), BYTE_IDS)


def test_a_grown_vocabulary_is_recorded_in_the_saved_config_and_a_plain_one_is_not(trained):
    root, _ = trained
    saved = {name: json.loads((root / name / "config.json").read_text())["model"]["vocab_size"] for name in ("plain", "chat")}
    assert saved == {"plain": 0, "chat": BYTE_IDS + 4}


def test_the_spec_is_frozen_and_reads_back_what_the_config_says(tmp_path):
    cfg = tiny_config(tmp_path / "corpus.txt", opt__warmup_steps=500, num_train_steps=20, model__num_kv_heads=1)
    run = spec.from_config(cfg)
    assert (run.model.D, run.model.H, run.model.G, run.model.V) == (32, 4, 1, 0)
    assert run.opt.warmup_steps == 20  # a short run warms up for its whole length
    assert run.saved() == json.loads(json.dumps(cfg.to_dict()))
    with pytest.raises(AttributeError):
        run.seed = 1
    assert spec.from_config(json.loads(json.dumps(cfg.to_dict()))) == run  # a saved config.json is the same spec


# Imports point one way: a stage imports only the stages below it (and its own modules). data and
# model are independent; upstream.py (process-wide workarounds) imports nothing of llm and may be
# imported by anything; the entry points (cli, launch, bench, llm.load) may import everything.
ORDER = ["data", "model", "spec", "training", "inspect", "run", "scaling", "interop"]
BELOW = {"data": set(), "model": set(), "spec": {"data", "model"}}
for i, stage in enumerate(ORDER[3:], start=3):
    BELOW[stage] = set(ORDER[:i]) - ({"scaling"} if stage == "interop" else set())
BELOW["compile"] = {"data", "model", "spec", "training"}  # compiling for a slice: an entry point's stage over training
ENTRY = {"cli", "launch", "bench", "__init__"}


def _stage(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ENTRY:
        return "entry"
    return parts[1]


def _imports(path: pathlib.Path) -> set[str]:
    """Every llm module a file imports, at any depth (a function's import counts as much as the top's)."""
    packages = {"llm", "llm.data", "llm.model", "llm.training", "llm.run", "llm.inspect", "llm.interop", "llm.scaling"}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("llm")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llm"):
            found |= {f"{node.module}.{a.name}" if node.module in packages else node.module for a in node.names}
    return found


def _modules():
    for path in sorted((REPO / "llm").rglob("*.py")):
        if "harness_tasks" not in path.parts:
            yield ".".join(path.relative_to(REPO).with_suffix("").parts), path


def test_imports_point_down_the_stages_and_never_up():
    wrong = []
    for module, path in _modules():
        here = _stage(module)
        for imported in _imports(path):
            there = _stage(imported)
            if here == "upstream" or (here != "entry" and there not in BELOW[here] | {here, "upstream"}):
                wrong.append(f"{module} ({here}) imports {imported} ({there})")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_itself_back_through_a_cycle():
    graph = {module.removesuffix(".__init__"): _imports(path) for module, path in _modules()}
    modules = set(graph)
    resolve = lambda m: m if m in modules else m.rsplit(".", 1)[0]  # `from llm.data import text` names a module
    edges = {m: {resolve(t) for t in targets if resolve(t) in modules and resolve(t) != m} for m, targets in graph.items()}
    done, path_stack, cycles = set(), [], []

    def visit(m):
        if m in path_stack:
            cycles.append(path_stack[path_stack.index(m):] + [m])
            return
        if m in done:
            return
        path_stack.append(m)
        for t in sorted(edges[m]):
            visit(t)
        path_stack.pop()
        done.add(m)

    for m in sorted(edges):
        visit(m)
    # A package's __init__ that re-exports its own modules is not a cycle of the code.
    cycles = [c for c in cycles if not any(c[i] == c[i + 1].rsplit(".", 1)[0] or c[i + 1] == c[i].rsplit(".", 1)[0]
                                           for i in range(len(c) - 1))]
    assert not cycles, cycles
