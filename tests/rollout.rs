//! The generation engine against the transformers goldens of the tiny package: chat template,
//! prompt ids, M-RoPE positions, logits of prefill + 5 decode steps and the greedy tokens; then
//! batch-independent sampling and LoRA swaps.

use spatial_ssrl::kernels::SamplingParams;
use spatial_ssrl::rollout::{Engine, EngineError, GenerationConfig, Request, Trace};
use std::io::Write;
use std::path::{Path, PathBuf};

mod common;

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny")
}

/// The tiny model exported with `--dtype fp16`: weights, arithmetic and cache in fp16.
fn tiny_fp16() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-fp16")
}

fn engine() -> Option<Engine> {
    engine_of(&tiny())
}

fn engine_of(dir: &Path) -> Option<Engine> {
    match Engine::open(dir, None) {
        Ok(e) => Some(e),
        Err(EngineError::Package(spatial_ssrl::model::package::PackageError::Runtime(e))) => {
            let _ = writeln!(std::io::stderr(), "SKIP: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn golden() -> (serde_json::Value, Vec<Request>) {
    golden_of(&tiny())
}

/// The transformers goldens of the package `dir` (run in the package's dtype) and their requests.
fn golden_of(dir: &Path) -> (serde_json::Value, Vec<Request>) {
    let g: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("goldens/rollout.json")).unwrap()).unwrap();
    let reqs = g["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(g["images"].as_array().unwrap())
        .enumerate()
        .map(|(i, (text, files))| {
            let files = files.as_array().unwrap();
            Request {
                id: i as u64,
                problem: format!(
                    "{}{}",
                    "<image>".repeat(files.len()),
                    text.as_str().unwrap()
                ),
                images: files
                    .iter()
                    .map(|f| {
                        image::open(dir.join("goldens").join(f.as_str().unwrap()))
                            .unwrap()
                            .to_rgb8()
                    })
                    .collect(),
            }
        })
        .collect();
    (g, reqs)
}

/// The goldens' greedy tokens of each prompt.
fn greedy_tokens(g: &serde_json::Value) -> Vec<Vec<u32>> {
    g["greedy_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn greedy(n: usize) -> GenerationConfig {
    GenerationConfig {
        group: 1,
        max_new_tokens: n,
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        verbatim: false,
        format_sentence: None,
    }
}

#[test]
fn greedy_rollout_matches_transformers() {
    if let Some(mut e) = engine() {
        assert_eq!(e.precision_note(), None);
        assert_matches_goldens(&mut e, &tiny(), 1e-4);
    }
}

/// The fp16 package (weights, matrix products, attention and cache in fp16; norms, softmax and
/// rotary angles in fp32) against transformers run in fp16 on the same weights: the same greedy
/// tokens, and logits within fp16's rounding (3e-2 on logits of magnitude ~1–5); against the
/// fp32 package, the same tokens too.
#[test]
fn greedy_rollout_in_fp16_matches_transformers_in_fp16() {
    let Some(mut e) = engine_of(&tiny_fp16()) else {
        return;
    };
    assert_eq!(e.package.manifest.dtype, "fp16");
    // What the commands say when it opens on the CPU.
    let note = e.precision_note().unwrap();
    assert!(
        note.contains("fp16 weights, arithmetic and cache") && note.contains("the CPU's"),
        "{note}"
    );
    assert_matches_goldens(&mut e, &tiny_fp16(), 3e-2);
    let (g16, _) = golden_of(&tiny_fp16());
    let (g32, _) = golden();
    assert_eq!(g16["greedy_tokens"], g32["greedy_tokens"]);
}

/// A Qwen3-VL package (patch 16, learned vision position embeddings, DeepStack features into
/// the first language layers, q/k-normed Qwen3 layers, interleaved M-RoPE, its chat template)
/// rolls out as transformers' Qwen3VLForConditionalGeneration generates: the same prompt ids
/// and positions, logits of prefill and decode steps within 1e-4, the same greedy tokens —
/// with CPU slices too.
#[test]
fn greedy_rollout_of_qwen3_vl_matches_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-qwen3-vl");
    let Some(mut e) = engine_of(&dir) else { return };
    assert_eq!(
        e.package.manifest.family,
        spatial_ssrl::model::package::Family::QWEN3_VL
    );
    assert_eq!(e.package.manifest.vision.deepstack_layers, 2);
    assert_matches_goldens(&mut e, &dir, 1e-4);
    let (g, reqs) = golden_of(&dir);
    e.set_cpu_slices(Some(2)).unwrap();
    let out = e.generate(&reqs, &greedy(6), None).unwrap();
    for (c, want) in out.iter().zip(greedy_tokens(&g)) {
        assert_eq!(c.tokens, want, "with two CPU slices");
    }
}

/// GRPO on the Qwen3-VL package, prompts with photos: the log-prob graph (DeepStack features
/// at the image positions) recomputes the sampler's log-probs of the sampled tokens as closely
/// as on Qwen2.5-VL, and two steps train (finite loss and gradients, the LoRA moves).
#[test]
fn grpo_trains_qwen3_vl_with_deepstack() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-qwen3-vl");
    let tmp = std::env::temp_dir().join(format!("ssrl-qwen3-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let data = tmp.join("tasks.jsonl");
    let photos = ["coffee.png", "rocket.jpg"];
    let lines: Vec<String> = (0..4)
        .map(|i| {
            serde_json::json!({
                "id": format!("p{i}"), "task": "letter", "answer": "a",
                "images": [photos[i % 2]], "problem": format!("<image> Question {i}: say a."),
            })
            .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let mut cfg = spatial_ssrl::train::config::TrainConfig {
        model: dir.clone(),
        out: tmp.join("run"),
        ..Default::default()
    };
    cfg.data.train_files = vec![data];
    cfg.data.image_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/photos");
    cfg.data.min_pixels = 3136;
    cfg.data.max_pixels = 65_536;
    cfg.data.rollout_batch_size = 2;
    cfg.data.max_response_length = 6;
    cfg.data.format_prompt = String::new();
    cfg.rollout.n = 3;
    cfg.actor.global_batch_size = 2;
    cfg.actor.optim.lr = 2e-2;
    cfg.trainer.save_freq = 0;
    cfg.trainer.kernels = "cpu".into();
    // A dense reward the random model's samples differ on (the share of 'a's), so that the
    // advantages are not all zero.
    let reward: spatial_ssrl::train::RewardFn = std::sync::Arc::new(|text: &str, _: &_| {
        let n = text.chars().count().max(1) as f64;
        let v = text.chars().filter(|c| *c == 'a').count() as f64 / n + n.recip();
        spatial_ssrl::reward::Score {
            overall: v,
            format: 0.0,
            accuracy: v,
            predicted: String::new(),
        }
    });
    let mut t = match spatial_ssrl::train::Trainer::new(cfg, None) {
        Ok(t) => t.with_reward(reward),
        Err(e) if e.to_string().contains("libonnxruntime") => return,
        Err(e) => panic!("{e}"),
    };
    let before = t.lora();
    for _ in 0..2 {
        let m = t.train_step().unwrap();
        // (as on Qwen2.5-VL, where the cached decoder and the chunked recomputation round
        // apart by up to ~1e-3 on this random model; without the DeepStack features at the
        // image positions the logits would move by more than 1)
        let (max, mean) = (
            m["rollout/logprob_mismatch_max"],
            m["rollout/logprob_mismatch_mean"],
        );
        assert!(
            max < 1e-2 && mean < 1e-3,
            "sampler vs log-prob graph: max {max}, mean {mean}"
        );
        for k in ["actor/grad_norm", "actor/pg_loss_plus_kl"] {
            assert!(m[k].is_finite() && m[k] != 0.0, "{k} = {}", m[k]);
        }
    }
    let moved = t
        .lora()
        .iter()
        .zip(&before)
        .filter(|(a, b)| a.name.ends_with(".B") && a.data != b.data)
        .count();
    assert!(moved > 0, "no LoRA tensor moved");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// The engine's prompt, positions, logits of prefill + 5 decode steps (within `tol`) and greedy
/// tokens against the package `dir`'s transformers goldens.
fn assert_matches_goldens(e: &mut Engine, dir: &Path, tol: f32) {
    let (g, reqs) = golden_of(dir);
    // Chat template rendered by minijinja exactly as transformers renders it.
    for (r, want) in reqs.iter().zip(g["rendered"].as_array().unwrap()) {
        let msgs = spatial_ssrl::model::prompt::PromptBuilder::content(&r.problem, None);
        assert_eq!(e.prompts.render(&msgs).unwrap(), want.as_str().unwrap());
    }
    let mut trace = Trace::default();
    let out = e.generate(&reqs, &greedy(6), Some(&mut trace)).unwrap();
    // Prompt ids (golden rows are left-padded), positions and rope deltas.
    for (b, ids) in trace.prompt_ids.iter().enumerate() {
        let row: Vec<u32> = g["input_ids"][b]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids[..], row[row.len() - ids.len()..], "prompt {b} ids");
    }
    let pos: Vec<i64> = g["position_ids"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .flat_map(|c| c.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()))
        })
        .collect();
    assert_eq!(trace.position_ids, pos);
    let deltas: Vec<i64> = g["rope_deltas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(trace.rope_deltas, deltas);
    // Greedy tokens and the logits of every step.
    let want = spatial_ssrl::tasks::npy::read(&dir.join("goldens/step_logits.npy")).unwrap();
    let (steps, b, v) = (want.shape[0], want.shape[1], want.shape[2]);
    assert_eq!(trace.steps.len(), steps);
    let mut worst = 0f32;
    for (s, (rows, logits)) in trace.steps.iter().enumerate() {
        for (k, &row) in rows.iter().enumerate() {
            for j in 0..v {
                worst = worst.max((logits[k * v + j] - want.data[(s * b + row) * v + j]).abs());
            }
        }
    }
    eprintln!("{}: max |logit − transformers| {worst:.2e}", dir.display());
    assert!(worst < tol, "max |logit − transformers| = {worst}");
    for (c, want) in out.iter().zip(greedy_tokens(&g)) {
        assert_eq!(c.tokens, want);
        assert_eq!(c.logprobs.len(), want.len());
        assert!(c.logprobs.iter().all(|l| *l <= 0.0));
    }
}

#[test]
fn samples_do_not_depend_on_the_batch_and_lora_swaps_apply() {
    let Some(mut e) = engine() else { return };
    let (_, reqs) = golden();
    let cfg = GenerationConfig {
        group: 3,
        max_new_tokens: 5,
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 9,
        },
        verbatim: false,
        format_sentence: Some(spatial_ssrl::data::FORMAT_SENTENCE.into()),
    };
    let both = e.generate(&reqs, &cfg, None).unwrap();
    let alone = e.generate(&reqs[1..], &cfg, None).unwrap();
    assert_eq!(both.len(), 6);
    assert_same_samples(
        &both[3..],
        &alone,
        "the same prompt id draws the same samples in any batch",
    );
    assert!(
        both[0].tokens != both[1].tokens || both[1].tokens != both[2].tokens,
        "samples of a group differ"
    );
    // A LoRA adapter changes the rollout; zeroing it restores the base model.
    let base = e.generate(&reqs[..1], &greedy(4), None).unwrap();
    let m = e.package.manifest.lora.clone();
    let mut r = spatial_ssrl::rng::Rng::keyed(4, &[]);
    let adapter: Vec<(String, Vec<f32>)> = m
        .tensors
        .iter()
        .flat_map(|t| {
            [
                (format!("{}.A", t.name), t.a.iter().product::<usize>()),
                (format!("{}.B", t.name), t.b.iter().product()),
            ]
        })
        .map(|(n, len)| (n, (0..len).map(|_| (r.f64() as f32 - 0.5) * 2.0).collect()))
        .collect();
    e.set_lora(&adapter).unwrap();
    let tuned = e.generate(&reqs[..1], &greedy(4), None).unwrap();
    assert_ne!(tuned[0].logprobs, base[0].logprobs);
    let zeros: Vec<(String, Vec<f32>)> = adapter
        .iter()
        .map(|(n, v)| (n.clone(), vec![0.0; v.len()]))
        .collect();
    e.set_lora(&zeros).unwrap();
    let again = e.generate(&reqs[..1], &greedy(4), None).unwrap();
    assert_eq!(again[0].tokens, base[0].tokens);
    assert!(e
        .set_lora(&[("lora.9.q_proj.A".into(), vec![0.0])])
        .is_err());
}

/// Every sampled token's log-prob is log-softmax(logits / T) of its step's logits, computed here in
/// f64, over the vocabulary without the image and video placeholders (never drawn: the sampler
/// renormalises without them) — and with top-p, over the nucleus it was drawn from.
#[test]
fn sampled_log_probs_are_the_tempered_distribution_without_placeholders() {
    let Some(mut e) = engine() else { return };
    let (_, reqs) = golden();
    let t = 0.7f64;
    let tokens = &e.package.manifest.tokens;
    let banned = [tokens.image as usize, tokens.video as usize];
    let vocab = e.package.manifest.text.vocab_size;
    let cfg = GenerationConfig {
        group: 3,
        max_new_tokens: 12,
        sampling: SamplingParams {
            temperature: t as f32,
            top_p: 1.0,
            top_k: 0,
            seed: 11,
        },
        verbatim: false,
        format_sentence: None,
    };
    let mut checked = 0;
    for top_p in [1.0f32, 0.9] {
        let mut cfg = cfg.clone();
        cfg.sampling.top_p = top_p;
        let mut trace = Trace::default();
        let out = e.generate(&reqs, &cfg, Some(&mut trace)).unwrap();
        let mut cut = 0.0f64;
        for (step, (rows, logits)) in trace.steps.iter().enumerate() {
            for (k, &row) in rows.iter().enumerate() {
                let l = &logits[k * vocab..(k + 1) * vocab];
                // Largest first; the nucleus keeps tokens while the mass before them is below p.
                let mut order: Vec<usize> = (0..vocab).filter(|i| !banned.contains(i)).collect();
                order.sort_by(|a, b| l[*b].total_cmp(&l[*a]));
                let max = f64::from(l[order[0]]) / t;
                let e = |i: usize| (f64::from(l[i]) / t - max).exp();
                let z: f64 = order.iter().map(|i| e(*i)).sum();
                let (mut before, mut floor) = (0.0, f32::NEG_INFINITY);
                for &i in &order {
                    if before >= f64::from(top_p) * z {
                        break;
                    }
                    before += e(i);
                    floor = l[i];
                }
                let kept: f64 = order
                    .iter()
                    .filter(|i| l[**i] >= floor)
                    .map(|i| e(*i))
                    .sum();
                cut = cut.max(1.0 - kept / z);
                let token = out[row].tokens[step] as usize;
                assert!(!banned.contains(&token), "row {row} drew a placeholder");
                assert!(
                    l[token] >= floor,
                    "row {row} step {step}: drawn outside the nucleus"
                );
                let want = f64::from(l[token]) / t - max - kept.ln();
                let got = f64::from(out[row].logprobs[step]);
                assert!(
                    (got - want).abs() < 2e-5,
                    "top-p {top_p} row {row} step {step}: {got} vs {want}"
                );
                checked += 1;
            }
        }
        // The nucleus did cut the rows at 0.9 (else the case would check nothing new).
        assert_eq!(
            cut > 0.05,
            top_p < 1.0,
            "top-p {top_p}: largest cut mass {cut}"
        );
    }
    assert!(checked >= 60, "{checked} tokens checked");
    // Settings that cannot sample are an error from the library too, naming the setting.
    for (sampling, name) in [
        (
            SamplingParams {
                top_p: 0.0,
                ..cfg.sampling
            },
            "top-p",
        ),
        (
            SamplingParams {
                top_p: 1.5,
                ..cfg.sampling
            },
            "top-p",
        ),
        (
            SamplingParams {
                temperature: -0.5,
                ..cfg.sampling
            },
            "temperature",
        ),
        (
            SamplingParams {
                temperature: f32::NAN,
                ..cfg.sampling
            },
            "temperature",
        ),
    ] {
        let bad = GenerationConfig {
            sampling,
            ..cfg.clone()
        };
        match e.generate(&reqs, &bad, None) {
            Err(EngineError::Config(m)) => assert!(m.contains(name), "{m}"),
            other => panic!("{name}: {:?}", other.map(|c| c.len())),
        }
    }
}

fn staggered_config() -> GenerationConfig {
    GenerationConfig {
        group: 4,
        max_new_tokens: 24,
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 5,
        },
        verbatim: false,
        format_sentence: None,
    }
}

/// Stop tokens that end rows of `full` at different depths.
fn staggered_stops(full: &[spatial_ssrl::rollout::Completion]) -> Vec<u32> {
    stops_at(full, &[(0, 2), (5, 7), (3, 12), (6, 17)])
}

/// [`staggered_config`] with 300 new tokens: rows outlive several chunks of the own-token buffer.
fn long_config() -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: 300,
        ..staggered_config()
    }
}

/// Stop tokens for [`long_config`]'s samples, taken at depths on both sides of chunk borders.
fn long_stops(full: &[spatial_ssrl::rollout::Completion]) -> Vec<u32> {
    stops_at(full, &[(0, 70), (5, 130), (3, 190), (6, 40)])
}

/// The tokens of samples `i` of `full` at depths `k`, for each `(i, k)`.
fn stops_at(full: &[spatial_ssrl::rollout::Completion], at: &[(usize, usize)]) -> Vec<u32> {
    at.iter()
        .filter_map(|&(i, k)| full[i].tokens.get(k).copied())
        .collect()
}

/// With `stops` added to the stop tokens, `e` generates every sample of `full` cut after its
/// first stop token, with the same log-probs, and the rows stop at four or more depths.
fn assert_rows_stop_at_their_first_stop(
    e: &mut Engine,
    reqs: &[Request],
    cfg: &GenerationConfig,
    full: &[spatial_ssrl::rollout::Completion],
    stops: &[u32],
) {
    e.package.manifest.tokens.eos.extend(stops);
    let cut = e.generate(reqs, cfg, None).unwrap();
    assert_cut_at_first_stop(full, &cut, &e.package.manifest.tokens.eos);
    let lengths: std::collections::BTreeSet<usize> = cut.iter().map(|c| c.tokens.len()).collect();
    assert!(
        lengths.len() >= 4,
        "rows should stop at different steps: lengths {lengths:?}"
    );
}

/// Every sample of `cut` is the same sample of `full` cut after its first token in `eos`, with
/// the same log-probs.
fn assert_cut_at_first_stop(
    full: &[spatial_ssrl::rollout::Completion],
    cut: &[spatial_ssrl::rollout::Completion],
    eos: &[u32],
) {
    for (i, (f, c)) in full.iter().zip(cut).enumerate() {
        let end = f
            .tokens
            .iter()
            .position(|t| eos.contains(t))
            .map_or(f.tokens.len(), |p| p + 1);
        assert_eq!(c.tokens, f.tokens[..end], "sample {i}");
        for (x, y) in c.logprobs.iter().zip(&f.logprobs) {
            assert!((x - y).abs() < 1e-4, "sample {i}: log-prob {x} vs {y}");
        }
    }
}

/// The golden requests and a third: the first one's images with a longer question.
fn three_requests() -> Vec<Request> {
    let (_, mut reqs) = golden();
    let mut third = reqs[0].clone();
    third.id = 7;
    third.problem.push_str(" Answer briefly.");
    reqs.push(third);
    reqs
}

/// Five prompts of one and of two images, the long ones not next to each other: CPU slices
/// get shares that are not consecutive prompts.
fn mixed_requests() -> Vec<Request> {
    let (_, reqs) = golden();
    [1, 0, 0, 1, 0]
        .iter()
        .enumerate()
        .map(|(i, &k)| {
            let mut r = reqs[k].clone();
            r.id = 10 + i as u64;
            r.problem.push_str(&" Answer briefly.".repeat(i));
            r
        })
        .collect()
}

/// Rows that stop leave the batch (the engine moves later rows into their cache slots); the rows
/// that go on must not notice. Extra stop tokens, drawn at different depths of a first run,
/// make rows finish at different steps: every sample of the second run is the first run's
/// sample cut after its first stop token, with the same log-probs.
#[test]
fn finished_rows_leave_the_batch_without_disturbing_the_others() {
    let Some(mut e) = engine() else { return };
    let (_, reqs) = golden();
    let cfg = staggered_config();
    let full = e.generate(&reqs, &cfg, None).unwrap();
    let stops = staggered_stops(&full);
    assert_rows_stop_at_their_first_stop(&mut e, &reqs, &cfg, &full, &stops);
}

/// With a shared prompt cache, a prompt whose samples have all stopped leaves it (the engine
/// moves a later prompt's cache into its place and renumbers the rows' slots); the samples of
/// the other prompts must not notice. Three prompts; every sample of the first stops at its
/// second token, while samples of the last go on.
#[test]
fn a_finished_prompt_leaves_the_shared_cache_without_disturbing_the_others() {
    let Some(mut e) = engine() else { return };
    let reqs = three_requests();
    let cfg = GenerationConfig {
        group: 3,
        max_new_tokens: 12,
        ..staggered_config()
    };
    let full = e.generate(&reqs, &cfg, None).unwrap();
    let stops: Vec<u32> = full[..3].iter().map(|c| c.tokens[1]).collect();
    e.package.manifest.tokens.eos.extend(&stops);
    let eos = e.package.manifest.tokens.eos.clone();
    let cut = e.generate(&reqs, &cfg, None).unwrap();
    assert_cut_at_first_stop(&full, &cut, &eos);
    let longest = |p: usize| cut[3 * p..3 * p + 3].iter().map(|c| c.tokens.len()).max();
    assert!(longest(0) <= Some(2), "prompt 0 stops by its second token");
    assert!(
        longest(2) > Some(3),
        "the last prompt's samples should outlive the first prompt's: {:?}",
        cut.iter().map(|c| c.tokens.len()).collect::<Vec<_>>()
    );
}

/// The rows' own tokens kept in a buffer the decoder reads in place (the newest in past, moved
/// into the buffer 64 at a time, the buffer growing as it fills) give the samples of the plain
/// past/present decoder, also as rows stop at different depths and leave the buffer: each
/// sample of the in-place run is the appended run's sample cut at its first stop token.
#[test]
fn the_own_cache_read_in_place_gives_the_samples_of_past_and_present() {
    let Some(mut e) = engine() else { return };
    let (_, reqs) = golden();
    let cfg = long_config();
    assert!(!e.set_own_cache(false));
    let full = e.generate(&reqs, &cfg, None).unwrap();
    let longest = full.iter().map(|c| c.tokens.len()).max().unwrap();
    assert!(
        longest > 200,
        "some rows should outlive three chunks: {longest}"
    );
    assert!(
        e.set_own_cache(true),
        "the tiny package reads its own cache in place"
    );
    let same = e.generate(&reqs, &cfg, None).unwrap();
    assert_cut_at_first_stop(&full, &same, &e.package.manifest.tokens.eos);
    let stops = long_stops(&full);
    assert_rows_stop_at_their_first_stop(&mut e, &reqs, &cfg, &full, &stops);
}

/// CPU slices (prompts dealt among concurrent single-threaded sessions, here not in consecutive
/// runs) draw the same samples as the engine's own sessions: every draw is keyed by prompt id,
/// sample and step, and each slice's completions come back under their prompts' indices.
#[test]
fn cpu_slices_generate_the_same_samples() {
    let Some(mut e) = engine() else { return };
    let reqs = mixed_requests();
    let cfg = staggered_config();
    let one = e.generate(&reqs, &cfg, None).unwrap();
    let _ = e.take_stats();
    assert!(e.set_cpu_slices(Some(2)).unwrap());
    let two = e.generate(&reqs, &cfg, None).unwrap();
    let stats = e.take_stats();
    assert_eq!(one.len(), two.len());
    for (i, (a, b)) in one.iter().zip(&two).enumerate() {
        assert_eq!(
            (a.prompt_index, a.sample_index),
            (b.prompt_index, b.sample_index)
        );
        assert_eq!(a.tokens, b.tokens, "sample {i}");
        for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
            assert!((x - y).abs() < 1e-4, "sample {i}: log-prob {x} vs {y}");
        }
    }
    let generated: usize = one.iter().map(|c| c.tokens.len()).sum();
    assert_eq!(stats.generated_tokens, generated);
    // The trainer's path: prompts prepared first (the vision calls shared out by image), then
    // generated.
    let prepared = e.prepare(&reqs, cfg.format_sentence.as_deref()).unwrap();
    let three = e.generate_prepared(&reqs, &prepared, &cfg, None).unwrap();
    assert_eq!(one.len(), three.len());
    for (i, (a, b)) in one.iter().zip(&three).enumerate() {
        assert_eq!(
            (a.prompt_index, a.sample_index, &a.tokens),
            (b.prompt_index, b.sample_index, &b.tokens),
            "sample {i}"
        );
    }
    assert!(e.set_cpu_slices(Some(1)).unwrap());
}

#[test]
fn an_unavailable_provider_is_an_error_unless_fallback_is_allowed() {
    use spatial_ssrl::model::session::{Device, DeviceChoice};
    if engine().is_none() {
        return;
    }
    let cuda = DeviceChoice {
        device: Device::Cuda { device_id: 0 },
        ..Default::default()
    };
    match Engine::open_on(&tiny(), None, &cuda) {
        Ok(e) => assert!(
            e.provider().starts_with("cuda"),
            "a working CUDA provider is used as asked: {}",
            e.provider()
        ),
        Err(e) => {
            // (as ssrl prints it: the provider's message with ONNX Runtime's under it)
            let msg = spatial_ssrl::error_chain(&e);
            assert!(
                msg.contains("cuda execution provider unavailable")
                    && msg.contains("--allow-fallback"),
                "{msg}"
            );
            let fallback = DeviceChoice {
                allow_fallback: true,
                ..cuda
            };
            let e = Engine::open_on(&tiny(), None, &fallback).unwrap();
            assert!(
                e.provider().starts_with("cpu (fallback from cuda"),
                "{}",
                e.provider()
            );
            // The trainer's setting: after the fallback its sessions share the CPU's one copy
            // of the weights (the GPU's store is not tried, and nothing is said about it).
            let shared = DeviceChoice {
                shared_weights: true,
                ..fallback
            };
            let e = Engine::open_on(&tiny(), None, &shared).unwrap();
            let store = e
                .shared_weights()
                .expect("the CPU's store after a fallback");
            assert!(store.lock().unwrap().tensors() > 10);
            assert_eq!(e.weights_note(), None);
            // The CPU build of the library: the error and the fallback both say which to load.
            if msg.contains("not enabled in this build") {
                for m in [msg.as_str(), e.provider()] {
                    assert!(
                        m.contains("CPU build") && m.contains("ORT_DYLIB_PATH"),
                        "{m}"
                    );
                }
            }
        }
    }
}

/// The tiny package on ONNX Runtime's CUDA provider, or `None` with a visible SKIP where there
/// is none (no onnxruntime-gpu library or no CUDA device).
fn cuda_engine() -> Option<Engine> {
    cuda_engine_of(&tiny())
}

/// [`cuda_engine`] of the package or folder `dir`.
fn cuda_engine_of(dir: &Path) -> Option<Engine> {
    use spatial_ssrl::model::session::{Device, DeviceChoice};
    let cuda = DeviceChoice {
        device: Device::Cuda { device_id: 0 },
        ..Default::default()
    };
    match Engine::open_on(dir, None, &cuda) {
        Ok(e) => Some(e),
        Err(e) => {
            common::gpu_skip(&format!("no CUDA execution provider ({e})"));
            None
        }
    }
}

/// On a GPU: prompts far apart in length (hundreds of padding slots in the short prompts' rows,
/// prefilled in one padded call there, in groups on the CPU) draw the CPU's samples, with the
/// cache on the GPU and on the host. Elsewhere a visible SKIP.
#[test]
fn cuda_prompts_far_apart_in_length_match_cpu() {
    let Some(mut cpu) = engine() else { return };
    let Some(mut gpu) = cuda_engine() else { return };
    let reqs = far_apart_requests(&mut cpu);
    let cfg = staggered_config();
    for host in [false, true] {
        gpu.set_host_cache(host);
        assert_generates_alike(&mut cpu, &mut gpu, &reqs, &cfg);
    }
}

/// On a GPU: the rows' own-token buffer kept on the GPU (chunks moved in by 2-D device copies,
/// grown into zeroed buffers, rows leaving by row moves) draws the CPU's samples over 300 tokens,
/// also with rows stopping between chunks; so does the buffer on the host under the CUDA
/// provider (`--host-cache`). Elsewhere a visible SKIP.
#[test]
fn cuda_own_cache_matches_cpu() {
    let Some(mut cpu) = engine() else { return };
    let Some(mut gpu) = cuda_engine() else { return };
    assert!(gpu.own_cache_in_place(), "{}", gpu.provider());
    let (_, reqs) = golden();
    let cfg = long_config();
    let full = cpu.generate(&reqs, &cfg, None).unwrap();
    let longest = full.iter().map(|c| c.tokens.len()).max().unwrap();
    assert!(longest > 200, "some rows should outlive three chunks");
    let stops = long_stops(&full);
    for host in [false, true] {
        gpu.set_host_cache(host);
        assert_eq!(gpu.cache_on_gpu(), !host);
        let eos = gpu.package.manifest.tokens.eos.clone();
        let got = gpu.generate(&reqs, &cfg, None).unwrap();
        assert_cut_at_first_stop(&full, &got, &eos);
        assert_rows_stop_at_their_first_stop(&mut gpu, &reqs, &cfg, &full, &stops);
        gpu.package.manifest.tokens.eos = eos;
    }
}

/// On a GPU (onnxruntime-gpu's library and a CUDA device): with the cache, logits and sampling
/// on the GPU, and with the cache on the host, the CUDA provider draws the CPU provider's
/// tokens, rows stopping at different steps, with log-probs and greedy logits within 1e-4.
/// Elsewhere a visible SKIP.
#[test]
fn cuda_rollout_matches_cpu() {
    let Some(mut cpu) = engine() else { return };
    let Some(mut gpu) = cuda_engine() else { return };
    assert!(gpu.cache_on_gpu(), "{}", gpu.provider());
    let (_, reqs) = golden();
    let cfg = staggered_config();
    let full = cpu.generate(&reqs, &cfg, None).unwrap();
    let stops = staggered_stops(&full);
    cpu.package.manifest.tokens.eos.extend(&stops);
    gpu.package.manifest.tokens.eos.extend(&stops);
    let want = cpu.generate(&reqs, &cfg, None).unwrap();
    let (mut greedy_cpu, mut greedy_gpu) = (Trace::default(), Trace::default());
    cpu.generate(&reqs, &greedy(5), Some(&mut greedy_cpu))
        .unwrap();
    for host in [false, true] {
        gpu.set_host_cache(host);
        assert_eq!(gpu.cache_on_gpu(), !host);
        let got = gpu.generate(&reqs, &cfg, None).unwrap();
        assert_same_samples(&want, &got, &format!("host cache {host}"));
        greedy_gpu.steps.clear();
        gpu.generate(&reqs, &greedy(5), Some(&mut greedy_gpu))
            .unwrap();
        let mut worst = 0f32;
        for ((ra, la), (rb, lb)) in greedy_cpu.steps.iter().zip(&greedy_gpu.steps) {
            assert_eq!(ra, rb);
            for (x, y) in la.iter().zip(lb) {
                worst = worst.max((x - y).abs());
            }
        }
        eprintln!("host cache {host}: max |logit cpu − cuda| {worst:.2e}");
        assert!(
            worst < 1e-4,
            "host cache {host}: max |logit cpu − cuda| = {worst}"
        );
    }
}

/// On a GPU: the fp16 package keeps its fp16 cache on the GPU (rows moved as 2-byte values)
/// and draws transformers' fp16 greedy tokens, logits within fp16's rounding; so does the
/// cache on the host. Elsewhere a visible SKIP.
#[test]
fn cuda_fp16_cache_on_the_gpu_matches_transformers() {
    let Some(mut gpu) = cuda_engine_of(&tiny_fp16()) else {
        return;
    };
    assert!(gpu.cache_on_gpu(), "{}", gpu.provider());
    for host in [false, true] {
        gpu.set_host_cache(host);
        assert_matches_goldens(&mut gpu, &tiny_fp16(), 3e-2);
    }
}

/// The package as a plain onnxruntime-genai folder in a temporary directory: no manifest (so
/// `genai_config.json` is read), no log-prob or training graph, and `decoder` (a file name and
/// the folder it is copied from) as the decoder, or the package's own.
fn genai_folder(tag: &str, decoder: Option<(&str, &Path)>) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ssrl-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(tiny()).unwrap() {
        let p = f.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let mut skip = vec!["manifest.json", "logprobs.onnx", "train.onnx"];
        if decoder.is_some() {
            skip.push("decoder.onnx");
        }
        if p.is_file() && !skip.contains(&name.as_str()) {
            std::fs::copy(&p, dir.join(&name)).unwrap();
        }
    }
    if let Some((file, from)) = decoder {
        for f in std::fs::read_dir(from).unwrap() {
            let p = f.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with(file) {
                std::fs::copy(&p, dir.join(&name)).unwrap();
            }
        }
        let path = dir.join("genai_config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        cfg["model"]["decoder"]["filename"] = file.into();
        std::fs::write(&path, cfg.to_string()).unwrap();
    }
    dir
}

/// Two small-image prompts and two photos of hundreds of image tokens, alternating.
fn far_apart_requests(e: &mut Engine) -> Vec<Request> {
    let (_, golden) = golden();
    let photo = |name: &str, id: u64, text: &str| Request {
        id,
        problem: format!("<image>{text}"),
        images: vec![image::open(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures/photos")
                .join(name),
        )
        .unwrap()
        .to_rgb8()],
    };
    let mut reqs = vec![
        golden[0].clone(),
        photo("chelsea.png", 21, "Where is the cat looking?"),
        golden[1].clone(),
        photo("coffee.png", 23, "Which side of the cup is the spoon on?"),
    ];
    reqs[0].id = 20;
    reqs[2].id = 22;
    let lens = prompt_lengths(e, &reqs);
    assert!(lens[1] > 2 * lens[0] && lens[3] > 2 * lens[2], "{lens:?}");
    reqs
}

/// Prompts far apart in length (a photo's hundreds of image tokens against a small image's
/// few) are prefilled in separate calls, each prompt's cache then placed in its row of the
/// padded batch: every prompt draws in the mixed batch what it draws alone, with the package's
/// shared-prefix decoder and the plain past/present decoder (left padding) and with
/// onnxruntime-genai's GroupQueryAttention decoder (right padding).
#[test]
fn prompts_far_apart_in_length_draw_in_a_batch_what_they_draw_alone() {
    let Some(mut e) = engine() else { return };
    let reqs = far_apart_requests(&mut e);
    let plain = genai_folder("apart-plain", None);
    let builder = builder_decoder();
    let gqa = genai_folder("apart-gqa", Some(("model.onnx", &builder)));
    // The package over 300 tokens as well: its rows' own tokens move into the buffer it reads
    // in place, behind the prompt caches placed by the grouped prefill.
    let runs = [
        (tiny(), staggered_config()),
        (tiny(), long_config()),
        (plain.clone(), staggered_config()),
        (gqa.clone(), staggered_config()),
    ];
    for (dir, cfg) in runs {
        let mut e = Engine::open(&dir, None).unwrap();
        let batch = e.generate(&reqs, &cfg, None).unwrap();
        for (i, r) in reqs.iter().enumerate() {
            let alone = e.generate(std::slice::from_ref(r), &cfg, None).unwrap();
            let mixed = &batch[i * cfg.group..(i + 1) * cfg.group];
            assert_same_samples(mixed, &alone, &format!("{}: prompt {i}", dir.display()));
        }
    }
    for d in [plain, gqa] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Each request's prompt length in tokens, images included.
fn prompt_lengths(e: &mut Engine, reqs: &[Request]) -> Vec<usize> {
    let prepared = e.prepare(reqs, None).unwrap();
    prepared.prompts.iter().map(Vec::len).collect()
}

/// The folder of onnxruntime-genai's model-builder decoder of the tiny package's weights.
fn builder_decoder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-genai-decoder")
}

/// `b` draws `a`'s samples: the same tokens, log-probs within 1e-4.
fn assert_generates_alike(
    a: &mut Engine,
    b: &mut Engine,
    reqs: &[Request],
    cfg: &GenerationConfig,
) {
    let x = a.generate(reqs, cfg, None).unwrap();
    let y = b.generate(reqs, cfg, None).unwrap();
    assert_same_samples(&x, &y, "");
}

/// The same number of samples, each with the same tokens and log-probs within 1e-4; `at` leads
/// each failure message.
fn assert_same_samples(
    x: &[spatial_ssrl::rollout::Completion],
    y: &[spatial_ssrl::rollout::Completion],
    at: &str,
) {
    assert_eq!(x.len(), y.len(), "{at}");
    for (x, y) in x.iter().zip(y) {
        let at = format!("{at}: sample {}", y.sample_index);
        assert_eq!(x.tokens, y.tokens, "{at}");
        for (p, q) in x.logprobs.iter().zip(&y.logprobs) {
            assert!((p - q).abs() < 1e-4, "{at}: {p} vs {q}");
        }
    }
}

/// The package's decoder read as a plain past/present decoder (a folder without the manifest:
/// no shared prompt cache, each prompt's cache fanned out to its rows, prompts left-padded and
/// prefilled a length at a time) generates what the package generates over prompts of
/// different lengths, greedy and sampled.
#[test]
fn a_plain_past_present_decoder_generates_like_the_package() {
    let Some(mut e) = engine() else { return };
    let dir = genai_folder("plain", None);
    let mut g = Engine::open(&dir, None).unwrap();
    assert_eq!(
        g.package.manifest.kv_layout,
        spatial_ssrl::model::package::KvLayout::Append
    );
    let reqs = mixed_requests();
    for cfg in [greedy(12), staggered_config()] {
        assert_generates_alike(&mut e, &mut g, &reqs, &cfg);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A plain onnxruntime-genai folder: this package's vision and embedding graphs with the decoder
/// onnxruntime-genai's model builder makes from the same checkpoint (GroupQueryAttention, each
/// row's cache packed from position 0, so prompts are right-padded). It generates what the
/// package generates, greedy and sampled, over prompts of different lengths.
#[test]
fn a_genai_builder_folder_generates_like_the_package() {
    let Some(mut e) = engine() else { return };
    let builder = builder_decoder();
    let dir = genai_folder("genai", Some(("model.onnx", &builder)));
    let mut g = Engine::open(&dir, None).unwrap();
    assert_eq!(
        g.package.manifest.kv_layout,
        spatial_ssrl::model::package::KvLayout::Packed
    );
    let (_, reqs) = golden();
    let lens = prompt_lengths(&mut e, &reqs);
    assert!(lens.iter().any(|l| *l != lens[0]), "{lens:?}");
    let sampled = GenerationConfig {
        group: 3,
        sampling: SamplingParams {
            temperature: 1.0,
            seed: 5,
            ..Default::default()
        },
        ..greedy(12)
    };
    for cfg in [greedy(12), sampled] {
        assert_generates_alike(&mut e, &mut g, &reqs, &cfg);
    }
    // A long run with rows stopping at different depths: GroupQueryAttention writes each token
    // into the past it reads (the buffers growing as they fill, the kept rows moving into new
    // ones as others stop), and the samples are the package's.
    assert!(g.own_cache_in_place());
    let long = GenerationConfig {
        max_new_tokens: 200,
        ..staggered_config()
    };
    let full = e.generate(&reqs, &long, None).unwrap();
    let stops = stops_at(&full, &[(0, 70), (5, 130), (3, 150), (6, 20)]);
    assert_rows_stop_at_their_first_stop(&mut g, &reqs, &long, &full, &stops);
    // No LoRA inputs: an adapter is refused with the way out.
    let err = g.set_lora(&[("lora.0.q_proj.A".into(), vec![0.0; 1024])]);
    assert!(err.unwrap_err().to_string().contains("ssrl export"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The folder of onnxruntime-genai's model-builder decoder of the tiny package's weights in
/// half precision (fp16 embeddings, cache and logits; its CUDA build, which the CPU runs too).
fn builder_decoder_fp16() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-genai-decoder-fp16")
}

/// The largest |a − b| over two traces' steps while both drew the same tokens, and the largest
/// |a| (the scale), and how many steps were compared.
fn trace_gap(a: &Trace, b: &Trace) -> (f32, f32, usize) {
    let (mut gap, mut scale) = (0f32, 0f32);
    let mut steps = 0;
    for ((ra, la), (rb, lb)) in a.steps.iter().zip(&b.steps) {
        if ra != rb || la.len() != lb.len() {
            break;
        }
        for (x, y) in la.iter().zip(lb) {
            gap = gap.max((x - y).abs());
            scale = scale.max(x.abs());
        }
        steps += 1;
    }
    (gap, scale, steps)
}

/// A half-precision onnxruntime-genai folder (the builder's fp16 GroupQueryAttention decoder of
/// the same checkpoint, and the package's embedding graph in fp16): the engine feeds fp16 image
/// features and embeddings, keeps the fp16 cache as it comes (moved as bytes), and reads fp16
/// embeddings and logits. Greedy, it draws what the fp32 builder decoder
/// draws with logits within half precision; sampled, every prompt draws in a mixed batch of
/// far-apart lengths (grouped prefill) what it draws alone, in CPU slices what it draws in one
/// session, and with each token written in place what it draws with past and present apart.
#[test]
fn a_half_precision_genai_folder_generates_like_the_fp32_one() {
    let Some(mut e) = engine() else { return };
    let dir16 = genai_folder("genai16", Some(("model.onnx", &builder_decoder_fp16())));
    // Its embedding graph in fp16 as well (image features in, embeddings out), as such folders
    // ship it; the vision graph stays the package's fp32 one.
    std::fs::copy(
        builder_decoder_fp16().join("embedding.onnx"),
        dir16.join("embedding.onnx"),
    )
    .unwrap();
    let dir32 = genai_folder("genai32", Some(("model.onnx", &builder_decoder())));
    let mut h = Engine::open(&dir16, None).unwrap();
    let mut f = Engine::open(&dir32, None).unwrap();
    // The folder's precision is read from its decoder.
    assert_eq!(h.package.manifest.dtype, "fp16");
    assert_eq!(f.package.manifest.dtype, "fp32");
    let (_, reqs) = golden();
    let cfg = greedy(16);
    let (mut th, mut tf) = (Trace::default(), Trace::default());
    let a = h.generate(&reqs, &cfg, Some(&mut th)).unwrap();
    let b = f.generate(&reqs, &cfg, Some(&mut tf)).unwrap();
    let (gap, scale, steps) = trace_gap(&th, &tf);
    let same: usize = a
        .iter()
        .zip(&b)
        .map(|(x, y)| {
            x.tokens
                .iter()
                .zip(&y.tokens)
                .take_while(|(p, q)| p == q)
                .count()
        })
        .sum();
    let total: usize = b.iter().map(|c| c.tokens.len()).sum();
    eprintln!("fp16 folder: max |logit fp16 − fp32| {gap:.2e} at a scale of {scale:.2}");
    assert_eq!((steps, same), (16, total), "greedy tokens part at a step");
    assert!(
        gap <= 1e-2 * scale.max(1.0),
        "logits {gap} apart (scale {scale})"
    );
    let far = far_apart_requests(&mut e);
    let sampled = staggered_config();
    let batch = h.generate(&far, &sampled, None).unwrap();
    for (i, r) in far.iter().enumerate() {
        let alone = h.generate(std::slice::from_ref(r), &sampled, None).unwrap();
        let mixed = &batch[i * sampled.group..(i + 1) * sampled.group];
        assert_same_samples(mixed, &alone, &format!("fp16: prompt {i}"));
    }
    assert!(h.own_cache_in_place());
    let long = GenerationConfig {
        max_new_tokens: 150,
        ..staggered_config()
    };
    let in_place = h.generate(&reqs, &long, None).unwrap();
    assert!(!h.set_own_cache(false));
    let apart = h.generate(&reqs, &long, None).unwrap();
    assert_same_samples(&in_place, &apart, "fp16, past and present apart");
    h.set_own_cache(true);
    assert!(h.set_cpu_slices(Some(2)).unwrap());
    let sliced = h.generate(&far, &sampled, None).unwrap();
    assert_same_samples(&batch, &sliced, "fp16, two CPU slices");
    for d in [dir16, dir32] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// On a GPU: the half-precision folder runs on the CUDA provider with its cache on the host
/// (the GPU-resident cache is fp32), saying so, and draws the CPU's greedy tokens with logits
/// within half precision while they agree. Elsewhere a visible SKIP.
#[test]
fn cuda_half_precision_genai_folder_matches_cpu() {
    if engine().is_none() {
        return;
    }
    let dir = genai_folder(
        "genai16-cuda",
        Some(("model.onnx", &builder_decoder_fp16())),
    );
    let Some(mut gpu) = cuda_engine_of(&dir) else {
        let _ = std::fs::remove_dir_all(&dir);
        return;
    };
    assert!(!gpu.cache_on_gpu(), "{}", gpu.provider());
    assert!(gpu.provider().contains("fp32 only"), "{}", gpu.provider());
    let mut cpu = Engine::open(&dir, None).unwrap();
    let (_, reqs) = golden();
    let (mut tc, mut tg) = (Trace::default(), Trace::default());
    cpu.generate(&reqs, &greedy(8), Some(&mut tc)).unwrap();
    gpu.generate(&reqs, &greedy(8), Some(&mut tg)).unwrap();
    let (gap, scale, steps) = trace_gap(&tc, &tg);
    eprintln!("fp16 on cuda: {steps} steps alike, max |logit cpu − cuda| {gap:.2e}");
    assert!(
        steps >= 1 && gap <= 2e-2 * scale.max(1.0),
        "{gap} (scale {scale})"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A prompt with no room for the new tokens in the model's context (the tiny checkpoint's
/// 4,096, from its config.json) is an error naming its position, before any generation —
/// whether generated directly, in CPU slices or from prepared prompts — and
/// `Engine::prompt_lengths` finds it beforehand with the lengths the engine renders.
#[test]
fn a_prompt_beyond_the_context_length_is_refused_naming_it() {
    let Some(mut e) = engine() else { return };
    assert_eq!(e.context_length(), Some(4096));
    let (_, golden) = golden();
    let photos = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/photos");
    let pics: Vec<image::RgbImage> = ["astronaut.png", "coffee.png", "rocket.jpg"]
        .iter()
        .map(|n| image::open(photos.join(n)).unwrap().to_rgb8())
        .collect();
    let long = Request {
        id: 7,
        problem: "<image>".repeat(15) + " Which photo is brightest?",
        images: pics.iter().cycle().take(15).cloned().collect(),
    };
    let reqs = vec![golden[0].clone(), long];
    let cfg = greedy(8);
    let lens = e.prompt_lengths(&reqs, &cfg).unwrap();
    // The long prompt alone is over the context (15 images of ~320 tokens).
    assert!(lens[0] + 8 <= 4096 && lens[1] > 4096, "{lens:?}");
    assert_eq!(lens, prompt_lengths(&mut e, &reqs));
    let refused = |r: Result<Vec<spatial_ssrl::rollout::Completion>, EngineError>| match r {
        Err(EngineError::Config(m)) => {
            let want = format!("prompt 1: {} tokens and 8 new ones", lens[1]);
            assert!(
                m.contains(&want)
                    && m.contains("context length of 4096")
                    && m.contains("the prompt alone fills it"),
                "{m}"
            );
        }
        other => panic!("{:?}", other.map(|c| c.len())),
    };
    // A prompt that does not match its images is named by its position as well.
    let short = Request {
        id: 8,
        problem: "<image><image> Which?".into(),
        images: vec![pics[0].clone()],
    };
    let mismatched = |e: &mut Engine| {
        let m = e
            .generate(&[golden[0].clone(), short.clone()], &cfg, None)
            .map(|c| c.len())
            .unwrap_err()
            .to_string();
        assert!(
            m.starts_with("prompt 1: the prompt has 2 image placeholders but 1 images"),
            "{m}"
        );
    };
    refused(e.generate(&reqs, &cfg, None));
    mismatched(&mut e);
    let prepared = e.prepare(&reqs, None).unwrap();
    refused(e.generate_prepared(&reqs, &prepared, &cfg, None));
    assert!(e.set_cpu_slices(Some(2)).unwrap());
    refused(e.generate(&reqs, &cfg, None));
    mismatched(&mut e);
    // The short prompt alone runs.
    assert_eq!(e.generate(&reqs[..1], &cfg, None).unwrap().len(), 1);
}

/// With shared weights every session reads one mapping of `weights.data`: each tensor the
/// graphs name is made once however many graphs name it, and the samples (CPU slices too) are
/// those of sessions that load their own weights.
#[test]
fn shared_weights_are_made_once_and_sample_alike() {
    use spatial_ssrl::model::onnx_edit::external_initializers;
    use spatial_ssrl::model::session::DeviceChoice;
    let Some(mut own) = engine() else { return };
    let choice = DeviceChoice {
        shared_weights: true,
        ..Default::default()
    };
    let mut shared = Engine::open_on(&tiny(), None, &choice).unwrap();
    let m = shared.package.manifest.clone();
    let _logprobs = shared.open_graph(&m.graphs.logprobs, false).unwrap();
    let _train = shared.open_graph(&m.graphs.train, true).unwrap();
    // What the five graphs name in the package's one data file, and how often.
    let (mut named, mut distinct) = (0, std::collections::BTreeMap::new());
    for g in [
        &m.graphs.vision,
        &m.graphs.embedding,
        &m.graphs.decoder,
        &m.graphs.logprobs,
        &m.graphs.train,
    ] {
        let bytes = std::fs::read(tiny().join(g)).unwrap();
        for t in external_initializers(&bytes).unwrap() {
            assert_eq!(t.location, "weights.data", "{g}: {}", t.name);
            named += 1;
            distinct.insert(t.offset, t.length.unwrap());
        }
    }
    let store = shared.shared_weights().unwrap();
    let store = store.lock().unwrap();
    assert_eq!(store.tensors(), distinct.len());
    assert_eq!(store.bytes(), distinct.values().sum::<u64>());
    assert!(
        named > distinct.len() + 10,
        "{named} names, {} tensors",
        distinct.len()
    );
    drop(store);
    let reqs = mixed_requests();
    let cfg = staggered_config();
    let a = own.generate(&reqs, &cfg, None).unwrap();
    for slices in [1, 2] {
        assert!(shared.set_cpu_slices(Some(slices)).unwrap());
        let b = shared.generate(&reqs, &cfg, None).unwrap();
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(x.tokens, y.tokens, "{slices} slices, sample {i}");
            for (p, q) in x.logprobs.iter().zip(&y.logprobs) {
                assert!((p - q).abs() < 1e-4, "sample {i}: log-prob {p} vs {q}");
            }
        }
    }
    // The slices' sessions took the same tensors: none was made for them.
    assert_eq!(
        shared.shared_weights().unwrap().lock().unwrap().tensors(),
        distinct.len()
    );
}

/// On a GPU: with shared weights every CUDA session reads one device copy of each tensor, and
/// the samples are the CPU's. Elsewhere a visible SKIP.
#[test]
fn cuda_shared_weights_sample_as_cpu() {
    use spatial_ssrl::model::session::{Device, DeviceChoice};
    let Some(mut cpu) = engine() else { return };
    if cuda_engine().is_none() {
        return;
    }
    let choice = DeviceChoice {
        device: Device::Cuda { device_id: 0 },
        shared_weights: true,
        ..Default::default()
    };
    let mut gpu = Engine::open_on(&tiny(), None, &choice).unwrap();
    let store = gpu
        .shared_weights()
        .expect("a CUDA device is present: the store should be on it");
    let m = gpu.package.manifest.clone();
    let _train = gpu.open_graph(&m.graphs.train, true).unwrap();
    let made = store.lock().unwrap().tensors();
    assert!(made > 20, "{made} tensors on the GPU");
    drop(store);
    let reqs = mixed_requests();
    assert_generates_alike(&mut cpu, &mut gpu, &reqs, &staggered_config());
}
