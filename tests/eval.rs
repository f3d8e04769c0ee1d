//! `ssrl eval` on the tiny package: per-item results and per-task scores, resume after an
//! interruption without duplicates or changes, and the side-by-side comparison.

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
    EvalConfig {
        data: data.to_path_buf(),
        images_root: None,
        out: out.to_path_buf(),
        batch: 2,
        max_new_tokens: 6,
        temperature: 0.0,
        format_sentence: None,
        limit,
        model: "tiny".into(),
        adapter: None,
    }
}

#[test]
fn eval_scores_resumes_and_compares() {
    let mut engine = match Engine::open(&tiny(), None) {
        Ok(e) => e,
        Err(e) if e.to_string().contains("libonnxruntime") => {
            let _ = writeln!(std::io::stderr(), "SKIP: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let dir = std::env::temp_dir().join(format!("ssrl-eval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dataset(&dir);
    // Straight through.
    let straight = eval::run(&mut engine, &config(&data, &dir.join("a"), None), |_, _| {}).unwrap();
    assert_eq!(straight.overall.items, 5);
    assert_eq!(straight.by_task["flip"].items, 2);
    assert_eq!(straight.by_variant["flip/1x2"].items, 1);
    let items = eval::read_items(&dir.join("a/items.jsonl")).unwrap();
    let e = items.iter().find(|i| i.id == "e").unwrap();
    assert_eq!((e.predicted.as_str(), e.correct), ("None", true));
    assert_eq!(
        straight.overall.correct,
        items.iter().filter(|i| i.correct).count()
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
