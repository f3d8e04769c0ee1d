//! The experience of a GRPO step: its prompts (this rank's share, decoded in the background),
//! the rollouts, rewards and group advantages, and the old and reference log-probs.

use super::*;

/// This rank's share of a step's prompts: dataset indices, requests (images decoded) and
/// each one's place among the step's usable prompts over all ranks (its mini-batch), with how
/// many those are.
pub(super) struct StepShare {
    pub(super) idx: Vec<usize>,
    pub(super) reqs: Vec<Request>,
    pub(super) order: Vec<usize>,
    pub(super) prompts: usize,
}

/// `all`'s items at `positions`.
pub(super) fn pick(all: &[usize], positions: &[usize]) -> Vec<usize> {
    positions.iter().map(|&p| all[p]).collect()
}

impl Trainer {
    /// This rank's share of the step's prompts (their requests with images decoded): decoded
    /// in the background during the previous step (double buffering), the next step's
    /// decoding started now. A prompt whose images cannot be decoded is left out of the step
    /// (named in `left_out`, on every rank), not the run's end.
    pub(super) fn step_prompts(&mut self, metrics: &mut Metrics) -> Result<StepShare, TrainError> {
        let seed = self.cfg.trainer.seed;
        let all = self.batch_indices(self.step);
        let mine = self.world.share(all.len());
        let salt = |step: usize| mix64(seed ^ (step as u64) << 20);
        let loaded = match self.prefetch.take() {
            Some((step, handle)) if step == self.step => {
                handle.join().map_err(|_| TrainError::LoaderPanicked)?
            }
            _ => load_requests(
                &self.data.pending(&pick(&all, &mine)),
                &mine,
                salt(self.step),
            ),
        };
        let (kept, reqs, left) = usable(&mine, loaded);
        // Which of the step's prompts every rank kept, and why the others were left out.
        let (mut order_all, mut left_all) = (Vec::new(), Vec::new());
        for (k, l) in self.world.gather(&(kept.clone(), left)) {
            order_all.extend(k);
            left_all.extend(l);
        }
        order_all.sort_unstable();
        left_all.sort_unstable();
        self.left_out = left_all.into_iter().map(|(_, e)| e).collect();
        if !self.left_out.is_empty() {
            metrics.insert("data/unreadable_prompts".into(), self.left_out.len() as f64);
        }
        if order_all.is_empty() {
            return Err(TrainError::Data {
                path: self.cfg.data.train_files[0].clone(),
                msg: format!(
                    "no prompt of step {} has images that can be read: {}",
                    self.step + 1,
                    self.left_out.join("; ")
                ),
            });
        }
        if self.step + 1 < self.total_steps() {
            let next_all = self.batch_indices(self.step + 1);
            let next_mine = self.world.share(next_all.len());
            let next = self.data.pending(&pick(&next_all, &next_mine));
            let salt = salt(self.step + 1);
            self.prefetch = Some((
                self.step + 1,
                std::thread::spawn(move || load_requests(&next, &next_mine, salt)),
            ));
        }
        Ok(StepShare {
            idx: pick(&all, &kept),
            order: (kept.iter())
                .map(|p| {
                    order_all
                        .binary_search(p)
                        .expect("every rank's kept are gathered")
                })
                .collect(),
            prompts: order_all.len(),
            reqs,
        })
    }

    /// `rollout.n` samples of each prompt with the current LoRA.
    pub(super) fn roll_out(
        &mut self,
        reqs: &[Request],
    ) -> Result<(Prepared, Vec<Completion>), TrainError> {
        if reqs.is_empty() {
            // (a rank whose share of the step could not be read)
            return Ok((Prepared::default(), Vec::new()));
        }
        let cfg = &self.cfg;
        let gen = GenerationConfig {
            group: cfg.rollout.n,
            max_new_tokens: cfg.data.max_response_length,
            sampling: SamplingParams {
                temperature: cfg.rollout.temperature,
                top_k: cfg.rollout.top_k.max(0) as usize,
                top_p: cfg.rollout.top_p,
                seed: cfg.trainer.seed,
            },
            verbatim: false,
            format_sentence: self.format(),
        };
        let prepared: Prepared = self.engine.prepare(reqs, self.format().as_deref())?;
        let completions = self.engine.generate_prepared(reqs, &prepared, &gen, None)?;
        Ok((prepared, completions))
    }

    /// Each sample's reward against its prompt's sample (`idx`), and the group advantages.
    pub(super) fn rewards(
        &self,
        idx: &[usize],
        completions: &[Completion],
    ) -> Result<(Vec<Score>, Vec<f32>), TrainError> {
        let mut scores = Vec::with_capacity(completions.len());
        for c in completions {
            let s = &self.data.samples[idx[c.prompt_index]];
            let text = self
                .engine
                .prompts
                .decode(&c.tokens)
                .map_err(EngineError::from)?;
            scores.push((self.reward)(&text, s));
        }
        if scores.is_empty() {
            return Ok((scores, Vec::new()));
        }
        let overall: Vec<f32> = scores.iter().map(|s| s.overall as f32).collect();
        let adv_cfg = self.cfg.algorithm.adv_estimator.config();
        let advantages = self
            .backend
            .advantages(&overall, self.cfg.rollout.n, &adv_cfg)?;
        Ok((scores, advantages))
    }

    /// The KL term's coefficient (0 without it).
    pub(super) fn kl_coef(&self) -> f32 {
        let alg = &self.cfg.algorithm;
        if alg.use_kl_loss {
            alg.kl_coef
        } else {
            0.0
        }
    }

    /// The old policy's log-probs (recomputed, or the sampler's), the reference's (LoRA off)
    /// where the KL term needs them, and the rollout correction's weights; the sampler /
    /// trainer mismatch and the weights' statistics go to `metrics`. `ref_rows` are the rows
    /// with the base vision tower's image features (a package with vision-tower LoRA; else
    /// `rows` serve both).
    pub(super) fn policy_logprobs(
        &mut self,
        rows: &[Row<'_>],
        ref_rows: Option<&[Row<'_>]>,
        completions: &[Completion],
        metrics: &mut Metrics,
    ) -> Result<StepLogprobs, TrainError> {
        let rollout_lp: Vec<Vec<f32>> = completions.iter().map(|c| c.logprobs.clone()).collect();
        let kl_coef = self.kl_coef();
        let recompute = self.cfg.actor.old_logprobs == "recompute";
        let tis_cap = self.cfg.actor.tis_cap;
        let wanted = [(recompute, true), (kl_coef != 0.0, false)];
        let computed = match ref_rows {
            // (the two settings embed different features)
            Some(base) => {
                let mut out = Vec::new();
                for (want, lora) in wanted {
                    if want {
                        let on = if lora { rows } else { base };
                        out.extend(self.completion_logprobs_for(on, &[lora])?);
                    }
                }
                out
            }
            None => {
                let settings: Vec<bool> = wanted
                    .into_iter()
                    .filter_map(|(want, lora)| want.then_some(lora))
                    .collect();
                self.completion_logprobs_for(rows, &settings)?
            }
        };
        let mut computed = computed.into_iter();
        let old = if recompute {
            let old = computed.next().expect("asked for");
            let mut diffs = Tally::default();
            (old.iter().flatten().zip(rollout_lp.iter().flatten()))
                .for_each(|(a, b)| diffs.add(f64::from((a - b).abs()), false));
            // (over every rank's tokens)
            let diffs = diffs.over(self.world);
            metrics.insert("rollout/logprob_mismatch_mean".into(), diffs.mean());
            metrics.insert("rollout/logprob_mismatch_max".into(), diffs.max);
            old
        } else {
            rollout_lp.clone()
        };
        let reference = computed.next().unwrap_or_else(|| old.clone());
        let is_weights = (tis_cap > 0.0).then(|| {
            let (w, tally) = tis_weights(&old, &rollout_lp, tis_cap);
            let t = tally.over(self.world);
            metrics.insert("rollout/tis_weight_mean".into(), t.mean());
            metrics.insert("rollout/tis_weight_max".into(), t.max);
            metrics.insert("rollout/tis_capped_frac".into(), t.hit_share());
            w
        });
        Ok(StepLogprobs {
            old,
            reference,
            is_weights,
            kl_coef,
        })
    }

    /// `logprobs.onnx` over rows, in micro-batches; `lora = false` runs the base model (the
    /// reference policy). Returns each row's completion log-probs.
    pub fn completion_logprobs(
        &mut self,
        rows: &[Row<'_>],
        lora: bool,
    ) -> Result<Vec<Vec<f32>>, TrainError> {
        Ok(self
            .completion_logprobs_for(rows, &[lora])?
            .pop()
            .expect("one setting asked for"))
    }

    /// [`Trainer::completion_logprobs`] for several LoRA settings at once: each micro-batch is
    /// laid out and embedded once and run once per setting.
    pub fn completion_logprobs_for(
        &mut self,
        rows: &[Row<'_>],
        loras: &[bool],
    ) -> Result<Vec<Vec<Vec<f32>>>, TrainError> {
        let chunk = self.cfg.actor.micro_batch_size_per_device_for_experience;
        let budget = self.cfg.actor.max_token_len_per_micro_batch;
        let mut out = vec![Vec::with_capacity(rows.len()); loras.len()];
        for range in batch::split(rows, chunk, budget) {
            let mb = self.micro_batch(&rows[range])?;
            let embeds = self.embed(&mb)?;
            for (slot, &lora) in out.iter_mut().zip(loras) {
                let mut inputs = self.batch_inputs(&mb, embeds.clone())?;
                inputs.push(("temperature".into(), scalar(self.cfg.rollout.temperature)?));
                inputs.extend(Param::inputs(&self.params, false, !lora)?);
                let res = self.logprobs.run(inputs).map_err(run_err("logprobs"))?;
                let (_, lp) = res["token_logprobs"]
                    .try_extract_tensor::<f32>()
                    .map_err(run_err("logprobs"))?;
                slot.extend(mb.completion_values(lp));
            }
        }
        Ok(out)
    }
}
