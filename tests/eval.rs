//! `ssrl eval`: the benchmark readers build the official prompts from small fixtures made from
//! the repo's photos and refuse bad input naming the place; on the tiny package every format
//! runs end to end, items are scored by their benchmark's rule, runs resume after an
//! interruption without duplicates or changes, and two runs compare side by side.

use spatial_ssrl::data::FORMAT_SENTENCE;
use spatial_ssrl::eval::bench::{self, Bench, ImageSource, ReadOptions, Rule};
use spatial_ssrl::eval::{self, EvalConfig};
use spatial_ssrl::rollout::Engine;
use std::io::Write;
use std::path::{Path, PathBuf};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny")
}

/// Five items on the tiny package's golden images; the last expects "None", which is what the
/// answer extraction gives for a response with no \boxed{} (EasyR1's rule), so it scores correct.
fn dataset(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::create_dir_all(dir.join("images")).unwrap();
    for n in ["image_0_0.png", "image_1_0.png"] {
        std::fs::copy(tiny().join("goldens").join(n), dir.join("images").join(n)).unwrap();
    }
    let p = dir.join("data/heldout.jsonl");
    let mut f = std::fs::File::create(&p).unwrap();
    let items = [
        ("a", "flip", "2x2", "image_0_0.png", "1-0"),
        ("b", "flip", "1x2", "image_1_0.png", "0-1"),
        ("c", "shuffle", "2x2", "image_0_0.png", "0-1-2-3"),
        ("d", "depth", "-", "image_1_0.png", "2-1-3"),
        ("e", "depth", "-", "image_0_0.png", "None"),
    ];
    for (id, task, variant, img, answer) in items {
        let line = serde_json::json!({"id": id, "task": task, "answer": answer, "source": [],
            "images": [format!("images/{img}")], "meta": {"variant": variant},
            "problem": format!("<image>Item {id}: which order is right?")});
        writeln!(f, "{line}").unwrap();
    }
    p
}

fn config(data: &Path, out: &Path, limit: Option<usize>) -> EvalConfig {
    let mut c = EvalConfig::new(
        Bench::Pretext,
        data.to_path_buf(),
        out.to_path_buf(),
        "tiny".into(),
    );
    c.batch = 2;
    c.max_new_tokens = Some(6);
    c.reasoning = false;
    c.limit = limit;
    c
}

fn open_tiny() -> Option<Engine> {
    match Engine::open(&tiny(), None) {
        Ok(e) => Some(e),
        Err(e) if e.to_string().contains("libonnxruntime") => {
            let _ = writeln!(std::io::stderr(), "SKIP: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bench")
}

fn photos() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/photos")
}

fn opts(root: PathBuf, reasoning: bool, frames: usize) -> ReadOptions {
    ReadOptions {
        images_root: root,
        detect_root: false,
        reasoning,
        frames,
        allow_columns: vec![],
    }
}

/// Where a benchmark's fixture lives and its images root.
fn fixture(b: Bench) -> (PathBuf, PathBuf) {
    match b {
        Bench::Viewspatial => (
            fixtures().join("viewspatial/eval/ViewSpatial-Bench.json"),
            photos(),
        ),
        Bench::Whatsup => (
            fixtures().join("whatsup/data/controlled_images_dataset.json"),
            photos(),
        ),
        Bench::Vsi => (
            fixtures().join("vsi/vsi_bench.json"),
            fixtures().join("vsi/videos"),
        ),
        Bench::Mcq => (fixtures().join("mcq.tsv"), photos()),
        Bench::Pretext => unreachable!(),
    }
}

fn read(b: Bench, reasoning: bool) -> Vec<bench::BenchItem> {
    let (data, root) = fixture(b);
    bench::read(b, &data, &opts(root, reasoning, 8)).unwrap()
}

#[test]
fn viewspatial_and_whatsup_prompts_are_the_official_ones() {
    let vs = read(Bench::Viewspatial, true);
    assert_eq!(vs.len(), 4);
    assert_eq!(
        vs[0].prompt,
        format!(
            "<image>Could you tell me the location of the cup in comparison to the spoon?\n\
             A. right\nB. left\nC. above\nD. back\n\
             The final answer should be the option letter from the given choices.\n{FORMAT_SENTENCE}"
        )
    );
    assert_eq!(vs[0].category, "Camera perspective - Relative Direction");
    assert!(vs[3].prompt.starts_with("<image><image>In the first image"));
    // Images are resized to 420×280 before the processor, as the official code asks.
    assert!(matches!(vs[3].images[1], ImageSource::Resized(_, 420, 280)));
    let img = vs[0].images[0].load().unwrap();
    assert_eq!(img.dimensions(), (420, 280));
    let direct = read(Bench::Viewspatial, false);
    assert!(direct[0]
        .prompt
        .ends_with("D. back\nReply only to the corresponding option.\nAnswer:"));

    let wu = read(Bench::Whatsup, true);
    assert_eq!(
        wu[0].prompt,
        format!(
            "<image>Based on the image, choose the correct option from the list below.\
             {FORMAT_SENTENCE}A: A cup on a saucer\nB: A cup under a saucer\n\
             C: A cup to the left of a saucer\nD: A cup to the right of a saucer"
        )
    );
    assert_eq!(wu[0].rule, Rule::Whatsup('A'));
    assert_eq!(wu[0].category, "controlled_images");
    let variants: Vec<&str> = wu.iter().map(|i| i.variant.as_str()).collect();
    assert_eq!(variants, ["on", "on", "front"]);
    let direct = read(Bench::Whatsup, false);
    assert_eq!(
        direct[2].prompt,
        "<image>Based on the image, choose the correct option from the list below. Only \
         respond the corresponding letter (e.g., C).\n\nA: A cat in front of a wall\n\
         B: A cat behind a wall"
    );
}

#[test]
fn vsi_samples_frames_like_numpy_and_keeps_the_prompt_quirks() {
    // np.linspace(0, total-1, n).round(): half to even (2.5 -> 2), ends included.
    assert_eq!(bench::frame_indices(6, 3), [0, 2, 5]);
    assert_eq!(bench::frame_indices(11, 4), [0, 3, 7, 10]);
    assert_eq!(bench::frame_indices(5, 8), [0, 1, 2, 3, 4]);
    let items = read(Bench::Vsi, true);
    assert_eq!(items.len(), 3);
    // 12 frames, 8 wanted: indices 0 2 3 5 6 8 9 11, in natural order (frame_10 after frame_9).
    let names: Vec<String> = items[0]
        .images
        .iter()
        .map(|s| match s {
            ImageSource::File(p) => p.file_name().unwrap().to_string_lossy().into_owned(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        names,
        [
            "frame_1", "frame_3", "frame_4", "frame_6", "frame_7", "frame_9", "frame_10",
            "frame_12"
        ]
        .map(|n| format!("{n}.jpg"))
    );
    assert_eq!(
        items[0].prompt,
        format!(
            "{}Watch the given video and anser the following question.\n\nHow many rockets are \
             in the video?\nThe final answer should be a number(integer or decimal).\n{FORMAT_SENTENCE}",
            "<image>".repeat(8)
        )
    );
    assert_eq!(
        (items[0].id.as_str(), items[0].variant.as_str()),
        ("1", "numeric")
    );
    // Fewer frames than asked: all of them.
    assert_eq!(items[2].images.len(), 6);
    // The Spatial-SSRL layout: mp4_path (its folder holds the frames) and options A-D, null
    // where a question has fewer.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("eval-vsi");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("vsi_ssrl.json");
    std::fs::write(
        &p,
        r#"[{"mp4_path": "arkitscenes/pan_coffee.mp4", "question": "Is the cup on the left?",
             "A": "yes", "B": "no", "C": null, "D": null, "answer": "A",
             "question_type": "object_rel_direction"}]"#,
    )
    .unwrap();
    let s = bench::read(
        Bench::Vsi,
        &p,
        &opts(fixtures().join("vsi/videos"), false, 3),
    )
    .unwrap();
    assert_eq!(s[0].images.len(), 3);
    assert!(s[0]
        .prompt
        .starts_with("<image><image><image>Watch the given video"));
    assert!(s[0].prompt.ends_with(
        "Is the cup on the left?A. yesB. no\nAnswer directly with the option letter from the given choices."
    ));
    assert_eq!((s[0].answer.as_str(), s[0].id.as_str()), ("A", "0"));
    // The Hugging Face Parquet copy (pyarrow, snappy) reads the same.
    let from_parquet = bench::read(
        Bench::Vsi,
        &fixtures().join("vsi/vsi_bench.parquet"),
        &opts(fixtures().join("vsi/videos"), true, 8),
    )
    .unwrap();
    assert_eq!(from_parquet, items);
    let direct = read(Bench::Vsi, false);
    // Options appended with no separator and a second "A. " prefix, as the official code does.
    assert!(direct[1].prompt.ends_with(
        "Which way does the camera move?A. A. leftB. B. rightC. C. upD. D. down\n\
         Answer directly with the option letter from the given choices."
    ));
    assert_eq!(direct[1].answer, "B");
}

#[test]
fn vlmevalkit_tsv_prompts_images_and_references() {
    let items = read(Bench::Mcq, true);
    assert_eq!(items.len(), 4);
    assert_eq!(
        items[1].prompt,
        format!(
            "<image>Hint: The spoon rests on the saucer.\nQuestion: Where is the spoon relative \
             to the cup?\nOptions:\nA. left of the cup\nB. right of the cup\nC. inside the cup\n\
             Please select the correct answer from the options above. \n{FORMAT_SENTENCE}"
        )
    );
    match &items[1].rule {
        Rule::Mcq(c) => assert_eq!(c.len(), 3, "an empty D cell is no option"),
        other => panic!("{other:?}"),
    }
    // Row 4 names row 2's image by its index.
    let a = items[3].images[0].load().unwrap();
    assert_eq!(a, items[1].images[0].load().unwrap());
    assert_eq!(a.dimensions(), (160, 107));
    assert_eq!(
        (items[3].category.as_str(), items[3].variant.as_str()),
        ("viewpoint", "spatial")
    );
    // Every image's size from its header is the decoded image's (base64 cells here; files,
    // resized ViewSpatial images and video frames below).
    let mut all = items;
    for b in [Bench::Viewspatial, Bench::Whatsup, Bench::Vsi] {
        all.extend(read(b, true));
    }
    for src in all.iter().flat_map(|i| &i.images) {
        assert_eq!(
            src.size().unwrap(),
            src.load().unwrap().dimensions(),
            "{src:?}"
        );
    }
    let direct = read(Bench::Mcq, false);
    assert!(direct[0]
        .prompt
        .ends_with("D. horse\nPlease select the correct answer from the options above. \n"));
}

fn expect_err(b: Bench, name: &str, text: &str, wants: &[&str]) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("eval-bad");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    let e = bench::read(b, &p, &opts(photos(), true, 4))
        .err()
        .unwrap_or_else(|| panic!("{name} was accepted"))
        .to_string();
    assert!(e.contains(name), "{e}");
    for w in wants {
        assert!(e.contains(w), "{e} lacks {w:?}");
    }
}

#[test]
fn bad_input_is_refused_naming_file_and_place() {
    let head = "index\timage_path\tquestion\tA\tB\tanswer\n";
    expect_err(
        Bench::Mcq,
        "cols.tsv",
        "index\timage_path\tquestion\tA\tB\tAnswer\n1\tcoffee.png\tq\tx\ty\tA\n",
        &["line 1", "unknown column \"Answer\"", "--allow-columns"],
    );
    expect_err(
        Bench::Mcq,
        "short.tsv",
        &format!("{head}1\tcoffee.png\tq\tx\ty\tA\n2\tcoffee.png\tq\tx\n"),
        &["line 3", "malformed row"],
    );
    expect_err(
        Bench::Mcq,
        "answer.tsv",
        &format!("{head}1\tcoffee.png\tq\tx\ty\tC\n"),
        &["line 2", "\"C\" is not one of the row's option letters"],
    );
    expect_err(
        Bench::Mcq,
        "ref.tsv",
        "index\timage\tquestion\tA\tB\tanswer\n1\t7\tq\tx\ty\tA\n",
        &["line 2", "row index \"7\""],
    );
    expect_err(
        Bench::Viewspatial,
        "vs.json",
        "[\n{\"question_type\": \"t\", \"image_path\": [\"coffee.png\"], \"question\": \"q\",\n \
         \"answer\": \"A. x\", \"choices\": \"A. x\\nB. y\"},\n{\"question_type\": \"t\", \
         \"image_path\": [\"coffee.png\"], \"question\": \"q\", \"answer\": \"A. x\"}\n]",
        &["item 1 (line 4)", "missing `choices`"],
    );
    expect_err(
        Bench::Viewspatial,
        "syntax.json",
        "[\n{\"question\": \"q\",\n}\n]",
        &["line 3", "not a JSON array"],
    );
    expect_err(
        Bench::Vsi,
        "vsi.json",
        "[{\"dataset\": \"scannet\", \"scene_name\": \"nowhere\", \"question_type\": \"t\", \
         \"question\": \"q\", \"ground_truth\": \"2\", \"options\": null}]",
        &["item 0 (line 1)", "nowhere"],
    );
    expect_err(
        Bench::Whatsup,
        "wu.json",
        "[{\"image_path\": \"no-such.png\", \"caption_options\": [\"a\", \"b\"]}]",
        &["item 0: image", "no-such.png not found"],
    );
    // The same unknown column is accepted when named.
    let dir = std::env::temp_dir().join(format!("ssrl-eval-ok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("extra.tsv");
    std::fs::write(
        &p,
        "index\timage_path\tquestion\tA\tB\tanswer\tnotes\n1\tcoffee.png\tq\tx\ty\tB\tm\n",
    )
    .unwrap();
    let mut o = opts(photos(), true, 4);
    o.allow_columns = vec!["notes".into()];
    assert_eq!(bench::read(Bench::Mcq, &p, &o).unwrap().len(), 1);
    // `--compare` on a folder that holds no finished run says which it is.
    let unfinished = dir.join("unfinished");
    std::fs::create_dir_all(&unfinished).unwrap();
    for (run, want) in [
        (dir.join("no-such-run"), "no such folder"),
        (unfinished.clone(), "not an `ssrl eval` run folder"),
    ] {
        let e = eval::read_summary(&run).unwrap_err().to_string();
        assert!(
            e.contains(&run.display().to_string()) && e.contains(want),
            "{e}"
        );
    }
    std::fs::write(unfinished.join("run.json"), "{}").unwrap();
    let e = eval::read_summary(&unfinished).unwrap_err().to_string();
    assert!(e.contains("has not finished"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn benchmarks_run_end_to_end_on_the_tiny_package() {
    let Some(mut engine) = open_tiny() else {
        return;
    };
    let pixels = (
        engine.preprocessor.min_pixels,
        engine.preprocessor.max_pixels,
    );
    let dir = std::env::temp_dir().join(format!("ssrl-eval-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for b in [Bench::Viewspatial, Bench::Whatsup, Bench::Vsi, Bench::Mcq] {
        let (data, root) = fixture(b);
        let out = dir.join(b.name());
        let mut cfg = EvalConfig::new(b, data.clone(), out.clone(), "tiny".into());
        cfg.images_root = Some(root.clone());
        cfg.max_new_tokens = Some(8);
        cfg.batch = 2;
        cfg.frames = 4;
        let s = eval::run(&mut engine, &cfg, |_, _| {}).unwrap();
        let want = bench::read(b, &data, &opts(root, true, 4)).unwrap();
        let items = eval::read_items(&out.join("items.jsonl")).unwrap();
        assert_eq!(items.len(), want.len(), "{b:?}");
        assert_eq!(s.overall.items, want.len());
        let mut points = 0.0;
        for it in &items {
            let w = want.iter().find(|w| w.id == it.id).unwrap();
            // The prompt sent is the reader's, and the score is the benchmark's rule.
            assert_eq!(it.problem, w.prompt);
            let r = w.score(&it.response, true);
            assert_eq!(
                (&it.predicted, it.score, it.strict),
                (&r.predicted, r.score, r.strict)
            );
            assert!(it.tokens > 0 && it.tokens <= 8);
            points += it.score;
        }
        assert!((s.overall.points - points).abs() < 1e-9);
        assert_eq!(
            s.overall.strict_accuracy.is_some(),
            matches!(b, Bench::Whatsup)
        );
        assert_eq!(s.bench, b.name());
        // The engine gets its own image bounds back.
        assert_eq!(
            (
                engine.preprocessor.min_pixels,
                engine.preprocessor.max_pixels
            ),
            pixels
        );
        // A run folder keeps one setting: continuing with the direct prompt is refused.
        cfg.reasoning = false;
        let e = eval::run(&mut engine, &cfg, |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("other settings") && e.contains("run.json"),
            "{e}"
        );
    }
    // The benchmark's own budget (4,096 new tokens) does not fit the tiny model's context of
    // 4,096: refused before anything is written, naming the budget; a budget that leaves some
    // prompt too little room is refused before anything is generated, naming the items and the
    // largest budget that fits them all.
    let (data, root) = fixture(Bench::Whatsup);
    let out = dir.join("no-room");
    let mut cfg = EvalConfig::new(Bench::Whatsup, data, out.clone(), "tiny".into());
    cfg.images_root = Some(root);
    let e = eval::run(&mut engine, &cfg, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("the whatsup budget") && e.contains("context length of 4096"),
        "{e}"
    );
    assert!(!out.exists());
    let number_before = |s: &str, end: &str| -> usize {
        let head = &s[..s.find(end).unwrap_or_else(|| panic!("{end:?} in {s}"))];
        head.rsplit(' ').next().unwrap().parse().unwrap()
    };
    cfg.max_new_tokens = Some(4000);
    let e = eval::run(&mut engine, &cfg, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no room for 4000 new tokens (--max-new-tokens)"),
        "{e}"
    );
    assert!(!out.exists(), "{e}");
    // The largest budget that fits is the context less the longest prompt; one more is refused
    // for that prompt alone.
    let (len, room) = (
        number_before(&e, " tokens: pass"),
        number_before(&e, " or less"),
    );
    assert_eq!(len + room, 4096, "{e}");
    cfg.max_new_tokens = Some(room + 1);
    let e = eval::run(&mut engine, &cfg, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("1 item (") && e.contains(&format!("has {len} tokens")),
        "{e}"
    );
    // An item whose prompt does not match its images is named, with its file, before anything
    // is written.
    let bad_dir = dir.join("mismatch");
    std::fs::create_dir_all(&bad_dir).unwrap();
    let bad = bad_dir.join("items.jsonl");
    let row = serde_json::json!({"id": "two-marks", "problem": "<image><image> Which?",
                                 "answer": "A", "images": ["coffee.png"]});
    std::fs::write(&bad, format!("{row}\n")).unwrap();
    let mut bcfg = EvalConfig::new(
        Bench::Pretext,
        bad.clone(),
        bad_dir.join("run"),
        "tiny".into(),
    );
    bcfg.images_root = Some(photos());
    bcfg.max_new_tokens = Some(8);
    let e = eval::run(&mut engine, &bcfg, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&bad.display().to_string())
            && e.contains("item two-marks: the prompt has 2 image placeholders but 1 images"),
        "{e}"
    );
    assert!(!bad_dir.join("run").exists());
    // A held-out sample without an answer cannot be scored: refused before the model runs.
    let row = serde_json::json!({"problem": "<image> Which?", "images": ["coffee.png"]});
    std::fs::write(&bad, format!("{row}\n")).unwrap();
    let e = eval::run(&mut engine, &bcfg, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("sample 1 (line-1) has no answer"), "{e}");
    assert!(!bad_dir.join("run").exists());
    // A folder whose run stopped before its first item (settings written, nothing scored)
    // takes new settings.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("run.json"), "{\"bench\": \"whatsup\"}").unwrap();
    std::fs::write(out.join("items.jsonl"), "").unwrap();
    cfg.max_new_tokens = Some(8);
    let s = eval::run(&mut engine, &cfg, |_, _| {}).unwrap();
    assert!(s.overall.items > 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn eval_scores_resumes_and_compares() {
    let Some(mut engine) = open_tiny() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("ssrl-eval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dataset(&dir);
    // The output folder of `ssrl tasks`, or its data/, reads as its file does (images found).
    let file_items = eval::load(&config(&data, &dir.join("a"), None)).unwrap();
    assert_eq!(file_items.len(), 5);
    for folder in [dir.clone(), dir.join("data")] {
        let got = eval::load(&config(&folder, &dir.join("a"), None)).unwrap();
        assert_eq!(got, file_items, "{}", folder.display());
    }
    // Straight through.
    let straight = eval::run(&mut engine, &config(&data, &dir.join("a"), None), |_, _| {}).unwrap();
    assert_eq!(straight.overall.items, 5);
    assert_eq!(straight.by_category["flip"].items, 2);
    assert_eq!(straight.by_variant["flip/1x2"].items, 1);
    let items = eval::read_items(&dir.join("a/items.jsonl")).unwrap();
    let e = items.iter().find(|i| i.id == "e").unwrap();
    assert_eq!((e.predicted.as_str(), e.correct), ("None", true));
    assert_eq!(
        straight.overall.points,
        items.iter().filter(|i| i.correct).count() as f64
    );
    assert!(items
        .iter()
        .all(|i| i.correct == (i.predicted == i.answer) && i.tokens > 0));
    // Interrupted after 3 items (and a torn last line), then continued: same items, once each.
    let b = dir.join("b");
    eval::run(&mut engine, &config(&data, &b, Some(3)), |_, _| {}).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(b.join("items.jsonl"))
        .unwrap();
    write!(f, "{{\"id\":\"d\",\"task\":").unwrap();
    drop(f);
    let mut seen = Vec::new();
    let resumed = eval::run(&mut engine, &config(&data, &b, None), |done, total| {
        seen.push((done, total))
    })
    .unwrap();
    assert_eq!(seen.first(), Some(&(3, 5)));
    assert_eq!(resumed, straight);
    let mut again = eval::read_items(&b.join("items.jsonl")).unwrap();
    again.sort_by(|x, y| x.id.cmp(&y.id));
    let mut want = items.clone();
    want.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(again, want);
    // Side by side.
    let rows = eval::compare(&straight, &resumed);
    assert_eq!(rows[0].0, "overall");
    assert!(rows.iter().all(|(_, x, y)| x == y));
    let _ = std::fs::remove_dir_all(&dir);
}

/// 3DSRBench's grouped accuracies, as VLMEvalKit computes them: `ABCDEFGH` and its circular
/// variants share the first 8 characters, `-flip` marks the flipped image.
#[test]
fn grouped_accuracies_follow_vlmevalkit() {
    let item = |qid: &str, ok: bool| eval::Item {
        id: qid.into(),
        category: "height".into(),
        variant: "-".into(),
        problem: String::new(),
        response: String::new(),
        predicted: String::new(),
        answer: "A".into(),
        score: f64::from(u8::from(ok)),
        correct: ok,
        strict: None,
        tokens: 1,
        qid: Some(qid.into()),
        source: None,
    };
    let items = [
        item("AAAAAAAA", true),
        item("AAAAAAAA-flip", true),
        item("AAAAAAAA1", false),
        item("BBBBBBBB", true),
        item("BBBBBBBB-flip", false),
        item("CCCCCCCC", true),
    ];
    let cfg = EvalConfig::new(Bench::Mcq, "x.tsv".into(), "out".into(), "m".into());
    let s = eval::summarize(&items, &cfg);
    assert!((s.overall.accuracy - 4.0 / 6.0).abs() < 1e-12);
    let g = |k: &str| s.grouped[k].accuracy;
    // Flip pairs: AAAAAAAA (both right), AAAAAAAA1 (alone, wrong), BBBBBBBB (flip wrong), CCCCCCCC.
    assert!((g("flip_eval") - 2.0 / 4.0).abs() < 1e-12);
    // Circular groups by 8-character prefix, flips apart: AAAAAAAA fails through AAAAAAAA1.
    assert!(
        (g("circ_eval") - 3.0 / 5.0).abs() < 1e-12,
        "{}",
        g("circ_eval")
    );
    // Both: AAAAAAAA and BBBBBBBB fail, CCCCCCCC stands.
    assert!((g("flip_circ_eval") - 1.0 / 3.0).abs() < 1e-12);
    // Without question ids there is nothing to group.
    let plain: Vec<eval::Item> = items
        .iter()
        .cloned()
        .map(|mut i| {
            i.qid = None;
            i
        })
        .collect();
    assert!(eval::summarize(&plain, &cfg).grouped.is_empty());
}

/// The format rate: the share of responses in the reasoning format, as the reward checks it,
/// overall and per task in summary.json, and as rows of `--compare`.
#[test]
fn format_rate_per_task_and_in_compare() {
    let item = |task: &str, response: &str| eval::Item {
        id: format!("{task}-{response}"),
        category: task.into(),
        variant: "-".into(),
        problem: String::new(),
        response: response.into(),
        predicted: String::new(),
        answer: "1".into(),
        score: 0.0,
        correct: false,
        strict: None,
        tokens: 1,
        qid: None,
        source: None,
    };
    let items = [
        item("flip", "<think>the left patch</think> \\boxed{1}"),
        // Whitespace is normalised before the check, as in the reward.
        item("flip", "  <think>a\n b</think>\n\\boxed{2}"),
        item("flip", "1"),
        item("depth", "<think>unfinished \\boxed{1}"),
    ];
    let cfg = EvalConfig::new(Bench::Pretext, "x.parquet".into(), "out".into(), "m".into());
    let a = eval::summarize(&items, &cfg);
    assert_eq!(a.overall.format_ok, Some(2));
    assert_eq!(a.overall.format_rate, Some(0.5));
    assert_eq!(a.by_category["flip"].format_rate, Some(2.0 / 3.0));
    assert_eq!(a.by_category["depth"].format_rate, Some(0.0));
    let json = serde_json::to_value(&a).unwrap();
    assert_eq!(json["overall"]["format_rate"], 0.5);
    // A run where every response is in the format: rows for the overall rate and each task.
    let fixed: Vec<eval::Item> = items
        .iter()
        .cloned()
        .map(|mut i| {
            i.response = "<think>x</think>\\boxed{1}".into();
            i
        })
        .collect();
    let b = eval::summarize(&fixed, &cfg);
    let rows = eval::compare(&a, &b);
    let row = |k: &str| rows.iter().find(|r| r.0 == k).map(|r| (r.1, r.2));
    assert_eq!(row("format rate"), Some((Some(0.5), Some(1.0))));
    assert_eq!(row("format rate: depth"), Some((Some(0.0), Some(1.0))));
    assert_eq!(row("format rate: flip"), Some((Some(2.0 / 3.0), Some(1.0))));
    // Summaries written before the rate existed still load, with no rate rows.
    let mut old = json.clone();
    old["overall"].as_object_mut().unwrap().remove("format_ok");
    old["overall"]
        .as_object_mut()
        .unwrap()
        .remove("format_rate");
    for (_, c) in old["by_category"].as_object_mut().unwrap() {
        c.as_object_mut().unwrap().remove("format_rate");
    }
    let old: eval::Summary = serde_json::from_value(old).unwrap();
    assert!(eval::compare(&old, &old)
        .iter()
        .all(|r| !r.0.starts_with("format")));
}

/// VLMEvalKit reads its TSVs with pandas, and the prompt shows it: a numeric option column
/// with a gap is float64 (`3` prints `3.0`), `None` / `NA` / `null` cells are missing (an
/// option dropped, no hint), a hint of spaces is kept, an integer column stays integer.
#[test]
fn tsv_cells_read_as_pandas_reads_them() {
    let dir = std::env::temp_dir().join(format!("ssrl-eval-pandas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("pandas.tsv");
    std::fs::write(
        &p,
        "index\timage_path\tquestion\thint\tA\tB\tC\tD\tanswer\n\
         1\tcoffee.png\tHow many?\t  \t3\t4\t1e-5\tNone\tA\n\
         2\tcoffee.png\tHow many?\tNA\t5\t\t2.50\tnull\tC\n\
         3\tcoffee.png\tHow many?\tnull\t6\t7\t+3\tx\tA\n",
    )
    .unwrap();
    let items = bench::read(Bench::Mcq, &p, &opts(photos(), false, 4)).unwrap();
    let body = |i: usize| items[i].prompt.trim_start_matches("<image>").to_string();
    let tail = "Please select the correct answer from the options above. \n";
    // A is integers throughout; B has a gap (float64); C has a non-integer (float64); D is text.
    assert_eq!(
        body(0),
        format!("Hint:   \nQuestion: How many?\nOptions:\nA. 3\nB. 4.0\nC. 1e-05\n{tail}")
    );
    assert_eq!(
        body(1),
        format!("Question: How many?\nOptions:\nA. 5\nC. 2.5\n{tail}")
    );
    assert_eq!(
        body(2),
        format!("Question: How many?\nOptions:\nA. 6\nB. 7.0\nC. 3.0\nD. x\n{tail}")
    );
    match &items[1].rule {
        Rule::Mcq(c) => assert_eq!(c.iter().map(|x| x.0).collect::<String>(), "AC"),
        other => panic!("{other:?}"),
    }
    // An empty response is scored as VLMEvalKit's Excel round trip leaves it: "nan", which
    // contains option text "a" (and so infers it).
    let nan = vec![('A', "a".to_string()), ('B', "b".to_string())];
    assert_eq!(
        spatial_ssrl::eval::score::multiple_choice("", "A", &nan).score,
        1.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// CV-Bench's TSVs carry their own `prompt`, which VLMEvalKit sends as it is; CV-Bench-2D's
/// overall accuracy is the mean of its image sources' accuracies.
#[test]
fn cv_bench_uses_its_prompt_and_averages_2d_over_sources() {
    let dir = std::env::temp_dir().join(format!("ssrl-eval-cvb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("CV-Bench-2D.tsv");
    let mut text = String::from(
        "index\timage_path\tquestion\tA\tB\tanswer\tcategory\tprompt\tsource\tsplit\n",
    );
    for (i, src) in ["ADE20K", "COCO", "COCO", "COCO"].iter().enumerate() {
        text += &format!(
            "{i}\tcoffee.png\tHow many cups?\t1\t2\tA\tCount\tHow many cups are there? Select from the following choices.\\n(A) 1\\n(B) 2\t{src}\t2D\n"
        );
    }
    std::fs::write(&p, &text).unwrap();
    let items = bench::read(Bench::Mcq, &p, &opts(photos(), true, 4)).unwrap();
    assert_eq!(
        items[0].prompt,
        format!(
            "<image>How many cups are there? Select from the following choices.\\n(A) 1\\n(B) 2{FORMAT_SENTENCE}"
        )
    );
    assert_eq!(items[1].source.as_deref(), Some("COCO"));
    // ADE20K right (1 of 1), COCO one of three: the mean of 1 and 1/3, not 2 of 4.
    let scored: Vec<eval::Item> = items
        .iter()
        .enumerate()
        .map(|(i, it)| {
            let response = if i < 2 { "A" } else { "B" };
            let r = it.score(response, true);
            eval::Item {
                id: it.id.clone(),
                category: it.category.clone(),
                variant: it.variant.clone(),
                problem: it.prompt.clone(),
                response: response.into(),
                predicted: r.predicted,
                answer: it.answer.clone(),
                correct: r.score >= 1.0,
                score: r.score,
                strict: r.strict,
                tokens: 1,
                qid: None,
                source: it.source.clone(),
            }
        })
        .collect();
    let cfg = EvalConfig::new(Bench::Mcq, p.clone(), "out".into(), "m".into());
    let s = eval::summarize(&scored, &cfg);
    assert!(
        (s.overall.accuracy - (1.0 + 1.0 / 3.0) / 2.0).abs() < 1e-12,
        "{:?}",
        s.overall
    );
    assert_eq!(s.by_source.len(), 2);
    // A 3D file (or a mix) is scored over all items.
    std::fs::write(&p, text.replace("\t2D\n", "\t3D\n")).unwrap();
    let items = bench::read(Bench::Mcq, &p, &opts(photos(), true, 4)).unwrap();
    assert!(items.iter().all(|i| i.source.is_none()));
    let _ = std::fs::remove_dir_all(&dir);
}
