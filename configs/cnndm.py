r"""CNN/Daily Mail: summarise news articles (Ziegler et al. 2019, §3.2; `launch.py` `cnndm`).

GPT-2 124M (spec §2.4, §6.1):

| task | "Article:\n\n" + 500-token article cut after its last newline + "\n\nTL;DR:" -> 75 tokens, cut at a newline at index >= 55, T = 0.5 |
| labels | best-of-4 `cnndm/online_45k.json`, 46,000 train the reward model |
| reward model | batch 16, lr 2.5e-5, one epoch, normalised on 256 rho samples (rollouts of 128) |
| PPO | 1M episodes, batch 32, lr 2e-6, no reward whitening |
| KL | fixed 0.01 |
| mock labeler | "copying": prefers sentences copied from the article |

Articles without a newline in the window are skipped. As in configs/tldr.py: the original's
`rewards.whiten=False` means `ppo.whiten_rewards=False` (spec §6.3.1); `offline_60k` is
launch.py's commented-out alternative label file.

`:model=774M` sets the paper's 774M values (its appendix, as spec.md §3.2 and §4.1 quote them):
reward model batch 32, lr 1.77e-5 (and 45,984 training labels, the nearest multiple of 32
below 46,000); PPO 2M episodes, batch 512, lr 7.07e-6. The paper trained no 355M or 1.5B model,
so `:model=355M` and `:model=1.5B` keep the 124M values above (unverified for those sizes).

Queries: "tfds:cnn_dailymail" (train / test splits; articles cleaned as the original's cnndm.py,
with a paragraph break after each sentence because tfds flattened the stories' paragraphs),
prepared once, offline, with `tfds build cnn_dailymail --file_format=array_record` and found
through `task.query_data_dir`; or "jsonl:/data/articles_{split}.jsonl" (fields article, summary);
or `labels:` (the label file's own queries).

Supervised baseline (`sft.mode="summarize"`: loss on the reference highlights), then PPO from it:
  python -m rlhf_jax.train_sft --config configs/cnndm.py --workdir runs/cnndm_sft \
      --config.task.query_data_dir=/data/tfds
  python -m rlhf_jax.train_policy --config configs/cnndm.py --workdir runs/cnndm_sl_rl \
      --config.model.checkpoint=runs/cnndm_sft/hf_model --config.task.query_data_dir=/data/tfds \
      --config.labels.path=/data/labels/cnndm/online_45k.json
Zero-shot GPT-2 policy (trains the reward model first):
  python -m rlhf_jax.train_policy --config configs/cnndm.py --workdir runs/cnndm \
      --config.labels.path=/data/labels/cnndm/online_45k.json \
      --config.task.query_data_dir=/data/tfds
ROUGE, novelty and copying of samples, beside the lead-3 baseline (the paper's strongest simple
baseline on CNN/DM):
  python -m rlhf_jax.evaluate --samples runs/cnndm_sft/samples.jsonl --output report.json \
      --plot report.png
CPU smoke run (tiny random GPT-2, "builtin:lead" articles as in configs/tldr.py):
  python -m rlhf_jax.train_sft --config configs/cnndm.py:runlocal --workdir /tmp/cnndm_sft

Arguments: model=<124M|355M|774M|1.5B>, runlocal.
"""

from rlhf_jax import config_lib


def get_config(arg=None):
    return config_lib.summarize_experiment(
        arg,
        task=dict(query_dataset="tfds:cnn_dailymail", query_prefix="Article:\n\n",
                  end_text="\n", temperature=0.5),
        labels=config_lib.LABELS_URL + "cnndm/online_45k.json", num_train=46000,
        labeler="copying",
        rewards=dict(batch_size=16, lr=2.5e-5, rollout_batch_size=128),
        ppo=dict(total_episodes=1_000_000, batch_size=32, lr=2e-6, whiten_rewards=False),
        kl=dict(coef=0.01, adaptive=False),
    )
