//! Validation: one sample per held-out prompt, dealt over the ranks, scored.

use super::*;

impl Trainer {
    /// Runs validation: one greedy (or `val_temperature`) sample per held-out prompt, the
    /// prompts dealt over the ranks and their scores gathered.
    pub fn validate(&mut self) -> Result<Metrics, TrainError> {
        let n = self.val.samples.len().min(self.cfg.data.val_batch_size);
        let mine = self.world.share(n);
        let mut metrics = Metrics::new();
        if n == 0 {
            return Ok(metrics);
        }
        let out = self.validate_share(&mine);
        let (scores, left) = parallel::agree(self.world, out)?;
        let (mut scores_all, mut left_all) = (Vec::new(), Vec::new());
        for (s, l) in self.world.gather(&(scores, left)) {
            scores_all.extend(s);
            left_all.extend(l);
        }
        scores_all.sort_by_key(|s: &(usize, String, Score, usize)| s.0);
        left_all.sort_unstable();
        self.left_out.extend(left_all.into_iter().map(|(_, e)| e));
        let scores: Vec<(String, Score, usize)> =
            scores_all.into_iter().map(|s| (s.1, s.2, s.3)).collect();
        metrics.insert(
            "val/reward".into(),
            mean(scores.iter().map(|s| s.1.overall)),
        );
        metrics.insert(
            "val/accuracy".into(),
            mean(scores.iter().map(|s| s.1.accuracy)),
        );
        metrics.insert("val/format".into(), mean(scores.iter().map(|s| s.1.format)));
        metrics.insert(
            "val/response_length".into(),
            mean(scores.iter().map(|s| s.2 as f64)),
        );
        let tasks: std::collections::BTreeSet<&String> = scores.iter().map(|s| &s.0).collect();
        for t in tasks {
            metrics.insert(
                format!("val/accuracy/{t}"),
                mean(scores.iter().filter(|s| &s.0 == t).map(|s| s.1.accuracy)),
            );
        }
        Ok(metrics)
    }

    /// This rank's validation prompts (positions in the validation set) scored: (position,
    /// task, score, response tokens) each, and those whose images cannot be read.
    #[allow(clippy::type_complexity)]
    pub(super) fn validate_share(
        &mut self,
        mine: &[usize],
    ) -> Result<(Vec<(usize, String, Score, usize)>, Vec<(usize, String)>), TrainError> {
        let (mut scores, mut left) = (Vec::new(), Vec::new());
        let chunk = self
            .cfg
            .actor
            .micro_batch_size_per_device_for_experience
            .max(1);
        for part in mine.chunks(chunk) {
            let loaded = load_requests(&self.val.pending(part), part, 0x7661_6c00);
            let (part, reqs, gone) = usable(part, loaded);
            left.extend(gone);
            if reqs.is_empty() {
                continue;
            }
            let gen = GenerationConfig {
                group: 1,
                max_new_tokens: self.cfg.data.max_response_length,
                sampling: SamplingParams {
                    temperature: self.cfg.rollout.val_temperature,
                    top_k: 0,
                    top_p: self.cfg.rollout.val_top_p,
                    seed: self.cfg.trainer.seed,
                },
                verbatim: false,
                format_sentence: self.format(),
            };
            let out = self.engine.generate(&reqs, &gen, None)?;
            for c in out {
                let at = part[c.prompt_index];
                let s = &self.val.samples[at];
                let text = self
                    .engine
                    .prompts
                    .decode(&c.tokens)
                    .map_err(EngineError::from)?;
                scores.push((at, s.task.clone(), (self.reward)(&text, s), c.tokens.len()));
            }
        }
        Ok((scores, left))
    }
}
