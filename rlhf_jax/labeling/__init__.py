"""Human labeling: a web app where people pick the best of N samples (spec §5.3).

The paper's labelers were shown a query and four samples and picked the best; the original code
left that part out. This package is that part:

- `schema`: the SQLAlchemy 2 tables (SQLite file or PostgreSQL) with a schema version;
- `store`: `LabelStore`, every operation on the store, one transaction each;
- `ingest`: comparisons from sample files (`rlhf_jax.sample` JSONL or query + samples rows);
- `auth`: access tokens (only their sha256 is stored), bearer/cookie authentication;
- `api`, `pages`: the FastAPI app (JSON API under /api/v1, server-rendered Jinja2 pages);
- `stats`: quality control (overlap agreement, gold accuracy, labels over time);
- `export`: the released label-file format (spec §5.2) and a JSONL with text and timing;
- `client`, `worker`: an HTTP client of the API and the mock label worker;
- `cli`: `python -m rlhf_jax.label_server COMMAND`.

Nothing here imports JAX except `ingest` (tokenizer and task spec) and `export` (validation
through `rlhf_jax.data.labels`), and only when they are called.
"""
