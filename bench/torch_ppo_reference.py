"""One PPO iteration of lm-human-preferences in PyTorch + transformers, for bench_ppo.py.

Written for the benchmark in the style of Hugging Face TRL's PPO loop (peers.md §3.1), without
depending on TRL, with the original's wiring and hyperparameters (spec §4):

- policy: `GPT2LMHeadModel` with a scalar value head on the shared trunk (the original's design,
  and TRL ≤ 0.11's `AutoModelForCausalLMWithValueHead`), trained with one Adam;
- reference policy: a frozen copy of the initial `GPT2LMHeadModel`;
- reward model: a frozen `GPT2Model` trunk + `Linear(d, 1)` head + gain/bias, scoring the raw
  query ‖ truncated response, the reward read at the last real token.

One iteration (`PPOReference.iteration`), phase by phase (each timed):
1. `generate`: `model.generate` with the KV cache, multinomial sampling at the task temperature,
   no top-k / top-p, exactly `response_length` new tokens (no EOS);
2. `policy_fwd`: a forward pass of the policy on query ‖ response for the sampling-time
   log-probs and values (TRL runs its value model here);
3. `ref_fwd`: the reference forward pass for the reference log-probs;
4. `reward`: truncate after the first stop token at index >= truncate_after (pads after it),
   score with the reward model, replace the score of responses without a stop token by the
   penalty;
5. `advantages`: per-token KL penalty with the score on the last token, reward whitening
   (mean kept), GAE as a Python loop over time (TRL style), returns, advantage whitening;
6. `update`: `noptepochs` epochs x `nminibatches` minibatches of clipped policy + value loss,
   each one Adam step (a fresh permutation per epoch).

Device and precision (`Hyper.device`, `Hyper.dtype`): "cpu" or "cuda"; "float32", or
"bfloat16" as mixed precision (float32 master weights and Adam state, forwards under
`torch.autocast(dtype=torch.bfloat16)`), the counterpart of rlhf_jax's `model.dtype=bfloat16`.
On CUDA every phase timing synchronizes the device first.

Masks and position ids are built TRL style (mask = ids != pad, positions = cumsum(mask) - mask,
pads replaced by id 0). Logits are computed only at the positions that predict response tokens
(TRL computes them at every position and slices afterwards; slicing first makes this baseline
cheaper, not dearer). Statistics (approxkl, clip fractions, entropy) are computed as TRL does,
under `no_grad`. Variances are population variances, as the original.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
import torch.nn.functional as F
import transformers


@dataclasses.dataclass(frozen=True)
class Hyper:
    """Shapes and PPO hyperparameters (the books task's unless the benchmark overrides them)."""

    batch_size: int = 16
    query_length: int = 64
    response_length: int = 24
    temperature: float = 0.7
    truncate_token: int = 13
    truncate_after: int = 16
    penalty: float = -1.0
    pad_id: int = 50259
    kl_coef: float = 0.15
    lr: float = 1e-5
    adam_eps: float = 1e-5
    noptepochs: int = 4
    nminibatches: int = 1
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = True
    device: str = "cpu"
    dtype: str = "float32"


def whiten(x: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean = x.mean()
    var = ((x - mean) ** 2).mean()
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def masked_inputs(ids: torch.Tensor, pad_id: int):
    """TRL-style model inputs: pads replaced by 0, masked out, skipped by the position ids."""
    mask = ids != pad_id
    positions = mask.long().cumsum(1) - mask.long()
    return ids.masked_fill(~mask, 0), mask.long(), positions


class PolicyWithValue(torch.nn.Module):
    """GPT2LMHeadModel + a zero-initialised scalar value head on the final hidden states."""

    def __init__(self, lm: transformers.GPT2LMHeadModel):
        super().__init__()
        self.lm = lm
        self.value_head = torch.nn.Linear(lm.config.n_embd, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def response_outputs(self, query_responses: torch.Tensor, context_length: int,
                         temperature: float, pad_id: int, with_values: bool = True):
        """Logits / T at the positions predicting the response tokens, and the values there."""
        ids, mask, positions = masked_inputs(query_responses, pad_id)
        hidden = self.lm.transformer(input_ids=ids, attention_mask=mask,
                                     position_ids=positions).last_hidden_state
        h = hidden[:, context_length - 1 : -1]
        logits = self.lm.lm_head(h) / temperature
        values = self.value_head(h).squeeze(-1) if with_values else None
        return logits, values


class RewardModel(torch.nn.Module):
    """GPT2Model trunk + Linear(d, 1) + trainable gain and bias; reward at the last real token."""

    def __init__(self, trunk: transformers.GPT2Model, kernel: np.ndarray, bias: np.ndarray,
                 gain: float, norm_bias: float):
        super().__init__()
        self.trunk = trunk
        self.head = torch.nn.Linear(trunk.config.n_embd, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor(np.asarray(kernel)).T)
            self.head.bias.copy_(torch.tensor(np.asarray(bias)))
        self.gain = torch.nn.Parameter(torch.tensor(float(gain)))
        self.norm_bias = torch.nn.Parameter(torch.tensor(float(norm_bias)))

    def forward(self, query_responses: torch.Tensor, pad_id: int) -> torch.Tensor:
        ids, mask, positions = masked_inputs(query_responses, pad_id)
        hidden = self.trunk(input_ids=ids, attention_mask=mask,
                            position_ids=positions).last_hidden_state
        last = mask.sum(1) - 1  # right padding only: the last real token
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(h).squeeze(-1) * self.gain + self.norm_bias


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.gather(F.log_softmax(logits, dim=-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


class PPOReference:
    """Holds the three models and the optimizer; `iteration(queries)` runs one PPO iteration."""

    def __init__(self, ckpt_dir: str, reward_head: dict, hp: Hyper, seed: int = 0):
        transformers.utils.logging.disable_progress_bar()
        self.hp = hp
        if hp.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={hp.dtype!r}: expected float32 or bfloat16")
        self.device = torch.device(hp.device)
        self.gen = torch.Generator().manual_seed(seed)  # minibatch permutations, on the host
        torch.manual_seed(seed)
        load_lm = lambda: transformers.GPT2LMHeadModel.from_pretrained(  # noqa: E731
            ckpt_dir, dtype=torch.float32)
        # eval(): dropout off on every model, as the original (spec §10.14).
        self.policy = PolicyWithValue(load_lm()).eval()
        self.ref = load_lm().eval().requires_grad_(False)
        self.reward_model = RewardModel(
            transformers.GPT2Model.from_pretrained(ckpt_dir, dtype=torch.float32),
            reward_head["kernel"], reward_head["bias"], reward_head["gain"],
            reward_head["norm_bias"]).eval().requires_grad_(False)
        # The config names 50256 as EOS; sampling must never stop early.
        self.policy.lm.generation_config.eos_token_id = None
        self.policy.lm.generation_config.pad_token_id = 0
        self.gen_kwargs = dict(
            do_sample=True, temperature=hp.temperature, top_k=0, top_p=1.0,
            max_new_tokens=hp.response_length, min_new_tokens=hp.response_length,
            eos_token_id=None, pad_token_id=0, use_cache=True,
        )
        for model in (self.policy, self.ref, self.reward_model):
            model.to(self.device)
        self.opt = torch.optim.Adam(self.policy.parameters(), lr=hp.lr, betas=(0.9, 0.999),
                                    eps=hp.adam_eps)
        self.attn = getattr(self.policy.lm.config, "_attn_implementation", "n/a")

    def autocast(self):
        """bfloat16 compute with float32 weights when `hp.dtype` is bfloat16, else a no-op."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.hp.dtype == "bfloat16")

    def now(self) -> float:
        """A timestamp after the device has finished its queued work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # -- rollout -----------------------------------------------------------------------------
    def ref_logprobs(self, query_responses: torch.Tensor, context_length: int) -> torch.Tensor:
        ids, mask, positions = masked_inputs(query_responses, self.hp.pad_id)
        hidden = self.ref.transformer(input_ids=ids, attention_mask=mask,
                                      position_ids=positions).last_hidden_state
        logits = self.ref.lm_head(hidden[:, context_length - 1 : -1]) / self.hp.temperature
        return logprobs_of(logits, query_responses[:, context_length:])

    def truncate(self, responses: torch.Tensor):
        hp = self.hp
        idx = torch.arange(responses.shape[1], device=responses.device)
        hits = (responses == hp.truncate_token) & (idx >= hp.truncate_after)
        after = (hits.long().cumsum(1) - hits.long()) > 0
        return responses.masked_fill(after, hp.pad_id), hits.any(1)

    def iteration(self, queries: torch.Tensor) -> tuple[dict, dict]:
        """Runs one PPO iteration on `queries` [B, Q] (int64, no pads).

        Returns:
            (phase -> seconds, stats dict of floats).
        """
        hp = self.hp
        t = {}
        queries = queries.to(self.device)
        ctx = queries.shape[1]
        time_now = self.now
        with torch.no_grad(), self.autocast():
            t0 = time_now()
            out = self.policy.lm.generate(queries, attention_mask=torch.ones_like(queries),
                                          **self.gen_kwargs)
            responses = out[:, ctx:]
            if responses.shape[1] != hp.response_length:
                raise RuntimeError(f"generate produced {responses.shape[1]} tokens")
            t["generate"] = time_now() - t0

            t0 = time_now()
            logits, values = self.policy.response_outputs(out, ctx, hp.temperature, hp.pad_id)
            logprobs, values = logprobs_of(logits, responses).float(), values.float()
            del logits
            t["policy_fwd"] = time_now() - t0

            t0 = time_now()
            ref_logprobs = self.ref_logprobs(out, ctx).float()
            t["ref_fwd"] = time_now() - t0

            t0 = time_now()
            truncated, valid = self.truncate(responses)
            raw = self.reward_model(torch.cat([queries, truncated], 1), hp.pad_id).float()
            scores = torch.where(valid, raw, torch.full_like(raw, hp.penalty))
            t["reward"] = time_now() - t0

            t0 = time_now()
            kl = logprobs - ref_logprobs
            non_score = -hp.kl_coef * kl
            rewards = non_score.clone()
            rewards[:, -1] += scores
            if hp.whiten_rewards:
                rewards = whiten(rewards, shift_mean=False)
            lastgaelam = torch.zeros(rewards.shape[0], device=rewards.device)
            adv_reversed = []
            length = rewards.shape[1]
            for step in reversed(range(length)):
                next_values = values[:, step + 1] if step < length - 1 else 0.0
                delta = rewards[:, step] + hp.gamma * next_values - values[:, step]
                lastgaelam = delta + hp.gamma * hp.lam * lastgaelam
                adv_reversed.append(lastgaelam)
            advantages = torch.stack(adv_reversed[::-1], 1)
            returns = advantages + values
            advantages = whiten(advantages)
            t["advantages"] = time_now() - t0

        t0 = time_now()
        mb_size = hp.batch_size // hp.nminibatches
        sums: dict[str, float] = {}
        for _ in range(hp.noptepochs):
            perm = torch.randperm(hp.batch_size, generator=self.gen).to(self.device)
            for start in range(0, hp.batch_size, mb_size):
                idx = perm[start : start + mb_size]
                mb_resp = responses[idx]
                with self.autocast():
                    new_logits, vpred = self.policy.response_outputs(
                        out[idx], ctx, hp.temperature, hp.pad_id)
                new_logits, vpred = new_logits.float(), vpred.float()
                new_logprobs = logprobs_of(new_logits, mb_resp)
                mb_values, mb_returns, mb_adv = values[idx], returns[idx], advantages[idx]
                vpred_clipped = mb_values + (vpred - mb_values).clamp(-hp.cliprange_value,
                                                                      hp.cliprange_value)
                vf1 = (vpred - mb_returns) ** 2
                vf2 = (vpred_clipped - mb_returns) ** 2
                vf_loss = 0.5 * torch.max(vf1, vf2).mean()
                logratio = new_logprobs - logprobs[idx]
                ratio = torch.exp(logratio)
                pg1 = -mb_adv * ratio
                pg2 = -mb_adv * ratio.clamp(1.0 - hp.cliprange, 1.0 + hp.cliprange)
                pg_loss = torch.max(pg1, pg2).mean()
                loss = pg_loss + hp.vf_coef * vf_loss
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                with torch.no_grad():
                    prob = F.softmax(new_logits, dim=-1)
                    entropy = torch.logsumexp(new_logits, -1) - (prob * new_logits).sum(-1)
                    step_stats = {
                        "ppo/loss/total": loss, "ppo/loss/policy": pg_loss,
                        "ppo/loss/value": vf_loss,
                        "ppo/policy/approxkl": 0.5 * (logratio ** 2).mean(),
                        "ppo/policy/clipfrac": (pg2 > pg1).float().mean(),
                        "ppo/val/clipfrac": (vf2 > vf1).float().mean(),
                        "ppo/policy/entropy": entropy.mean(),
                    }
                for k, v in step_stats.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
        t["update"] = time_now() - t0
        n = hp.noptepochs * hp.nminibatches
        stats = {k: v / n for k, v in sums.items()}
        stats |= {
            "objective/kl": float(kl.sum(1).mean()),
            "objective/score": float(scores.mean()),
            "objective/valid_fraction": float(valid.float().mean()),
        }
        return t, stats
