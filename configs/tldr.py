r"""TL;DR: summarise Reddit posts (Ziegler et al. 2019, §3.2; the original `launch.py` `tldr`).

GPT-2 124M (spec §2.4, §6.1):

| task | 500-token post (right-padded) + "\n\nTL;DR:" -> 75 tokens, cut at a newline at index >= 55, T = 0.7 |
| labels | best-of-4 `tldr/online_45k.json`, 46,000 train the reward model |
| reward model | batch 16, lr 2.5e-5, one epoch, normalised on 256 rho samples (rollouts of 128) |
| PPO | 1M episodes, batch 32, lr 2e-6, no reward whitening |
| KL | fixed 0.03 ("0.01 too low") |
| mock labeler | "copying": prefers sentences copied from the post |

The original passed `rewards.whiten=False`, a field that does not exist, so its tldr and cnndm
policy runs failed at start-up (spec §6.3.1); the intent, required anyway with 4 rollouts per
rank, is `ppo.whiten_rewards=False`. `online_45k` holds labels collected online during the
original's 774M runs; launch.py keeps `offline_60k` (num_train 60000) as a commented-out
alternative.

`:model=774M` sets the paper's 774M values (its appendix, as spec.md §3.2 and §4.1 quote them):
reward model batch 32, lr 1.77e-5 (and 45,984 training labels, the nearest multiple of 32
below 46,000); PPO 2M episodes, batch 512, lr 7.07e-6. The paper trained no 355M or 1.5B model,
so `:model=355M` and `:model=1.5B` keep the 124M values above (unverified for those sizes).

Queries: "tfds:reddit" (Webis-TLDR-17 through tfds, cleaned as the original's tldr.py; its last
5% is the test split), prepared once, offline, with `tfds build reddit --file_format=array_record`
and found through `task.query_data_dir`; or "jsonl:/data/posts_{split}.jsonl" (fields article,
summary); or `labels:` (the label file's own queries). `task.query_max_texts` caps how many posts
the query stream encodes (reddit has 3.8M).

Supervised baseline (`sft.mode="summarize"`: loss on the reference TL;DRs), then PPO from it:
  python -m rlhf_jax.train_sft --config configs/tldr.py --workdir runs/tldr_sft \
      --config.task.query_data_dir=/data/tfds
  python -m rlhf_jax.train_policy --config configs/tldr.py --workdir runs/tldr_sl_rl \
      --config.model.checkpoint=runs/tldr_sft/hf_model --config.task.query_data_dir=/data/tfds \
      --config.labels.path=/data/labels/tldr/online_45k.json
Zero-shot GPT-2 policy (trains the reward model first, as the original's train_new_model):
  python -m rlhf_jax.train_policy --config configs/tldr.py --workdir runs/tldr \
      --config.labels.path=/data/labels/tldr/online_45k.json --config.task.query_data_dir=/data/tfds
ROUGE, novelty and copying of samples, beside the lead-3 baseline:
  python -m rlhf_jax.evaluate --samples runs/tldr_sft/samples.jsonl --output report.json \
      --plot report.png
CPU smoke run: the tiny random GPT-2; the builtin passages as posts, one sentence per paragraph,
with their first sentence as the reference ("builtin:lead"); queries of 128 and responses of 32
tokens so that everything fits the tiny model's 256 positions (1-2 minutes on 2 cores):
  python -m rlhf_jax.train_sft --config configs/tldr.py:runlocal --workdir /tmp/tldr_sft

Arguments: model=<124M|355M|774M|1.5B>, runlocal.
"""

from rlhf_jax import config_lib


def get_config(arg=None):
    return config_lib.summarize_experiment(
        arg,
        task=dict(query_dataset="tfds:reddit", query_prefix="", end_text=None, temperature=0.7),
        labels=config_lib.LABELS_URL + "tldr/online_45k.json", num_train=46000,
        labeler="copying",
        rewards=dict(batch_size=16, lr=2.5e-5, rollout_batch_size=128),
        ppo=dict(total_episodes=1_000_000, batch_size=32, lr=2e-6, whiten_rewards=False),
        kl=dict(coef=0.03, adaptive=False),
    )
