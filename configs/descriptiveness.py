r"""Descriptiveness: continue book passages vividly (Ziegler et al. 2019, §3.1).

The original `launch.py` experiment `descriptiveness`: GPT-2 124M, best-of-4 labels from
`descriptiveness/offline_5k.json` (4,992 for training), a reward model trained for one epoch, then PPO
for 1M episodes at batch 512 with an adaptive KL coefficient (start 0.15, target 6 nats).

The paper started these tasks from GPT-2 fine-tuned on BookCorpus, which the released code
skipped (spec §2.4). `config.sft` (mode "lm", the task's book passages) reproduces that step:
  python -m rlhf_jax.train_sft --config configs/descriptiveness.py --workdir runs/descriptiveness_sft \
      --config.task.query_dataset=/data/books/{split}.jsonl
  then add --config.model.checkpoint=runs/descriptiveness_sft/hf_model to the commands below.
Reward model only:
  python -m rlhf_jax.train_reward --config configs/descriptiveness.py --workdir runs/descriptiveness_rm \
      --config.labels.path=/data/labels/descriptiveness/offline_5k.json
Policy (trains the reward model first, as the original's train_new_model):
  python -m rlhf_jax.train_policy --config configs/descriptiveness.py --workdir runs/descriptiveness \
      --config.labels.path=/data/labels/descriptiveness/offline_5k.json
Paper scale (774M) on a TPU slice:
  python -m rlhf_jax.train_policy --config configs/descriptiveness.py:model=774M --workdir gs://B/runs/s
CPU smoke run, tiny random GPT-2, mock labels (VADER sentiment: no mock
labeler judges descriptiveness, so this checks the machinery, not the task):
  python -m rlhf_jax.train_policy --config configs/descriptiveness.py:runlocal --workdir /tmp/s

Arguments: model=<124M|355M|774M|1.5B>, runlocal.
"""

from rlhf_jax import config_lib

LABELS = "https://openaipublic.blob.core.windows.net/lm-human-preferences/labels/"


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, model="124M", runlocal=False)
    config = config_lib.ml_collections.ConfigDict()
    config.seed = 1
    config.model = config_lib.model_config(arg.model, config_lib.hf_name(arg.model))
    config.task = config_lib.books_task()
    config.labels = config_lib.labels_config(LABELS + "descriptiveness/offline_5k.json",
                                             num_train=4992)
    config.labeler = config_lib.labeler_config("vader")
    config.rewards = config_lib.reward_config()
    config.ppo = config_lib.ppo_config()
    config.sft = config_lib.sft_config(mode="lm")
    config_lib.runtime_config(config)
    if arg.runlocal:
        config_lib.tiny_overrides(config)
        config_lib.sft_tiny_overrides(config)
    return config
