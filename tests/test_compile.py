"""Compiling for a TPU slice that is not attached: libtpu's compiler runs here, on the CPU host, on the
train step `./run.sh train` builds (small shapes: the ladder table is an experiment, not a test)."""

import dataclasses
import importlib.util
import json

import jax
import numpy as np
import pytest
from conftest import default_config, run_cli, tiny_config

from llm import bench, model, spec
from llm.compile import cost, plan, topology
from llm.data.tokenizer import size_without_corpus
from llm.training import sharding, state as state_lib

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (./run.sh setup installs jax[tpu])")

SMALL = {"model.d_model": 256, "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 4, "model.d_ff": 1024,
         "model.dtype": "bfloat16", "data.tokenizer": "byte", "batch_size": 32, "seq_len": 256}
# Too big for one v5e chip when every chip holds the whole state (1.5B params: 17 GiB of params and Adam
# moments), a few GiB per chip once FSDP shards it over 16.
BIG = {**SMALL, "model.d_model": 8192, "model.num_layers": 1, "model.num_heads": 64, "model.num_kv_heads": 64,
       "model.d_ff": 49152, "batch_size": 16}


def _compile(*flags: str, **config) -> dict:
    result = run_cli("compile", *flags, *[f"--config.{k}={v}" for k, v in config.items()], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TPU_" not in result.stderr  # libtpu's warnings about a TPU VM's variables are silenced
    return json.loads(result.stdout.strip().splitlines()[-1])


def _config(**overrides):
    return default_config(**overrides)


@pytest.fixture(scope="module")
def small():
    return _compile("--topology=v5e-8", **SMALL)


def test_a_two_layer_model_compiles_for_v5e_8_fits_and_reports_its_step(small):
    assert small["topology"] == "v5e-8" and small["chips"] == 8 and small["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert small["fits"] is True and small["hbm_capacity_gib"] == 16.0
    parts = small["hbm_per_chip_gib"]
    assert set(parts) == {"arguments", "outputs", "temporaries", "program", "total"}
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"), abs=1e-3)
    # XLA's count of the step's FLOPs is ours (6N + attention) plus the softmax, norms and optimizer.
    assert 1.0 <= small["flops_ratio"] < 1.2
    assert small["collectives"]["all-reduce"]["count"] >= 1  # data parallelism sums the gradients
    assert small["projected_step_ms"] == pytest.approx(max(small["roofline_ms"]["compute"], small["roofline_ms"]["memory"])
                                                       + small["roofline_ms"]["communication"])
    assert 0 < small["projected_mfu"] < 1 and small["compile_s"] > 0


def test_the_state_a_chip_holds_is_what_the_shapes_say(small):
    """Arguments per chip: float32 params and two Adam moments, replicated on a data-parallel mesh, and
    this chip's rows of the batch."""
    run = spec.resolve(spec.from_config(_config(**SMALL)), size_without_corpus("byte", 0), backend="tpu")
    params = model.param_counts(run.model)["total"]
    batch = 3 * 4 * run.batch_size // 8 * run.seq_len
    assert small["hbm_per_chip_gib"]["arguments"] == pytest.approx((12 * params + batch) / 2**30, rel=0.01)


def test_model_flops_per_step_are_the_benchmarks_count(small, tmp_path):
    cfg = tiny_config(tmp_path / "unread.txt", **{k.replace(".", "__"): v for k, v in SMALL.items()})
    bench_run = bench.bench_train(cfg, steps=1, peak_tflops=1.0)
    assert small["model_flops_per_step"] == bench_run["model_flops_per_token"] * SMALL["batch_size"] * SMALL["seq_len"]


def _report(name: str, costs: bool = True, **config) -> dict:
    """What `./run.sh compile --topology=name` prints, computed in this process (costs=False: without the
    copies compiled only to count FLOPs and bytes)."""
    tpu = topology.parse(name)
    run = plan.resolve(spec.from_config(_config(**config)), tpu)
    mesh = plan.mesh_of(run, topology.devices(tpu))
    return plan.report(run, tpu, mesh, plan.compile_train_step(run, mesh, costs=costs))


def test_a_model_too_big_for_a_chip_does_not_fit_and_fits_once_fsdp_spreads_it():
    refused = _report("v5e-8", **BIG)
    assert refused["fits"] is False and refused["over_gib"] > 0 and refused["largest_part"] in refused["hbm_per_chip_gib"]
    assert refused["hbm_per_chip_gib"]["arguments"] > 16  # the whole state on every chip
    assert "RESOURCE_EXHAUSTED" in refused["compiler"]
    spread = _report("v5e-16", costs=False, **BIG, **{"mesh.data": 1, "mesh.fsdp": -1})
    assert spread["fits"] is True and spread["mesh"] == {"data": 1, "fsdp": 16, "tensor": 1}
    assert spread["hbm_per_chip_gib"]["arguments"] == pytest.approx(refused["hbm_per_chip_gib"]["arguments"] / 16, rel=0.02)
    # FSDP gathers each weight where it is used and shards each gradient back.
    assert spread["collectives"]["all-gather"]["count"] >= 7  # wq, wk, wv, wo and the MLP's three


def test_a_scanned_stack_costs_what_the_unrolled_stack_costs():
    """XLA counts a while loop's body once: a scanned step's FLOPs and bytes are read from its unrolled
    copies at depth 1 and 2 and extended to its depth, so they match the unrolled step's own count; and
    its collectives, inside the layers' loop and inside FSDP's windowed einsums (loops of permutes whose
    trip counts only their conditions hold on TPU), are counted as often as they run."""
    shape = {**SMALL, "model.num_layers": 3, "mesh.data": 1, "mesh.fsdp": -1}
    tpu = topology.parse("v5e-8")
    run = plan.resolve(spec.from_config(_config(**shape, **{"model.scan_layers": True})), tpu)
    mesh = plan.mesh_of(run, topology.devices(tpu))
    scanned = plan.compile_train_step(run, mesh)
    unrolled = plan.compile_train_step(dataclasses.replace(run, model=dataclasses.replace(run.model, scan_layers=False)), mesh)
    assert scanned.costs_from == plan.COSTS_UNROLLED and unrolled.costs_from == plan.COSTS_UNWINDOWED
    # Counted without windowed einsums (whose loops XLA counts once: 0.80 of the FLOPs), XLA's count is ours
    # plus the softmax, norms and optimizer.
    model_flops = model.flops_per_token(run.model) * run.tokens_per_step
    assert 1.0 <= scanned.flops_per_chip * 8 / model_flops < 1.2
    assert scanned.flops_per_chip == pytest.approx(unrolled.flops_per_chip, rel=0.01)
    # Bytes are XLA's estimate over its fusions, which it draws differently at each depth (this step
    # unrolled at depth 1-4 reads 0.32, 0.58, 0.68, 0.95 GB), so the extension only lands near them.
    assert scanned.bytes_per_chip == pytest.approx(unrolled.bytes_per_chip, rel=0.3)
    # Each layer's gradients are scattered once per step however the stack is compiled.
    scatters = lambda c: (c.collectives["reduce-scatter"]["count"], c.collectives["reduce-scatter"]["buffer_bytes"])
    assert scatters(scanned) == scatters(unrolled) and scanned.collectives["all-gather"]["windowed"] > 0


def test_a_looped_step_whose_unrolled_copy_did_not_fit_projects_nothing():
    """XLA's counts of a scanned step are one layer's: a projection from them once read 199% MFU."""
    tpu = topology.parse("v5e-8")
    run = plan.resolve(spec.from_config(_config(**SMALL, **{"model.scan_layers": True})), tpu)
    mesh = plan.mesh_of(run, topology.devices(tpu))
    looped = plan.Compiled({"arguments": 1.0, "outputs": 0.0, "temporaries": 1.0, "program": 0.1, "total": 2.1}, 1e9, 1e9, {}, 1.0,
                           costs_from=plan.COSTS_LOOPED)
    out = plan.report(run, tpu, mesh, looped)
    assert out["fits"] is True and out["costs_from"] == plan.COSTS_LOOPED
    assert out["projected_mfu"] is None and out["projected_step_ms"] is None and out["bound"] is None
    assert plan.report(run, tpu, mesh, dataclasses.replace(looped, costs_from="the compiled step"))["projected_mfu"] > 0


def test_an_unknown_slice_or_a_mesh_that_does_not_divide_it_is_one_error_before_compiling():
    result = run_cli("compile", "--topology=v9-8")
    assert result.returncode == 2 and "error: --topology='v9-8' is not a slice this command knows; known: " in result.stderr
    assert "v4-8, v4-16" in result.stderr and "v5e-1, v5e-4, v5e-8" in result.stderr
    result = run_cli("compile", "--topology=v5e-3")
    assert result.returncode == 2 and "error: --topology='v5e-3': v5e slices are v5e-1, v5e-4, v5e-8" in result.stderr
    result = run_cli("compile", "--topology=v5e-8", "--config.mesh.data=-1", "--config.mesh.tensor=3")
    assert result.returncode == 2 and "8 devices are not divisible by 3" in result.stderr
    for r in (result,):
        assert "Traceback" not in r.stderr


def test_slice_names_map_to_chips_and_shapes():
    assert (topology.parse("v4-8").chips, topology.parse("v4-8").jax_name) == (4, "v4:2x2x1")
    assert (topology.parse("v5p-64").chips, topology.parse("v5p-64").jax_name) == (32, "v5p:2x4x4")
    assert (topology.parse("v5litepod-16").chips, topology.parse("v5e-16").jax_name) == (16, "v5e:4x4")
    assert topology.parse("v6e-8").jax_name == "v6e:2x4"


def test_the_largest_batch_fits_and_one_more_row_does_not():
    """A one-chip slice and a step whose float32 logits over a 262k vocabulary take 4 GiB a row at
    seq_len 4096: the search, up to 3 rows, finds 2 (compiles at 1, 2 and 3 rows), and 3 do not fit."""
    cfg = _config(**{**SMALL, "model.d_model": 128, "model.num_layers": 1, "model.num_heads": 2, "model.num_kv_heads": 2,
                     "model.d_ff": 256, "data.tokenizer": "sentencepiece", "data.vocab_size": 262144, "batch_size": 8})
    tpu = topology.parse("v5e-1")
    run = plan.resolve(spec.from_config(cfg), tpu)
    mesh = plan.mesh_of(run, topology.devices(tpu))
    found = plan.find_batch(run, mesh, tpu, seq_len=4096, remats=("none",), most=3)
    assert found == {"none": 2}
    one_more = dataclasses.replace(plan.seq_len_of(run, 4096), batch_size=found["none"] + 1)
    assert not plan.fits(plan.compile_train_step(one_more, mesh), tpu, mesh)


def test_the_sampler_compiles_with_its_cache_on_the_slice():
    out = _compile("--topology=v5e-4", "--what=sample", "--batch_size=8", "--cache_len=1024", **SMALL)
    assert set(out) >= {"prefill", "decode", "kv_cache_gib_per_chip"}
    # [layers, batch, slots, kv heads, head dim] twice, bf16, the batch split over 4 chips.
    assert out["kv_cache_gib_per_chip"] == pytest.approx(2 * 2 * 8 * 1024 * 4 * 64 * 2 / 4 / 2**30)
    assert out["decode"]["hbm_per_chip_gib"]["total"] > 0 and out["prefill"]["compile_s"] > 0


def test_fsdp_gathers_weights_and_scatters_their_gradients_and_never_reshards_activations():
    """Under FSDP over 8 chips the compiled step's collectives move parameters: all-gathers of weights,
    reduce-scatters of their gradients. The only activation that moves is the embedding lookup's output,
    from the table's sharded width to the batch (once, and once for its gradient); no [batch, length, ...]
    activation is gathered (the model pins activations to the batch axes: llm/model/constrain.py).
    seq_len 160 is a length no weight has, so an activation is recognised by it."""
    tpu = topology.parse("v5e-8")
    run = plan.resolve(spec.from_config(_config(**{**SMALL, "seq_len": 160, "batch_size": 16, "mesh.data": 1, "mesh.fsdp": -1})), tpu)
    mesh = plan.mesh_of(run, topology.devices(tpu))
    moved = plan.compile_train_step(run, mesh, costs=False).collectives
    leaves = jax.tree.leaves(state_lib.setup(run.model, run.opt, mesh, run.mesh.rules).abstract_params)
    params = {tuple(x.shape) for x in leaves}
    floats = lambda kind: [s for s in moved[kind]["shapes"] if s.startswith(("bf16", "f32"))]
    assert moved["all-to-all"]["count"] <= 2
    for kind in ("all-gather", "reduce-scatter", "all-reduce", "collective-permute"):
        assert not [s for s in floats(kind) if 160 in cost.shape_of(s)], kind  # no activation
    gathered = {cost.shape_of(s) for s in floats("all-gather")}
    sizes = {int(np.prod(p)) for p in params}
    assert {int(np.prod(g)) for g in gathered} <= sizes, gathered  # whole weights (a q/k/v maybe as [D, H K])
    assert {(256, 4, 64), (4, 64, 256), (256, 1024), (1024, 256)} <= gathered  # q/k/v, attention's out, the MLP's in and out
    assert len({cost.shape_of(s) for s in floats("reduce-scatter")} & params) >= 4  # the same weights' gradients
    # No all-gather of the whole optimizer state: the step gathers a few copies of the bf16 weights at most.
    assert moved["all-gather"]["buffer_bytes"] < 8 * 2 * sum(int(np.prod(x.shape)) for x in leaves)


@pytest.mark.skipif(not sharding.installed("jax_plugins.xla_cuda13"), reason="JAX's CUDA plugin is not installed (the gpu extra)")
def test_an_h100_host_compiles_the_step_without_a_card():
    out = _report("h100-8", **SMALL)
    assert out["fits"] is True and out["devices"] == 8 and out["hbm_capacity_gib"] == pytest.approx(79.14)
    assert out["hbm_per_chip_gib"]["temporaries"] > 0 and out["collectives"]["all-reduce"]["count"] >= 1
    assert out["flops_per_step"] is None and out["roofline_ms"]["memory"] == 0  # no cost analysis without a card
