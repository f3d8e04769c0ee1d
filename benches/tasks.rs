//! Task-generation throughput: samples/s per task on one thread at COCO size (640×480),
//! JPEG in and JPEG out, decode + generate + encode + write included; then the full mix on
//! all cores, and the relative-position pair search on the full-size official MegaDepth frames
//! (the official script allows it 15 s).
//!
//! Then the official scripts' own inputs, one task and one input at a time on one thread (N
//! copies, one decode per sample, as `benches/official/run.sh` times the official scripts): ssrl's
//! samples/s against the official figures in `benches/official-tasks.json`, and against the codec
//! floor (decoding the input plus encoding that sample's images, alone).
//!
//! `cargo bench --bench tasks` (or `make bench`, which turns on `fast-jpeg` where nasm is
//! installed); results also go to target/bench-tasks.json. `SSRL_BENCH_OFFICIAL_ONLY=1` runs the
//! second part alone; `SSRL_BENCH_DIR=/dev/shm/bench` writes the samples there instead of
//! target/bench-tasks.

use spatial_ssrl::data::images;
use spatial_ssrl::rng::Rng;
use spatial_ssrl::tasks::{
    self, crop, depth_order, flip, position, shuffle, source, TaskKind, TasksConfig,
};
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One task on N copies of one input: ssrl's ms per sample, the codec floor's, the official one's.
fn official_inputs(root: &Path) -> Vec<serde_json::Value> {
    let official: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/official-tasks.json"),
        )
        .unwrap(),
    )
    .unwrap();
    println!(
        "\nthe official inputs, one thread, one decode per sample (JPEG encoder: {})",
        tasks::JPEG_CODEC
    );
    println!(
        "{:<9} {:<24} {:>9} {:>9} {:>7} {:>9} {:>7}",
        "task", "input", "ssrl ms", "official", "ratio", "codec ms", "×floor"
    );
    let rgb = [
        "official/RGB_img.png",
        "photos/astronaut.png",
        "photos/camera.png",
        "photos/chelsea.png",
        "photos/coffee.png",
        "photos/rocket.jpg",
    ];
    let mut plan: Vec<(TaskKind, &str)> = Vec::new();
    for t in [TaskKind::Shuffle, TaskKind::Flip, TaskKind::Crop] {
        plan.extend(rgb.iter().map(|f| (t, *f)));
    }
    plan.push((TaskKind::Depth, "official/RGB-D_img3.png"));
    plan.push((TaskKind::Position, "official/RGB-D_img1.jpg"));
    plan.push((TaskKind::Position, "official/RGB-D_img2.jpg"));
    let mut rows = Vec::new();
    for (task, file) in plan {
        let src = fixtures().join(file);
        let dir = root.join("copies");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Enough copies for about two seconds of the official script's work, and at least 20
        // (a few samples of the slow scripts' inputs measure little but the first one's start).
        let official_ms = official["median_ms"][task.name()][file].as_f64().unwrap();
        let n = ((2000.0 / official_ms * 2.0) as usize).clamp(20, 400);
        let stem = |k: usize| dir.join(format!("f{k:04}"));
        let frame = |n: &str| fixtures().join("official").join(n);
        for k in 0..n {
            match task {
                // DIODE's layout and MegaDepth's side-by-side one.
                TaskKind::Depth => {
                    std::fs::copy(&src, stem(k).with_extension("png")).unwrap();
                    std::fs::copy(
                        frame("RGB-D_depth3.npy"),
                        dir.join(format!("f{k:04}_depth.npy")),
                    )
                    .unwrap();
                    std::fs::copy(
                        frame("RGB-D_depth_mask3.npy"),
                        dir.join(format!("f{k:04}_depth_mask.npy")),
                    )
                    .unwrap();
                }
                TaskKind::Position => {
                    let h5 = file
                        .replace("official/RGB-D_img", "RGB-D_depth")
                        .replace(".jpg", ".h5");
                    std::fs::copy(&src, stem(k).with_extension("jpg")).unwrap();
                    std::fs::copy(frame(&h5), stem(k).with_extension("h5")).unwrap();
                }
                _ => {
                    let ext = src.extension().unwrap().to_string_lossy().to_string();
                    std::fs::copy(&src, stem(k).with_extension(ext)).unwrap();
                }
            }
        }
        let out = root.join("out-official");
        let _ = std::fs::remove_dir_all(&out);
        let (images, rgbd) = match task.needs_depth() {
            true => (vec![], vec![dir.clone()]),
            false => (vec![dir.clone()], vec![]),
        };
        let cfg = TasksConfig {
            images,
            rgbd,
            out,
            tasks: vec![task],
            per_image: 1,
            threads: 1,
            ..Default::default()
        };
        let t = Instant::now();
        let s = tasks::run(&cfg, &tasks::Silent).unwrap();
        let ssrl_ms = t.elapsed().as_secs_f64() * 1000.0 / s.produced.max(1) as f64;
        // The floor: the input's decode, and the encode of one sample's images.
        let (mut dec, mut enc) = (Vec::new(), Vec::new());
        for k in 0..5u64 {
            let mut r = Rng::keyed(k, &[]);
            let t = Instant::now();
            let g = if task.needs_depth() {
                let found = source::discover_rgbd(&dir).unwrap().frames;
                let f = source::load_rgbd(&found[0], 0).unwrap();
                dec.push(t.elapsed().as_secs_f64());
                match task {
                    TaskKind::Depth => depth_order::generate(&f, &mut r),
                    _ => position::generate(&f, &mut r, position::Geometry::Sign),
                }
            } else {
                let img = images::load_rgb(&src).unwrap();
                dec.push(t.elapsed().as_secs_f64());
                match task {
                    TaskKind::Shuffle => {
                        let v = shuffle::Variant::sample(&mut r);
                        shuffle::generate(&img, &mut r, v)
                    }
                    TaskKind::Flip => flip::generate(&img, &mut r),
                    _ => crop::generate(&img, &mut r),
                }
            };
            let g = g.expect("the official inputs give samples");
            let t = Instant::now();
            for i in &g.images {
                std::hint::black_box(tasks::encode_jpeg(i, 95));
            }
            enc.push(t.elapsed().as_secs_f64());
        }
        let floor_ms = (median(dec) + median(enc)) * 1000.0;
        let name = file.rsplit('/').next().unwrap();
        println!(
            "{:<9} {:<24} {:>9.2} {:>9.2} {:>6.2}× {:>9.2} {:>6.2}×",
            task.name(),
            name,
            ssrl_ms,
            official_ms,
            official_ms / ssrl_ms,
            floor_ms,
            ssrl_ms / floor_ms
        );
        rows.push(
            serde_json::json!({"task": task.name(), "input": file, "samples": s.produced,
            "ssrl_ms": ssrl_ms, "official_ms": official_ms, "speedup": official_ms / ssrl_ms,
            "codec_floor_ms": floor_ms, "over_floor": ssrl_ms / floor_ms}),
        );
    }
    rows
}

fn main() {
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    // Where the inputs are copied and the samples written (`SSRL_BENCH_DIR`: e.g. a tmpfs, to
    // take the file system's cost of creating files out of the figures).
    let root = std::env::var_os("SSRL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target.join("bench-tasks"));
    if std::env::var_os("SSRL_BENCH_OFFICIAL_ONLY").is_some() {
        let rows = official_inputs(&root);
        let json = serde_json::json!({"official_inputs": rows, "jpeg_codec": tasks::JPEG_CODEC});
        std::fs::write(
            target.join("bench-tasks-official.json"),
            serde_json::to_vec_pretty(&json).unwrap(),
        )
        .unwrap();
        return;
    }
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
            let blocks = position::Candidates::new(&fr.depth, fr.width(), fr.height()).unwrap();
            cands = blocks.len();
            let kind = if k % 2 == 0 {
                position::PairKind::Far
            } else {
                position::PairKind::Near
            };
            let _ = blocks.find_pair(kind, (fr.width().min(fr.height()) / 8) as f64);
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
    let official = official_inputs(&root);
    let json = serde_json::json!({"per_task": rows, "mix_samples_per_s": mix, "cores": cores, "weighted_81k_per_core": weighted, "pair_search": search, "official_inputs": official, "jpeg_codec": tasks::JPEG_CODEC});
    std::fs::write(
        target.join("bench-tasks.json"),
        serde_json::to_vec_pretty(&json).unwrap(),
    )
    .unwrap();
}
