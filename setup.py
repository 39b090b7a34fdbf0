from setuptools import find_packages, setup

setup(
    name="llm",
    version="0.1.0",
    description="A small JAX/Flax codebase for training, evaluating and scaling decoder-only language models.",
    packages=find_packages(include=["llm", "llm.*", "configs", "configs.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "absl-py",
        "numpy",
        "sentencepiece",
        "tensorflow-datasets>=4.9.8",
        "importlib_resources",  # tensorflow-datasets imports it without declaring it
        "tensorflow-cpu",  # TFDS community builders (tiny_shakespeare, lm1b, c4, ...) need tf to prepare
        "grain>=0.2.12",  # streamed corpora (llm/data.py)
        "array-record",  # TFDS writes and random-accesses prepared builders as ArrayRecord (file_format= in llm/data.py)
        "fsspec",  # shard globs on gs://, s3://, ... (llm/sources.py)
        "pyarrow",  # parquet: shards
        "zstandard",  # .jsonl.zst shards
        "tensorboardX",  # metrics as TensorBoard event files (llm/training/metrics.py)
        "tqdm",
        "scipy",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest", "pytest-xdist"],
        # export/import (llm/hf.py). torch 2.13.0 is the CPU build this project's machines keep in their
        # wheel cache; any recent torch works.
        "hf": ["torch==2.13.0", "transformers>=5", "safetensors"],
        # ./run.sh eval --tasks (llm/harness.py)
        "harness": ["lm_eval>=0.4.9", "datasets"],  # datasets: the local task files are read with it
        # ./run.sh sweep --ray=ADDRESS (llm/scaling/ray_sweep.py): a sweep's points as tasks on a Ray cluster
        "ray": ["ray>=2.40"],
        # ./run.sh compile --topology=h100-8 (llm/compile/topology.py): JAX's CUDA 13 plugin matching the jax
        # installed, without NVIDIA's libraries (about 130 MB; a CUDA 13 toolkit's ptxas must be on the PATH).
        # Not in the default setup; libtpu for TPU slices is (run.sh).
        "gpu": ["jax[cuda13-local]"],
    },
    package_data={"llm.interop": ["harness_tasks/*/*"]},
)
