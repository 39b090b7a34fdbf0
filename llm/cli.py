"""Command-line entry points behind run.sh: train, eval, sample, chat, score, sweep, fit, coordcheck, bench,
compile, export, import, inspect.

Over 400 lines: absl defines every command's flags in this one module, and each command is a short
function over them; splitting the commands from their flags would only move the lines apart."""

import json
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags


try:
    # config_flags applies --config.KEY=VALUE overrides here, at definition time.
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "ml_collections config file.", lock_config=True)
except (AttributeError, KeyError) as e:
    overrides = [a.split("=")[0] for a in sys.argv if a.startswith("--config.")]
    key = re.search(r"(\w+)", str(e))
    print(f"error: unknown config key {key.group(1) if key else e!r} in the overrides {', '.join(overrides)} "
          f"(configs/default.py lists every key)", file=sys.stderr)
    sys.exit(2)
flags.DEFINE_string("workdir", "", "Run directory (default: runs/<config name>).")
flags.DEFINE_string("split", "validation", "eval: split to score; inspect neurons: split to search.")
flags.DEFINE_string("dataset", "", "eval: a dataset other than the run's (out-of-domain perplexity).")
flags.DEFINE_integer("step", None, "eval/sample/export: checkpoint step (default: the latest).")
flags.DEFINE_integer("batch_size", 0, "eval: rows per batch (default: the run's eval_batch_size; 16 with --tasks); "
                     "compile --what=sample: rows decoded at once (default: the config's batch_size).")
flags.DEFINE_string("tasks", "", "eval: comma-separated lm_eval tasks (llm/harness_tasks/ and --task_dir) instead of a split.")
flags.DEFINE_multi_string("task_dir", [], "eval --tasks: a folder of lm_eval task YAMLs (repeatable).")
flags.DEFINE_integer("limit", 0, "eval --tasks: at most this many documents per task (0: all).")
flags.DEFINE_integer("num_fewshot", -1, "eval --tasks: few-shot examples (-1: each task's default).")
flags.DEFINE_string("prompt", "", "sample: the prompt.")
flags.DEFINE_string("prompts_file", "", "sample: a file with one prompt per line.")
flags.DEFINE_string("input", "", "sample: a seq2seq run's input to answer (an encoder-decoder's, or input + eos for a decoder).")
flags.DEFINE_string("system", "", "chat: a system message that opens the conversation.")
flags.DEFINE_string("response", "", "score: the response to score after --prompt.")
flags.DEFINE_string("pairs", "", "score: a JSONL file of {'prompt', 'response'} lines.")
flags.DEFINE_integer("num_samples", 1, "sample: samples per prompt.")
flags.DEFINE_integer("max_new_tokens", 200, "sample: tokens to generate.")
flags.DEFINE_float("temperature", 1.0, "sample: softmax temperature; 0 is greedy.")
flags.DEFINE_integer("top_k", 0, "sample: keep the k most likely tokens (0: all).")
flags.DEFINE_float("top_p", 1.0, "sample: nucleus mass in (0, 1].")
flags.DEFINE_integer("seed", 0, "sample: random seed.")
flags.DEFINE_string("coordinator_address", "", "multi-host: HOST:PORT of process 0 (Cloud TPU: auto-detected).")
flags.DEFINE_integer("num_processes", 1, "multi-host: number of processes.")
flags.DEFINE_integer("process_id", 0, "multi-host: this process's index.")
flags.DEFINE_integer("distributed_timeout_s", 300, "multi-host: how long to wait for all processes to join.")
flags.DEFINE_integer("heartbeat_timeout_s", 60, "multi-host: a process silent this long is taken as dead; the others stop.")
flags.DEFINE_bool("dry_run", False, "sweep: print the table of points and stop.")
flags.DEFINE_string("shard", "", "sweep: 'i/n' runs every n-th point starting at i (0-based).")
flags.DEFINE_string("ray", "", "sweep: run the points as tasks on the Ray cluster at this address (HOST:PORT, "
                    "ray://HOST:PORT, or 'auto': the cluster this machine belongs to).")
flags.DEFINE_string("point_file", "", "sweep-point: the pickled point a --ray sweep's task hands its child.")
flags.DEFINE_string("points", "", "fit: CSV with params,tokens,loss or params,flops,loss.")
flags.DEFINE_string("out", "", "fit: directory for fit.json and plots (default: the sweep workdir, else fit_out/); "
                    "coordcheck: directory for its PNG (default: coordcheck_out/); "
                    "export: the HF directory; inspect lens|attention|heads|patch|attribute: a directory for PNG plots.")
flags.DEFINE_string("arch", "", "fit: only the rows of this model.arch (a sweep over `archs` names them '<arch>-...').")
flags.DEFINE_integer("bootstrap", 100, "fit: bootstrap resamples for standard errors.")
flags.DEFINE_float("predict", None, "fit: also predict the compute-optimal params, tokens and loss at this many FLOPs, "
                   "with bootstrap intervals.")
flags.DEFINE_string("target", "", "fit: fit the loss column eval_loss_<target> (one domain's) instead of eval_loss.")
flags.DEFINE_string("hf", "", "import: a local Hugging Face Llama model directory.")
flags.DEFINE_string("tokenizer", "", "import: a SentencePiece .model to use when the HF directory has no tokenizer.model.")
flags.DEFINE_integer("max_shard_mb", 5000, "export: safetensors files above this size are split, with an index.")
flags.DEFINE_integer("steps", 20, "bench: timed steps after warm-up; coordcheck: train steps per width (default 5).")
flags.DEFINE_list("widths", ["64", "128", "256", "512", "1024"], "coordcheck: the d_model of each model.")
flags.DEFINE_string("topology", "", "compile: the slice to compile for, by its Cloud TPU name (v4-8, v5e-16, v5p-64, v6e-8, ...).")
flags.DEFINE_bool("find_batch", False, "compile: also the largest global batch that fits, for each model.remat policy.")
flags.DEFINE_integer("seq_len", 0, "compile: the context to compile at (default: the config's seq_len).")
flags.DEFINE_string("what", "", "compile: train (default) | sample, the train step or the sampler's prefill and decode step; "
                    "inspect patch: heads | positions | layers (default), what one patched row swaps.")
flags.DEFINE_integer("cache_len", 0, "compile --what=sample: KV cache slots (default: seq_len).")
flags.DEFINE_float("peak_tflops", 0.0, "bench: published peak TFLOP/s (default: measure a large matmul).")
flags.DEFINE_integer("k", 5, "inspect: top tokens (lens), attended positions (attention), neighbours or contexts (neurons) to list.")
flags.DEFINE_integer("layer", None, "inspect neurons: the block whose MLP holds the neuron (0-based).")
flags.DEFINE_integer("neuron", None, "inspect neurons: the MLP hidden unit (0-based, below model.d_ff).")
flags.DEFINE_string("clean", "", "inspect patch: the input whose activations are patched in.")
flags.DEFINE_string("corrupted", "", "inspect patch: the input that runs with them (as many tokens as --clean).")
flags.DEFINE_string("at", "", "inspect patch: the activation, [block_I/]LEAF[:HEAD] (default: head_out for --what=heads, else resid_pre).")
flags.DEFINE_string("token", "", "inspect patch|attribute: the answer token (default: the clean run's / the model's top next token).")
flags.DEFINE_string("against", "", "inspect patch: a second token; the metric becomes logit(token) - logit(against) instead of the loss of token.")
flags.DEFINE_string("sender", "", "inspect patch: path patching from this head, block_I:H ...")
flags.DEFINE_string("receiver", "", "inspect patch: ... into this later head, block_J:H ...")
flags.DEFINE_string("via", "k", "inspect patch: ... through its q, k or v.")
flags.DEFINE_enum("ablation", "zero", ["zero", "mean", "resample"], "inspect heads: set a head's output to 0, to its mean over "
                  "held-out text, or to its output on held-out text (averaged over the resampled rows).")
FLAGS = flags.FLAGS


def _user_errors() -> tuple[type, ...]:
    from llm import inspect, spec
    from llm.data import DataError, template, tokenizer
    from llm.interop import harness, hf
    from llm.model import attention, sample
    from llm.training import checkpoint, guard, loop, rl, sharding

    return (spec.ConfigError, DataError, tokenizer.TokenizerError, checkpoint.CheckpointError, rl.RewardError, template.TemplateError,
            sample.SampleError, sharding.MeshError, sharding.DistributedError, loop.NonFiniteLossError,
            guard.WorkdirError, attention.AttentionError, hf.HFError, harness.HarnessError, inspect.InspectError)


def _join_distributed_job() -> None:
    from llm.training import sharding

    on_tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if FLAGS.coordinator_address or on_tpu_pod:
        sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                        FLAGS.distributed_timeout_s, FLAGS.heartbeat_timeout_s)


def _split_host_cpu(run) -> None:
    """Before JAX starts: a CPU host's cores become mesh.cpu_devices devices (see llm/training/sharding.py)."""
    from llm.training import sharding

    rows = [run.batch_size // run.opt.grad_accum_steps] + ([run.loop.eval_batch_size] if run.loop.eval_every_steps else [])
    rows = [r // FLAGS.num_processes if r % FLAGS.num_processes == 0 else 1 for r in rows]  # each process's share
    default_mesh = (run.mesh.data, run.mesh.fsdp, run.mesh.tensor) == (-1, 1, 1)
    sharding.split_host_cpu(run.mesh.cpu_devices, rows, default_mesh)


def cmd_train() -> None:
    from llm import spec
    from llm.run import api
    from llm.training import loop, rl

    run = spec.from_config(_CONFIG.value)
    _split_host_cpu(run)
    _join_distributed_job()
    import jax

    workdir = FLAGS.workdir or os.path.join("runs", run.name)
    summary = rl.train_grpo(run, workdir) if run.objective.name == "grpo" else loop.train(run, workdir)
    if jax.process_index() != 0:
        return
    print(json.dumps({k: v for k, v in summary.items()}), file=sys.stderr)
    if run.objective.name != "lm" or run.data.kind in ("sft", "seq2seq") or run.model.arch != "decoder":
        # A sample of raw text says nothing about a post-trained model (./run.sh chat does), a seq2seq
        # model (./run.sh sample --input) or a denoiser.
        return
    prompt, tokens = run.loop.sample_prompt, run.loop.sample_tokens
    if tokens and jax.process_count() > 1:
        print(f"(multi-process run: sample afterwards with ./run.sh sample --workdir={workdir})", file=sys.stderr)
    elif tokens:
        trained = api.load(workdir)
        budget = min(tokens, run.seq_len - len(trained.encode_prompt(prompt)))
        if budget < 1:
            print(f"(no sample: sample_prompt fills the {run.seq_len}-token context)", file=sys.stderr)
            return
        print(f"\n--- sample (step {trained.step}, temperature 0.8) ---")
        print(prompt, end="", flush=True)
        trained.generate(prompt, max_new_tokens=budget, temperature=0.8, seed=run.seed, stream=lambda s: print(s, end="", flush=True))
        print()


def _need_workdir() -> str:
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    return FLAGS.workdir


def cmd_eval() -> None:
    from llm.run import api

    if FLAGS.tasks:
        from llm.interop import harness

        tasks = [t for t in FLAGS.tasks.split(",") if t]
        manager = harness.find_tasks(tasks, FLAGS.task_dir)  # before the checkpoint is read
        result = harness.evaluate(api.load(_need_workdir(), FLAGS.step), tasks, limit=FLAGS.limit or None,
                                  num_fewshot=None if FLAGS.num_fewshot < 0 else FLAGS.num_fewshot,
                                  batch_size=FLAGS.batch_size or 16, manager=manager)
    else:
        run = api.load(_need_workdir(), FLAGS.step)
        result = run.evaluate(FLAGS.split, FLAGS.dataset or None, FLAGS.batch_size or None)
    print(json.dumps(result))


def cmd_sample() -> None:
    from llm.model import sample
    from llm.run import api

    sample.check_options(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.max_new_tokens)
    if FLAGS.input:
        if FLAGS.prompt or FLAGS.prompts_file:
            raise app.UsageError("--input answers a seq2seq run's input; it does not take --prompt or --prompts_file")
        run = api.load(_need_workdir(), FLAGS.step)
        options = dict(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed)
        if FLAGS.num_samples == 1:
            run.answer(FLAGS.input, FLAGS.max_new_tokens, stream=lambda s: print(s, end="", flush=True), **options)
            print()
            return
        for i, text in enumerate(run.answer([FLAGS.input] * FLAGS.num_samples, FLAGS.max_new_tokens, **options)):
            print(f"--- sample {i} ---\n{text}")
        return
    prompts = [FLAGS.prompt]
    if FLAGS.prompts_file:
        with open(FLAGS.prompts_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    run = api.load(_need_workdir(), FLAGS.step)
    options = dict(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p)
    if len(prompts) == 1 and FLAGS.num_samples == 1:
        run.encode_prompt(prompts[0])  # an unencodable prompt fails here, before anything is printed
        print(prompts[0], end="", flush=True)
        run.generate(prompts[0], seed=FLAGS.seed, stream=lambda s: print(s, end="", flush=True), **options)
        print()
        return
    expanded = [p for p in prompts for _ in range(FLAGS.num_samples)]
    texts = run.generate(expanded, seed=FLAGS.seed, **options)
    for i, (prompt, text) in enumerate(zip(expanded, texts)):
        print(f"--- sample {i} ---\n{prompt}{text}")


def cmd_sweep() -> None:
    from llm import spec
    from llm.scaling import sweep

    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    if "base" in _CONFIG.value:
        _split_host_cpu(spec.from_config(_CONFIG.value.base))  # points that change the batch must still divide the split
    if FLAGS.ray and not FLAGS.dry_run:
        from llm.scaling import ray_sweep  # the one import of ray: the main job never loads it

        ray_sweep.run(_CONFIG.value, FLAGS.workdir, FLAGS.ray, shard=FLAGS.shard)
    else:
        sweep.run(_CONFIG.value, FLAGS.workdir, dry_run=FLAGS.dry_run, shard=FLAGS.shard)


def cmd_sweep_point() -> None:
    """One point of a --ray sweep, in the process its Ray task starts (llm/scaling/ray_task.py): what
    `./run.sh sweep` does for that point, the exit codes included."""
    from llm import spec
    from llm.scaling import ray_task, sweep
    from llm.training import checkpoint

    point, base = ray_task.read_point(FLAGS.point_file)
    if base is not None:
        _split_host_cpu(spec.from_config(base))  # as cmd_sweep: the same devices, the same losses
    start = checkpoint.latest_step(os.path.join(FLAGS.workdir, point.name))
    print(f"{point.name}: {point.config.num_train_steps} steps" + (f", resuming from step {start}" if start else ""),
          file=sys.stderr, flush=True)
    row = sweep.train_point(point, FLAGS.workdir)
    print(f"{point.name}: eval loss {row['eval_loss']}, train loss {row['train_loss']}", file=sys.stderr)


def cmd_fit() -> None:
    from llm import spec
    from llm.scaling import fit, plots

    if bool(FLAGS.points) == bool(FLAGS.workdir):
        raise app.UsageError("give exactly one of --points=FILE.csv or --workdir=SWEEPDIR")
    path = FLAGS.points or os.path.join(FLAGS.workdir, "results.csv")
    if not os.path.exists(path):
        raise app.UsageError(f"{path} does not exist")
    try:
        points = fit.load_points(path, FLAGS.arch, FLAGS.target)
        if FLAGS.predict is not None and FLAGS.predict <= 0:
            raise ValueError(f"--predict needs a positive number of FLOPs, got {FLAGS.predict:g}")
        if FLAGS.predict is not None and FLAGS.bootstrap < 2:
            raise ValueError(f"--predict needs --bootstrap >= 2 for its intervals, got {FLAGS.bootstrap}")
    except ValueError as e:
        raise spec.ConfigError(str(e)) from None
    result = fit.fit_all(points, bootstrap=FLAGS.bootstrap, predict_flops=FLAGS.predict)
    if FLAGS.target:
        result["target"] = f"eval_loss_{FLAGS.target}"
    out = FLAGS.out or FLAGS.workdir or "fit_out"
    if FLAGS.arch and not FLAGS.out:
        out = os.path.join(out, f"fit_{FLAGS.arch}")  # one fit per arch beside the sweep
    if FLAGS.target and not FLAGS.out:
        out = os.path.join(out, f"fit_{FLAGS.target}")  # one fit per domain beside the sweep
    os.makedirs(out, exist_ok=True)
    result["plots"] = plots.plot_all(points, result, out)
    with open(os.path.join(out, "fit.json"), "w") as f:
        json.dump(result, f, indent=2)
    if "predict" in result:
        print(fit.describe_prediction(result["predict"]))
    print(json.dumps(result))


def cmd_coordcheck() -> None:
    from llm.scaling import coordcheck

    try:
        widths = [int(w) for w in FLAGS.widths]
    except ValueError:
        raise app.UsageError(f"--widths takes integers, got {','.join(FLAGS.widths)}") from None
    steps = FLAGS.steps if FLAGS["steps"].present else 5
    result = coordcheck.run(_CONFIG.value, widths, steps, FLAGS.out or "coordcheck_out")
    print(json.dumps(result))


def cmd_bench(kind: str) -> None:
    from llm import bench, spec

    if kind == "train":
        _split_host_cpu(spec.from_config(_CONFIG.value))
        result = bench.bench_train(_CONFIG.value, steps=FLAGS.steps, peak_tflops=FLAGS.peak_tflops)
    elif kind == "sample":
        result = bench.bench_sample(_CONFIG.value)
    else:
        raise app.UsageError("usage: ./run.sh bench train|sample [flags]")
    print(json.dumps(result))


def cmd_compile() -> None:
    """The train step (or the sampler) a config would run on a TPU slice, compiled here by the slice's own
    compiler; one JSON line: fit, memory per chip, FLOPs, collectives, a roofline step time."""
    from llm import spec
    from llm.compile import plan, topology

    if not FLAGS.topology:
        raise app.UsageError("--topology is required: a slice such as v5e-8, v4-8, v5p-64 or v6e-8")
    if FLAGS.what not in ("", "train", "sample"):
        raise app.UsageError(f"compile --what is train or sample, not {FLAGS.what!r}")
    tpu = topology.parse(FLAGS.topology)  # an unknown name fails here, before JAX starts
    run = spec.from_config(_CONFIG.value)
    devices = topology.devices(tpu)
    run = plan.seq_len_of(plan.resolve(run, tpu), FLAGS.seq_len)
    mesh = plan.mesh_of(run, devices)
    head = {"topology": tpu.name, "chips": tpu.chips, "mesh": dict(mesh.shape)}
    if FLAGS.what == "sample":
        result = {**head, **plan.compile_sampler(run, mesh, FLAGS.batch_size or run.batch_size, FLAGS.cache_len or run.seq_len)}
    else:
        plan.check_batch(run, mesh)
        result = plan.report(run, tpu, mesh, plan.compile_train_step(run, mesh))
        if FLAGS.find_batch:
            result["largest_batch"] = plan.find_batch(run, mesh, tpu)
    print(json.dumps(result))


def cmd_export() -> None:
    from llm.interop import hf

    if not FLAGS.out:
        raise app.UsageError("--out is required: the Hugging Face directory to write")
    print(json.dumps(hf.export(_need_workdir(), FLAGS.out, FLAGS.step, FLAGS.max_shard_mb << 20)))


def cmd_import() -> None:
    from llm.interop import hf

    if not FLAGS.hf:
        raise app.UsageError("--hf is required: the Hugging Face model directory to read")
    print(json.dumps(hf.import_run(FLAGS.hf, _need_workdir(), _CONFIG.value.to_dict(), FLAGS.tokenizer)))


INSPECT = ("lens", "attention", "heads", "neurons", "neighbours", "patch", "attribute")
PLOTTED = ("lens", "attention", "heads", "patch", "attribute")
INSPECT_USAGE = (f"usage: ./run.sh inspect {'|'.join(INSPECT)} --workdir=D --prompt=TEXT [--out=DIR]\n"
                 "       ./run.sh inspect neurons --workdir=D --layer=I --neuron=N [--k=K] [--split=S]\n"
                 "       ./run.sh inspect patch --workdir=D --clean=TEXT --corrupted=TEXT [--what=heads|positions|layers] [--at=SITE]\n"
                 "                             [--token=T [--against=U]] [--sender=block_I:H --receiver=block_J:H --via=q|k|v] [--out=DIR]\n"
                 "       ./run.sh inspect attribute --workdir=D --prompt=TEXT [--token=T] [--out=DIR]")


def _plot_path(name: str) -> str:
    os.makedirs(FLAGS.out, exist_ok=True)
    return os.path.join(FLAGS.out, name)


def _inspect_neuron(run) -> dict:
    contexts = run.top_contexts(FLAGS.layer, FLAGS.neuron, FLAGS.split, FLAGS.k)
    print(f"block_{FLAGS.layer} neuron {FLAGS.neuron}: the {len(contexts)} {FLAGS.split} contexts that activate it most")
    for c in contexts:
        print(f"{c['activation']:>9.4f}  {c['text']!r}")
    return {"layer": FLAGS.layer, "neuron": FLAGS.neuron, "split": FLAGS.split, "contexts": contexts}


def _site_head(text: str, flag: str, cfg) -> tuple[int, int]:
    from llm.inspect import InspectError

    match = re.fullmatch(r"block_(\d+):(\d+)", text)
    if not match:
        raise InspectError(f"--{flag}={text!r} is not block_I:H")
    layer, head = int(match.group(1)), int(match.group(2))
    if layer >= cfg.N or head >= cfg.H:
        raise InspectError(f"--{flag}={text!r}: layers lie in 0..{cfg.N - 1} and heads in 0..{cfg.H - 1}")
    return layer, head


def _inspect_patch(run) -> dict:
    """Activation patching (with attribution patching's estimate of the same rows), or with --sender path patching."""
    import numpy as np

    from llm.inspect import plots

    against = FLAGS.against or None
    if FLAGS.sender or FLAGS.receiver:
        sender, receiver = _site_head(FLAGS.sender, "sender", run.model_config), _site_head(FLAGS.receiver, "receiver", run.model_config)
        result = run.path_patch(FLAGS.clean, FLAGS.corrupted, sender, receiver, FLAGS.via, FLAGS.token or None, against)
        print(f"path {result['sender']} -> {result['receiver']}.{result['via']}: {result['metric']} clean {result['clean']:.4f}, "
              f"corrupted {result['corrupted']:.4f}, patched {result['patched']:.4f} (restored {result['restored']})")
        return result
    what = FLAGS.what or "layers"
    result = run.patch(FLAGS.clean, FLAGS.corrupted, FLAGS.at or None, what, FLAGS.token or None, against)
    result["attribution"] = run.attribution_patch(FLAGS.clean, FLAGS.corrupted, FLAGS.at or None, what, FLAGS.token or None, against)["estimate"]
    columns = {"layers": ["all"], "positions": [run.tokenizer.decode([int(t)]) for t in run.tokens_BxL(FLAGS.corrupted)[0]],
               "heads": [f"head {h}" for h in range(len(result["patched"][0]))]}[what]
    print(f"{result['metric']} of {result['token']!r}" + (f" - {result['against']!r}" if against else "") +
          f": clean {result['clean']:.4f}, corrupted {result['corrupted']:.4f}; patched {result['at']} per {what[:-1]} "
          "(the fraction of the gap restored)")
    restored = result["restored"] or [[float("nan")] * len(row) for row in result["patched"]]
    for layer, row in zip(result["layers"], restored):
        print(f"{layer:<8} " + " ".join(f"{c:>+7.3f}" for c in row))
    if FLAGS.out:
        shown = np.asarray(result["restored"] if result["restored"] else np.asarray(result["patched"]) - result["corrupted"])
        os.makedirs(FLAGS.out, exist_ok=True)
        result["plots"] = [plots.layer_heatmap(shown, os.path.join(FLAGS.out, f"patch_{what}.png"), result["layers"], columns,
                                               f"patching {result['at']} from clean into corrupted",
                                               "fraction restored" if result["restored"] else "metric change")]
    return result


def cmd_inspect(kind: str) -> None:
    """A short table on stdout, then one JSON line; the flags and prompt are checked before anything compiles."""
    import numpy as np

    from llm.inspect import InspectError, neurons, patching, plots
    from llm.run import api

    if kind not in INSPECT:
        raise app.UsageError(INSPECT_USAGE)
    if FLAGS.k < 1:
        raise InspectError(f"--k must be at least 1, not {FLAGS.k}")
    if FLAGS.out and kind not in PLOTTED:
        raise InspectError(f"--out draws {', '.join(PLOTTED)}; inspect {kind} has no plot")
    if kind == "neurons":
        missing = [f"--{name}" for name in ("layer", "neuron") if FLAGS[name].value is None]
        if missing:
            raise InspectError(f"inspect neurons needs {' and '.join(missing)}")
    if kind == "patch":
        if not FLAGS.clean or not FLAGS.corrupted:
            raise InspectError("inspect patch needs --clean=TEXT and --corrupted=TEXT")
        if FLAGS.what not in ("", *patching.WHAT):
            raise InspectError(f"inspect patch --what is one of {', '.join(patching.WHAT)}, not {FLAGS.what!r}")
    run = api.load(_need_workdir(), FLAGS.step)
    if kind == "neurons":
        neurons.check_neuron(run.model_config, FLAGS.layer, FLAGS.neuron)
        print(json.dumps(_inspect_neuron(run)))
        return
    if kind == "patch":
        print(json.dumps(_inspect_patch(run)))
        return
    tokens = run.tokens_BxL(FLAGS.prompt)[0]
    if FLAGS.out and kind == "lens" and len(tokens) < 2:
        raise InspectError("--prompt needs at least 2 tokens for the lens plot: it colours next-token log-probabilities")
    show = lambda ids: " ".join(repr(run.tokenizer.decode([int(t)])) for t in ids)
    pieces = [run.tokenizer.decode([int(t)]) for t in tokens]
    layers = [f"block_{i}" for i in range(run.model_config.N)]
    written = []  # PNGs, with --out
    if kind == "lens":
        rows = run.lens(FLAGS.prompt, FLAGS.k)
        print(f"{'layer':<10} {'loss':>8}  top next tokens after the prompt")
        for r in rows:
            loss = "-" if r["loss"] is None else f"{r['loss']:.3f}"
            print(f"{r['layer']:<10} {loss:>8}  " + "  ".join(f"{t!r} {p:.2f}" for t, p in zip(r["top"], r["top_probs"])))
        result = {"lens": rows}
        if FLAGS.out:
            losses_NxL = np.asarray([r["position_losses"] for r in rows])
            written.append(plots.lens_heatmap(losses_NxL, pieces, _plot_path("lens.png"), [r["layer"] for r in rows]))
    elif kind == "attention":
        _, cache = run.trace(tokens, names="block_*/attn_probs_BxHxLxS")
        if FLAGS.out:
            probs_NxHxLxS = np.stack([probs_BxHxLxS[0] for probs_BxHxLxS in cache.values()])
            written.append(plots.attention_maps(probs_NxHxLxS, pieces, _plot_path("attention.png"), layers))
        result = {"attention": []}
        print(f"where the last token ({show(tokens[-1:])}) attends, per layer and head")
        for name, probs_BxHxLxS in cache.items():
            for h, probs_S in enumerate(probs_BxHxLxS[0, :, -1]):
                top = [int(i) for i in probs_S.argsort()[::-1][: FLAGS.k]]
                result["attention"].append({"layer": name.split("/")[0], "head": h, "positions": top,
                                            "probs": [float(probs_S[i]) for i in top]})
                print(f"{name.split('/')[0]:<8} head {h:<3} " + "  ".join(f"{i}:{show(tokens[i:i + 1])} {probs_S[i]:.2f}" for i in top))
    elif kind == "heads":
        cfg = run.model_config
        if len(tokens) < 2:
            raise InspectError("--prompt needs at least 2 tokens: ablation is measured on next-token loss")
        values = run.ablation_values(FLAGS.ablation, len(tokens))
        effects = [[run.intervention_effect(tokens, ablate={f"block_{i}/heads": [h]}, values=values) for h in range(cfg.H)]
                   for i in range(cfg.N)]
        change = [[e["loss_change"] for e in row] for row in effects]
        print(f"prompt loss change when one head is {FLAGS.ablation}-ablated")
        print(f"{'':<8} " + " ".join(f"{'head ' + str(h):>9}" for h in range(cfg.H)))
        for i, row in enumerate(change):
            print(f"{'block_' + str(i):<8} " + " ".join(f"{c:>+9.4f}" for c in row))
        result = {"loss": effects[0][0]["loss_clean"], "ablation": FLAGS.ablation, "head_ablation_loss_change": change}
        if FLAGS.out:
            written.append(plots.head_ablation_heatmap(np.asarray(change), _plot_path("heads.png"), layers, FLAGS.ablation))
    elif kind == "attribute":
        result = run.attribute(FLAGS.prompt, FLAGS.token or None)
        print(f"direct logit attribution of {result['text']!r} (logit {result['logit']:.3f}; embedding {result['embed']:+.3f}, "
              f"norm bias {result['bias']:+.3f})")
        print(f"{'':<8} " + " ".join(f"{'head ' + str(h):>9}" for h in range(run.model_config.H)) + f" {'mlp':>9}")
        for i, (row, mlp) in enumerate(zip(result["heads"], result["mlps"])):
            print(f"{'block_' + str(i):<8} " + " ".join(f"{c:>+9.4f}" for c in row) + f" {mlp:>+9.4f}")
        if FLAGS.out:
            table_NxC = np.concatenate([np.asarray(result["heads"]), np.asarray(result["mlps"])[:, None]], axis=1)
            columns = [f"head {h}" for h in range(run.model_config.H)] + ["mlp"]
            written.append(plots.layer_heatmap(table_NxC, _plot_path("attribute.png"), layers, columns,
                                               f"direct logit attribution of {result['text']!r}", "logit contribution"))
    else:
        if len(tokens) != 1:
            raise InspectError(f"--prompt must be one token for neighbours, and {FLAGS.prompt!r} is {len(tokens)}")
        result = {"token": FLAGS.prompt}
        for table in ("embed", "unembed") if not run.model_config.tie_embeddings else ("embed",):
            near = [n for n in run.neighbours(int(tokens[0]), FLAGS.k + 1, table) if n[0] != tokens[0]][: FLAGS.k]  # not itself
            print(f"{table}: " + "  ".join(f"{show([i])} {c:.3f}" for i, c in near))
            result[table] = [{"token": run.tokenizer.decode([i]), "id": i, "cosine": c} for i, c in near]
    if written:
        result["plots"] = written
    print(json.dumps(result))


def cmd_chat() -> None:
    import signal

    from llm.run import api, chat

    # Ctrl-C must stop an answer even when the launching process left SIGINT ignored (a job runner, nohup):
    # an ignored signal is inherited through exec, and Python then keeps it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    chat.interactive(api.load(_need_workdir(), FLAGS.step), system=FLAGS.system, max_new_tokens=FLAGS.max_new_tokens,
                     temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed)


def cmd_score() -> None:
    from llm.data import DataError, examples
    from llm.run import api

    run = api.load(_need_workdir(), FLAGS.step)
    if FLAGS.pairs:
        records = examples.read(f"file:{FLAGS.pairs}")
        for r in records:
            missing = [k for k in ("prompt", "response") if not isinstance(r.value.get(k), str)]
            if missing:
                raise DataError(f"{r.where}: missing the string field(s) {', '.join(map(repr, missing))} (a line is {{'prompt', 'response'}})")
        prompts, responses = [r.value["prompt"] for r in records], [r.value["response"] for r in records]
    elif FLAGS.prompt and FLAGS.response:
        prompts, responses = [FLAGS.prompt], [FLAGS.response]
    else:
        raise app.UsageError("score needs --pairs=FILE.jsonl (lines {'prompt', 'response'}) or --prompt=TEXT --response=TEXT")
    scores = run.score(prompts, responses)
    for p, r, v in zip(prompts, responses, scores):
        print(f"{v:+.4f}  {p!r:.40} -> {r!r:.60}")
    print(json.dumps({"step": int(run.step), "scores": scores}))


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "sweep": cmd_sweep, "sweep-point": cmd_sweep_point,
            "fit": cmd_fit, "bench": cmd_bench,
            "compile": cmd_compile, "coordcheck": cmd_coordcheck,
            "export": cmd_export, "import": cmd_import, "inspect": cmd_inspect, "chat": cmd_chat, "score": cmd_score}


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: python -m llm.cli {{{','.join(COMMANDS)}}} [flags]")
    positional = argv[2:]
    if argv[1] == "bench":
        if len(positional) != 1:
            raise app.UsageError("usage: ./run.sh bench train|sample [flags]")
    elif argv[1] == "inspect":
        if len(positional) != 1:
            raise app.UsageError(INSPECT_USAGE)
    elif positional:
        raise app.UsageError(f"unexpected arguments: {' '.join(positional)}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    from llm import upstream
    from llm.training import guard

    upstream.one_line_orbax_errors()
    from llm.training import sharding

    # libtpu (installed for `compile`) stays unloaded on a host without a TPU; `compile` never needs one.
    sharding.leave_out_absent_tpu(host_only=argv[1] == "compile")

    try:
        COMMANDS[argv[1]](*positional)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(guard.EXIT_ERROR)
    except guard.WriteFailed as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        upstream.exit_now(guard.EXIT_WRITE_FAILED)  # the workdir cannot be written; see upstream.py
    except guard.Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(guard.EXIT_INTERRUPTED)
    except KeyboardInterrupt:  # Ctrl-C outside the train loop (sampling, eval, data preparation)
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    app.run(main)
