"""Online RLHF (spec §5.3): labels collected on the policy's samples while PPO runs, and the
reward model retrained on a schedule. Modules: `loop` (the loop train_policy runs), `schedule`
(the label-count arithmetic), `comparisons` (records and label arrays) and `store` (the label
store or server behind one interface)."""
