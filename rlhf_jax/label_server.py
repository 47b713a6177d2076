r"""The human labeling server (spec §5.3): `python -m rlhf_jax.label_server COMMAND`.

  python -m rlhf_jax.label_server serve --workdir runs/labels --port 8000
  python -m rlhf_jax.label_server add-labeler alice [--admin] --workdir runs/labels
  python -m rlhf_jax.label_server enqueue --workdir runs/labels --task configs/sentiment.py \
      --samples samples.jsonl
  python -m rlhf_jax.label_server export --workdir runs/labels --output labels.json

See `rlhf_jax.labeling.cli` for every command and flag, and `rlhf_jax.labeling.api` for the
HTTP API.
"""

import sys

from rlhf_jax.labeling.cli import main

if __name__ == "__main__":
    sys.exit(main())
