//! Regional depth ordering (`data_process/Depth.py`, paper §3.1.2 Eq. 5–6).

use super::draw::{self, MarkerStyle};
use super::source::RgbdFrame;
use super::templates;
use super::window::{self, NanCount};
use super::{Generated, SkipReason};
use crate::rng::Rng;
use serde_json::json;

/// Normalised-depth bins: 1 = near, 2 = middle, 3 = far (bounds inclusive).
pub const BINS: [(f32, f32); 3] = [(0.0, 0.3), (0.35, 0.65), (0.7, 1.0)];
/// (window side, maximum range inside the window): the 25×25 test, then the 11×11 fallback.
pub const WINDOWS: [(usize, f32); 2] = [(25, 0.15), (11, 0.2)];
pub const PERCENTILES: (f64, f64) = (0.5, 99.5);

/// NumPy's default (linear) percentile of `v` (unsorted; reordered in place).
pub fn percentile(v: &mut [f32], q: f64) -> f32 {
    let n = v.len();
    let pos = q / 100.0 * (n - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(n - 1);
    let frac = pos - lo as f64;
    let (_, a, rest) = v.select_nth_unstable_by(lo, f32::total_cmp);
    let a = f64::from(*a);
    let b = if hi == lo {
        a
    } else {
        f64::from(rest.iter().copied().fold(f32::INFINITY, f32::min))
    };
    (a + (b - a) * frac) as f32
}

/// `(depth − d_min) / (d_max − d_min)` for valid pixels within `[d_min, d_max]`, NaN elsewhere.
pub fn normalise(depth: &[f32]) -> Option<(Vec<f32>, f32, f32)> {
    let mut valid: Vec<f32> = depth.iter().copied().filter(|v| v.is_finite()).collect();
    if valid.is_empty() {
        return None;
    }
    let d_min = percentile(&mut valid, PERCENTILES.0);
    let d_max = percentile(&mut valid, PERCENTILES.1);
    if d_max <= d_min {
        return None;
    }
    let norm = depth
        .iter()
        .map(|&d| {
            if d.is_finite() && d >= d_min && d <= d_max {
                (d - d_min) / (d_max - d_min)
            } else {
                f32::NAN
            }
        })
        .collect();
    Some((norm, d_min, d_max))
}

struct Region {
    x: usize,
    y: usize,
    window: usize,
    min: f32,
    max: f32,
}

/// Three regions, one per depth bin, each a small window of nearly constant depth, marked
/// 1–3 in random order; the answer lists the marks from nearest to farthest.
///
/// The official script shuffles every pixel of a bin and takes the first whose window passes;
/// we pick uniformly among the passing pixels, which is the same distribution. Two additions
/// keep every sample answerable: a marker must fit inside the frame and must not overlap
/// another marker.
pub fn generate(frame: &RgbdFrame, rng: &mut Rng) -> Result<Generated, SkipReason> {
    let (w, h) = (frame.width(), frame.height());
    let (norm, d_min, d_max) = normalise(&frame.depth).ok_or(SkipReason::InvalidDepth)?;
    let style = MarkerStyle::matplotlib_like(w as u32, h as u32, 15.0, 0.3, 1.5);
    let margin = style.radius.ceil() as usize + 1;
    let nan = NanCount::new(&norm, w, h);
    let mut regions: Vec<Region> = Vec::with_capacity(3);
    let mut stats: [Option<window::MinMax>; 2] = [None, None];
    for (lo, hi) in BINS {
        let mut found = None;
        for (wi, (k, thr)) in WINDOWS.into_iter().enumerate() {
            let half = k / 2;
            let mm = stats[wi].get_or_insert_with(|| window::min_max(&norm, w, h, k));
            let mut pass: Vec<(usize, usize)> = Vec::new();
            let (y_lo, y_hi) = (half.max(margin), h.saturating_sub(half.max(margin)));
            let (x_lo, x_hi) = (half.max(margin), w.saturating_sub(half.max(margin)));
            for y in y_lo..y_hi {
                for x in x_lo..x_hi {
                    let c = norm[y * w + x];
                    if !(c >= lo && c <= hi) {
                        continue;
                    }
                    let (x0, y0) = (x - half, y - half);
                    let i = y0 * mm.ow + x0;
                    if mm.max[i] - mm.min[i] >= thr || nan.count(x0, y0, k) > 0 {
                        continue;
                    }
                    let apart = regions.iter().all(|r| {
                        let d2 = (r.x as f32 - x as f32).powi(2) + (r.y as f32 - y as f32).powi(2);
                        d2 >= (2.0 * style.radius + 2.0).powi(2)
                    });
                    if apart {
                        pass.push((x, y));
                    }
                }
            }
            if !pass.is_empty() {
                let (x, y) = pass[rng.below(pass.len())];
                let i = (y - half) * mm.ow + (x - half);
                found = Some(Region {
                    x,
                    y,
                    window: k,
                    min: mm.min[i],
                    max: mm.max[i],
                });
                break;
            }
        }
        regions.push(found.ok_or(SkipReason::NoRegion)?);
    }
    // lst[i] = the bin (1-based) whose region gets display label i+1.
    let mut lst = [1usize, 2, 3];
    rng.shuffle(&mut lst);
    let mut img = frame.rgb.clone();
    let mut meta_regions = Vec::new();
    for (i, &b) in lst.iter().enumerate() {
        let r = &regions[b - 1];
        draw::marker(
            &mut img,
            r.x as f32 + 0.5,
            r.y as f32 + 0.5,
            &(i + 1).to_string(),
            &style,
        );
        meta_regions.push(json!({
            "label": i + 1,
            "bin": b,
            "center": [r.x, r.y],
            "window": r.window,
            "norm_center": norm[r.y * w + r.x],
            "norm_min": r.min,
            "norm_max": r.max,
            "depth_center": frame.depth[r.y * w + r.x],
        }));
    }
    // argsort(lst) + 1: display labels ordered from the nearest bin to the farthest.
    let mut order = [0usize; 3];
    for (i, &b) in lst.iter().enumerate() {
        order[b - 1] = i + 1;
    }
    let answer = order
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("-");
    Ok(Generated {
        problem: templates::depth_order(),
        answer,
        images: vec![img],
        meta: json!({
            "variant": "depth3",
            "d_min": d_min,
            "d_max": d_max,
            "percentiles": [PERCENTILES.0, PERCENTILES.1],
            "regions": meta_regions,
            "marker": style,
            "size": [w, h],
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_matches_numpy_linear() {
        // np.percentile([1,2,3,4,5,6,7,8,9,10], [0.5, 99.5]) == [1.045, 9.955]
        let mut v: Vec<f32> = (1..=10).map(|x| x as f32).collect();
        assert!((percentile(&mut v, 0.5) - 1.045).abs() < 1e-5);
        assert!((percentile(&mut v, 99.5) - 9.955).abs() < 1e-5);
        let mut one = vec![4.0f32];
        assert_eq!(percentile(&mut one, 50.0), 4.0);
    }
}
