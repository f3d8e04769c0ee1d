//! The `ssrl` binary: exit codes, messages, and the reward filter.

mod common;

use common::*;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

fn ssrl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ssrl"))
}

/// Runs `cmd`, which must succeed (its stderr shown otherwise).
fn succeeded(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The JSON values of a JSONL file, one per line.
fn json_lines(f: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(f)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `ssrl rollout` of the tiny package on `data`.
fn rollout(data: &std::path::Path) -> Command {
    let mut c = ssrl();
    c.args(["rollout", "--model"])
        .arg(tiny())
        .arg("--data")
        .arg(data);
    c
}

/// The committed tiny model package.
fn tiny() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny")
}

/// The stderr of a run that needs ONNX Runtime: `None` (with a visible SKIP) where no library is
/// installed, else the run must have succeeded.
fn succeeded_or_skip(r: &std::process::Output) -> Option<String> {
    let err = String::from_utf8_lossy(&r.stderr).into_owned();
    if err.contains("ONNX Runtime library not found") {
        let _ = writeln!(std::io::stderr(), "SKIP: {err}");
        return None;
    }
    assert!(r.status.success(), "{err}");
    Some(err)
}

/// Standard input, with no file named or with `-`.
#[test]
fn reward_filter_scores_jsonl() {
    for stdin in [&[][..], &["-"]] {
        reward_filter_scores_jsonl_from(stdin);
    }
}

fn reward_filter_scores_jsonl_from(stdin: &[&str]) {
    let mut child = ssrl()
        .arg("reward")
        .args(stdin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            br#"{"response": "<think> the far region </think> so \\boxed{2-1-3}", "answer": "2-1-3"}

{"response": "\\boxed{A}", "ground_truth": "A"}
  
{"response": "<think>x</think>\\boxed{B}", "answer": "A"}
"#,
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    // Line N of the output answers line N of the input: blank lines stay blank.
    let text = String::from_utf8(out.stdout).unwrap();
    let raw: Vec<&str> = text.lines().collect();
    assert_eq!(raw.len(), 5, "{text}");
    assert!(raw[1].is_empty() && raw[3].is_empty(), "{text}");
    let lines: Vec<serde_json::Value> = [0, 2, 4]
        .iter()
        .map(|&i| serde_json::from_str(raw[i]).unwrap())
        .collect();
    assert_eq!(lines[0]["overall"], 1.0);
    assert_eq!(lines[0]["predicted"], "2-1-3");
    assert!((lines[1]["overall"].as_f64().unwrap() - 0.9).abs() < 1e-12);
    assert!((lines[2]["overall"].as_f64().unwrap() - 0.1).abs() < 1e-12);
}

/// Output into a pipe whose reader has gone (`ssrl reward … | head`) ends the run quietly by
/// SIGPIPE, as other Unix tools do, not with a panic's message.
#[cfg(unix)]
#[test]
fn a_closed_output_pipe_ends_the_run_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let mut child = ssrl()
        .arg("reward")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut stdin = child.stdin.take().unwrap();
    let line = b"{\"response\": \"\\\\boxed{A}\", \"answer\": \"A\"}\n";
    // The run may end before all of it is written: the write errors are expected.
    for _ in 0..20_000 {
        if stdin.write_all(line).is_err() {
            break;
        }
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(13), "{:?}: {err}", out.status);
    assert!(err.is_empty(), "{err}");
}

#[test]
fn reward_names_the_bad_line() {
    let dir = scratch("cli-reward");
    let f = dir.join("in.jsonl");
    std::fs::write(
        &f,
        "{\"response\": \"a\", \"answer\": \"b\"}\n{\"response\": 3}\n",
    )
    .unwrap();
    let out = ssrl().arg("reward").arg(&f).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("in.jsonl:2"), "{err}");
}

#[test]
fn tasks_runs_refuses_to_overwrite_and_resumes() {
    let dir = scratch("cli-tasks");
    let out = dir.join("out");
    let args = |extra: &[&str]| {
        let mut c = ssrl();
        c.args(["tasks", "--images"])
            .arg(fixtures().join("photos"))
            .args(["--tasks", "flip,crop", "--quiet", "--out"])
            .arg(&out)
            .args(extra);
        c
    };
    let first = succeeded(&mut args(&[]));
    let stdout = String::from_utf8(first.stdout).unwrap();
    assert!(
        stdout.contains("flip") && stdout.contains("crop") && stdout.contains("10 samples"),
        "{stdout}"
    );
    let again = args(&[]).output().unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8(again.stderr)
        .unwrap()
        .contains("--resume"));
    let resumed = args(&["--resume"]).output().unwrap();
    assert!(resumed.status.success());
    assert!(String::from_utf8(resumed.stdout)
        .unwrap()
        .contains("1 shard(s) resumed"));
}

#[test]
fn tasks_without_input_or_with_bad_values_fails_clearly() {
    let out = ssrl()
        .args(["tasks", "--out"])
        .arg(scratch("cli-none").join("o"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr).unwrap().contains("--images"));
    let out = ssrl()
        .args(["tasks", "--out", "x", "--images", "y", "--tasks", "jigsaw"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr).unwrap().contains("jigsaw"));
    let help = ssrl().args(["tasks", "--help"]).output().unwrap();
    let h = String::from_utf8(help.stdout).unwrap();
    assert!(h.contains("--resume") && h.contains("Example"), "{h}");
    // Tasks whose inputs were not given say which they take, and leave nothing behind: the
    // corrected command runs into the same folder; so does one after a run that made nothing
    // (every photo too small for --max-side 10).
    let out = scratch("cli-no-sources").join("o");
    let photos = fixtures().join("photos");
    let tasks = |args: &[&str]| {
        let r = ssrl()
            .args(["tasks", "--images"])
            .arg(&photos)
            .arg("--out")
            .arg(&out)
            .args(args)
            .output()
            .unwrap();
        (
            r.status.success(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        )
    };
    let (ok, err) = tasks(&["--tasks", "depth,position"]);
    assert!(
        !ok && err.contains("depth, position take RGB-D frames (--rgbd: none given)"),
        "{err}"
    );
    assert!(!out.exists());
    let (ok, err) = tasks(&["--tasks", "flip", "--max-side", "10"]);
    assert!(
        !ok && err.contains("flip: ")
            && err.contains("too_small (too small for the task's grid or crop; see --max-side)"),
        "{err}"
    );
    assert!(!out.exists());
    let (ok, err) = tasks(&["--tasks", "flip"]);
    assert!(ok, "{err}");
    assert!(out.join("run.json").is_file());
    // Photos may be files, several after one flag (a shell glob); a file that is not a photo
    // is named.
    let files = scratch("cli-photo-files").join("o");
    let r = ssrl()
        .args(["tasks", "--tasks", "flip", "--images"])
        .args([photos.join("coffee.png"), photos.join("rocket.jpg")])
        .arg("--out")
        .arg(&files)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(files.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["sources"], 2, "{summary}");
    let not_photo = fixtures().join("PROVENANCE.md");
    let r = ssrl()
        .args(["tasks", "--images"])
        .arg(&not_photo)
        .arg("--out")
        .arg(files.with_file_name("o2"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("neither a folder nor a jpg/png/webp image"),
        "{err}"
    );
}

/// Settings that cannot run are refused before anything is read or written, naming the flag and
/// the range: counts of zero, temperatures below zero or not finite, top-p outside (0, 1].
#[test]
fn out_of_range_settings_are_refused_naming_the_flag() {
    let dir = scratch("cli-range");
    let data = dir.join("no-such-data.jsonl");
    let out = dir.join("r.jsonl");
    let cases: &[(&[&str], &str, &str)] = &[
        (&["--group", "0"], "--group", "at least 1"),
        (&["--batch", "0"], "--batch", "at least 1"),
        (&["--max-new-tokens", "0"], "--max-new-tokens", "at least 1"),
        (&["--temperature", "-1"], "--temperature", "≥ 0"),
        (&["--temperature=nan"], "--temperature", "≥ 0"),
        (&["--top-p", "0"], "--top-p", "(0, 1]"),
        (&["--top-p", "1.5"], "--top-p", "(0, 1]"),
        (&["--limit", "0"], "--limit", "at least 1"),
        (
            &["--cuda-mem-limit", "0"],
            "--cuda-mem-limit",
            "at least 1 byte",
        ),
        (
            &["--trt-workspace", "4 parsecs"],
            "--trt-workspace",
            "unknown unit",
        ),
    ];
    for (args, flag, range) in cases {
        let r = rollout(&data)
            .arg("--out")
            .arg(&out)
            .args(*args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(flag) && err.contains(range), "{args:?}: {err}");
    }
    assert!(!out.exists() && !dir.join("r.jsonl.partial").exists());
    for (cmd, args) in [
        (&["bench", "rollout"][..], &["--rounds", "0"][..]),
        (&["bench", "rollout"], &["--temperature=-0.5"]),
        (&["bench", "rollout"], &["--top-p", "0"]),
        (&["bench", "rollout"], &["--cpu-slices", "0"]),
        (&["eval", "--out", "x", "--data", "y"], &["--top-p", "2"]),
        (&["bench", "kernels"], &["--vocab", "0"]),
        (&["bench", "kernels"], &["--rows", "0"]),
        (
            &["tasks", "--out", "x", "--images", "y"],
            &["--per-image", "0"],
        ),
    ] {
        let r = ssrl().args(cmd).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(args[0].split('=').next().unwrap()), "{err}");
    }
}

/// EasyR1-style rows (problem, answer, images only) roll out, and rows without an answer (not
/// scored), an id (named by their line) or images (text only) too; a prompt with no room for the new tokens in the model's context, or whose
/// placeholders do not match its images, is skipped with a warning naming it, the rest rolled
/// out.
#[test]
fn rollout_skips_a_prompt_beyond_the_context_length_or_its_images() {
    let dir = scratch("cli-context");
    let data = dir.join("data.jsonl");
    let long: Vec<&str> = ["astronaut.png", "coffee.png", "rocket.jpg"]
        .iter()
        .cycle()
        .take(15)
        .copied()
        .collect();
    let rows = [
        serde_json::json!({"problem": "<image> Where is the cat looking?", "answer": "A",
                           "images": ["chelsea.png"]}),
        serde_json::json!({"id": "too-long", "problem": "<image>".repeat(15) + " Which?",
                           "answer": "B", "images": long}),
        serde_json::json!({"id": "one-short", "problem": "<image><image> Which?", "answer": "C",
                           "images": ["chelsea.png"]}),
        // No answer: rolled out, not scored.
        serde_json::json!({"id": "open", "problem": "<image> Describe it.",
                           "images": ["chelsea.png"]}),
        // Text only, no images field.
        serde_json::json!({"problem": "What is two plus two?", "answer": "4"}),
    ];
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&data, text).unwrap();
    let out = dir.join("r.jsonl");
    let r = rollout(&data)
        .arg("--images-root")
        .arg(fixtures().join("photos"))
        .args(["--group", "2", "--max-new-tokens", "4", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let Some(err) = succeeded_or_skip(&r) else {
        return;
    };
    assert!(
        err.contains("skipping sample too-long (1)") && err.contains("context length of 4096"),
        "{err}"
    );
    // So is one whose prompt does not match its images.
    assert!(
        err.contains(
            "skipping sample one-short (2): the prompt has 2 image placeholders but 1 images"
        ),
        "{err}"
    );
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 6, "{lines:?}");
    let (scored, rest): (Vec<_>, Vec<_>) = lines.iter().partition(|l| l["prompt_index"] == 0);
    // A row without an id is named by its line.
    assert!(scored.iter().all(|l| l["reward"]["overall"].is_number()
        && l["answer"] == "A"
        && l["prompt_id"] == "line-1"));
    let (text, open): (Vec<&serde_json::Value>, Vec<_>) =
        rest.iter().partition(|l| l["prompt_index"] == 4);
    assert!(text.len() == 2 && text.iter().all(|l| l["prompt_id"] == "line-5"));
    assert_eq!(open.len(), 2);
    assert!(open
        .iter()
        .all(|l| l["prompt_index"] == 3 && l["answer"].is_null() && l["reward"].is_null()));
    let summary = String::from_utf8_lossy(&r.stdout);
    assert!(summary.contains("mean reward"), "{summary}");
}

/// A missing input is named once with its cause once, not repeated down the error chain.
#[test]
fn a_missing_input_is_named_once() {
    let dir = scratch("cli-missing");
    let missing = dir.join("no-such-folder");
    let out = ssrl()
        .args(["tasks", "--out"])
        .arg(dir.join("o"))
        .arg("--images")
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.matches("no-such-folder").count(), 1, "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    let out = ssrl()
        .args(["rollout", "--model", "models/tiny", "--out"])
        .arg(dir.join("r.jsonl"))
        .arg("--data")
        .arg(dir.join("no-such-samples.jsonl"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("cannot read samples"), "{err}");
    assert_eq!(err.matches("no-such-samples.jsonl").count(), 1, "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
}

/// A library named by --ort-lib that is not there is an error naming it; no other library
/// (ORT_DYLIB_PATH, the setup location) is loaded in its place.
#[test]
fn a_missing_ort_lib_is_an_error_naming_it() {
    let out = ssrl()
        .args(["bench", "rollout", "--rounds", "1", "--ort-lib"])
        .arg("/no/such/libonnxruntime.so")
        .arg("--json")
        .arg(scratch("cli-ort-lib").join("b.json"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("not found") && err.contains("/no/such/libonnxruntime.so"),
        "{err}"
    );
}

/// `inspect` checks every graph of the tiny package against its contract, names the weight file
/// the graphs share and says how its decoder keeps the cache.
#[test]
fn inspect_checks_every_graph_and_names_the_cache_layout() {
    let r = ssrl()
        .args(["inspect", "--model"])
        .arg(tiny())
        .output()
        .unwrap();
    if succeeded_or_skip(&r).is_none() {
        return;
    }
    let out = String::from_utf8_lossy(&r.stdout);
    for g in ["vision", "embedding", "decoder", "logprobs", "train", "sft"] {
        assert!(out.contains(&format!("  {g}.onnx: ok (")), "{out}");
    }
    // Each graph's size with the weights it reads from the shared file, and the file.
    assert!(
        out.contains("  decoder.onnx: ok (27 inputs, 5 outputs; 2.3 MB with the weights it reads)"),
        "{out}"
    );
    assert!(
        out.contains("weights: weights.data, 3.3 MB (shared by 6 graphs, each tensor stored once)"),
        "{out}"
    );
    assert!(
        out.contains(
            "log-prob and training graphs: the completion's columns only; the vocabulary head in 8 chunks of \
             positions; attention in 8 chunks of queries"
        ),
        "{out}"
    );
    assert!(
        out.contains(
            "cache: prompts' cache shared by their samples; rows' own tokens read in place"
        ),
        "{out}"
    );
    // The context length, from the package's config.json.
    assert!(out.contains("context: 4096 tokens"), "{out}");
}

/// `--profile`: ONNX Runtime's profile of every session in the folder, and the time per
/// operator type of each graph printed.
#[test]
fn bench_rollout_profiles_every_session() {
    let dir = scratch("cli-profile").join("profile");
    let r = ssrl()
        .args(["bench", "rollout", "--model"])
        .arg(tiny())
        .args(["--batch", "2", "--group", "2", "--max-new-tokens", "4"])
        .args([
            "--warmup",
            "0",
            "--rounds",
            "1",
            "--cpu-slices",
            "2",
            "--json",
        ])
        .arg(dir.with_file_name("b.json"))
        .arg("--profile")
        .arg(&dir)
        .output()
        .unwrap();
    if succeeded_or_skip(&r).is_none() {
        return;
    }
    let out = String::from_utf8_lossy(&r.stdout);
    // Three graphs, on the engine's sessions and two slices.
    let files = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(files, 9, "{out}");
    assert!(out.contains("(9 files in"), "{out}");
    for g in ["decoder", "vision", "embedding"] {
        assert!(out.contains(&format!("  {g}: ")), "{out}");
    }
    assert!(out.contains("MatMul"), "{out}");
}

#[test]
fn bench_rollout_reports_its_rounds_and_time_split() {
    // The JSON's folder is made.
    let json = scratch("cli-bench").join("results/b.json");
    let r = ssrl()
        .args(["bench", "rollout", "--model"])
        .arg(tiny())
        .args(["--batch", "4", "--group", "2", "--max-new-tokens", "4"])
        .args(["--top-p", "0.9", "--top-k", "40"])
        .args([
            "--warmup",
            "2",
            "--rounds",
            "2",
            "--cpu-slices",
            "2",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let Some(err) = succeeded_or_skip(&r) else {
        return;
    };
    assert!(
        err.contains("2 timed rounds after 2 warm-up rounds"),
        "{err}"
    );
    let b: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(b["warmup_rounds"], 2);
    assert_eq!(b["rounds"], 2);
    // What ran, for the record: the model, its precision, the slices, the sampling.
    assert_eq!(b["model"], tiny().display().to_string());
    assert_eq!(
        (&b["dtype"], &b["cpu_slices"], &b["temperature"]),
        (&"fp32".into(), &2.into(), &1.0.into())
    );
    assert_eq!((b["top_p"].as_f64(), &b["top_k"]), (Some(0.9), &40.into()));
    assert_eq!(b["rss_mb"].as_array().unwrap().len(), 4);
    // Four prompts × two samples × at most four tokens, per timed round.
    let tokens = b["generated_tokens"].as_u64().unwrap();
    assert!((2..=64).contains(&tokens), "{tokens}");
    let (wall, share, busy) = (
        b["wall_s"].as_f64().unwrap(),
        b["ort_share"].as_f64().unwrap(),
        b["ort_share_busy"].as_f64().unwrap(),
    );
    let wait = b["stats"]["slice_wait_s"].as_f64().unwrap();
    assert!(
        share > 0.0 && share <= 1.0 && busy >= share && busy <= 1.0,
        "{b}"
    );
    assert!(wait >= 0.0 && wait < wall, "{b}");
    // The tiny package's decoder reads the rows' own tokens in place unless told not to.
    assert_eq!(b["own_cache_in_place"], true, "{b}");
    succeeded(
        ssrl()
            .args(["bench", "rollout", "--model"])
            .arg(tiny())
            .args(["--batch", "1", "--group", "1", "--max-new-tokens", "2"])
            .args(["--warmup", "0", "--rounds", "1", "--append-cache", "--json"])
            .arg(&json),
    );
    let b: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(b["own_cache_in_place"], false, "{b}");
}

/// `ssrl tasks` on the fixture photos (the tasks named, JSONL) into `out`; returns the data file.
fn photo_tasks(out: &std::path::Path, tasks: &str) -> std::path::PathBuf {
    succeeded(
        ssrl()
            .args(["tasks", "--images"])
            .arg(fixtures().join("photos"))
            .args(["--tasks", tasks, "--quiet", "--format", "jsonl", "--out"])
            .arg(out),
    );
    out.join("data/part-00000.jsonl")
}

/// A rollout stopped by Ctrl-C keeps the prompts it finished (in OUT.partial) and exits 130;
/// run again, it refuses other settings, drops a torn last line, continues, and ends with the
/// responses of an uninterrupted run; a finished OUT is never overwritten; a sample whose image
/// cannot be read is skipped with a warning naming the file.
#[test]
fn rollout_continues_after_ctrl_c_and_skips_unreadable_samples() {
    let dir = scratch("cli-rollout-resume");
    let data = dir.join("tasks");
    let file = photo_tasks(&data, "flip,crop,shuffle");
    let run = |out: &std::path::Path, extra: &[&str]| {
        let mut c = rollout(&file);
        c.args(["--group", "2", "--max-new-tokens", "96", "--batch", "1"])
            .args(extra)
            .arg("--out")
            .arg(out);
        c
    };
    let full = dir.join("full.jsonl");
    if succeeded_or_skip(&run(&full, &[]).output().unwrap()).is_none() {
        return;
    }
    let sorted = |f: &std::path::Path| {
        let mut v: Vec<(u64, u64, serde_json::Value)> = json_lines(f)
            .into_iter()
            .map(|v| {
                let key = (
                    v["prompt_index"].as_u64().unwrap(),
                    v["sample"].as_u64().unwrap(),
                );
                (key.0, key.1, v["tokens"].clone())
            })
            .collect();
        v.sort_by_key(|x| (x.0, x.1));
        v
    };
    let want = sorted(&full);
    assert_eq!(
        want.len(),
        2 * std::fs::read_to_string(&file).unwrap().lines().count()
    );

    // Ctrl-C once the first prompt is written: that batch and the one in hand are kept.
    let out = dir.join("r.jsonl");
    let partial = dir.join("r.jsonl.partial");
    let child = run(&out, &[]).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while std::fs::metadata(&partial).map_or(true, |m| m.len() == 0) {
        assert!(t0.elapsed().as_secs() < 60, "no batch written");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    // The shell's own `kill` (no procps needed).
    let kill = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -INT {}", child.id()))
        .status()
        .unwrap();
    assert!(kill.success());
    let r = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(
        r.status.code(),
        Some(130),
        "finished before Ctrl-C reached it? {err}"
    );
    assert!(err.contains("interrupted: ") && !out.exists(), "{err}");
    let kept = std::fs::read_to_string(&partial).unwrap();
    let kept_lines = kept.lines().count();
    assert!(
        kept_lines >= 2 && kept_lines < want.len(),
        "{kept_lines} lines kept"
    );
    // Ctrl-C twice: out at once, with what was written kept and without ONNX Runtime torn
    // down under a running graph (its exit handlers printed errors from the slices' threads).
    let twice = dir.join("twice.jsonl");
    // Batches long enough (4 prompts × 5 × 512 tokens) for both signals to land in one.
    let child = rollout(&file)
        .args([
            "--group",
            "5",
            "--max-new-tokens",
            "512",
            "--batch",
            "4",
            "--out",
        ])
        .arg(&twice)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let twice_partial = dir.join("twice.jsonl.partial");
    let t0 = std::time::Instant::now();
    while std::fs::metadata(&twice_partial).map_or(true, |m| m.len() == 0) {
        assert!(t0.elapsed().as_secs() < 60, "no batch written");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let id = child.id();
    Command::new("sh")
        .arg("-c")
        // Apart, as two key presses: signals sent together arrive as one.
        .arg(format!(
            "kill -INT {id}; sleep 0.1; kill -INT {id} 2>/dev/null; true"
        ))
        .status()
        .unwrap();
    let r = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(130), "{err}");
    assert!(err.contains("second Ctrl-C: exiting"), "{err}");
    assert!(!err.contains("onnxruntime") && !twice.exists(), "{err}");
    assert!(
        std::fs::read_to_string(&twice_partial)
            .unwrap()
            .lines()
            .count()
            >= 20
    );

    // A write cut short.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&partial)
        .unwrap()
        .write_all(b"{\"prompt_id\": \"flip-")
        .unwrap();

    let r = run(&out, &["--seed", "1"]).output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("seed 0 there, 1 here"),
        "{err}"
    );
    // Another --limit would write more (or fewer) prompts than either run asked for.
    let r = run(&out, &["--limit", "2"]).output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("limit null there, 2 here"),
        "{err}"
    );
    // The data file rewritten with its first two samples swapped: the kept lines no longer
    // name the prompts at their indices.
    let original = std::fs::read_to_string(&file).unwrap();
    let mut swapped: Vec<&str> = original.lines().collect();
    swapped.swap(0, 1);
    std::fs::write(&file, swapped.join("\n")).unwrap();
    let r = run(&out, &[]).output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("the data changed"),
        "{err}"
    );
    std::fs::write(&file, &original).unwrap();
    let r = run(&out, &[]).output().unwrap();
    let err = succeeded_or_skip(&r).unwrap();
    assert!(err.contains("continuing "), "{err}");
    assert_eq!(sorted(&out), want);
    assert!(!partial.exists() && !dir.join("r.jsonl.run.json").exists());
    let r = run(&out, &[]).output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains("exists"), "{err}");
    // A folder as --out is named as such.
    let r = run(&dir, &[]).output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("is a folder; --out takes the JSONL file"),
        "{err}"
    );

    // One sample's image is missing: the others are rolled out.
    let first = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    let mut broken: serde_json::Value = serde_json::from_str(&first).unwrap();
    broken["id"] = "broken-1".into();
    broken["images"] = serde_json::json!(["images/missing.png"]);
    let mixed = data.join("data/mixed.jsonl");
    std::fs::write(&mixed, format!("{broken}\n{first}\n")).unwrap();
    let out = dir.join("mixed.jsonl");
    let r = rollout(&mixed)
        .args(["--group", "2", "--max-new-tokens", "4", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let err = succeeded_or_skip(&r).unwrap();
    assert!(
        err.contains("skipping sample broken-1") && err.contains("missing.png"),
        "{err}"
    );
    let lines = sorted(&out);
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l.0 == 1));
}

#[test]
fn rollout_writes_one_scored_line_per_response() {
    let dir = scratch("cli-rollout");
    let data = dir.join("tasks");
    let file = photo_tasks(&data, "flip");
    let out = dir.join("rollouts.jsonl");
    // Three samples of four tokens for the first `limit` prompts of `data`, into `out`.
    let short = |data: &std::path::Path, limit: &str, out: &std::path::Path| {
        let mut c = rollout(data);
        c.args([
            "--group",
            "3",
            "--max-new-tokens",
            "4",
            "--limit",
            limit,
            "--out",
        ])
        .arg(out);
        c
    };
    let r = short(&file, "2", &out).output().unwrap();
    if succeeded_or_skip(&r).is_none() {
        return;
    }
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 6);
    for l in &lines {
        assert_eq!(
            l["tokens"].as_array().unwrap().len(),
            l["logprobs"].as_array().unwrap().len()
        );
        assert!(l["reward"]["overall"].as_f64().is_some() && l["answer"].as_str().is_some());
        assert!(l["prompt_id"].as_str().unwrap().starts_with("flip-"));
    }
    assert!(!dir.join("rollouts.jsonl.partial").exists());
    // A folder of shards: read in name order, one prompt index across them, each sample the
    // one the single file gives it.
    let rows: Vec<String> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let shards = dir.join("shards");
    std::fs::create_dir_all(shards.join("data")).unwrap();
    std::fs::write(shards.join("data/b.jsonl"), rows[1..].join("\n")).unwrap();
    std::fs::write(shards.join("data/a.jsonl"), format!("{}\n", rows[0])).unwrap();
    let from_shards = dir.join("shards.jsonl");
    let r = short(&shards, "3", &from_shards)
        .arg("--images-root")
        .arg(&data)
        .output()
        .unwrap();
    succeeded_or_skip(&r).unwrap();
    let got = json_lines(&from_shards);
    assert_eq!(got.len(), 9);
    for (k, g) in got.iter().enumerate() {
        let index = g["prompt_index"].as_u64().unwrap() as usize;
        let row: serde_json::Value = serde_json::from_str(&rows[index]).unwrap();
        assert_eq!(g["prompt_id"], row["id"]);
        if let Some(l) = lines.get(k) {
            assert_eq!(
                (&g["prompt_index"], &g["tokens"]),
                (&l["prompt_index"], &l["tokens"])
            );
        }
    }
    assert_eq!(got[8]["prompt_index"], 2);
    // --device cuda: the CPU's tokens on a GPU; elsewhere a clear error, and with
    // --allow-fallback the CPU run, saying so.
    let tokens = |f: &std::path::Path| -> Vec<serde_json::Value> {
        json_lines(f).iter().map(|v| v["tokens"].clone()).collect()
    };
    for fallback in [false, true] {
        let out2 = dir.join(format!("cuda-{fallback}.jsonl"));
        let mut cmd = rollout(&file);
        cmd.args(["--group", "3", "--max-new-tokens", "4", "--limit", "2"])
            .args(["--device", "cuda", "--out"])
            .arg(&out2);
        if fallback {
            cmd.arg("--allow-fallback");
        }
        let r = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        if r.status.success() {
            assert!(err.contains("execution provider: "), "{err}");
            assert_eq!(tokens(&out2), tokens(&out), "{err}");
        } else {
            assert!(!fallback, "the fallback runs on the CPU: {err}");
            assert!(
                err.contains("cuda execution provider unavailable")
                    && err.contains("--allow-fallback"),
                "{err}"
            );
            assert!(!out2.exists());
            gpu_skip(&format!("ssrl rollout --device cuda: {err}"));
        }
    }
}

#[test]
fn sft_config_is_taught_and_checked_where_it_is_read() {
    let dir = std::env::temp_dir().join(format!("ssrl-cli-sft-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // --print-config writes the official cold start's values, and --max-steps overrides its
    // length, as a file --config reads back.
    let out = succeeded(ssrl().args(["sft", "--print-config", "--max-steps", "7"]));
    let text = String::from_utf8(out.stdout).unwrap();
    for key in [
        "learning_rate = 0.00001",
        "lora_rank = 128",
        "max_steps = 7",
        "lr_scheduler_type = \"cosine\"",
        "shared_weights = true",
    ] {
        assert!(text.contains(key), "{key} missing from:\n{text}");
    }
    let cfg = dir.join("cold.toml");
    let with_data = text
        .replace("model = \"\"", "model = \"pkg\"")
        .replace("train_files = []", "train_files = [\"sft.json\"]");
    std::fs::write(&cfg, &with_data).unwrap();
    let printed = succeeded(ssrl().args(["sft", "--print-config", "--config"]).arg(&cfg));
    // (relative paths resolve against the file's folder)
    let printed = String::from_utf8(printed.stdout).unwrap();
    assert!(
        printed.contains(&format!("{}", dir.join("sft.json").display())),
        "{printed}"
    );
    // A value out of range is refused as the file is read, naming that file (not a default
    // name) and the value, before anything is opened or written.
    std::fs::write(
        &cfg,
        with_data.replace("warmup_ratio = 0.1", "warmup_ratio = 1.5"),
    )
    .unwrap();
    let out = ssrl()
        .args(["sft", "--print-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("cold.toml") && err.contains("warmup_ratio 1.5"),
        "{err}"
    );
    assert!(!dir.join("runs").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn train_config_is_taught_checked_and_runs_are_not_overwritten() {
    let dir = std::env::temp_dir().join(format!("ssrl-cli-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // --print-config writes the defaults (the paper's; the learning rate EasyR1's LoRA recipe's)
    // as a file --config reads back.
    let out = ssrl().args(["train", "--print-config"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for key in [
        "rollout_batch_size = 256",
        "n = 5",
        "lr = 0.00001",
        "kl_coef = 0.01",
        "clip_ratio_high = 0.3",
    ] {
        assert!(text.contains(key), "{key} missing from:\n{text}");
    }
    let data = dir.join("tasks.jsonl");
    std::fs::write(&data, "").unwrap();
    let cfg = dir.join("train.toml");
    let with_data = text.replace("train_files = []", "train_files = [\"tasks.jsonl\"]");
    std::fs::write(&cfg, &with_data).unwrap();
    succeeded(
        ssrl()
            .args(["train", "--print-config", "--config"])
            .arg(&cfg),
    );
    // `ssrl train [flags] --config train.toml`: whether it succeeded, and its stderr.
    let train = |flags: &[&str]| {
        let out = ssrl()
            .arg("train")
            .args(flags)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), err)
    };
    // A misspelt key names the file and the key; a value out of range the file, the key and
    // the range.
    let bad: [(&str, &str, &[&str]); 2] = [
        ("rollout_batch_size", "rollout_batch", &["rollout_batch"]),
        ("top_p = 1.0", "top_p = 1.5", &["rollout.top_p", "(0, 1]"]),
    ];
    for (from, to, named) in bad {
        std::fs::write(&cfg, with_data.replace(from, to)).unwrap();
        let (ok, err) = train(&[]);
        assert!(!ok && err.contains("train.toml"), "{err}");
        assert!(named.iter().all(|n| err.contains(n)), "{named:?}: {err}");
    }
    // A run stopped before its first checkpoint saved nothing: it starts over, with or
    // without --resume (here to fail on the model, which is not there, after saying so).
    std::fs::write(&cfg, &with_data).unwrap();
    std::fs::create_dir_all(dir.join("runs/grpo")).unwrap();
    std::fs::write(dir.join("runs/grpo/metrics.jsonl"), "{\"step\":1.0}\n").unwrap();
    for flags in [&[][..], &["--resume"]] {
        let (ok, err) = train(flags);
        assert!(
            !ok && err.contains("starting it over") && !err.contains("--resume"),
            "{err}"
        );
        assert!(err.contains("manifest.json"), "{err}");
    }
    // A run with a checkpoint is continued only with --resume.
    std::fs::create_dir_all(dir.join("runs/grpo/checkpoints/global_step_1")).unwrap();
    let (ok, err) = train(&[]);
    assert!(!ok && err.contains("--resume"), "{err}");
    let (ok, err) = train(&["--resume"]);
    assert!(!ok && !err.contains("starting it over"), "{err}");
    // ssrl plot draws the curves it finds.
    let run = dir.join("runs/grpo");
    let lines: String = (1..=4)
        .map(|s| {
            format!(
                "{{\"step\":{s}.0,\"reward/overall\":{},\"actor/kl_loss\":0.01}}\n",
                s as f64 * 0.1
            )
        })
        .collect();
    std::fs::write(run.join("metrics.jsonl"), lines).unwrap();
    succeeded(ssrl().arg("plot").arg(&run));
    let png = image::open(run.join("curves.png")).unwrap();
    assert!(png.width() >= 800 && png.height() >= 250);
    let out = ssrl()
        .arg("plot")
        .arg(&run)
        .args(["--keys", "nothing/here"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    // The unknown name, and what the run has.
    assert!(
        err.contains("no metric nothing/here")
            && err.contains("it has actor/kl_loss, reward/overall"),
        "{err}"
    );
    // One known, one not: drawn, with a warning naming the unknown one.
    let out = ssrl()
        .arg("plot")
        .arg(&run)
        .args(["--keys", "reward/overall,rewrad"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("left out: rewrad"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn eval_checks_the_data_before_loading_a_model() {
    let dir = scratch("cli-eval");
    let tsv = dir.join("bench.tsv");
    std::fs::write(
        &tsv,
        "index\timage_path\tquestion\tA\tB\tanswer\n1\tcoffee.png\tq\tx\ty\tA\n2\tcoffee.png\tq\n",
    )
    .unwrap();
    // No model is opened: the package path does not even exist.
    let out = ssrl()
        .args([
            "eval",
            "--bench",
            "mcq",
            "--model",
            "no-such-package",
            "--data",
        ])
        .arg(&tsv)
        .arg("--images")
        .arg(fixtures().join("photos"))
        .arg("--out")
        .arg(dir.join("run"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("bench.tsv") && err.contains("line 3") && !err.contains("no-such-package"),
        "{err}"
    );
    assert!(
        !dir.join("run").exists(),
        "nothing is written for a bad file"
    );
    // Held-out tasks from a file that is not a task file: it is named, with how it was read.
    let notes = dir.join("notes.md");
    std::fs::write(&notes, "# Notes\n").unwrap();
    let out = ssrl()
        .args(["eval", "--model", "no-such-package", "--data"])
        .arg(&notes)
        .arg("--out")
        .arg(dir.join("run"))
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("notes.md: line 1") && err.contains("read as JSONL"),
        "{err}"
    );
    assert!(!dir.join("run").exists());
    let help = ssrl().args(["eval", "--help"]).output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for b in [
        "viewspatial",
        "whatsup",
        "vsi",
        "mcq",
        "--frames",
        "--compare",
    ] {
        assert!(help.contains(b), "--help lacks {b}");
    }
}

/// With stderr not a terminal (a log, CI) every skipped file is named, not only counted; the
/// flags that have limits say so.
#[test]
fn tasks_name_every_skipped_file_wherever_stderr_goes() {
    let dir = scratch("cli-tasks-warnings");
    let inp = dir.join("inp");
    std::fs::create_dir_all(&inp).unwrap();
    std::fs::copy(fixtures().join("photos/coffee.png"), inp.join("coffee.png")).unwrap();
    std::fs::write(inp.join("broken.jpg"), b"not a jpeg at all").unwrap();
    std::fs::write(inp.join("empty.png"), b"").unwrap();
    let r = ssrl()
        .args(["tasks", "--tasks", "flip", "--images"])
        .arg(&inp)
        .arg("--out")
        .arg(dir.join("out"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    for f in ["broken.jpg", "empty.png"] {
        assert!(
            err.contains(&format!("warning: skipped {}", inp.join(f).display())),
            "{err}"
        );
    }
    for (flag, value, want) in [
        ("--threads", "20000", "at most 1024"),
        ("--shard-sources", "0", "at least 1"),
    ] {
        let r = ssrl()
            .args(["tasks", "--images"])
            .arg(&inp)
            .arg("--out")
            .arg(dir.join("o2"))
            .args([flag, value])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(
            !r.status.success() && err.contains(flag) && err.contains(want),
            "{err}"
        );
    }
}

/// A write error on standard output (`> /dev/full`) ends the command with a message, not a
/// panic.
#[cfg(target_os = "linux")]
#[test]
fn a_full_standard_output_is_an_error_not_a_panic() {
    let Ok(full) = std::fs::File::create("/dev/full") else {
        eprintln!("SKIP: no /dev/full");
        return;
    };
    let r = ssrl()
        .args(["train", "--print-config"])
        .stdout(full)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot write to standard output") && !err.contains("panicked"),
        "{err}"
    );
}

/// `eval --compare` of runs that measured different things prints no deltas and says why.
#[test]
fn eval_compare_refuses_deltas_between_different_measurements() {
    let dir = scratch("cli-compare");
    let run = |name: &str, bench: &str, data: &str, items: usize| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let s = serde_json::json!({
            "model": "m", "adapter": null, "bench": bench, "data": data, "reasoning": true,
            "overall": {"items": items, "points": 1.0, "accuracy": 1.0 / items as f64},
            "by_category": {}, "by_variant": {}
        });
        std::fs::write(d.join("summary.json"), s.to_string()).unwrap();
        std::fs::write(d.join("run.json"), "{}").unwrap();
        d
    };
    let a = run("a", "mcq", "3DSRBench.tsv", 4);
    let b = run("b", "mcq", "3DSRBench.tsv", 2);
    let c = run("c", "whatsup", "wu.json", 4);
    let compare = |x: &Path, y: &Path| {
        let r = ssrl()
            .args(["eval", "--compare"])
            .arg(x)
            .arg(y)
            .output()
            .unwrap();
        assert!(r.status.success());
        (
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        )
    };
    let (out, err) = compare(&a, &a);
    assert!(out.contains("+0.0") && err.is_empty(), "{out}{err}");
    let (out, err) = compare(&a, &b);
    assert!(
        !out.contains("+25.0") && out.contains("not comparable: items: 4, 2"),
        "{out}"
    );
    assert!(err.contains("not comparable"), "{err}");
    let (out, _) = compare(&a, &c);
    assert!(
        out.contains("benchmark: mcq, whatsup") && out.contains("data: 3DSRBench.tsv, wu.json"),
        "{out}"
    );
}

/// `ssrl bench train` runs the trainer's two graph calls on rows of the asked shape and
/// records times, positions and memory.
#[test]
fn bench_train_reports_both_graphs() {
    let dir = scratch("cli-bench-train");
    let json = dir.join("bt.json");
    let r = ssrl()
        .args(["bench", "train", "--model"])
        .arg(tiny())
        .args([
            "--rows",
            "2",
            "--prompt-len",
            "16",
            "--response-len",
            "24",
            "--rounds",
            "2",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let Some(_) = succeeded_or_skip(&r) else {
        return;
    };
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(
        out.contains("log-probs:") && out.contains("training step:"),
        "{out}"
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["positions"], 2 * (16 + 24 - 1));
    for k in ["logprobs_s", "train_s"] {
        let t = v[k].as_array().unwrap();
        assert!(
            t.len() == 2 && t.iter().all(|x| x.as_f64().unwrap() > 0.0),
            "{v}"
        );
    }
    let open = v["rss_open_mb"].as_f64().unwrap();
    if let (Some(lp), Some(tr)) = (v["logprobs_peak_mb"].as_f64(), v["train_peak_mb"].as_f64()) {
        assert!(open > 0.0 && lp >= open && tr >= lp, "{v}");
    }
    let r = ssrl()
        .args(["bench", "train", "--device", "gpu", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains("--device gpu"), "{err}");
}
