//! The policy update of a GRPO step: each mini-batch's micro-batches through `train.onnx`
//! (and, with vision-tower LoRA, the tower's backward), the gradients summed over the ranks,
//! clipped, one AdamW step.

use super::*;

/// A step's images for the vision tower's LoRA: each prompt's pixel rows (its images' one
/// after the other) and grids, and each row's prompt.
pub(super) struct StepImages {
    pub(super) pixels: Vec<Vec<f32>>,
    pub(super) grids: Vec<Vec<[u32; 3]>>,
    pub(super) prompt_of: Vec<usize>,
}

/// One prompt's image features `[tokens, D]` and, for a DeepStack package, its DeepStack
/// features `[K, tokens, D]` (empty for others).
pub type ImageOutputs = (Vec<f32>, Vec<f32>);

/// Adds each gradient of `more` into `acc`'s.
pub(super) fn add_into(acc: &mut [Vec<f32>], more: &[Vec<f32>]) {
    for (a, b) in acc.iter_mut().zip(more) {
        a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
    }
}

/// The log-probs a step's update takes: the old policy's and the reference's per row, the
/// rollout correction's weights, and the KL coefficient in force.
pub(super) struct StepLogprobs {
    pub(super) old: Vec<Vec<f32>>,
    pub(super) reference: Vec<Vec<f32>>,
    pub(super) is_weights: Option<Vec<Vec<f32>>>,
    pub(super) kl_coef: f32,
}

impl Trainer {
    /// One `train.onnx` call: the loss of `rows` (summed over their completion tokens and
    /// divided by `token_count`, the mini-batch's tokens), the LoRA gradients in parameter
    /// order, and the stat sums. Per-row values are in completion order; `is_weights`, when
    /// given, weights each token's policy loss (rollout correction, [`tis_weights`]).
    #[allow(clippy::too_many_arguments)]
    pub fn loss_and_grads(
        &mut self,
        rows: &[Row<'_>],
        old: &[Vec<f32>],
        reference: &[Vec<f32>],
        advantages: &[f32],
        kl_coef: f32,
        token_count: usize,
        is_weights: Option<&[Vec<f32>]>,
    ) -> Result<MicroResult, TrainError> {
        let cfg = &self.cfg;
        let (t, low, high, dual) = (
            cfg.rollout.temperature,
            cfg.actor.clip_ratio_low,
            cfg.actor.clip_ratio_high,
            cfg.actor.clip_ratio_dual,
        );
        let mb = self.micro_batch(rows)?;
        let embeds = self.embed(&mb)?;
        loop {
            let scale = self.loss_scale.map_or(1.0, |s| s.scale);
            let r = self.run_train(
                &mb,
                embeds.clone(),
                [old, reference],
                advantages,
                [t, low, high, dual, kl_coef, token_count as f32, scale],
                is_weights,
            )?;
            // fp16: gradients that overflowed at this scale are run again at a lower one.
            // (with vision-tower LoRA, the image features' gradient too)
            let finite = || scale::all_finite(&r.grads) && scale::finite(&r.feature_grads);
            if !scale::rerun(&mut self.loss_scale, finite) {
                return Ok(r);
            }
            self.scale_backoffs += 1;
        }
    }

    /// One `train.onnx` run of the micro-batch `mb`; `settings` are temperature, the three clip
    /// ratios, the KL coefficient, the token count and the loss scale.
    pub(super) fn run_train(
        &mut self,
        mb: &MicroBatch,
        embeds: Vec<f32>,
        [old, reference]: [&[Vec<f32>]; 2],
        advantages: &[f32],
        settings: [f32; 7],
        is_weights: Option<&[Vec<f32>]>,
    ) -> Result<MicroResult, TrainError> {
        let mut inputs = self.batch_inputs(mb, embeds)?;
        let olds: Vec<&[f32]> = old.iter().map(Vec::as_slice).collect();
        let refs: Vec<&[f32]> = reference.iter().map(Vec::as_slice).collect();
        let shape = [mb.rows, mb.cols];
        inputs.push((
            "completion_mask".into(),
            tensor(&shape, mb.completion_mask.clone())?,
        ));
        inputs.push(("old_logprobs".into(), tensor(&shape, mb.scatter(&olds))?));
        inputs.push(("ref_logprobs".into(), tensor(&shape, mb.scatter(&refs))?));
        let weights = match is_weights {
            Some(w) => mb.scatter(&w.iter().map(Vec::as_slice).collect::<Vec<_>>()),
            None => vec![1.0; mb.rows * mb.cols],
        };
        inputs.push(("rollout_is_weights".into(), tensor(&shape, weights)?));
        inputs.push((
            "advantages".into(),
            tensor(&[mb.rows], advantages.to_vec())?,
        ));
        let names = [
            "temperature",
            "clip_ratio_low",
            "clip_ratio_high",
            "clip_ratio_dual",
            "kl_coef",
            "token_count",
            "loss_scale",
        ];
        for (name, v) in names.into_iter().zip(settings) {
            inputs.push((name.into(), scalar(v)?));
        }
        inputs.extend(Param::inputs(&self.params, false, false)?);
        let res = self.train.run(inputs).map_err(run_err("train"))?;
        let (_, loss) = res["loss"]
            .try_extract_tensor::<f32>()
            .map_err(run_err("train"))?;
        let (_, st) = res["stats"]
            .try_extract_tensor::<f32>()
            .map_err(run_err("train"))?;
        let m = &self.engine.package.manifest;
        let stats = Stats::read(&m.train.stats, st, "train")?;
        let grads = Param::read_grads(&self.params, &res, "train", false)?;
        let feature_grads = match self.vision_grad {
            None => Vec::new(),
            Some(_) => {
                let (_, g) = res["grad.inputs_embeds"]
                    .try_extract_tensor::<f32>()
                    .map_err(run_err("train"))?;
                let placeholders = [i64::from(m.tokens.image), i64::from(m.tokens.video)];
                let scale = settings[6];
                let d = m.text.hidden_size;
                let main = mb.feature_rows(g, d, placeholders);
                let mut out = match m.vision.deepstack_layers {
                    0 => main,
                    k => {
                        let (_, deep) = res["grad.deepstack_features"]
                            .try_extract_tensor::<f32>()
                            .map_err(run_err("train"))?;
                        let tokens: Vec<usize> =
                            mb.row_features.iter().map(|n| n / d.max(1)).collect();
                        batch::rows_with_deepstack(&main, deep, k, &tokens, d)
                    }
                };
                out.iter_mut().for_each(|v| *v /= scale);
                out
            }
        };
        Ok(MicroResult {
            loss: f64::from(loss[0]),
            grads,
            feature_grads,
            stats,
        })
    }

    /// The image features of one prompt's images (`pixels`: their pixel rows one after the
    /// other, as [`preprocess`](crate::model::processor::preprocess) makes them; `grids`: theirs)
    /// with the current vision-tower LoRA (`lora`) or without it (the reference policy's).
    pub fn image_features(
        &mut self,
        pixels: &[f32],
        grids: &[[u32; 3]],
        lora: bool,
    ) -> Result<Vec<f32>, TrainError> {
        Ok(self.image_outputs(pixels, grids, lora)?.0)
    }

    /// As [`Trainer::image_features`], with a DeepStack package's DeepStack features
    /// `[K, tokens, D]` (empty for others): (features, DeepStack features).
    pub fn image_outputs(
        &mut self,
        pixels: &[f32],
        grids: &[[u32; 3]],
        lora: bool,
    ) -> Result<ImageOutputs, TrainError> {
        Ok(self.engine.prompt_image_outputs(pixels, grids, lora)?)
    }

    /// The vision-tower LoRA gradients of one prompt's images (as [`Trainer::image_features`]
    /// takes them) from the loss's gradient at their features (`feature_grads`, unscaled, as
    /// [`MicroResult::feature_grads`] gives them, summed over the micro-batches): one
    /// vision_grad.onnx run at the current loss scale, run again at a lower one should the
    /// half-precision backward overflow. In parameter order, zeros for the language model's.
    pub fn vision_grads(
        &mut self,
        pixels: &[f32],
        grids: &[[u32; 3]],
        feature_grads: &[f32],
    ) -> Result<Vec<Vec<f32>>, TrainError> {
        let Some(sess) = self.vision_grad.as_mut() else {
            return Err(TrainError::Run {
                graph: "vision_grad",
                msg: "the package has no vision-tower LoRA".into(),
            });
        };
        let v = &self.engine.package.manifest.vision;
        let (d, k) = (v.out_hidden_size, v.deepstack_layers);
        let patches: usize = grids.iter().map(|g| (g[0] * g[1] * g[2]) as usize).sum();
        let grid: Vec<i64> = grids.iter().flatten().map(|&v| i64::from(v)).collect();
        // (the features' gradient, then a DeepStack package's K layers of it)
        let n = feature_grads.len() / (1 + k) / d.max(1);
        let (main, deep) = feature_grads.split_at(n * d);
        loop {
            let scale = self.loss_scale.map_or(1.0, |s| s.scale);
            let scaled = |g: &[f32]| g.iter().map(|g| g * scale).collect::<Vec<f32>>();
            let mut inputs = vec![
                (
                    "pixel_values".to_string(),
                    tensor(&[patches, pixels.len() / patches.max(1)], pixels.to_vec())?,
                ),
                (
                    "image_grid_thw".into(),
                    tensor(&[grids.len(), 3], grid.clone())?,
                ),
                ("grad_features".into(), tensor(&[n, d], scaled(main))?),
                ("loss_scale".into(), scalar(scale)?),
            ];
            if k > 0 {
                inputs.push(("grad_deepstack".into(), tensor(&[k, n, d], scaled(deep))?));
            }
            inputs.extend(Param::inputs(&self.params, true, false)?);
            let res = sess.run(inputs).map_err(run_err("vision_grad"))?;
            let grads = Param::read_grads(&self.params, &res, "vision_grad", true)?;
            if !scale::rerun(&mut self.loss_scale, || scale::all_finite(&grads)) {
                return Ok(grads);
            }
            self.scale_backoffs += 1;
        }
    }

    /// Each prompt's image features and DeepStack features, with (`lora`) or without the
    /// vision-tower LoRA.
    pub(super) fn prompt_features(
        &mut self,
        images: &StepImages,
        lora: bool,
    ) -> Result<Vec<ImageOutputs>, TrainError> {
        images
            .pixels
            .iter()
            .zip(&images.grids)
            .map(|(px, g)| self.image_outputs(px, g, lora))
            .collect()
    }

    /// The step's prompts' pixels for the vision tower's backward (`None` without vision-tower
    /// LoRA), preprocessed again as the rollout did.
    pub(super) fn step_images(
        &self,
        reqs: &[Request],
        completions: &[Completion],
    ) -> Result<Option<StepImages>, TrainError> {
        if self.vision_grad.is_none() {
            return Ok(None);
        }
        let cfg = &self.engine.preprocessor;
        let each = reqs
            .par_iter()
            .map(|r| {
                let mut px = Vec::new();
                let mut grids = Vec::new();
                for img in &r.images {
                    let p =
                        crate::model::processor::preprocess(img, cfg).map_err(EngineError::from)?;
                    px.extend(p.pixel_values);
                    grids.push(p.grid_thw);
                }
                Ok((px, grids))
            })
            .collect::<Result<Vec<_>, TrainError>>()?;
        let (pixels, grids) = each.into_iter().unzip();
        Ok(Some(StepImages {
            pixels,
            grids,
            prompt_of: completions.iter().map(|c| c.prompt_index).collect(),
        }))
    }

    /// One optimizer step per mini-batch of `actor.global_batch_size` prompts (`minis` of
    /// them; row `i` in mini-batch `mini_of[i]`): its micro-batches through `train.onnx`, the
    /// gradients summed over the ranks, clipped, AdamW; the new LoRA into the engine. A rank
    /// with no rows in a mini-batch adds zeros. The loss, its statistics, the gradient norms
    /// and the time split go to `metrics`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn update(
        &mut self,
        rows: &[Row<'_>],
        mini_of: &[usize],
        minis: usize,
        images: Option<&StepImages>,
        advantages: &[f32],
        lp: &StepLogprobs,
        metrics: &mut Metrics,
    ) -> Result<(), TrainError> {
        let a = &self.cfg.actor;
        let (micro_rows, micro_tokens, max_norm) = (
            a.micro_batch_size_per_device_for_update,
            a.max_token_len_per_micro_batch,
            a.max_grad_norm,
        );
        let h = AdamW {
            lr: a.optim.lr,
            beta1: a.optim.betas[0],
            beta2: a.optim.betas[1],
            eps: a.optim.eps,
            weight_decay: a.optim.weight_decay,
        };
        let (mut t_train, mut t_optim, mut t_wait, mut t_sum) = (0.0, 0.0, 0.0, 0.0);
        // (the vision tower's share of t_train: its features again, and its backward)
        let mut t_vision = 0.0;
        // (and its passes: forwards for the recomputed features, backwards)
        let (mut v_forwards, mut v_backwards) = (0usize, 0usize);
        let mut sums = Stats::default();
        let (mut loss_sum, mut norms, mut skipped) = (0.0, Vec::new(), 0usize);
        self.scale_backoffs = 0;
        for k in 0..minis {
            let t = Instant::now();
            let mini: Vec<usize> = (0..rows.len()).filter(|&i| mini_of[i] == k).collect();
            let mini = &mini[..];
            // EasyR1's global token mean: the mini-batch's tokens on every rank.
            let token_count = self
                .world
                .sum_usize(mini.iter().map(|&i| rows[i].completion.len()).sum());
            let mut grads: Vec<Vec<f32>> = self
                .params
                .iter()
                .map(|p| vec![0.0; p.value.len()])
                .collect();
            // With vision-tower LoRA: after an optimizer step the image features are the
            // updated tower's (the rollout's before the first) — computed again for this
            // mini-batch's prompts only — and the loss's gradient at them is summed per prompt
            // over the micro-batches, then taken through the tower once per prompt.
            let tv = Instant::now();
            let fresh: BTreeMap<usize, ImageOutputs> = match images {
                Some(im) if k > 0 => {
                    let prompts: std::collections::BTreeSet<usize> =
                        mini.iter().map(|&i| im.prompt_of[i]).collect();
                    let mut f = BTreeMap::new();
                    for p in prompts {
                        f.insert(p, self.image_outputs(&im.pixels[p], &im.grids[p], true)?);
                    }
                    v_forwards += f.len();
                    f
                }
                _ => BTreeMap::new(),
            };
            t_vision += tv.elapsed().as_secs_f64();
            let rows: Vec<Row<'_>> = match images {
                Some(im) if !fresh.is_empty() => rows
                    .iter()
                    .zip(&im.prompt_of)
                    .map(|(r, p)| match fresh.get(p) {
                        Some(f) => Row {
                            features: &f.0,
                            deepstack: &f.1,
                            ..*r
                        },
                        None => *r,
                    })
                    .collect(),
                _ => rows.to_vec(),
            };
            let mut feature_grads: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
            let mini_rows: Vec<Row<'_>> = mini.iter().map(|&i| rows[i]).collect();
            let ranges = batch::split(&mini_rows, micro_rows, micro_tokens);
            for range in ranges {
                let micro = &mini[range];
                let part: Vec<Row<'_>> = micro.iter().map(|&i| rows[i]).collect();
                let pick = |v: &[Vec<f32>]| -> Vec<Vec<f32>> {
                    micro.iter().map(|&i| v[i].clone()).collect()
                };
                let adv: Vec<f32> = micro.iter().map(|&i| advantages[i]).collect();
                let r = self.loss_and_grads(
                    &part,
                    &pick(&lp.old),
                    &pick(&lp.reference),
                    &adv,
                    lp.kl_coef,
                    token_count,
                    lp.is_weights.as_deref().map(pick).as_deref(),
                )?;
                loss_sum += r.loss;
                sums.add(&r.stats);
                add_into(&mut grads, &r.grads);
                if let Some(im) = images {
                    // (each row's features' gradient, then its DeepStack layers')
                    let per = 1 + self.engine.package.manifest.vision.deepstack_layers;
                    let mut at = 0;
                    for &i in micro {
                        let n = rows[i].features.len() * per;
                        let acc = feature_grads
                            .entry(im.prompt_of[i])
                            .or_insert_with(|| vec![0.0; n]);
                        let part =
                            r.feature_grads
                                .get(at..at + n)
                                .ok_or_else(|| TrainError::Run {
                                    graph: "train",
                                    msg: format!(
                                    "{} image-feature gradient values for rows with {} features",
                                    r.feature_grads.len(),
                                    at + n
                                ),
                                })?;
                        acc.iter_mut().zip(part).for_each(|(a, b)| *a += b);
                        at += n;
                    }
                }
            }
            if let Some(im) = images {
                let tv = Instant::now();
                for (p, g) in &feature_grads {
                    let vg = self.vision_grads(&im.pixels[*p], &im.grids[*p], g)?;
                    add_into(&mut grads, &vg);
                }
                v_backwards += feature_grads.len();
                t_vision += tv.elapsed().as_secs_f64();
            }
            let (wait, sum) = parallel::sum_grads(self.world, &self.reducer, &mut grads)?;
            (t_wait, t_sum) = (t_wait + wait, t_sum + sum);
            parallel::agree_loss_scale(self.world, &mut self.loss_scale);
            t_train += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let mut views: Vec<&mut [f32]> = grads.iter_mut().map(|v| v.as_mut_slice()).collect();
            let norm = self.backend.clip(&mut views, max_norm)?;
            norms.push(f64::from(norm));
            if norm.is_finite() {
                let opt_step = (self.step * minis + k + 1) as u32;
                // From here until the step ends, the weights are between states.
                self.updating = true;
                for (p, gr) in self.params.iter_mut().zip(&grads) {
                    self.backend.adamw(p, gr, opt_step, &h)?;
                }
                if let Some(s) = &mut self.loss_scale {
                    s.step_done();
                }
            } else {
                skipped += 1;
            }
            t_optim += t.elapsed().as_secs_f64();
        }
        self.push_lora()?;
        metrics.insert("timing_s/train".into(), t_train - t_wait - t_sum);
        metrics.insert("timing_s/optimizer".into(), t_optim);
        if images.is_some() {
            // (part of timing_s/train)
            metrics.insert("timing_s/train_vision".into(), t_vision);
            metrics.insert("perf/vision_forwards".into(), v_forwards as f64);
            metrics.insert("perf/vision_backwards".into(), v_backwards as f64);
        }
        if self.world.size > 1 {
            // (the wait is this rank's for the slowest: the largest over the ranks is kept)
            metrics.insert("timing_s/rank_wait".into(), t_wait);
            metrics.insert("timing_s/allreduce".into(), t_sum);
        }
        let (loss_sum, sums) = parallel::sum_loss(self.world, loss_sum, sums);
        let tokens = sums.get("tokens").max(1.0);
        metrics.insert(
            "actor/pg_loss_plus_kl".into(),
            loss_sum / minis.max(1) as f64,
        );
        for (stat, metric) in [
            ("pg_clipfrac_higher", "pg_clipfrac_higher"),
            ("pg_clipfrac_lower", "pg_clipfrac_lower"),
            ("ppo_kl", "ppo_kl"),
            ("kl", "kl_loss"),
            ("entropy", "entropy"),
        ] {
            metrics.insert(format!("actor/{metric}"), sums.get(stat) / tokens);
        }
        metrics.insert("actor/grad_norm".into(), mean(norms.iter().copied()));
        metrics.insert("actor/skipped_updates".into(), skipped as f64);
        if let Some(s) = self.loss_scale {
            metrics.insert("actor/loss_scale".into(), f64::from(s.scale));
            metrics.insert(
                "actor/loss_scale_backoffs".into(),
                self.scale_backoffs as f64,
            );
        }
        metrics.insert("actor/lr".into(), f64::from(h.lr));
        Ok(())
    }
}
