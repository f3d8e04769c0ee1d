#![allow(dead_code)]
//! Shared helpers for the integration tests.

use image::RgbImage;
use spatial_ssrl::tasks::{SampleRecord, TasksConfig};
use std::io::Write;
use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A fresh, empty folder under the target's temporary directory.
pub fn scratch(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Every photo and RGB-D fixture, as the demo uses them.
pub fn all_fixtures_config(out: &Path) -> TasksConfig {
    let f = fixtures();
    TasksConfig {
        images: vec![f.join("photos"), f.join("official")],
        rgbd: vec![f.join("rgbd"), f.join("official")],
        out: out.to_path_buf(),
        ..Default::default()
    }
}

pub fn read_all(out: &Path) -> Vec<SampleRecord> {
    let mut v = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(out.join("data"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        v.extend(spatial_ssrl::data::records::read_samples(&f).unwrap());
    }
    v
}

pub fn load(out: &Path, rel: &str) -> RgbImage {
    image::open(out.join(rel)).unwrap().to_rgb8()
}

/// Mean absolute difference over the pixels of `a` and `b` where `keep(x, y)` holds.
pub fn mad_where(a: &RgbImage, b: &RgbImage, keep: impl Fn(u32, u32) -> bool) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let (mut s, mut n) = (0u64, 0u64);
    for (x, y, p) in a.enumerate_pixels() {
        if keep(x, y) {
            let q = b.get_pixel(x, y);
            for c in 0..3 {
                s += u64::from(p[c].abs_diff(q[c]));
            }
            n += 3;
        }
    }
    s as f64 / n.max(1) as f64
}

/// Recursively lists files under `dir` with their bytes, relative paths sorted.
pub fn tree_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().to_string();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A GPU test that cannot run here: a visible SKIP (written to the stderr handle, so it shows
/// even when the harness captures output), or a failure where `SSRL_REQUIRE_GPU` is set — on a
/// GPU server (`make gpu-check`) a broken GPU install must not pass as skipped.
pub fn gpu_skip(why: &str) {
    if std::env::var_os("SSRL_REQUIRE_GPU").is_some_and(|v| v != "0") {
        panic!("SSRL_REQUIRE_GPU is set and the GPU path is unusable: {why}");
    }
    let _ = writeln!(std::io::stderr(), "SKIP: {why}");
}

/// Share of the response's non-space characters equal to the answer letter: a dense reward a
/// random-weight model can climb, and whose samples differ (so advantages are not zero).
pub fn letter_reward() -> spatial_ssrl::train::RewardFn {
    std::sync::Arc::new(|text: &str, s: &SampleRecord| {
        let chars: Vec<char> = text.chars().filter(|c| !c.is_whitespace()).collect();
        let hit = chars
            .iter()
            .filter(|c| c.to_lowercase().to_string() == s.answer)
            .count();
        let v = hit as f64 / chars.len().max(1) as f64;
        spatial_ssrl::reward::Score {
            overall: v,
            format: 0.0,
            accuracy: v,
            predicted: String::new(),
        }
    })
}
