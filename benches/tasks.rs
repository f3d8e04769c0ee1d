//! Task-generation throughput: samples/s per task on one thread at COCO size (640×480),
//! JPEG in and JPEG out, decode + generate + encode + write included; then the full mix on
//! all cores, and the relative-position pair search on the full-size official MegaDepth frames
//! (the official script allows it 15 s).
//!
//! `cargo bench --bench tasks` (or `make bench`); results also go to target/bench-tasks.json.

use spatial_ssrl::data::images;
use spatial_ssrl::rng::Rng;
use spatial_ssrl::tasks::{self, position, source, TaskKind, TasksConfig};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// 640×480 JPEG photos and RGB-D frames (JPEG colour + 16-bit PNG millimetres) from the fixtures.
fn make_inputs(root: &Path) -> (PathBuf, PathBuf) {
    let _ = std::fs::remove_dir_all(root);
    let (img, rgbd) = (root.join("images"), root.join("rgbd"));
    std::fs::create_dir_all(&img).unwrap();
    std::fs::create_dir_all(&rgbd).unwrap();
    let resize = |i: &image::RgbImage| {
        image::imageops::resize(i, 640, 480, image::imageops::FilterType::Triangle)
    };
    let save_jpeg = |i: &image::RgbImage, p: &Path| {
        let mut buf = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 95)
            .encode_image(i)
            .unwrap();
        std::fs::write(p, buf).unwrap();
    };
    let mut n = 0;
    for dir in ["photos", "official"] {
        for p in source::discover_images(&fixtures().join(dir)).unwrap() {
            let i = images::load_rgb(&p).unwrap();
            // Several copies with different crops so there are enough sources to time.
            for k in 0..4u32 {
                let (w, h) = i.dimensions();
                let c = image::imageops::crop_imm(
                    &i,
                    k * w / 16,
                    k * h / 16,
                    w - k * w / 8,
                    h - k * h / 8,
                )
                .to_image();
                save_jpeg(&resize(&c), &img.join(format!("p{n:03}.jpg")));
                n += 1;
            }
        }
    }
    let mut m = 0;
    for dir in ["rgbd", "official"] {
        for f in source::discover_rgbd(&fixtures().join(dir)).unwrap().frames {
            if !f.metric {
                continue;
            }
            let fr = source::load_rgbd(&f, 0).unwrap();
            let d = source::resample_nearest(&fr.depth, fr.width(), fr.height(), 640, 480);
            for k in 0..4 {
                save_jpeg(&resize(&fr.rgb), &rgbd.join(format!("f{m:03}.jpg")));
                let mm: Vec<u16> = d
                    .iter()
                    .map(|v| {
                        if v.is_finite() {
                            (v * 1000.0 + k as f32).round().min(65535.0) as u16
                        } else {
                            0
                        }
                    })
                    .collect();
                image::ImageBuffer::<image::Luma<u16>, _>::from_raw(640, 480, mm)
                    .unwrap()
                    .save(rgbd.join(format!("f{m:03}_depth.png")))
                    .unwrap();
                m += 1;
            }
        }
    }
    (img, rgbd)
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-tasks");
    let (img, rgbd) = make_inputs(&root.join("in"));
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "task generation, 640×480 JPEG in/out ({} cores here)\n",
        cores
    );
    println!("{:<10} {:>10} {:>14}", "task", "samples", "samples/s/core");
    let mut rows = Vec::new();
    let per_image = 3;
    for task in TaskKind::ALL {
        let out = root.join(format!("out-{}", task.name()));
        let _ = std::fs::remove_dir_all(&out);
        let cfg = TasksConfig {
            images: vec![img.clone()],
            rgbd: vec![rgbd.clone()],
            out,
            tasks: vec![task],
            per_image,
            threads: 1,
            ..Default::default()
        };
        let t = Instant::now();
        let s = tasks::run(&cfg, &tasks::Silent).unwrap();
        let rate = s.produced as f64 / t.elapsed().as_secs_f64();
        println!("{:<10} {:>10} {:>14.1}", task.name(), s.produced, rate);
        rows.push(serde_json::json!({"task": task.name(), "samples": s.produced, "samples_per_s_per_core": rate}));
    }
    // The paper's mix: per source, depth-free and depth tasks in their dataset proportions.
    let out = root.join("out-mix");
    let _ = std::fs::remove_dir_all(&out);
    let cfg = TasksConfig {
        images: vec![img],
        rgbd: vec![rgbd],
        out,
        per_image,
        threads: 0,
        ..Default::default()
    };
    let t = Instant::now();
    let s = tasks::run(&cfg, &tasks::Silent).unwrap();
    let mix = s.produced as f64 / t.elapsed().as_secs_f64();
    println!(
        "{:<10} {:>10} {:>14.1}   ({:.1} samples/s on {cores} threads)",
        "all five",
        s.produced,
        mix / cores as f64,
        mix
    );
    // Weighted by the 81k dataset's task sizes.
    let sizes = [16028.0, 4005.0, 20200.0, 20620.0, 20200.0];
    let secs_per: f64 = rows
        .iter()
        .zip(sizes)
        .map(|(r, n)| n / r["samples_per_s_per_core"].as_f64().unwrap())
        .sum();
    let weighted = 81053.0 / secs_per;
    println!("\n81k-sample mix (Table 5 weights): {weighted:.1} samples/s per core → {:.1} min for Spatial-SSRL-81k on {cores} cores", 81053.0 / weighted / cores as f64 / 60.0);

    println!("\nrelative-position pair search on full-size MegaDepth frames (official: O(n²), 15 s timeout)");
    let mut search = Vec::new();
    for f in source::discover_rgbd(&fixtures().join("official"))
        .unwrap()
        .frames
        .iter()
        .filter(|f| !f.metric)
    {
        let fr = source::load_rgbd(f, 0).unwrap();
        let t = Instant::now();
        let reps = 5;
        let mut cands = 0;
        for k in 0..reps {
            let norm = position::normalise(&fr.depth).unwrap();
            let blocks = position::candidate_blocks(&norm, fr.width(), fr.height());
            cands = blocks.len();
            let kind = if k % 2 == 0 {
                position::PairKind::Far
            } else {
                position::PairKind::Near
            };
            let _ = position::find_pair(&blocks, kind, (fr.width().min(fr.height()) / 8) as f64);
        }
        let ms = t.elapsed().as_secs_f64() * 1000.0 / reps as f64;
        let name = f.color.file_name().unwrap().to_string_lossy().to_string();
        println!(
            "  {name}: {}×{}, {cands} candidate blocks, {ms:.1} ms per frame (blocks + search)",
            fr.width(),
            fr.height()
        );
        search.push(serde_json::json!({"frame": name, "candidates": cands, "ms": ms}));
        let mut r = Rng::keyed(0, &[]);
        let _ = position::generate(&fr, &mut r, position::Geometry::Sign);
    }
    let json = serde_json::json!({"per_task": rows, "mix_samples_per_s": mix, "cores": cores, "weighted_81k_per_core": weighted, "pair_search": search});
    std::fs::write(
        root.parent().unwrap().join("bench-tasks.json"),
        serde_json::to_vec_pretty(&json).unwrap(),
    )
    .unwrap();
}
