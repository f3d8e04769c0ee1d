//! The GRPO trainer on the tiny package: the loss graph against the formulas computed here by
//! hand, micro-batches adding up to one batch, the row layout, learning on a task the tiny
//! model can learn, exact resume, refused checkpoints and Ctrl-C behaviour.

mod common;

use common::letter_reward;
use spatial_ssrl::model::rope::RopeConfig;
use spatial_ssrl::train::batch::{self, Row};
use spatial_ssrl::train::checkpoint;
use spatial_ssrl::train::config::TrainConfig;
use spatial_ssrl::train::{Metrics, RunEnd, TrainError, Trainer};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny")
}

fn tempdir(name: &str) -> PathBuf {
    common::scratch(&format!("train-{name}"))
}

/// A text-only task set: short prompts keep each CPU step well under a second.
fn text_tasks(dir: &Path, n: usize) -> PathBuf {
    let p = dir.join("tasks.jsonl");
    let mut f = std::fs::File::create(&p).unwrap();
    for i in 0..n {
        let line = serde_json::json!({
            "id": format!("t{i}"), "task": "letter", "answer": "a", "images": [], "source": [],
            "meta": {}, "problem": format!("Question {i}: answer with the letter a, as often as you can."),
        });
        writeln!(f, "{line}").unwrap();
    }
    p
}

fn config(dir: &Path, data: PathBuf) -> TrainConfig {
    let mut c = TrainConfig {
        model: tiny(),
        out: dir.join("run"),
        ..Default::default()
    };
    c.data.train_files = vec![data];
    c.data.rollout_batch_size = 4;
    c.data.max_response_length = 8;
    c.data.format_prompt = String::new();
    c.rollout.n = 4;
    c.actor.global_batch_size = 2;
    c.actor.micro_batch_size_per_device_for_update = 3;
    c.actor.micro_batch_size_per_device_for_experience = 5;
    c.actor.optim.lr = 2e-2;
    c.trainer.save_freq = 0;
    c.trainer.kernels = "cpu".into();
    c
}

fn trainer(c: TrainConfig) -> Option<Trainer> {
    match Trainer::new(c, None) {
        Ok(t) => Some(t.with_reward(letter_reward())),
        Err(e) if e.to_string().contains("libonnxruntime") => {
            let _ = writeln!(std::io::stderr(), "SKIP: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn rope() -> RopeConfig {
    RopeConfig {
        image_token_id: 2012,
        video_token_id: 2013,
        spatial_merge_size: 2,
        tokens_per_second: 2.0,
    }
}

#[test]
fn rows_are_laid_out_for_the_graphs() {
    let (p1, c1) = (vec![10u32, 11, 12], vec![20u32, 21]);
    let (p2, c2) = (vec![13u32], vec![22u32, 23, 24]);
    let rows = [
        Row {
            prompt: &p1,
            completion: &c1,
            grids: &[],
            features: &[],
            deepstack: &[],
        },
        Row {
            prompt: &p2,
            completion: &c2,
            grids: &[],
            features: &[],
            deepstack: &[],
        },
    ];
    let mb = batch::build(&rows, 0, &rope()).unwrap();
    // P = 3, C = 3: 5 columns; prompts end at column 2.
    assert_eq!((mb.rows, mb.len, mb.first), (2, 5, 2));
    assert_eq!(mb.ids, vec![10, 11, 12, 20, 21, 0, 0, 13, 22, 23]);
    assert_eq!(mb.attention_mask, vec![1, 1, 1, 1, 1, 0, 0, 1, 1, 1]);
    assert_eq!(mb.target_ids, vec![11, 12, 20, 21, 0, 0, 13, 22, 23, 24]);
    assert_eq!(
        mb.completion_mask,
        vec![0., 0., 1., 1., 0., 0., 0., 1., 1., 1.]
    );
    // Text positions count the row's real tokens from 0; pads get 0 (as get_rope_index).
    assert_eq!(&mb.position_ids[..10], &[0, 1, 2, 3, 4, 0, 0, 0, 1, 2]);
    assert_eq!(mb.tokens(), 5);
    let lp: Vec<f32> = (0..10).map(|v| v as f32).collect();
    assert_eq!(
        mb.completion_values(&lp),
        vec![vec![2., 3.], vec![7., 8., 9.]]
    );
    assert_eq!(
        mb.scatter(&[&[1., 2.], &[3., 4., 5.]]),
        vec![0., 0., 1., 2., 0., 0., 0., 3., 4., 5.]
    );
    // The completion's columns alone (the memory-lean graphs' layout): the last C = 3 of each
    // row, the same values where they were.
    let mut narrow = mb.clone();
    narrow.completion_columns();
    assert_eq!((narrow.cols, narrow.at), (3, 0));
    assert_eq!(narrow.target_ids, vec![20, 21, 0, 22, 23, 24]);
    assert_eq!(narrow.completion_mask, vec![1., 1., 0., 1., 1., 1.]);
    let lp: Vec<f32> = vec![2., 3., 4., 7., 8., 9.];
    assert_eq!(
        narrow.completion_values(&lp),
        vec![vec![2., 3.], vec![7., 8., 9.]]
    );
    assert_eq!(
        narrow.scatter(&[&[1., 2.], &[3., 4., 5.]]),
        vec![1., 2., 0., 3., 4., 5.]
    );
    assert_eq!((narrow.ids, narrow.len), (mb.ids, mb.len));
}

/// EasyR1's per-token loss, written out from method.md §7.4 in f64.
fn token_loss(logp: f64, old: f64, reference: f64, adv: f64, kl_coef: f64, is_weight: f64) -> f64 {
    let (low, high, dual) = (0.2f64, 0.3f64, 3.0f64);
    let nkl = logp - old;
    let ratio = nkl.clamp(-20.0, 20.0).exp();
    let clipped = nkl.clamp((1.0 - low).ln(), (1.0 + high).ln()).exp();
    let higher = (-adv * ratio).max(-adv * clipped);
    let pg = if adv < 0.0 {
        higher.min(-adv * dual)
    } else {
        higher
    };
    let k = (reference - logp).clamp(-20.0, 20.0);
    let kl = (k.exp() - k - 1.0).clamp(-10.0, 10.0);
    pg * is_weight + kl_coef * kl
}

#[test]
fn the_loss_graph_is_easyr1s_loss_and_micro_batches_add_up() {
    let dir = tempdir("loss");
    let data = text_tasks(&dir, 8);
    let Some(mut t) = trainer(config(&dir, data)) else {
        return;
    };
    // Rows from real tokens of the tiny model's vocabulary.
    let prompts = [vec![100u32, 200, 300, 400], vec![500u32, 600]];
    let completions = [vec![7u32, 8, 9], vec![11u32, 12, 13, 14, 15]];
    let rows: Vec<Row<'_>> = (0..2)
        .map(|i| Row {
            prompt: &prompts[i],
            completion: &completions[i],
            grids: &[],
            features: &[],
            deepstack: &[],
        })
        .collect();
    // Make LoRA non-zero so reference (LoRA off) and policy differ.
    let lora: Vec<(String, Vec<f32>)> = t
        .lora()
        .into_iter()
        .map(|p| {
            let v = (0..p.data.len())
                .map(|i| ((i % 7) as f32 - 3.0) * 0.02)
                .collect();
            (p.name, v)
        })
        .collect();
    t.set_lora(&lora).unwrap();
    let logp = t.completion_logprobs(&rows, true).unwrap();
    let reference = t.completion_logprobs(&rows, false).unwrap();
    assert!(logp.iter().flatten().all(|v| v.is_finite() && *v < 0.0));
    let differs = logp
        .iter()
        .flatten()
        .zip(reference.iter().flatten())
        .any(|(a, b)| (a - b).abs() > 1e-4);
    assert!(differs, "LoRA changes nothing");
    // Old log-probs straddling every clip region; one positive, one negative advantage.
    let shifts = [[0.5f32, -0.5, 0.05], [1.5, -1.5, 0.1]];
    let old: Vec<Vec<f32>> = logp
        .iter()
        .enumerate()
        .map(|(r, v)| {
            v.iter()
                .enumerate()
                .map(|(j, x)| x + shifts[r % 2][j % 3])
                .collect()
        })
        .collect();
    let adv = [1.0f32, -2.0];
    let kl_coef = 0.05;
    let tokens = 8usize;
    // Rollout-correction weights on the policy loss (not the KL), as verl applies them.
    let isw: Vec<Vec<f32>> = completions
        .iter()
        .map(|c| (0..c.len()).map(|j| 0.5 + 0.5 * (j % 3) as f32).collect())
        .collect();
    let want = |weighted: bool| {
        let mut want = 0.0;
        for r in 0..2 {
            for j in 0..completions[r].len() {
                want += token_loss(
                    f64::from(logp[r][j]),
                    f64::from(old[r][j]),
                    f64::from(reference[r][j]),
                    f64::from(adv[r]),
                    kl_coef,
                    if weighted { f64::from(isw[r][j]) } else { 1.0 },
                );
            }
        }
        want / tokens as f64
    };
    let plain = t
        .loss_and_grads(&rows, &old, &reference, &adv, kl_coef as f32, tokens, None)
        .unwrap();
    let (want_plain, want) = (want(false), want(true));
    assert!(
        (plain.loss - want_plain).abs() <= 1e-5 * want_plain.abs().max(1.0),
        "graph loss {} vs hand-computed {want_plain}",
        plain.loss
    );
    let both = t
        .loss_and_grads(
            &rows,
            &old,
            &reference,
            &adv,
            kl_coef as f32,
            tokens,
            Some(&isw),
        )
        .unwrap();
    assert!(
        (both.loss - want).abs() <= 1e-5 * want.abs().max(1.0),
        "weighted graph loss {} vs hand-computed {want}",
        both.loss
    );
    assert!(
        (both.loss - plain.loss).abs() > 1e-3,
        "the weights change nothing"
    );
    // Two micro-batches of one row each, normalised by the whole batch's token count, add up
    // to the batch of two: loss and every gradient.
    let a = t
        .loss_and_grads(
            &rows[..1],
            &old[..1],
            &reference[..1],
            &adv[..1],
            kl_coef as f32,
            tokens,
            Some(&isw[..1]),
        )
        .unwrap();
    let b = t
        .loss_and_grads(
            &rows[1..],
            &old[1..],
            &reference[1..],
            &adv[1..],
            kl_coef as f32,
            tokens,
            Some(&isw[1..]),
        )
        .unwrap();
    assert!((a.loss + b.loss - both.loss).abs() <= 1e-6 * both.loss.abs().max(1.0));
    let mut nonzero = 0;
    for ((ga, gb), g) in a.grads.iter().zip(&b.grads).zip(&both.grads) {
        // f32 sums over differently padded batches: compare at the tensor's own scale.
        let scale = g.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        for ((x, y), z) in ga.iter().zip(gb).zip(g) {
            assert!(
                (x + y - z).abs() <= 1e-4 * scale,
                "{x} + {y} vs {z} (scale {scale})"
            );
            nonzero += usize::from(*z != 0.0);
        }
    }
    assert!(nonzero > 100, "gradients are all zero");
}

fn train_metrics(m: &[Metrics]) -> Vec<Vec<(String, f64)>> {
    m.iter()
        .map(|s| {
            s.iter()
                .filter(|(k, _)| {
                    !k.starts_with("timing_s/")
                        && !k.starts_with("throughput/")
                        && !k.starts_with("perf/")
                })
                .map(|(k, v)| (k.clone(), *v))
                .collect()
        })
        .collect()
}

/// Every step's metrics of a run of `c` (none where the tiny package cannot open).
fn step_metrics(c: TrainConfig) -> Option<Vec<Metrics>> {
    let mut t = trainer(c)?;
    let stop = AtomicBool::new(false);
    let mut seen = Vec::new();
    t.run(&stop, |m, step, _| {
        if step > 0 {
            seen.push(m.clone());
        }
    })
    .unwrap();
    Some(seen)
}

/// Rollout correction (actor.tis_cap): the step weights each token's policy loss by the capped
/// ratio of the recomputed old probability to the sampler's and reports the weights. On the
/// CPU the sampler and the training graph compute the same numbers, so every weight is ≈ 1.
#[test]
fn rollout_correction_is_reported_and_near_one_on_the_cpu() {
    let dir = tempdir("tis");
    let data = text_tasks(&dir, 8);
    let mut c = config(&dir, data);
    c.trainer.max_steps = 1;
    c.actor.tis_cap = 2.0;
    let Some(seen) = step_metrics(c) else { return };
    let m = &seen[0];
    let (mean, max, capped) = (
        m["rollout/tis_weight_mean"],
        m["rollout/tis_weight_max"],
        m["rollout/tis_capped_frac"],
    );
    assert!((mean - 1.0).abs() < 1e-3, "mean weight {mean}");
    assert!(max <= 2.0 && (max - 1.0).abs() < 1e-2, "max weight {max}");
    assert_eq!(capped, 0.0);
    assert!(m["rollout/logprob_mismatch_max"] < 1e-2);
}

/// GRPO on the fp16 package (rollouts, log-probs and the training step in fp16; LoRA tensors,
/// gradients and AdamW in fp32): finite losses and gradients, no update skipped, the sampler's
/// and the training graph's log-probs reported and close, and the loss scale where its
/// back-offs put it (65,536 halved once per overflowed micro-batch).
#[test]
fn grpo_runs_in_fp16_with_dynamic_loss_scaling() {
    let dir = tempdir("fp16");
    let data = text_tasks(&dir, 8);
    let mut c = config(&dir, data);
    c.model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-fp16");
    c.trainer.max_steps = 2;
    let Some(seen) = step_metrics(c) else { return };
    let mut backoffs = 0.0;
    for m in &seen {
        for k in ["actor/pg_loss_plus_kl", "actor/grad_norm", "actor/entropy"] {
            assert!(m[k].is_finite(), "{k} = {}", m[k]);
        }
        assert!(m["actor/grad_norm"] > 0.0);
        assert_eq!(m["actor/skipped_updates"], 0.0);
        assert!(m["rollout/logprob_mismatch_max"] < 0.1, "{:?}", m);
        eprintln!(
            "fp16 step: loss scale {}, back-offs {}, log-prob mismatch max {:.2e}",
            m["actor/loss_scale"],
            m["actor/loss_scale_backoffs"],
            m["rollout/logprob_mismatch_max"]
        );
        backoffs += m["actor/loss_scale_backoffs"];
        assert_eq!(m["actor/loss_scale"], 65536.0 / 2f64.powf(backoffs));
    }
}

#[test]
fn learning_is_real_mean_reward_rises() {
    let dir = tempdir("learn");
    let data = text_tasks(&dir, 16);
    let mut c = config(&dir, data);
    // A single-answer task: one token per response, whose letters the reward counts.
    c.data.max_response_length = 1;
    c.data.rollout_batch_size = 8;
    c.actor.global_batch_size = 4;
    c.actor.optim.lr = 1e-2;
    // Eight samples per prompt: with four, whether 60 steps climb depended on the seed (three
    // of eight seeds climbed by +0.15); with eight, every one of seeds 1-8 rose at least 3.1×
    // and by at least +0.14 (to 0.21-0.78 from 0.05-0.07).
    c.rollout.n = 8;
    c.trainer.max_steps = 60;
    c.trainer.seed = 3;
    let Some(steps) = step_metrics(c) else { return };
    let rewards: Vec<f64> = steps.iter().map(|m| m["reward/overall"]).collect();
    let first = rewards[..5].iter().sum::<f64>() / 5.0;
    let last = rewards[rewards.len() - 5..].iter().sum::<f64>() / 5.0;
    eprintln!("mean reward: first 5 steps {first:.4}, last 5 steps {last:.4}");
    assert!(
        last > 2.5 * first && last > first + 0.1,
        "no learning: first 5 steps {first:.4}, last 5 steps {last:.4} ({rewards:?})"
    );
}

#[test]
fn resume_equals_uninterrupted_and_bad_checkpoints_are_refused() {
    let dir = tempdir("resume");
    let data = text_tasks(&dir, 12);
    let stop = AtomicBool::new(false);
    // Uninterrupted: 4 steps.
    let mut c = config(&dir.join("a"), data.clone());
    c.trainer.max_steps = 4;
    let Some(mut t) = trainer(c.clone()) else {
        return;
    };
    t.run(&stop, |_, _, _| {}).unwrap();
    let straight = spatial_ssrl::train::read_metrics(&c.out.join("metrics.jsonl")).unwrap();
    assert_eq!(straight.len(), 4);
    // A run killed before its first checkpoint left metric lines (its validation before
    // training, step 0) and nothing to resume from: a run from step 0 rewrites them all.
    let mut c0 = config(&dir.join("killed"), data.clone());
    c0.trainer.max_steps = 4;
    std::fs::create_dir_all(&c0.out).unwrap();
    std::fs::write(
        c0.out.join("metrics.jsonl"),
        "{\"step\":0.0,\"val/reward\":0.5}\n{\"step\":1.0,\"reward/overall\":9.0}\n",
    )
    .unwrap();
    trainer(c0.clone())
        .unwrap()
        .run(&stop, |_, _, _| {})
        .unwrap();
    let again = spatial_ssrl::train::read_metrics(&c0.out.join("metrics.jsonl")).unwrap();
    assert_eq!(train_metrics(&again), train_metrics(&straight));
    // Interrupted after step 2 (the flag Ctrl-C sets), then resumed in a new process state.
    let mut c2 = config(&dir.join("b"), data);
    c2.trainer.max_steps = 4;
    let mut t = trainer(c2.clone()).unwrap();
    let end = t
        .run(&stop, |_, step, _| {
            if step == 2 {
                stop.store(true, Ordering::SeqCst);
            }
        })
        .unwrap();
    let RunEnd::Interrupted { checkpoint: ckpt } = end else {
        panic!("not interrupted: {end:?}");
    };
    assert!(ckpt.ends_with("global_step_2"), "{}", ckpt.display());
    stop.store(false, Ordering::SeqCst);
    let mut t = trainer(c2.clone()).unwrap();
    t.restore(&t.latest_checkpoint().unwrap()).unwrap();
    assert_eq!(t.step(), 2);
    t.run(&stop, |_, _, _| {}).unwrap();
    let resumed = spatial_ssrl::train::read_metrics(&c2.out.join("metrics.jsonl")).unwrap();
    assert_eq!(train_metrics(&resumed), train_metrics(&straight));
    // The adapter is PEFT's layout.
    let st = checkpoint::read_safetensors(&ckpt.join("adapter_model.safetensors")).unwrap();
    assert!(st.iter().any(|t| t.name
        == "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
        && t.shape == vec![8, 128]));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        (cfg["peft_type"].as_str(), cfg["r"].as_u64()),
        (Some("LORA"), Some(8))
    );
    // A flipped byte is refused, naming the file.
    let bad = dir.join("bad");
    copy_dir(&ckpt, &bad);
    let f = bad.join("optimizer.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&f, bytes).unwrap();
    let e = checkpoint::load(&bad).unwrap_err().to_string();
    assert!(
        e.contains("optimizer.safetensors") && e.contains("corrupt"),
        "{e}"
    );
    // A checkpoint whose writing never finished (no trainer_state.json) is refused.
    std::fs::remove_file(bad.join("trainer_state.json")).unwrap();
    let e = checkpoint::load(&bad).unwrap_err().to_string();
    assert!(e.contains("trainer_state.json"), "{e}");
    // Another configuration cannot resume this run.
    let mut other = c2.clone();
    other.actor.optim.lr = 1e-3;
    let mut t = trainer(other).unwrap();
    let e = t.restore(&ckpt).unwrap_err();
    assert!(matches!(e, TrainError::Resume(_)), "{e}");
    assert!(e.to_string().contains("lr"), "{e}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn micro_batches_respect_rows_and_padded_tokens() {
    let prompts: Vec<Vec<u32>> = [10usize, 10, 400, 10, 10, 10]
        .iter()
        .map(|n| vec![1; *n])
        .collect();
    let completion = vec![2u32; 5];
    let rows: Vec<Row<'_>> = prompts
        .iter()
        .map(|p| Row {
            prompt: p,
            completion: &completion,
            grids: &[],
            features: &[],
            deepstack: &[],
        })
        .collect();
    // Rows only: chunks of 4.
    assert_eq!(batch::split(&rows, 4, 0), vec![0..4, 4..6]);
    // 100 padded tokens: two short rows (2 × 14) fit, the long one goes alone, then three short.
    assert_eq!(batch::split(&rows, 8, 100), vec![0..2, 2..3, 3..6]);
    // Every split covers each row once, in order.
    for (r, t) in [(1, 0), (3, 50), (8, 1000)] {
        let s = batch::split(&rows, r, t);
        assert_eq!(s.first().unwrap().start, 0);
        assert_eq!(s.last().unwrap().end, rows.len());
        assert!(s
            .windows(2)
            .all(|w| w[0].end == w[1].start && !w[0].is_empty()));
    }
}

/// EasyR1's `filter_overlong_prompts`: prompts over `data.max_prompt_length` tokens — image
/// tokens counted from each image's size — are left out when the trainer opens the data, so no
/// step meets a prompt the model's context cannot hold; with the filter off they stay. A data
/// file that is not there is named once.
#[test]
fn overlong_prompts_are_left_out_of_the_data_and_missing_files_named() {
    let dir = std::env::temp_dir().join(format!("ssrl-train-overlong-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = text_tasks(&dir, 8);
    // Two prompts of fifteen photos (about 4,500 tokens), one of a single photo.
    let photos = ["astronaut.png", "coffee.png", "rocket.jpg"];
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&data)
        .unwrap();
    for (i, n) in [15usize, 1, 15].into_iter().enumerate() {
        let images: Vec<&str> = photos.iter().cycle().take(n).copied().collect();
        let line = serde_json::json!({
            "id": format!("p{i}"), "task": "letter", "answer": "a", "images": images,
            "problem": "<image>".repeat(n) + " Answer with the letter a.",
        });
        writeln!(f, "{line}").unwrap();
    }
    drop(f);
    let mut c = config(&dir, data);
    c.data.image_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/photos");
    let Some(t) = trainer(c.clone()) else { return };
    assert_eq!(t.overlong, (2, 0));
    // A prompt limit under the text prompts' length leaves none: refused, counting them.
    c.data.max_prompt_length = 20;
    let e = Trainer::new(c.clone(), None).err().unwrap().to_string();
    assert!(e.contains("0 prompts (11 more too long"), "{e}");
    c.data.filter_overlong_prompts = false;
    assert_eq!(trainer(c.clone()).unwrap().overlong, (0, 0));
    // A data file that is not there: named once, with the cause.
    let missing = dir.join("no-such-data.jsonl");
    c.data.train_files = vec![missing.clone()];
    let e = Trainer::new(c, None).err().unwrap().to_string();
    let name = missing.display().to_string();
    assert!(
        e.matches(&name).count() == 1 && e.contains("No such file"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Prompts whose images cannot be read do not end a run: a missing file, a prompt whose
/// placeholders do not match its images, or one without an answer, is left out when the data
/// opens; an image that does not
/// decode is left out of its step, named to `on_step` and
/// counted in the step's metrics. A step left with no prompt stops the run with the finished
/// steps saved (the error names their checkpoint), and a run resumes from them once the images
/// are mended.
#[test]
fn unreadable_images_are_left_out_and_a_failed_step_keeps_the_finished_ones() {
    let dir = tempdir("unreadable");
    let img = dir.join("img");
    std::fs::create_dir_all(&img).unwrap();
    let photos = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/photos");
    std::fs::copy(photos.join("coffee.png"), img.join("coffee.png")).unwrap();
    let jpeg = std::fs::read(photos.join("rocket.jpg")).unwrap();
    std::fs::write(img.join("broken.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    // Seven good prompts and one whose JPEG is cut short: two steps of four cover them all,
    // so each epoch meets the broken one once. One more names a file that is not there.
    let data = dir.join("tasks.jsonl");
    let mut f = std::fs::File::create(&data).unwrap();
    // And one whose prompt asks for two images but has one, and one without an answer.
    for i in 0..11 {
        let image = match i {
            3 => "broken.jpg",
            8 => "gone.png",
            _ => "coffee.png",
        };
        let marks = if i == 9 { "<image><image>" } else { "<image>" };
        let answer = if i == 10 { "" } else { "a" };
        let line = serde_json::json!({
            "id": format!("p{i}"), "answer": answer, "images": [image],
            "problem": format!("{marks} Question {i}: answer with the letter a."),
        });
        writeln!(f, "{line}").unwrap();
    }
    drop(f);
    let mut c = config(&dir, data);
    c.data.image_dir = img.clone();
    c.data.min_pixels = 3136;
    c.data.max_pixels = 50_176;
    c.trainer.total_epochs = 2;
    let Some(mut t) = trainer(c.clone()) else {
        return;
    };
    assert_eq!(t.unusable.len(), 3, "{:?}", t.unusable);
    assert!(
        t.unusable[2].contains("sample p10: no answer"),
        "{:?}",
        t.unusable
    );
    assert!(t.unusable[0].contains("gone.png"), "{:?}", t.unusable);
    assert!(
        t.unusable[1].contains("sample p9: the prompt has 2 image placeholders but 1 images"),
        "{:?}",
        t.unusable
    );
    assert_eq!(t.total_steps(), 4);
    let stop = AtomicBool::new(false);
    let mut reported = Vec::new();
    let end = t
        .run(&stop, |m, step, left_out| {
            for e in left_out {
                assert!(e.contains("broken.jpg") && e.contains("truncated"), "{e}");
                reported.push(step);
            }
            let counted = m.get("data/unreadable_prompts").copied().unwrap_or(0.0);
            assert_eq!(counted, left_out.len() as f64, "step {step}");
        })
        .unwrap();
    assert!(matches!(end, RunEnd::Finished { .. }));
    assert_eq!(reported.len(), 2, "once per epoch: {reported:?}");

    // Every image broken once step 1 is done: step 2's prompts were decoded during step 1, so
    // step 3 is the first without any. The error keeps steps 1-2 in a checkpoint.
    c.out = dir.join("run2");
    let mut t = trainer(c.clone()).unwrap();
    let png = std::fs::read(img.join("coffee.png")).unwrap();
    let e = t
        .run(&stop, |_, step, _| {
            if step == 1 {
                std::fs::write(img.join("coffee.png"), b"not an image").unwrap();
            }
        })
        .unwrap_err();
    let kept = match &e {
        TrainError::Kept {
            step, checkpoint, ..
        } => {
            assert_eq!(*step, 2, "{e}");
            checkpoint.clone()
        }
        other => panic!("{other}"),
    };
    let msg = e.to_string();
    assert!(
        msg.contains("no prompt of step 3") && msg.contains("--resume"),
        "{msg}"
    );
    assert_eq!(checkpoint::list(&c.out.join("checkpoints")).len(), 1);
    // Mended, the run resumes after step 2 and finishes.
    std::fs::write(img.join("coffee.png"), png).unwrap();
    let mut t = trainer(c.clone()).unwrap();
    t.restore(&kept).unwrap();
    assert_eq!(t.step(), 2);
    let end = t.run(&stop, |_, _, _| {}).unwrap();
    assert!(matches!(end, RunEnd::Finished { .. }));
    assert_eq!(t.step(), 4);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A completion that samples an image placeholder id (the tiny model can: its vocabulary holds
/// them) keeps that token's embedding in training, as the sampler fed it back, and does not take
/// a later row's image features: a micro-batch with such a row before a row with an image gives
/// the loss and gradients of the two rows run apart.
#[test]
fn a_sampled_image_placeholder_does_not_take_another_rows_features() {
    let dir = tempdir("placeholder");
    let c = config(&dir, text_tasks(&dir, 4));
    let Some(mut t) = trainer(c) else { return };
    let tokens = spatial_ssrl::model::package::Package::open(&tiny())
        .unwrap()
        .manifest
        .tokens;
    let engine = spatial_ssrl::rollout::Engine::open(&tiny(), None).unwrap();
    let img = image::open(tiny().join("goldens/image_0_0.png"))
        .unwrap()
        .to_rgb8();
    let p = spatial_ssrl::model::processor::preprocess(&img, &engine.preprocessor).unwrap();
    let features = t
        .image_features(&p.pixel_values, &[p.grid_thw], true)
        .unwrap();
    let n = (p.grid_thw[0] * p.grid_thw[1] * p.grid_thw[2] / 4) as usize;
    let mut with_image = vec![10u32, 11, tokens.vision_start];
    with_image.extend(std::iter::repeat_n(tokens.image, n));
    with_image.extend([tokens.vision_end, 12, 13]);
    let text_prompt = vec![20u32, 21, 22];
    // Row 0 samples the image placeholder (and the video one) mid-completion.
    let sampled = vec![30u32, tokens.image, 31, tokens.video, 32];
    let plain = vec![40u32, 41, 42, 43];
    let rows = [
        Row {
            prompt: &text_prompt,
            completion: &sampled,
            grids: &[],
            features: &[],
            deepstack: &[],
        },
        Row {
            prompt: &with_image,
            completion: &plain,
            grids: std::slice::from_ref(&p.grid_thw),
            features: &features,
            deepstack: &[],
        },
    ];
    let lp = |r: &Row<'_>| vec![-2.0f32; r.completion.len()];
    let count = sampled.len() + plain.len();
    let run = |t: &mut Trainer, rows: &[Row<'_>], adv: &[f32]| {
        let old: Vec<Vec<f32>> = rows.iter().map(lp).collect();
        t.loss_and_grads(rows, &old, &old, adv, 0.01, count, None)
            .unwrap()
    };
    let both = run(&mut t, &rows, &[1.0, -0.5]);
    let first = run(&mut t, &rows[..1], &[1.0]);
    let second = run(&mut t, &rows[1..], &[-0.5]);
    let dl = (both.loss - (first.loss + second.loss)).abs();
    assert!(
        dl <= 1e-5,
        "loss {} vs {} + {}",
        both.loss,
        first.loss,
        second.loss
    );
    for (k, g) in both.grads.iter().enumerate() {
        let scale = g.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let d = g
            .iter()
            .zip(first.grads[k].iter().zip(&second.grads[k]))
            .map(|(a, (b, c))| (a - (b + c)).abs())
            .fold(0f32, f32::max);
        assert!(d <= 1e-4 * scale, "gradient {k}: {d} apart (scale {scale})");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
