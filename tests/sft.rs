//! `ssrl sft`, the SFT cold start, on the tiny package: it learns its responses (loss falls,
//! token accuracy rises, the merged package writes the reasoning format), micro-batches add up
//! to the optimizer step, a resumed run equals an unbroken one, and a package that cannot run
//! the configured LoRA is refused with the export to run.

use spatial_ssrl::train::checkpoint;
use spatial_ssrl::train::sft::{Sft, SftConfig};
use spatial_ssrl::train::{Metrics, RunEnd};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ssrl-sft-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A cold-start set laid out as the released one: `SFT-coldstart.json` (LLaMA-Factory alpaca
/// rows, `<image>` in the instruction) beside `coldstart_SFT_images/`, with reasoning-format
/// responses; half the rows text-only.
fn cold_start_set(dir: &Path) -> PathBuf {
    let imgs = dir.join("coldstart_SFT_images");
    std::fs::create_dir_all(&imgs).unwrap();
    let photos = ["rocket.jpg", "coffee.png", "camera.png", "chelsea.png"];
    let mut rows = Vec::new();
    for (i, p) in photos.iter().enumerate() {
        let name = format!("img_{i}.{}", p.rsplit('.').next().unwrap());
        std::fs::copy(root().join("fixtures/photos").join(p), imgs.join(&name)).unwrap();
        rows.push(serde_json::json!({
            "instruction": format!("<image>Which of the {} patches is flipped?", i + 2),
            "input": "",
            "output": format!("<think>The patches are compared edge by edge.</think> \\boxed{{{}}}", i + 1),
            "images": [format!("coldstart_SFT_images/{name}")]
        }));
        rows.push(serde_json::json!({
            "instruction": format!("Which region is closer, A or B? Case {i}."),
            "input": "",
            "output": "<think>The regions are compared by depth.</think> \\boxed{A}",
        }));
    }
    let f = dir.join("SFT-coldstart.json");
    std::fs::write(&f, serde_json::Value::Array(rows).to_string()).unwrap();
    f
}

/// The tiny package's LoRA (rank 8, alpha 16, q and v), a small learning-rate run.
fn config(dir: &Path, data: PathBuf) -> SftConfig {
    let mut c = SftConfig {
        model: root().join("models/tiny"),
        out: dir.join("run"),
        ..Default::default()
    };
    c.data.train_files = vec![data];
    c.lora_rank = 8;
    c.lora_alpha = 16.0;
    c.lora_target = "q_proj,v_proj".into();
    c.learning_rate = 5e-2;
    c.per_device_train_batch_size = 2;
    c.gradient_accumulation_steps = 2;
    c.max_steps = 40;
    c.save_steps = 0;
    c.kernels = "cpu".into();
    c
}

fn sft(c: SftConfig) -> Option<Sft> {
    match Sft::new(c, None) {
        Ok(t) => Some(t),
        Err(e) if e.to_string().contains("libonnxruntime") => {
            let _ = writeln!(std::io::stderr(), "SKIP: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn run_all(t: &mut Sft) -> Vec<Metrics> {
    let mut seen = Vec::new();
    let stop = AtomicBool::new(false);
    t.run(&stop, |m, _, left_out| {
        assert!(left_out.is_empty(), "{left_out:?}");
        seen.push(m.clone());
    })
    .unwrap();
    seen
}

/// Forty steps (20 epochs of 8 examples) on the cold-start layout: the loss falls by more than half, token accuracy
/// rises, the learning rate warms up then decays, and the adapter merged into the package
/// writes the reasoning format the responses taught, with its box.
#[test]
fn sft_learns_its_responses_and_the_merged_package_writes_the_format() {
    let dir = tempdir("learn");
    let data = cold_start_set(&dir);
    let c = config(&dir, data);
    let Some(mut t) = sft(c.clone()) else { return };
    assert_eq!(
        (t.examples(), t.steps_per_epoch(), t.total_steps()),
        (8, 2, 40)
    );
    // Its sessions (vision, embedding, decoder, sft.onnx) read one copy of the package's
    // weights, each tensor once: no more than weights.data holds.
    let (tensors, bytes) = t
        .shared_weights()
        .expect("the cold start shares its weights");
    let file = std::fs::metadata(c.model.join("weights.data"))
        .unwrap()
        .len();
    assert!(
        tensors > 20 && bytes > file / 2 && bytes <= file,
        "{tensors} tensors, {bytes} of {file} bytes"
    );
    let seen = run_all(&mut t);
    assert_eq!(seen.len(), 40);
    let (first, last) = (&seen[0], &seen[39]);
    for m in &seen {
        eprintln!(
            "step {}: loss {:.4}, token accuracy {:.3}, lr {:.2e}",
            m["step"], m["sft/loss"], m["sft/token_accuracy"], m["sft/lr"]
        );
    }
    assert!(
        last["sft/loss"] < 0.5 * first["sft/loss"],
        "loss {} → {}",
        first["sft/loss"],
        last["sft/loss"]
    );
    assert!(last["sft/token_accuracy"] > first["sft/token_accuracy"] + 0.3);
    // 4 warm-up steps from 0, the peak, then the cosine down.
    assert_eq!(first["sft/lr"], 0.0);
    assert!((seen[4]["sft/lr"] - 5e-2).abs() < 1e-9);
    assert!(seen[39]["sft/lr"] < seen[20]["sft/lr"]);
    let ckpt = t.latest_checkpoint().expect("a checkpoint at the end");
    assert!(ckpt.ends_with("global_step_40"));
    // Merged into the package, the adapter answers a training prompt in the format.
    let merged = dir.join("merged");
    let adapter = checkpoint::load_adapter(&ckpt).unwrap();
    let opts = spatial_ssrl::model::export::ExportOptions {
        adapter: Some(adapter.into_iter().map(|t| (t.name, t.data)).collect()),
        fp16: false,
        optimize: false,
    };
    spatial_ssrl::model::export::export(&c.model, &merged, &opts, None).unwrap();
    let mut e = spatial_ssrl::rollout::Engine::open(&merged, None).unwrap();
    let mut base = spatial_ssrl::rollout::Engine::open(&c.model, None).unwrap();
    let req = spatial_ssrl::rollout::Request {
        id: 0,
        problem: "Which region is closer, A or B? Case 1.".into(),
        images: vec![],
    };
    let gen = spatial_ssrl::rollout::GenerationConfig {
        group: 1,
        max_new_tokens: 24,
        sampling: spatial_ssrl::kernels::SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        verbatim: false,
        format_sentence: None,
    };
    let text = |e: &mut spatial_ssrl::rollout::Engine| {
        let c = e.generate(std::slice::from_ref(&req), &gen, None).unwrap();
        e.prompts.tokenizer().decode(&c[0].tokens, true).unwrap()
    };
    let (after, before) = (text(&mut e), text(&mut base));
    eprintln!("before: {before:?}\nafter:  {after:?}");
    assert!(!spatial_ssrl::reward::in_format(&before), "{before}");
    assert!(spatial_ssrl::reward::in_format(&after), "{after}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The step's loss and update do not depend on how its examples are split into micro-batches:
/// 4 × 1 and 1 × 4 give the same loss, token accuracy and adapter (the labels' token mean over
/// the whole step).
#[test]
fn micro_batches_add_up_to_the_step() {
    let dir = tempdir("micro");
    let data = cold_start_set(&dir);
    let mut runs = Vec::new();
    for (bs, accum) in [(4, 1), (1, 4)] {
        let mut c = config(&dir, data.clone());
        c.out = dir.join(format!("run-{bs}x{accum}"));
        c.per_device_train_batch_size = bs;
        c.gradient_accumulation_steps = accum;
        c.max_steps = 2;
        let Some(mut t) = sft(c) else { return };
        let seen = run_all(&mut t);
        let adapter = checkpoint::load_adapter(&t.latest_checkpoint().unwrap()).unwrap();
        runs.push((seen, adapter));
    }
    let (a, b) = (&runs[0], &runs[1]);
    for (x, y) in a.0.iter().zip(&b.0) {
        assert!((x["sft/loss"] - y["sft/loss"]).abs() < 1e-5, "{x:?} {y:?}");
        assert_eq!(x["sft/token_accuracy"], y["sft/token_accuracy"]);
    }
    for (x, y) in a.1.iter().zip(&b.1) {
        let d = x
            .data
            .iter()
            .zip(&y.data)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-5, "{}: {d}", x.name);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Stopped after 3 of 6 steps (as Ctrl-C stops it) and resumed from its checkpoint, the run
/// ends with the adapter and optimizer state of an unbroken run, bit for bit.
#[test]
fn a_resumed_run_equals_an_unbroken_one() {
    let dir = tempdir("resume");
    let data = cold_start_set(&dir);
    let mut c = config(&dir, data);
    c.max_steps = 6;
    c.out = dir.join("whole");
    let Some(mut whole) = sft(c.clone()) else {
        return;
    };
    run_all(&mut whole);
    let want = checkpoint::load(&whole.latest_checkpoint().unwrap()).unwrap();
    c.out = dir.join("broken");
    let mut first = sft(c.clone()).unwrap();
    let stop = AtomicBool::new(false);
    let end = first
        .run(&stop, |_, step, _| {
            if step == 3 {
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        })
        .unwrap();
    let RunEnd::Interrupted { checkpoint: ck } = end else {
        panic!("the run should stop after step 3");
    };
    assert!(ck.ends_with("global_step_3"));
    let mut second = sft(c).unwrap();
    second.restore(&ck).unwrap();
    assert_eq!(second.step(), 3);
    run_all(&mut second);
    let got = checkpoint::load(&second.latest_checkpoint().unwrap()).unwrap();
    assert_eq!(got.step, 6);
    assert_eq!(got.params, want.params);
    assert_eq!(got.exp_avg, want.exp_avg);
    assert_eq!(got.exp_avg_sq, want.exp_avg_sq);
    let lines = std::fs::read_to_string(dir.join("broken/metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 6);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The official defaults (rank 128 on every linear layer) on the tiny package (rank 8 on q, v)
/// are refused with the export that would fit; so is a package without sft.onnx.
#[test]
fn a_package_that_cannot_run_the_config_is_refused() {
    let dir = tempdir("refuse");
    let data = cold_start_set(&dir);
    let mut c = config(&dir, data);
    c.lora_rank = 128;
    c.lora_alpha = 256.0;
    c.lora_target = "all".into();
    let e = match Sft::new(c.clone(), None) {
        Err(e) if e.to_string().contains("libonnxruntime") => return,
        Err(e) => e.to_string(),
        Ok(_) => panic!("rank 128 on the tiny package should be refused"),
    };
    assert!(
        e.contains("rank 8")
            && e.contains("--lora-rank 128 --lora-alpha 256 --lora-targets")
            && e.contains("down_proj"),
        "{e}"
    );
    // A package of an earlier exporter: no sft.onnx in its manifest.
    let old = dir.join("old");
    std::fs::create_dir_all(&old).unwrap();
    for f in std::fs::read_dir(root().join("models/tiny"))
        .unwrap()
        .flatten()
    {
        if f.path().is_file() && f.file_name() != "sft.onnx" {
            std::fs::copy(f.path(), old.join(f.file_name())).unwrap();
        }
    }
    let mpath = old.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    m["graphs"].as_object_mut().unwrap().remove("sft");
    m.as_object_mut().unwrap().remove("sft");
    std::fs::write(&mpath, m.to_string()).unwrap();
    let mut c = config(&dir, c.data.train_files[0].clone());
    c.model = old;
    let e = Sft::new(c, None).err().expect("no SFT graph").to_string();
    assert!(
        e.contains("no SFT graph") && e.contains("export it again"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ssrl tasks` output (JSONL here, as the task engine writes it): each response is the
/// template with the sample's answer, each prompt gets the format sentence as GRPO's prompts
/// do; the run learns the templated response, and the fp16 package (dynamic loss scaling)
/// learns it as the fp32 one does.
#[test]
fn task_samples_train_with_the_templated_response_in_fp32_and_fp16() {
    let dir = tempdir("tasks");
    let data = dir.join("tasks.jsonl");
    let mut f = std::fs::File::create(&data).unwrap();
    for i in 0..8 {
        let answer = ["A", "B"][i % 2];
        let line = serde_json::json!({
            "id": format!("t{i}"), "task": "depth", "answer": answer, "images": [],
            "source": [], "meta": {}, "problem": format!("Which point is closer, A or B? Scene {i}."),
        });
        writeln!(f, "{line}").unwrap();
    }
    drop(f);
    for (pkg, tag) in [("models/tiny", "fp32"), ("models/tiny-fp16", "fp16")] {
        let mut c = config(&dir, data.clone());
        c.model = root().join(pkg);
        c.out = dir.join(tag);
        c.max_steps = 16;
        c.data.response_template = "<think>Compare.</think> \\boxed{{answer}}".into();
        let Some(mut t) = sft(c) else { return };
        let seen = run_all(&mut t);
        let (first, last) = (&seen[0], &seen[15]);
        eprintln!(
            "{tag}: loss {:.3} → {:.3}, token accuracy {:.3} → {:.3}, loss scale {:?}",
            first["sft/loss"],
            last["sft/loss"],
            first["sft/token_accuracy"],
            last["sft/token_accuracy"],
            last.get("sft/loss_scale")
        );
        // The labels: "<think>Compare.</think> \boxed{A}<|im_end|>\n" — the same count for
        // every sample, whatever its prompt (the format sentence is in the prompt, not here).
        assert_eq!(first["sft/tokens"] % 4.0, 0.0);
        assert!(last["sft/loss"] < 0.7 * first["sft/loss"], "{tag}");
        assert!(
            last["sft/token_accuracy"] > first["sft/token_accuracy"] + 0.3,
            "{tag}"
        );
        assert_eq!(last.contains_key("sft/loss_scale"), tag == "fp16");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// An example whose image cannot be read, and one whose prompt leaves no room in `cutoff_len`,
/// are left out and named in the step that met them; the others train.
#[test]
fn unreadable_and_overlong_examples_are_left_out_by_name() {
    let dir = tempdir("leftout");
    let data = cold_start_set(&dir);
    let mut rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&data).unwrap()).unwrap();
    let rows_v = rows.as_array_mut().unwrap();
    rows_v.push(serde_json::json!({
        "instruction": "<image>Which patch is flipped?", "input": "",
        "output": "<think>x</think> \\boxed{1}", "images": ["coldstart_SFT_images/missing.jpg"]
    }));
    rows_v.push(serde_json::json!({
        "instruction": "word ".repeat(400), "input": "", "output": "<think>x</think> \\boxed{1}"
    }));
    std::fs::write(&data, rows.to_string()).unwrap();
    let mut c = config(&dir, data);
    c.max_steps = 3; // 10 examples, 4 per step: every example once
    c.cutoff_len = 600;
    let Some(mut t) = sft(c) else { return };
    let stop = AtomicBool::new(false);
    let mut left = Vec::new();
    let mut examples = 0.0;
    t.run(&stop, |m, _, left_out| {
        left.extend(left_out.iter().cloned());
        examples += m["sft/examples"];
    })
    .unwrap();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.iter().any(|e| e.contains("missing.jpg")), "{left:?}");
    assert!(
        left.iter().any(|e| e.contains("cutoff_len 600")),
        "{left:?}"
    );
    assert_eq!(examples, 8.0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// On a package with LoRA on the vision tower too, the cold start trains the language model's
/// adapter and leaves the tower's at zero (LLaMA-Factory freezes the vision tower), saying so;
/// the checkpoint still holds every tensor, so `ssrl train` can start from it.
#[test]
fn the_cold_start_leaves_a_vision_tower_adapter_at_zero() {
    leaves_the_vision_adapter_at_zero("models/tiny-vision-lora", "vision");
}

/// The same on Qwen3-VL, whose tower's adapter includes the DeepStack mergers'.
#[test]
fn the_qwen3_vl_cold_start_leaves_its_vision_tower_adapter_at_zero() {
    leaves_the_vision_adapter_at_zero("models/tiny-qwen3-vl-vision-lora", "vision-qwen3");
}

fn leaves_the_vision_adapter_at_zero(pkg: &str, name: &str) {
    let dir = tempdir(name);
    let mut c = config(&dir, cold_start_set(&dir));
    c.model = root().join(pkg);
    if pkg.contains("qwen3") {
        c.image_min_pixels = 4096;
        c.image_max_pixels = 65_536;
    }
    c.max_steps = 2;
    let Some(mut t) = sft(c) else { return };
    let note = t.vision_note().unwrap();
    assert!(
        note.contains("visual.qkv") && note.contains("zero"),
        "{note}"
    );
    for _ in 0..2 {
        let m = t.train_step().unwrap();
        assert!(m["sft/loss"].is_finite(), "{m:?}");
    }
    let ck = t.save().unwrap();
    let tensors = checkpoint::read_safetensors(&ck.join("adapter_model.safetensors")).unwrap();
    let b = |vision: bool| {
        tensors
            .iter()
            .filter(|t| t.name.contains(".visual.") == vision && t.name.contains("lora_B"))
            .map(|t| t.data.iter().map(|v| v.abs()).fold(0f32, f32::max))
            .collect::<Vec<_>>()
    };
    let (lang, vision) = (b(false), b(true));
    assert!(
        !vision.is_empty() && vision.iter().all(|&m| m == 0.0),
        "{vision:?}"
    );
    assert!(
        !lang.is_empty() && lang.iter().all(|&m| m > 0.0),
        "{lang:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The cold start on the Qwen3-VL package (DeepStack features through sft.onnx): the loss of
/// its responses falls and the token accuracy rises.
#[test]
fn the_cold_start_learns_on_qwen3_vl() {
    let dir = tempdir("qwen3");
    let mut c = config(&dir, cold_start_set(&dir));
    c.model = root().join("models/tiny-qwen3-vl");
    c.image_min_pixels = 4096;
    c.image_max_pixels = 65_536;
    c.max_steps = 10;
    let Some(mut t) = sft(c) else { return };
    let mut first = None;
    let mut last = Metrics::new();
    for _ in 0..10 {
        last = t.train_step().unwrap();
        first.get_or_insert(last.clone());
    }
    let first = first.unwrap();
    assert!(
        last["sft/loss"] < 0.8 * first["sft/loss"],
        "loss {} → {}",
        first["sft/loss"],
        last["sft/loss"]
    );
    assert!(
        last["sft/token_accuracy"] > first["sft/token_accuracy"],
        "token accuracy {} → {}",
        first["sft/token_accuracy"],
        last["sft/token_accuracy"]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
