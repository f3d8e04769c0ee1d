//! LoRA on the vision tower (the tiny packages of both families exported with `--lora-targets
//! q_proj,v_proj,vision`): the trainer's gradient chain — image features with the adapter,
//! `train.onnx`'s gradient at the embeddings gathered at the image rows (and, for Qwen3-VL, at
//! the DeepStack features), `vision_grad.onnx` — against torch autograd through the whole
//! transformers model from the pixels; GRPO moving the tower's adapter, its PEFT checkpoint, and
//! the merge of it into the vision graph.

use spatial_ssrl::model::export::{export, ExportOptions};
use spatial_ssrl::model::processor::preprocess;
use spatial_ssrl::rollout::Engine;
use spatial_ssrl::tasks::npy;
use spatial_ssrl::train::batch::Row;
use spatial_ssrl::train::checkpoint;
use spatial_ssrl::train::config::TrainConfig;
use spatial_ssrl::train::Trainer;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Qwen2.5-VL's tiny package with vision-tower LoRA.
const QWEN2_5: &str = "models/tiny-vision-lora";
/// Qwen3-VL's: its merger target takes the DeepStack mergers too.
const QWEN3: &str = "models/tiny-qwen3-vl-vision-lora";

fn package(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ssrl-vlora-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `n` prompts, each with one of the repository's photos.
fn photo_tasks(dir: &Path, n: usize) -> PathBuf {
    let p = dir.join("tasks.jsonl");
    let mut f = std::fs::File::create(&p).unwrap();
    let photos = ["coffee.png", "rocket.jpg", "astronaut.png"];
    for i in 0..n {
        let line = serde_json::json!({
            "id": format!("p{i}"), "task": "letter", "answer": "a",
            "images": [photos[i % photos.len()]],
            "problem": format!("<image> Question {i}: answer with the letter a."),
        });
        writeln!(f, "{line}").unwrap();
    }
    p
}

fn config(pkg: &str, dir: &Path, data: PathBuf) -> TrainConfig {
    let mut c = TrainConfig {
        model: package(pkg),
        out: dir.join("run"),
        ..Default::default()
    };
    c.data.train_files = vec![data];
    c.data.image_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/photos");
    c.data.min_pixels = 3136;
    c.data.max_pixels = 50_176;
    c.data.rollout_batch_size = 2;
    c.data.max_response_length = 6;
    c.data.format_prompt = String::new();
    c.rollout.n = 4;
    c.actor.global_batch_size = 1;
    c.actor.micro_batch_size_per_device_for_update = 3;
    c.actor.optim.lr = 2e-2;
    c.trainer.save_freq = 0;
    c.trainer.kernels = "cpu".into();
    c
}

fn trainer(c: TrainConfig) -> Option<Trainer> {
    match Trainer::new(c, None) {
        Ok(t) => Some(t),
        Err(e) if e.to_string().contains("libonnxruntime") => {
            let _ = writeln!(std::io::stderr(), "SKIP: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn rel(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
        / scale
}

/// One GRPO micro-batch of two rows with an image each, from the exporter's goldens: the
/// trainer's loss and every LoRA gradient — the language model's from `train.onnx`, the vision
/// tower's through the image rows of its embedding gradient and `vision_grad.onnx`, per prompt —
/// equal torch autograd through the whole transformers model (pixels → vision tower with the
/// adapter → language model with the adapter → EasyR1's loss).
#[test]
fn the_vision_gradient_chain_matches_autograd_from_the_pixels() {
    chain_matches_autograd(QWEN2_5, "lora.visual.merger.mlp_2");
}

/// The same for Qwen3-VL, whose tower also feeds the language model through DeepStack: the
/// loss's gradient at the DeepStack features joins the features' in the tower's backward.
#[test]
fn the_qwen3_vl_vision_gradient_chain_with_deepstack_matches_autograd() {
    chain_matches_autograd(QWEN3, "lora.visual.deepstack_merger_list.1.linear_fc2");
}

/// `must_have`: a vision-tower tensor the package's adapter has.
fn chain_matches_autograd(pkg: &str, must_have: &str) {
    let dir = tempdir(&format!("chain-{}", pkg.rsplit('/').next().unwrap()));
    let gd = package(pkg).join("goldens/vision");
    let b: serde_json::Value =
        serde_json::from_slice(&std::fs::read(gd.join("batch.json")).unwrap()).unwrap();
    let settings = &b["settings"];
    let f = |k: &str| settings[k].as_f64().unwrap() as f32;
    let mut c = config(pkg, &dir, photo_tasks(&dir, 2));
    c.rollout.temperature = f("temperature");
    c.actor.clip_ratio_low = f("clip_ratio_low");
    c.actor.clip_ratio_high = f("clip_ratio_high");
    c.actor.clip_ratio_dual = f("clip_ratio_dual");
    let Some(mut t) = trainer(c) else { return };
    let names: Vec<String> = t.lora().into_iter().map(|p| p.name).collect();
    assert!(
        names.iter().any(|n| n == &format!("{must_have}.B")),
        "{must_have} not in {names:?}"
    );
    let golden: Vec<(String, Vec<f32>)> = names
        .iter()
        .map(|n| {
            (
                n.clone(),
                npy::read(&gd.join(format!("in.{n}.npy"))).unwrap().data,
            )
        })
        .collect();
    t.set_lora(&golden).unwrap();
    let ids = |k: &str| -> Vec<Vec<u32>> {
        b[k].as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect()
            })
            .collect()
    };
    let (prompts, completions) = (ids("prompts"), ids("completions"));
    let grids: Vec<[u32; 3]> = ids("image_grid_thw")
        .into_iter()
        .map(|g| [g[0], g[1], g[2]])
        .collect();
    let pv = npy::read(&gd.join("pixel_values.npy")).unwrap();
    let width = pv.shape[1];
    let mut pixels = Vec::new();
    let mut at = 0;
    for g in &grids {
        let n = (g[0] * g[1] * g[2]) as usize * width;
        pixels.push(pv.data[at..at + n].to_vec());
        at += n;
    }
    let outputs: Vec<(Vec<f32>, Vec<f32>)> = (0..2)
        .map(|r| t.image_outputs(&pixels[r], &grids[r..r + 1], true).unwrap())
        .collect();
    let deepstack = outputs[0].1.len() / outputs[0].0.len();
    assert_eq!(deepstack, usize::from(pkg == QWEN3) * 2, "DeepStack layers");
    let rows: Vec<Row<'_>> = (0..2)
        .map(|r| Row {
            prompt: &prompts[r],
            completion: &completions[r],
            grids: &grids[r..r + 1],
            features: &outputs[r].0,
            deepstack: &outputs[r].1,
        })
        .collect();
    let per_row = |k: &str| -> Vec<Vec<f32>> {
        let a = npy::read(&gd.join(format!("in.{k}.npy"))).unwrap();
        a.data.chunks(a.shape[1]).map(|r| r.to_vec()).collect()
    };
    let adv: Vec<f32> = b["advantages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let r = t
        .loss_and_grads(
            &rows,
            &per_row("old_logprobs"),
            &per_row("ref_logprobs"),
            &adv,
            f("kl_coef"),
            f("token_count") as usize,
            Some(&per_row("rollout_is_weights")),
        )
        .unwrap();
    let want_loss = b["loss"].as_f64().unwrap();
    assert!(
        (r.loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0),
        "loss {} vs torch {want_loss}",
        r.loss
    );
    // The vision tower's gradients: each prompt's image rows (and DeepStack rows) through
    // vision_grad.onnx.
    let mut grads = r.grads.clone();
    let mut at = 0;
    for (row, (feats, _)) in outputs.iter().enumerate() {
        let n = feats.len() * (1 + deepstack);
        let part = &r.feature_grads[at..at + n];
        at += n;
        let vg = t
            .vision_grads(&pixels[row], &grids[row..row + 1], part)
            .unwrap();
        for (acc, g) in grads.iter_mut().zip(&vg) {
            acc.iter_mut().zip(g).for_each(|(a, b)| *a += b);
        }
    }
    assert_eq!(
        at,
        r.feature_grads.len(),
        "every image row is some prompt's"
    );
    let mut vision = 0;
    for (n, g) in names.iter().zip(&grads) {
        let want = npy::read(&gd.join(format!("out.grad.{n}.npy")))
            .unwrap()
            .data;
        assert!(
            want.iter().any(|v| v.abs() > 1e-7),
            "{n}: the golden gradient is zero"
        );
        let d = rel(g, &want);
        assert!(
            d <= 1e-4,
            "{n}: relative difference {d} from torch autograd"
        );
        vision += usize::from(n.starts_with("lora.visual."));
    }
    assert!(vision >= 4, "{vision} vision-tower tensors");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two GRPO steps (two mini-batches each, so the second runs on the features of the tower the
/// first updated; the KL term on the base tower's): the vision tower's adapter moves; the
/// checkpoint names it by PEFT's module paths with a `target_modules` that matches those modules
/// only; `ssrl export --adapter` merges it into the vision graphs, whose base features then
/// equal the trained adapter's.
#[test]
fn grpo_trains_the_vision_tower_and_its_adapter_merges() {
    grpo_trains_and_merges(
        QWEN2_5,
        &[
            "base_model.model.model.visual.blocks.0.attn.qkv.lora_A.weight",
            "base_model.model.model.visual.blocks.1.mlp.down_proj.lora_B.weight",
            "base_model.model.model.visual.merger.mlp.2.lora_B.weight",
        ],
    );
}

/// The same on Qwen3-VL: its DeepStack mergers' adapters move too (their features reach the
/// first language layers), and the checkpoint names them by transformers' module paths.
#[test]
fn grpo_trains_the_qwen3_vl_vision_tower_and_its_adapter_merges() {
    grpo_trains_and_merges(
        QWEN3,
        &[
            "base_model.model.model.visual.blocks.0.attn.qkv.lora_A.weight",
            "base_model.model.model.visual.blocks.2.mlp.linear_fc1.lora_B.weight",
            "base_model.model.model.visual.merger.linear_fc2.lora_B.weight",
            "base_model.model.model.visual.deepstack_merger_list.1.linear_fc1.lora_A.weight",
        ],
    );
}

/// `want`: vision-tower keys the checkpoint must hold.
fn grpo_trains_and_merges(pkg: &str, want: &[&str]) {
    let dir = tempdir(&format!("grpo-{}", pkg.rsplit('/').next().unwrap()));
    let c = config(pkg, &dir, photo_tasks(&dir, 4));
    let Some(mut t) = trainer(c) else { return };
    for _ in 0..2 {
        let m = t.train_step().unwrap();
        for k in ["actor/grad_norm", "actor/pg_loss_plus_kl", "actor/kl_loss"] {
            assert!(m[k].is_finite(), "{k} = {}", m[k]);
        }
        // The tower's share of the update's time is reported, within it.
        let (vision, train) = (m["timing_s/train_vision"], m["timing_s/train"]);
        assert!(vision > 0.0 && vision < train, "{vision} of {train}");
        // Two prompts in two mini-batches of one: the tower's backward once per prompt, and
        // its features recomputed after the first optimizer step for the second prompt only.
        assert_eq!(
            (m["perf/vision_backwards"], m["perf/vision_forwards"]),
            (2.0, 1.0)
        );
    }
    let lora = t.lora();
    let moved = lora
        .iter()
        .filter(|p| p.name.starts_with("lora.visual.") && p.name.ends_with(".B"))
        .filter(|p| p.data.iter().any(|v| *v != 0.0))
        .count();
    let vision_b = lora
        .iter()
        .filter(|p| p.name.starts_with("lora.visual.") && p.name.ends_with(".B"))
        .count();
    assert!(
        vision_b >= 4 && moved == vision_b,
        "{moved} of {vision_b} moved"
    );
    let ck = t.save().unwrap();
    let keys: Vec<String> = checkpoint::read_safetensors(&ck.join("adapter_model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    let lang = ["base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"];
    for k in want.iter().chain(&lang) {
        assert!(keys.iter().any(|x| x == k), "{k} not in {keys:?}");
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ck.join("adapter_config.json")).unwrap()).unwrap();
    let tm = cfg["target_modules"].as_str().unwrap();
    assert!(
        tm.contains(r"visual\.blocks") && tm.contains("merger"),
        "{tm}"
    );
    // The merge: every vision-tower tensor into vision.onnx (and its backward's graph).
    let merged = dir.join("merged");
    let spec = spatial_ssrl::model::package::Package::open(&package(pkg))
        .unwrap()
        .manifest
        .lora;
    let adapter: Vec<(String, Vec<f32>)> = checkpoint::load_adapter_for(&ck, &spec)
        .unwrap()
        .into_iter()
        .map(|t| (t.name, t.data))
        .collect();
    let opts = ExportOptions {
        adapter: Some(adapter),
        fp16: false,
        optimize: false,
    };
    let rep = export(&package(pkg), &merged, &opts, None).unwrap();
    let into = |g: &str| {
        rep.merged
            .iter()
            .find(|(f, _)| f == g)
            .map_or(0, |(_, n)| n.len())
    };
    assert_eq!(into("vision.onnx"), vision_b, "{:?}", rep.merged);
    assert_eq!(into("vision_grad.onnx"), vision_b);
    assert_eq!(into("decoder.onnx"), lora.len() / 2 - vision_b);
    let img = image::open(package(pkg).join("goldens/image_0_0.png"))
        .unwrap()
        .to_rgb8();
    let mut engine = Engine::open(&merged, None).unwrap();
    let p = preprocess(&img, &engine.preprocessor).unwrap();
    // (the features, and a Qwen3-VL tower's DeepStack features, each compared)
    let grid = [p.grid_thw];
    let trained = t.image_outputs(&p.pixel_values, &grid, true).unwrap();
    let base = t.image_outputs(&p.pixel_values, &grid, false).unwrap();
    let got = engine
        .prompt_image_outputs(&p.pixel_values, &grid, false)
        .unwrap();
    assert_eq!(got.1.is_empty(), pkg == QWEN2_5);
    for (what, got, trained, base) in [
        ("features", &got.0, &trained.0, &base.0),
        ("DeepStack features", &got.1, &trained.1, &base.1),
    ] {
        if got.is_empty() {
            continue;
        }
        let d = rel(got, trained);
        let apart = rel(base, trained);
        assert!(d <= 1e-4, "merged {what} differ from the adapter's by {d}");
        assert!(
            apart > 1e2 * d.max(1e-6),
            "the adapter moved the {what} by {apart} only"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
