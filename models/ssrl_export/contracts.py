"""The training graphs' I/O contracts: batch inputs and statistics, in order."""


STATS = ["tokens", "pg_clipfrac_higher", "pg_clipfrac_lower", "ppo_kl", "kl", "entropy"]


TRAIN_BATCH = ["inputs_embeds", "attention_mask", "position_ids", "target_ids", "completion_mask", "old_logprobs",
               "ref_logprobs", "advantages", "temperature", "clip_ratio_low", "clip_ratio_high", "clip_ratio_dual",
               "kl_coef", "token_count", "rollout_is_weights", "loss_scale"]


SFT_BATCH = ["inputs_embeds", "attention_mask", "position_ids", "target_ids", "loss_mask", "token_count", "loss_scale"]
SFT_STATS = ["tokens", "correct"]
