//! Data parallel: a run of two MPI ranks (`mpirun -np 2`) equals a run of one process with the
//! same global batch — the same samples, rewards and advantages, the same loss, gradient norm
//! and LoRA tensors up to float summation — for GRPO and for SFT, with uneven shares, a rank
//! whose whole share of a step cannot be read, and ranks of different response lengths.
//!
//! The ranks are this test binary itself, started under `mpirun` to run [`rank_worker`]. Where
//! the crate is built without the `mpi` feature or `mpirun` is missing, the tests say SKIP.

use spatial_ssrl::train::checkpoint;
use spatial_ssrl::train::config::TrainConfig;
use spatial_ssrl::train::sft::{Sft, SftConfig};
use spatial_ssrl::train::{Metrics, Trainer};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

mod common;

use common::letter_reward;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tempdir(name: &str) -> PathBuf {
    common::scratch(&format!("dp-{name}"))
}

/// Whether two ranks can be started: the `mpi` build and a working `mpirun`; else SKIP.
fn mpirun_ready() -> bool {
    if !cfg!(feature = "mpi") {
        // (written past the test harness's capture, so that it shows)
        let _ = writeln!(
            std::io::stderr(),
            "SKIP: built without the mpi feature (make test builds it where mpicc is found)"
        );
        return false;
    }
    match Command::new("mpirun").arg("--version").output() {
        Ok(o) if o.status.success() => true,
        _ => {
            let _ = writeln!(
                std::io::stderr(),
                "SKIP: no mpirun (apt-get install openmpi-bin libopenmpi-dev)"
            );
            false
        }
    }
}

/// Runs `job` (`grpo:FILE` or `sft:FILE`) on two ranks of this test binary.
fn on_two_ranks(job: &str) {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("mpirun")
        .args(["-np", "2", "--oversubscribe", "--allow-run-as-root"])
        .args(["-x", "SSRL_TEST_RANK_JOB", "-x", "ORT_DYLIB_PATH"])
        .arg(&exe)
        .args([
            "rank_worker",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SSRL_TEST_RANK_JOB", job)
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "mpirun -np 2 failed:\n{text}");
    assert!(text.contains("rank 1 of 2 done"), "{text}");
}

/// One rank of a two-rank run (started by the tests below under mpirun; alone it does nothing).
#[test]
#[ignore = "a rank of the data-parallel tests, which start it under mpirun"]
fn rank_worker() {
    let Ok(job) = std::env::var("SSRL_TEST_RANK_JOB") else {
        return;
    };
    let world = spatial_ssrl::dist::init().unwrap();
    assert_eq!(world.size, 2, "started as {world:?}", world = world.who());
    let (kind, path) = job.split_once(':').unwrap();
    let stop = AtomicBool::new(false);
    match kind {
        "grpo" | "grpo-resume" => {
            let c = TrainConfig::load(Path::new(path)).unwrap();
            let mut t = Trainer::new(c, None).unwrap().with_reward(letter_reward());
            if kind == "grpo-resume" {
                // (every rank restores rank 0's newest checkpoint, as ssrl train --resume does)
                let dir = world.broadcast(t.latest_checkpoint().unwrap());
                t.restore(&dir).unwrap();
            }
            t.run(&stop, |_, _, _| {}).unwrap();
        }
        "sft" => {
            let c = SftConfig::load(Path::new(path)).unwrap();
            Sft::new(c, None).unwrap().run(&stop, |_, _, _| {}).unwrap();
        }
        other => panic!("unknown job {other}"),
    }
    // One write, so that the two ranks' lines, merged by mpirun, cannot interleave.
    let line = format!("{} done\n", world.who());
    std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes()).unwrap();
    spatial_ssrl::dist::finish();
}

/// The run's metric lines.
fn metrics(out: &Path) -> Vec<Metrics> {
    spatial_ssrl::train::read_metrics(&out.join("metrics.jsonl")).unwrap()
}

/// Metric lines of two runs compared: `exact` keys equal, `close` keys within `tol` relative;
/// times, memory and the rank count are each run's own.
fn same_metrics(one: &[Metrics], two: &[Metrics], close: &[&str], tol: f64) {
    assert_eq!(one.len(), two.len(), "steps");
    for (a, b) in one.iter().zip(two) {
        let own = |k: &str| {
            k.starts_with("timing_s/")
                || k.starts_with("perf/")
                || k.starts_with("throughput/")
                || k.starts_with("dist/")
                || k == "sft/tokens_per_s"
        };
        let keys_a: Vec<&String> = a.keys().filter(|k| !own(k)).collect();
        let keys_b: Vec<&String> = b.keys().filter(|k| !own(k)).collect();
        assert_eq!(keys_a, keys_b, "step {:?}", a.get("step"));
        if b.contains_key("timing_s/step") {
            assert_eq!(b.get("dist/ranks"), Some(&2.0));
        }
        for k in keys_a {
            let (x, y) = (a[k], b[k]);
            if close.iter().any(|c| k.starts_with(c)) {
                let d = (x - y).abs() / x.abs().max(1e-3);
                assert!(d <= tol, "{k} at step {:?}: {x} vs {y}", a.get("step"));
            } else {
                assert_eq!(x, y, "{k} at step {:?}", a.get("step"));
            }
        }
    }
}

/// The last checkpoint's LoRA tensors of two runs, within `tol` of the largest value.
fn same_adapter(one: &Path, two: &Path, tol: f32) {
    let last = |out: &Path| {
        let dir = checkpoint::latest(&out.join("checkpoints")).expect("a checkpoint");
        checkpoint::read_safetensors(&dir.join("adapter_model.safetensors")).unwrap()
    };
    let (a, b) = (last(one), last(two));
    assert_eq!(a.len(), b.len());
    let mut moved = 0;
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((&x.name, &x.shape), (&y.name, &y.shape));
        let (xv, yv) = (&x.data, &y.data);
        let scale = xv.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let diff = xv
            .iter()
            .zip(yv.iter())
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(
            diff <= tol * scale,
            "{}: differs by {diff} (scale {scale})",
            x.name
        );
        if x.name.contains("lora_B") && scale > 1e-6 {
            moved += 1;
        }
    }
    assert!(moved > 0, "no B tensor moved: the runs did not train");
}

/// Twelve prompts with a photo each, three of them (the 2nd, 4th and 6th) a JPEG cut short,
/// whose header reads (so it passes the opening screen) but whose pixels do not.
fn image_prompts(dir: &Path) -> PathBuf {
    let img = dir.join("img");
    std::fs::create_dir_all(&img).unwrap();
    let photos = root().join("fixtures/photos");
    std::fs::copy(photos.join("coffee.png"), img.join("coffee.png")).unwrap();
    let jpeg = std::fs::read(photos.join("rocket.jpg")).unwrap();
    std::fs::write(img.join("broken.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    let data = dir.join("tasks.jsonl");
    let mut f = std::fs::File::create(&data).unwrap();
    for i in 0..12 {
        let image = if [1, 3, 5].contains(&i) {
            "broken.jpg"
        } else {
            "coffee.png"
        };
        let line = serde_json::json!({
            "id": format!("p{i}"), "answer": "a", "images": [image], "task": format!("t{}", i % 2),
            "problem": format!("<image> Question {i}: answer with the letter a."),
        });
        writeln!(f, "{line}").unwrap();
    }
    data
}

fn grpo_config(dir: &Path, out: &str) -> TrainConfig {
    let data = image_prompts(dir);
    let mut c = TrainConfig {
        model: root().join("models/tiny"),
        out: dir.join(out),
        ..Default::default()
    };
    c.data.train_files = vec![data.clone()];
    c.data.val_files = vec![data];
    c.data.image_dir = dir.join("img");
    c.data.min_pixels = 3136;
    c.data.max_pixels = 50_176;
    c.data.shuffle = false;
    // Six prompts a step, in two mini-batches of three that each span both ranks: step 1's
    // three on rank 1 are all broken, so rank 1 sits that step out with zero gradients. The
    // validation's five are dealt three and two.
    c.data.rollout_batch_size = 6;
    c.actor.global_batch_size = 3;
    c.data.val_batch_size = 5;
    c.data.max_response_length = 8;
    c.data.format_prompt = String::new();
    c.rollout.n = 4;
    c.actor.micro_batch_size_per_device_for_update = 3;
    c.actor.micro_batch_size_per_device_for_experience = 5;
    c.actor.optim.lr = 2e-2;
    c.trainer.max_steps = 3;
    c.trainer.val_freq = 3;
    c.trainer.save_freq = 0;
    c.trainer.replica_check_freq = 1;
    c.trainer.kernels = "cpu".into();
    c
}

#[test]
fn grpo_on_two_ranks_equals_one_process() {
    if !mpirun_ready() {
        return;
    }
    let dir = tempdir("grpo");
    let one = grpo_config(&dir, "one");
    let two = grpo_config(&dir, "two");
    let stop = AtomicBool::new(false);
    let mut t = match Trainer::new(one.clone(), None) {
        Ok(t) => t.with_reward(letter_reward()),
        Err(e) if e.to_string().contains("libonnxruntime") => {
            let _ = writeln!(std::io::stderr(), "SKIP: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    t.run(&stop, |_, _, _| {}).unwrap();
    let file = dir.join("two.toml");
    std::fs::write(&file, two.to_toml()).unwrap();
    on_two_ranks(&format!("grpo:{}", file.display()));
    let (a, b) = (metrics(&one.out), metrics(&two.out));
    // Validation before the first step, three steps (validation with the third).
    assert_eq!(a.len(), 4);
    assert_eq!(
        a[1]["data/unreadable_prompts"], 3.0,
        "step 1 met the three broken"
    );
    assert!(!a[2].contains_key("data/unreadable_prompts"));
    assert!(a[1]["advantage/abs_mean"] > 0.0, "samples differ in reward");
    // (the recomputed log-probs, and so the sampler mismatch, are summed in other
    // micro-batches: equal up to float summation)
    same_metrics(&a, &b, &["actor/", "rollout/logprob_mismatch"], 1e-3);
    same_adapter(&one.out, &two.out, 1e-4);

    // Two ranks stopped after step 2 and resumed on two ranks end where the others did.
    let mut part = grpo_config(&dir, "resumed");
    part.trainer.max_steps = 2;
    part.trainer.save_freq = 2;
    let file = dir.join("part.toml");
    std::fs::write(&file, part.to_toml()).unwrap();
    on_two_ranks(&format!("grpo:{}", file.display()));
    part.trainer.max_steps = 3;
    std::fs::write(&file, part.to_toml()).unwrap();
    on_two_ranks(&format!("grpo-resume:{}", file.display()));
    same_metrics(
        &a[1..],
        &metrics(&part.out)[1..],
        &["actor/", "rollout/logprob_mismatch"],
        1e-3,
    );
    same_adapter(&one.out, &part.out, 1e-4);
}

/// Nine examples: eight a step (per device 2 × accumulation 4 on one process, × 2 on two
/// ranks), so every second step has one example, on rank 0 alone.
fn sft_config(dir: &Path, out: &str, ranks: usize) -> SftConfig {
    let imgs = dir.join("images");
    std::fs::create_dir_all(&imgs).unwrap();
    let photos = ["rocket.jpg", "coffee.png", "camera.png", "chelsea.png"];
    let mut rows = Vec::new();
    for i in 0..9 {
        let p = photos[i % 4];
        let name = format!("img_{i}.{}", p.rsplit('.').next().unwrap());
        std::fs::copy(root().join("fixtures/photos").join(p), imgs.join(&name)).unwrap();
        let row = match i % 2 {
            0 => serde_json::json!({
                "instruction": format!("<image>Which of the {} patches is flipped?", i + 2),
                "input": "",
                "output": format!("<think>The patches are compared edge by edge.</think> \\boxed{{{}}}", i + 1),
                "images": [format!("images/{name}")]
            }),
            _ => serde_json::json!({
                "instruction": format!("Which region is closer, A or B? Case {i}."),
                "input": "",
                "output": "<think>The regions are compared by depth.</think> \\boxed{A}",
            }),
        };
        rows.push(row);
    }
    let f = dir.join("SFT-coldstart.json");
    std::fs::write(&f, serde_json::Value::Array(rows).to_string()).unwrap();
    let mut c = SftConfig {
        model: root().join("models/tiny"),
        out: dir.join(out),
        ..Default::default()
    };
    c.data.train_files = vec![f];
    c.lora_rank = 8;
    c.lora_alpha = 16.0;
    c.lora_target = "q_proj,v_proj".into();
    c.learning_rate = 5e-2;
    c.image_max_pixels = 50_176;
    c.per_device_train_batch_size = 2;
    c.gradient_accumulation_steps = 8 / (2 * ranks);
    c.max_steps = 4;
    c.save_steps = 0;
    c.replica_check_steps = 1;
    c.kernels = "cpu".into();
    c
}

#[test]
fn sft_on_two_ranks_equals_one_process() {
    if !mpirun_ready() {
        return;
    }
    let dir = tempdir("sft");
    let one = sft_config(&dir, "one", 1);
    let two = sft_config(&dir, "two", 2);
    let stop = AtomicBool::new(false);
    let mut t = match Sft::new(one.clone(), None) {
        Ok(t) => t,
        Err(e) if e.to_string().contains("libonnxruntime") => {
            let _ = writeln!(std::io::stderr(), "SKIP: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    assert_eq!(t.steps_per_epoch(), 2);
    t.run(&stop, |_, _, _| {}).unwrap();
    let file = dir.join("two.toml");
    std::fs::write(&file, two.to_toml()).unwrap();
    on_two_ranks(&format!("sft:{}", file.display()));
    let (a, b) = (metrics(&one.out), metrics(&two.out));
    assert_eq!(a.len(), 4);
    assert_eq!(
        (a[0]["sft/examples"], a[1]["sft/examples"]),
        (8.0, 1.0),
        "eight, then the epoch's one left"
    );
    assert!(a[3]["sft/loss"] < a[0]["sft/loss"], "it learns");
    same_metrics(
        &a,
        &b,
        &["sft/loss", "sft/grad_norm", "sft/token_accuracy"],
        1e-3,
    );
    same_adapter(&one.out, &two.out, 1e-4);
}

/// `ssrl ARGS` on two ranks (mpirun) and as one process, each writing under its own folder
/// (`OUT` in the arguments is replaced by it); the two folders.
fn ssrl_both_ways(dir: &Path, args: &[&str]) -> (PathBuf, PathBuf) {
    let exe = env!("CARGO_BIN_EXE_ssrl");
    let (one, two) = (dir.join("one"), dir.join("two"));
    for d in [&one, &two] {
        std::fs::create_dir_all(d).unwrap();
    }
    let fill = |d: &Path| -> Vec<String> {
        let d = d.display().to_string();
        args.iter().map(|a| a.replace("OUT", &d)).collect()
    };
    let single = Command::new(exe).args(fill(&one)).output().unwrap();
    assert!(
        single.status.success(),
        "{}",
        String::from_utf8_lossy(&single.stderr)
    );
    let pair = Command::new("mpirun")
        .args(["-np", "2", "--oversubscribe", "--allow-run-as-root"])
        .args(["-x", "ORT_DYLIB_PATH", exe])
        .args(fill(&two))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&pair.stderr);
    assert!(pair.status.success(), "mpirun -np 2 ssrl: {err}");
    assert!(err.contains("data parallel: 2 ranks"), "{err}");
    (one, two)
}

/// Seven prompts with the photo (one a broken JPEG, which is skipped and named once) and
/// answers: an odd count, so the ranks' shares differ.
fn rollout_data(dir: &Path) -> PathBuf {
    let data = image_prompts(dir);
    let text = std::fs::read_to_string(&data).unwrap();
    let seven: String = text.lines().take(7).map(|l| format!("{l}\n")).collect();
    let f = dir.join("seven.jsonl");
    std::fs::write(&f, seven).unwrap();
    f
}

#[test]
fn rollout_and_eval_on_two_ranks_write_what_one_process_writes() {
    if !mpirun_ready() {
        return;
    }
    let dir = tempdir("rollout");
    let data = rollout_data(&dir);
    let data = data.to_str().unwrap();
    let img = dir.join("img");
    let img = img.to_str().unwrap();
    let tiny = root().join("models/tiny");
    let tiny = tiny.to_str().unwrap();
    let (one, two) = ssrl_both_ways(
        &dir,
        &[
            "rollout",
            "--model",
            tiny,
            "--data",
            data,
            "--images-root",
            img,
            "--group",
            "3",
            "--batch",
            "2",
            "--max-new-tokens",
            "12",
            "--seed",
            "5",
            "--out",
            "OUT/r.jsonl",
        ],
    );
    let lines = |d: &Path| -> Vec<serde_json::Value> {
        (std::fs::read_to_string(d.join("r.jsonl")).unwrap().lines())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (a, b) = (lines(&one), lines(&two));
    // Three broken of seven: four prompts of three samples each, in the data's order.
    assert_eq!(a.len(), 12);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        for k in [
            "prompt_id",
            "prompt_index",
            "sample",
            "tokens",
            "text",
            "finish",
            "reward",
        ] {
            assert_eq!(x[k], y[k], "{k}");
        }
        let (lx, ly) = (
            x["logprobs"].as_array().unwrap(),
            y["logprobs"].as_array().unwrap(),
        );
        for (p, q) in lx.iter().zip(ly) {
            let (p, q) = (p.as_f64().unwrap(), q.as_f64().unwrap());
            assert!((p - q).abs() <= 1e-4 * p.abs().max(1.0), "{p} vs {q}");
        }
    }
    // Greedy evaluation of the readable prompts: the same items and summary.
    let text = std::fs::read_to_string(dir.join("tasks.jsonl")).unwrap();
    let ok: String = (text.lines().enumerate())
        .filter(|(i, _)| ![1, 3, 5].contains(i))
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    let ok_file = dir.join("readable.jsonl");
    std::fs::write(&ok_file, ok).unwrap();
    let (one, two) = ssrl_both_ways(
        &dir.join("eval"),
        &[
            "eval",
            "--model",
            tiny,
            "--data",
            ok_file.to_str().unwrap(),
            "--images",
            img,
            "--batch",
            "2",
            "--max-new-tokens",
            "8",
            "--out",
            "OUT/e",
        ],
    );
    let read = |d: &Path, f: &str| std::fs::read_to_string(d.join("e").join(f)).unwrap();
    assert_eq!(read(&one, "items.jsonl").lines().count(), 9);
    assert_eq!(read(&one, "items.jsonl"), read(&two, "items.jsonl"));
    assert_eq!(read(&one, "summary.json"), read(&two, "summary.json"));
}

/// NCCL through the GPU with a communicator of one: the sum of one rank's gradients is those
/// gradients, bit for bit, after the trip through the device and back. (Several GPUs are what
/// it is for; that needs more than one device and is not tested here.)
#[test]
fn nccl_sums_through_the_gpu_with_a_communicator_of_one() {
    #[cfg(not(feature = "mpi"))]
    common::gpu_skip("built without the mpi feature, which carries NCCL");
    #[cfg(feature = "mpi")]
    {
        let cuda = match spatial_ssrl::kernels::cuda::Cuda::new(0) {
            Ok(c) => c,
            Err(e) => return common::gpu_skip(&format!("no CUDA device ({e})")),
        };
        let world = spatial_ssrl::dist::World::solo();
        let sum = match spatial_ssrl::dist::GpuSum::open(&world, cuda.stream().clone()) {
            Ok(s) => s,
            Err(e) => return common::gpu_skip(&format!("no NCCL ({e})")),
        };
        let grads: Vec<f32> = (0..100_003)
            .map(|i| (i as f32 * 0.37).sin() * 1e-3)
            .collect();
        let mut v = grads.clone();
        sum.sum_f32(&mut v).unwrap();
        assert_eq!(v, grads);
    }
}

/// A command that does not share its work over ranks refuses a launch of several (two copies
/// of `ssrl tasks` would write the same folder), naming the commands that do.
#[test]
fn commands_without_ranks_refuse_a_launcher() {
    if !mpirun_ready() {
        return;
    }
    let dir = tempdir("refuse");
    let out = Command::new("mpirun")
        .args(["-np", "2", "--oversubscribe", "--allow-run-as-root"])
        .arg(env!("CARGO_BIN_EXE_ssrl"))
        .args(["tasks", "--images"])
        .arg(root().join("fixtures/photos"))
        .arg("--out")
        .arg(dir.join("tasks"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("as 2 ranks, but this command runs as one process"),
        "{err}"
    );
    assert!(!dir.join("tasks").exists(), "nothing was written");
}
