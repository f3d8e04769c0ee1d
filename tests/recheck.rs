//! Re-derives every generated answer from the written pixels and the source depth alone, on
//! the real fixtures (photos, official Spatial-SSRL samples, Middlebury, OpenNI2, TUM).

mod common;

use common::*;
use image::RgbImage;
use spatial_ssrl::data::images;
use spatial_ssrl::tasks::{self, source, SampleRecord};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

struct Run {
    out: PathBuf,
    samples: Vec<SampleRecord>,
    summary: tasks::Summary,
}

fn run() -> &'static Run {
    static RUN: OnceLock<Run> = OnceLock::new();
    RUN.get_or_init(|| {
        let out = scratch("recheck");
        let mut cfg = all_fixtures_config(&out);
        cfg.per_image = 3;
        cfg.seed = 7;
        let summary = tasks::run(&cfg, &tasks::Silent).expect("generation succeeds");
        let samples = read_all(&out);
        Run {
            out,
            samples,
            summary,
        }
    })
}

fn of_task(task: &str) -> Vec<&'static SampleRecord> {
    let v: Vec<_> = run().samples.iter().filter(|s| s.task == task).collect();
    assert!(!v.is_empty(), "no {task} samples");
    v
}

fn source_rgb(s: &SampleRecord) -> RgbImage {
    images::load_rgb(Path::new(&s.source[0])).unwrap()
}

fn grid(s: &SampleRecord) -> (u32, u32, u32, u32) {
    let g = &s.meta["grid"];
    let p = &s.meta["patch_size"];
    let u = |v: &serde_json::Value| v.as_u64().unwrap() as u32;
    (u(&g[0]), u(&g[1]), u(&p[0]), u(&p[1]))
}

/// Inside a patch, away from its border and its label.
fn interior(pw: u32, ph: u32) -> impl Fn(u32, u32) -> bool {
    move |x, y| x >= 4 && y >= 4 && x + 4 < pw && y + 4 < ph && !(x < 80 && y < 72)
}

#[test]
fn every_task_and_shuffle_variant_is_produced() {
    let r = run();
    for t in ["shuffle", "flip", "crop", "depth", "position"] {
        assert!(r.summary.tasks.values().map(|s| s.produced).sum::<u64>() > 0);
        assert!(r.samples.iter().any(|s| s.task == t), "{t}");
    }
    let variants: std::collections::BTreeSet<String> = of_task("shuffle")
        .iter()
        .map(|s| s.meta["variant"].as_str().unwrap().to_string())
        .collect();
    assert!(variants.len() >= 3, "{variants:?}");
    // Images referenced by the samples exist and every problem has one <image> per image.
    for s in &r.samples {
        assert_eq!(
            s.problem.matches("<image>").count(),
            s.images.len(),
            "{}",
            s.id
        );
        for i in &s.images {
            assert!(r.out.join(i.label()).is_file(), "{}", i.label());
        }
    }
}

#[test]
fn shuffle_answers_reassemble_the_source() {
    for s in of_task("shuffle") {
        let src = source_rgb(s);
        let out = load(&run().out, s.images[0].label());
        let (m, n, pw, ph) = grid(s);
        assert_eq!(out.dimensions(), (n * pw, m * ph));
        let k = (m * n) as usize;
        let cut = |img: &RgbImage, i: usize| {
            image::imageops::crop_imm(img, (i as u32 % n) * pw, (i as u32 / n) * ph, pw, ph)
                .to_image()
        };
        let mut derived: Vec<Option<usize>> = vec![None; k];
        let mut masked = None;
        for slot in 0..k {
            let shown = cut(&out, slot);
            let white = shown
                .enumerate_pixels()
                .filter(|(x, y, _)| interior(pw, ph)(*x, *y))
                .all(|(_, _, p)| p.0.iter().all(|c| *c > 240));
            if white {
                masked = Some(slot);
                continue;
            }
            let mut d: Vec<(f64, usize)> = (0..k)
                .map(|p| (mad_where(&shown, &cut(&src, p), interior(pw, ph)), p))
                .collect();
            d.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert!(
                d[0].0 < 6.0,
                "{}: slot {slot} matches no source patch ({:?})",
                s.id,
                d
            );
            assert!(
                d[1].0 > d[0].0 + 3.0,
                "{}: slot {slot} ambiguous {:?}",
                s.id,
                d
            );
            derived[d[0].1] = Some(slot);
        }
        if let Some(ms) = masked {
            assert_eq!(s.meta["masked_slot"].as_u64(), Some(ms as u64));
            let free: Vec<usize> = (0..k).filter(|p| derived[*p].is_none()).collect();
            assert_eq!(free.len(), 1);
            derived[free[0]] = Some(ms);
        }
        let answer: Vec<String> = derived.iter().map(|d| d.unwrap().to_string()).collect();
        assert_eq!(answer.join("-"), s.answer, "{}", s.id);
    }
}

#[test]
fn flip_answers_name_the_flipped_patch() {
    for s in of_task("flip") {
        let src = source_rgb(s);
        let out = load(&run().out, s.images[0].label());
        let (_, _, pw, ph) = grid(s);
        let mut found = Vec::new();
        for i in 0..4u32 {
            let shown =
                image::imageops::crop_imm(&out, (i % 2) * pw, (i / 2) * ph, pw, ph).to_image();
            let orig =
                image::imageops::crop_imm(&src, (i % 2) * pw, (i / 2) * ph, pw, ph).to_image();
            let keep = interior(pw, ph);
            let d = [
                mad_where(&shown, &orig, &keep),
                mad_where(&shown, &image::imageops::flip_vertical(&orig), &keep),
                mad_where(&shown, &image::imageops::flip_horizontal(&orig), &keep),
            ];
            let best = (0..3).min_by(|a, b| d[*a].total_cmp(&d[*b])).unwrap();
            assert!(d[best] < 6.0, "{}: patch {i} {d:?}", s.id);
            if best > 0 {
                found.push(format!("{i}-{}", best - 1));
            }
        }
        assert_eq!(found, vec![s.answer.clone()], "{}", s.id);
    }
}

#[test]
fn crop_answer_is_the_blackened_region() {
    for s in of_task("crop") {
        let src = source_rgb(s);
        let b = &s.meta["box"];
        let (x, y, side) = (
            b[0].as_u64().unwrap() as u32,
            b[1].as_u64().unwrap() as u32,
            b[2].as_u64().unwrap() as u32,
        );
        let truth = image::imageops::crop_imm(&src, x, y, side, side).to_image();
        let black = load(&run().out, s.images[0].label());
        let inner = image::imageops::crop_imm(&black, x + 3, y + 3, side - 6, side - 6).to_image();
        let mean: f64 =
            inner.as_raw().iter().map(|v| f64::from(*v)).sum::<f64>() / inner.as_raw().len() as f64;
        assert!(mean < 6.0, "{}: masked square not black ({mean})", s.id);
        assert!(
            mad_where(&black, &src, |px, py| px + 3 < x
                || py + 3 < y
                || px > x + side + 2
                || py > y + side + 2)
                < 6.0
        );
        let opts: Vec<RgbImage> = s.images[1..]
            .iter()
            .map(|p| load(&run().out, p.label()))
            .collect();
        let d: Vec<f64> = opts
            .iter()
            .map(|o| mad_where(o, &truth, |_, _| true))
            .collect();
        let best = (0..4).min_by(|a, b| d[*a].total_cmp(&d[*b])).unwrap();
        assert_eq!(["A", "B", "C", "D"][best], s.answer, "{}: {d:?}", s.id);
        assert!(d[best] < 4.0, "{}: {d:?}", s.id);
        for i in 0..4 {
            for j in i + 1..4 {
                assert!(
                    mad_where(&opts[i], &opts[j], |_, _| true) >= 2.0,
                    "{}: options {i} and {j} look alike",
                    s.id
                );
            }
        }
        let kinds: Vec<&str> = s.meta["options"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds.iter().filter(|k| **k == "true").count(), 1);
        let distinct: std::collections::BTreeSet<_> = kinds.iter().collect();
        assert_eq!(distinct.len(), 4, "{kinds:?}");
    }
}

fn frames() -> &'static BTreeMap<String, source::RgbdFrame> {
    static F: OnceLock<BTreeMap<String, source::RgbdFrame>> = OnceLock::new();
    F.get_or_init(|| {
        let mut m = BTreeMap::new();
        for dir in ["rgbd", "official"] {
            for f in source::discover_rgbd(&fixtures().join(dir)).unwrap().frames {
                let frame = source::load_rgbd(&f, 1600).unwrap();
                m.insert(f.color.to_string_lossy().to_string(), frame);
            }
        }
        m
    })
}

fn marker_visible(img: &RgbImage, s: &SampleRecord, cx: f64, cy: f64) {
    let r = s.meta["marker"]["radius"].as_f64().unwrap();
    let e = s.meta["marker"]["edge"].as_f64().unwrap();
    let pad = img.get_pixel((cx + 0.72 * r) as u32, cy as u32);
    assert!(
        pad.0.iter().all(|c| *c > 190),
        "{}: marker pad not white {pad:?}",
        s.id
    );
    let edge = img.get_pixel((cx + r - e / 2.0) as u32, cy as u32);
    assert!(
        edge.0.iter().all(|c| *c < 110),
        "{}: marker edge not black {edge:?}",
        s.id
    );
}

/// NumPy's linear percentile, written independently of the crate.
fn np_percentile(sorted: &[f32], q: f64) -> f64 {
    let pos = q / 100.0 * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    f64::from(sorted[lo]) + (f64::from(sorted[hi]) - f64::from(sorted[lo])) * (pos - lo as f64)
}

#[test]
fn depth_answers_follow_the_depth_under_the_markers() {
    for s in of_task("depth") {
        let f = &frames()[&s.source[0]];
        let w = f.width();
        let mut valid: Vec<f32> = f.depth.iter().copied().filter(|v| v.is_finite()).collect();
        valid.sort_by(f32::total_cmp);
        let (lo, hi) = (np_percentile(&valid, 0.5), np_percentile(&valid, 99.5));
        assert!((s.meta["d_min"].as_f64().unwrap() - lo).abs() < 1e-4 * lo.abs().max(1.0));
        assert!((s.meta["d_max"].as_f64().unwrap() - hi).abs() < 1e-4 * hi.abs().max(1.0));
        let norm = |d: f32| (f64::from(d) - lo) / (hi - lo);
        let img = load(&run().out, s.images[0].label());
        let mut by_depth: Vec<(f32, u64)> = Vec::new();
        for reg in s.meta["regions"].as_array().unwrap() {
            let (x, y) = (
                reg["center"][0].as_u64().unwrap() as usize,
                reg["center"][1].as_u64().unwrap() as usize,
            );
            let k = reg["window"].as_u64().unwrap() as usize;
            let thr = if k == 25 { 0.15 } else { 0.2 };
            let (mut a, mut b) = (f64::MAX, f64::MIN);
            for yy in y - k / 2..=y + k / 2 {
                for xx in x - k / 2..=x + k / 2 {
                    let d = f.depth[yy * w + xx];
                    assert!(
                        d.is_finite() && f64::from(d) >= lo && f64::from(d) <= hi,
                        "{}: invalid depth in window",
                        s.id
                    );
                    a = a.min(norm(d));
                    b = b.max(norm(d));
                }
            }
            assert!(b - a < thr, "{}: window range {}", s.id, b - a);
            let c = norm(f.depth[y * w + x]);
            let bin = reg["bin"].as_u64().unwrap();
            let (blo, bhi) = [(0.0, 0.3), (0.35, 0.65), (0.7, 1.0)][bin as usize - 1];
            assert!(
                c >= blo - 1e-6 && c <= bhi + 1e-6,
                "{}: centre {c} outside bin {bin}",
                s.id
            );
            marker_visible(&img, s, x as f64 + 0.5, y as f64 + 0.5);
            by_depth.push((f.depth[y * w + x], reg["label"].as_u64().unwrap()));
        }
        by_depth.sort_by(|a, b| a.0.total_cmp(&b.0));
        let expect: Vec<String> = by_depth.iter().map(|d| d.1.to_string()).collect();
        assert_eq!(expect.join("-"), s.answer, "{}", s.id);
    }
}

#[test]
fn position_answers_follow_equation_7() {
    let mut kinds = std::collections::BTreeSet::new();
    for s in of_task("position") {
        let f = &frames()[&s.source[0]];
        let (w, h) = (f.width(), f.height());
        let (lo, hi) = f
            .depth
            .iter()
            .filter(|v| v.is_finite())
            .fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
        let img = load(&run().out, s.images[0].label());
        let mut blocks = Vec::new();
        for m in s.meta["markers"].as_array().unwrap() {
            let (x, y) = (
                m["center"][0].as_u64().unwrap() as usize,
                m["center"][1].as_u64().unwrap() as usize,
            );
            let (mut mn, mut mx) = (f32::MAX, f32::MIN);
            for yy in y - 7..=y + 7 {
                for xx in x - 7..=x + 7 {
                    let d = f.depth[yy * w + xx];
                    if d.is_finite() {
                        mn = mn.min(d);
                        mx = mx.max(d);
                    }
                }
            }
            assert!(
                (f64::from(mx) - m["depth"].as_f64().unwrap()).abs() < 1e-3,
                "{}: block depth",
                s.id
            );
            let (nmin, nmax) = ((mn - lo) / (hi - lo), (mx - lo) / (hi - lo));
            assert!(nmax - nmin <= 0.15 + 1e-6, "{}: block range", s.id);
            marker_visible(&img, s, x as f64 + 0.5, y as f64 + 0.5);
            blocks.push((
                x as f64,
                y as f64,
                nmin,
                nmax,
                f64::from(mx),
                m["label"].as_u64().unwrap(),
            ));
        }
        let d_min = (w.min(h) / 8) as f64;
        let (a, b) = (blocks[0], blocks[1]);
        let far = s.meta["pair"] == "far";
        kinds.insert(s.meta["pair"].as_str().unwrap().to_string());
        if far {
            assert!(
                f64::from(a.2.max(b.2) - a.3.min(b.3)) >= 0.25 - 1e-6,
                "{}",
                s.id
            );
            assert!(((a.0 - b.0).powi(2) + (a.1 - b.1).powi(2)).sqrt() >= d_min);
        } else {
            assert!(
                f64::from((a.3 - b.2).abs()) <= 0.25 + 1e-6
                    && f64::from((b.3 - a.2).abs()) <= 0.25 + 1e-6
            );
            assert!(
                (a.1 - b.1).abs() < 30.0 && (a.0 - b.0).abs() >= d_min,
                "{}",
                s.id
            );
        }
        let cam_label = s.meta["camera_label"].as_u64().unwrap();
        let cam = blocks.iter().find(|b| b.5 == cam_label).unwrap();
        let tgt = blocks.iter().find(|b| b.5 != cam_label).unwrap();
        let (dx, dd) = (tgt.0 - cam.0, tgt.4 - cam.4);
        if dd == 0.0 {
            continue;
        }
        let facing = s.meta["facing"].as_u64().unwrap() as usize;
        let theta = [90f64, 270.0, 180.0, 0.0][facing].to_radians();
        let (sn, cs) = (theta.sin().round(), theta.cos().round());
        let diff_x = far && (a.0 - b.0).abs() > 150.0;
        let (lat, dep) = if !far {
            (dx, 0.0)
        } else if diff_x {
            (dx, dd)
        } else {
            (0.0, dd)
        };
        let (xt, zt) = (cs * lat + sn * dep, -sn * lat + cs * dep);
        let lx = if xt > 0.0 {
            Some("Right")
        } else if xt < 0.0 {
            Some("Left")
        } else {
            None
        };
        let lz = if zt > 0.0 {
            Some("Front")
        } else if zt < 0.0 {
            Some("Back")
        } else {
            None
        };
        let expect = match (lx, lz) {
            (Some(p), Some(q)) => format!("{p}-{q}"),
            (Some(p), None) | (None, Some(p)) => p.to_string(),
            _ => unreachable!(),
        };
        let slot = ["A", "B", "C", "D"]
            .iter()
            .position(|l| *l == s.answer)
            .unwrap();
        assert_eq!(
            s.meta["options"][slot].as_str().unwrap(),
            expect,
            "{}",
            s.id
        );
        assert!(s
            .problem
            .contains(&format!("camera at position '{cam_label}'")));
        assert!(
            s.problem.contains(&format!(" {}. {expect}", s.answer)),
            "{}",
            s.problem
        );
    }
    assert!(!kinds.is_empty());
}
