"""Byte-compiles every module the commands import (`./run.sh setup` runs it once per install): the
packages are installed without bytecode, and a host with PYTHONDONTWRITEBYTECODE set would otherwise
compile them from source in every process it starts."""

import importlib
import importlib.util
import os
import py_compile
import sys

# What the commands import, all together (llm.cli imports most of it lazily, per command).
COMMAND_MODULES = ("llm.cli", "llm.training.loop", "llm.training.rl", "llm.run.api", "llm.run.chat", "llm.data.corpus",
                   "llm.interop.hf", "llm.scaling.sweep", "llm.scaling.points", "llm.scaling.fit", "llm.compile.plan", "llm.inspect.trace", "llm.bench")
# What export, import and eval --tasks import from the hf and harness extras, where they are installed.
EXTRA_MODULES = ("safetensors.numpy", "transformers", "transformers.convert_slow_tokenizer", "transformers.models.llama.modeling_llama",
                 "lm_eval", "lm_eval.api.model", "lm_eval.tasks", "lm_eval.utils")
# The ray extra: `ray start`, the raylet's agents, the dashboard and every worker are Python processes that
# load Ray's core, much of it by path at run time (a 3-node test cluster and a 4-point sweep on it: 38 s
# without bytecode, 27 s with it, on the shared 2-core machine); its core is compiled as a tree, its
# libraries never load here.
RAY_LIBRARIES = {"air", "data", "llm", "rllib", "serve", "train", "tune", "workflow"}


def _ray_core_sources() -> set[str]:
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        return set()
    root = list(spec.submodule_search_locations)[0]
    sources = set()
    for directory, subdirs, files in os.walk(root):
        if directory == root:
            subdirs[:] = [d for d in subdirs if d not in RAY_LIBRARIES]
        sources.update(os.path.join(directory, f) for f in files if f.endswith(".py"))
    return sources


def main() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name)
    for name in EXTRA_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    sources = {m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None) and m.__file__.endswith(".py")}
    sources |= _ray_core_sources()
    compiled = 0
    for source in sorted(sources):
        cached = importlib.util.cache_from_source(source)
        if os.path.exists(cached) and os.path.getmtime(cached) >= os.path.getmtime(source):
            continue
        try:
            py_compile.compile(source, cfile=cached, doraise=True)
            compiled += 1
        except (py_compile.PyCompileError, OSError):  # a read-only or odd file: Python compiles it on import
            pass
    print(f"[setup] byte-compiled {compiled} modules", file=sys.stderr)


if __name__ == "__main__":
    main()
