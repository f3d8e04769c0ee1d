//! `ssrl plot RUN`: the training curves of a run's metrics.jsonl as one PNG, a panel per
//! metric (x = step), the raw values thin and a 5-step moving average bold.

use super::Metrics;
use crate::tasks::draw::{draw_text, text_metrics};
use image::{Rgb, RgbImage};

/// The panels drawn by default, those present in the run.
pub const DEFAULT_KEYS: [&str; 13] = [
    "sft/loss",
    "sft/token_accuracy",
    "sft/lr",
    "sft/grad_norm",
    "reward/overall",
    "reward/format",
    "reward/accuracy",
    "val/reward",
    "actor/kl_loss",
    "actor/entropy",
    "actor/grad_norm",
    "response_length/mean",
    "rollout/logprob_mismatch_mean",
];

const PANEL_W: u32 = 420;
const PANEL_H: u32 = 260;
const COLS: u32 = 3;

fn line(img: &mut RgbImage, (x0, y0): (f32, f32), (x1, y1): (f32, f32), rgb: [u8; 3], width: i32) {
    let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
    for i in 0..=steps {
        let t = i as f32 / steps as f32;
        let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
        for dx in 0..width {
            for dy in 0..width {
                let (px, py) = (
                    x.round() as i32 + dx - width / 2,
                    y.round() as i32 + dy - width / 2,
                );
                if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                    img.put_pixel(px as u32, py as u32, Rgb(rgb));
                }
            }
        }
    }
}

fn fmt(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-2 || v.abs() >= 1e4) {
        format!("{v:.2e}")
    } else {
        format!("{v:.3}")
    }
}

/// Draws one panel per key that has at least one value; `None` when none has.
pub fn plot(rows: &[Metrics], keys: &[&str], title: &str) -> Option<RgbImage> {
    let series: Vec<(&str, Vec<(f64, f64)>)> = keys
        .iter()
        .map(|k| {
            let pts = rows
                .iter()
                .filter_map(|m| Some((*m.get("step")?, *m.get(*k)?)))
                .filter(|(_, v)| v.is_finite())
                .collect::<Vec<_>>();
            (*k, pts)
        })
        .filter(|(_, p)| !p.is_empty())
        .collect();
    if series.is_empty() {
        return None;
    }
    let n = series.len() as u32;
    let rows_n = n.div_ceil(COLS);
    let top = 40;
    let mut img =
        RgbImage::from_pixel(PANEL_W * COLS.min(n), top + PANEL_H * rows_n, Rgb([255; 3]));
    draw_text(&mut img, title, 12.0, 10.0, 18.0, [20, 20, 20]);
    for (i, (key, pts)) in series.iter().enumerate() {
        let (ox, oy) = (
            (i as u32 % COLS * PANEL_W) as f32,
            (top + i as u32 / COLS * PANEL_H) as f32,
        );
        let (l, r, t, b) = (
            ox + 64.0,
            ox + PANEL_W as f32 - 16.0,
            oy + 30.0,
            oy + PANEL_H as f32 - 34.0,
        );
        let (xmin, xmax) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
        let (mut ymin, mut ymax) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        if ymax - ymin < 1e-12 {
            ymin -= 0.5;
            ymax += 0.5;
        }
        let xs = |x: f64| l + ((x - xmin) / (xmax - xmin).max(1e-12)) as f32 * (r - l);
        let ys = |y: f64| b - ((y - ymin) / (ymax - ymin)) as f32 * (b - t);
        line(&mut img, (l, b), (r, b), [120; 3], 1);
        line(&mut img, (l, t), (l, b), [120; 3], 1);
        draw_text(&mut img, key, l, oy + 8.0, 14.0, [20, 20, 20]);
        for (v, y) in [(ymax, t), (ymin, b)] {
            let s = fmt(v);
            let (w, _, _) = text_metrics(&s, 11.0);
            draw_text(&mut img, &s, l - w - 6.0, y - 6.0, 11.0, [80; 3]);
        }
        for (v, x) in [(xmin, l), (xmax, r)] {
            let s = format!("{}", v as i64);
            let (w, _, _) = text_metrics(&s, 11.0);
            draw_text(&mut img, &s, x - w / 2.0, b + 6.0, 11.0, [80; 3]);
        }
        for w in pts.windows(2) {
            line(
                &mut img,
                (xs(w[0].0), ys(w[0].1)),
                (xs(w[1].0), ys(w[1].1)),
                [160, 190, 230],
                1,
            );
        }
        if pts.len() == 1 {
            line(
                &mut img,
                (xs(pts[0].0) - 2.0, ys(pts[0].1)),
                (xs(pts[0].0) + 2.0, ys(pts[0].1)),
                [31, 119, 180],
                3,
            );
        }
        let smooth: Vec<(f64, f64)> = (0..pts.len())
            .map(|j| {
                let lo = j.saturating_sub(4);
                let w = &pts[lo..=j];
                (
                    pts[j].0,
                    w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64,
                )
            })
            .collect();
        for w in smooth.windows(2) {
            line(
                &mut img,
                (xs(w[0].0), ys(w[0].1)),
                (xs(w[1].0), ys(w[1].1)),
                [31, 119, 180],
                2,
            );
        }
    }
    Some(img)
}
