//! Relative 3D position (`data_process/Position.py`, paper §3.1.2 Eq. 7–9, Table 8).
//!
//! Candidate 15×15 blocks of nearly constant normalised depth are ranked by distance to the
//! image centre, and the first pair (in that order) that satisfies the "near" or "far" rule is
//! marked. The official search is a quadratic Python loop with a 15 s timeout; here block
//! statistics come from O(H·W) sliding windows and the pair search prunes with suffix bounds
//! (far) or a row index (near), so it finds the same first pair in milliseconds.

use super::draw::{self, MarkerStyle};
use super::source::RgbdFrame;
use super::templates;
use super::window;
use super::{Generated, SkipReason};
use crate::rng::Rng;
use serde_json::json;

pub const BLOCK: usize = 15;
pub const CENTER_MARGIN: f64 = 0.45;
pub const INNER_THR: f32 = 0.15;
pub const DEPTH_SEP: f32 = 0.25;
pub const DIFF_X_PX: i64 = 150;
pub const NEAR_ROW_BAND: i64 = 30;
/// Orientation weights: facing left of image, right of image, to me, away from me.
pub const FACING_WEIGHTS: [f64; 4] = [30.0, 30.0, 30.0, 10.0];
/// Upper bound on pair comparisons before a frame is reported as having no pair.
const SEARCH_BUDGET: u64 = 200_000_000;

/// How the answer is derived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Geometry {
    /// The official code: signs of Δ(pixel column) and Δ(depth).
    #[default]
    Sign,
    /// The paper's camera-frame formulation (Eq. 7–9) with intrinsics and metric depth.
    Metric,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairKind {
    Near,
    Far,
}

/// A candidate block: its centre and the range of its normalised depth. (16 bytes: a million
/// of them are ordered per frame.)
#[derive(Debug, Clone, Copy)]
pub struct Block {
    pub y: u32,
    pub x: u32,
    pub min: f32,
    pub max: f32,
}

impl Block {
    /// `(x, y)` as indices.
    pub fn at(&self) -> (usize, usize) {
        (self.x as usize, self.y as usize)
    }

    /// Squared distance to the centre of a `w × h` image, in half pixels: (2y − h)² + (2x − w)².
    pub fn dist2(&self, w: usize, h: usize) -> u64 {
        let d = |v: u32, n: usize| (2 * i64::from(v) - n as i64).unsigned_abs();
        d(self.y, h).pow(2) + d(self.x, w).pow(2)
    }
}

/// Min-max normalised depth (valid → [0, 1], invalid NaN; a constant map becomes all 1).
pub fn normalise(depth: &[f32]) -> Option<Vec<f32>> {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &d in depth.iter().filter(|d| d.is_finite()) {
        lo = lo.min(d);
        hi = hi.max(d);
    }
    if !lo.is_finite() {
        return None;
    }
    Some(
        depth
            .iter()
            .map(|&d| {
                if !d.is_finite() {
                    f32::NAN
                } else if hi == lo {
                    1.0
                } else {
                    (d - lo) / (hi - lo)
                }
            })
            .collect(),
    )
}

/// Every 15×15 block centred within ±45 % of the image centre whose valid depth spans at most
/// 0.15, sorted by distance to the centre (ties by row, then column).
pub fn candidate_blocks(norm: &[f32], w: usize, h: usize) -> Vec<Block> {
    let half = BLOCK / 2;
    let mm = window::min_max(norm, w, h, BLOCK, window::Nans::Skip);
    if mm.ow == 0 {
        return vec![];
    }
    let (cy, cx) = (h as f64 / 2.0, w as f64 / 2.0);
    let (my, mx) = (CENTER_MARGIN * h as f64, CENTER_MARGIN * w as f64);
    let y_lo = half.max((cy - my).ceil().max(0.0) as usize);
    let y_hi = (h - half - 1).min((cy + my).floor() as usize);
    let x_lo = half.max((cx - mx).ceil().max(0.0) as usize);
    let x_hi = (w - half - 1).min((cx + mx).floor() as usize);
    // Built in raster order (sequential reads of the window statistics), then sorted by
    // (distance², row, column).
    let span = |lo: usize, hi: usize| (hi + 1).saturating_sub(lo);
    let mut out: Vec<Block> = Vec::with_capacity(span(y_lo, y_hi) * span(x_lo, x_hi));
    for y in y_lo..=y_hi {
        let base = (y - half) * mm.ow;
        for x in x_lo..=x_hi {
            let i = base + (x - half);
            let (lo, hi) = (mm.min[i], mm.max[i]);
            if lo.is_finite() && hi - lo <= INNER_THR {
                out.push(Block {
                    y: y as u32,
                    x: x as u32,
                    min: lo,
                    max: hi,
                });
            }
        }
    }
    // Raster order is (row, column) order, so a stable sort by distance alone gives it.
    stable_sort_by_key(out, |b| b.dist2(w, h))
}

/// `v` stably sorted by `key`: an LSD radix sort of the records themselves on 11-bit digits
/// (two passes for a frame's distances) — where a comparison sort of a million candidate
/// blocks, or a sort of keys followed by a gather from random places, takes most of a frame's
/// search.
fn stable_sort_by_key<T: Copy>(mut v: Vec<T>, key: impl Fn(&T) -> u64) -> Vec<T> {
    const BITS: u32 = 11;
    const MASK: u64 = (1 << BITS) - 1;
    let top = v.iter().map(&key).max().unwrap_or(0);
    let passes = (u64::BITS - top.leading_zeros()).div_ceil(BITS) as usize;
    // Every pass's digit counts in one read.
    let mut counts = vec![[0usize; 1 << BITS]; passes];
    for k in v.iter().map(&key) {
        for (p, c) in counts.iter_mut().enumerate() {
            c[((k >> (BITS as usize * p)) & MASK) as usize] += 1;
        }
    }
    let mut tmp = v.clone();
    for (p, count) in counts.iter_mut().enumerate() {
        let digit = |t: &T| ((key(t) >> (BITS as usize * p)) & MASK) as usize;
        let mut at = 0;
        for c in count.iter_mut() {
            (*c, at) = (at, at + *c);
        }
        for t in &v {
            let d = digit(t);
            tmp[count[d]] = *t;
            count[d] += 1;
        }
        std::mem::swap(&mut v, &mut tmp);
    }
    v
}

fn far_ok(a: &Block, b: &Block, min_dist: f64) -> bool {
    a.min.max(b.min) - a.max.min(b.max) >= DEPTH_SEP
        && ((a.y as f64 - b.y as f64).powi(2) + (a.x as f64 - b.x as f64).powi(2)).sqrt()
            >= min_dist
}

fn near_ok(a: &Block, b: &Block, min_dist: f64) -> bool {
    (a.max - b.min).abs() <= DEPTH_SEP
        && (b.max - a.min).abs() <= DEPTH_SEP
        && (b.y as i64 - a.y as i64).abs() < NEAR_ROW_BAND
        && (a.x as f64 - b.x as f64).abs() >= min_dist
}

/// The first pair `(i, j)`, `i < j` in candidate order, satisfying the rule of `kind`.
pub fn find_pair(blocks: &[Block], kind: PairKind, min_dist: f64) -> Option<(usize, usize)> {
    let n = blocks.len();
    let mut budget = SEARCH_BUDGET;
    match kind {
        PairKind::Far => {
            // suffix bounds: a partner j > i needs min_j ≥ max_i + sep or max_j ≤ min_i − sep.
            let mut suf_max_min = vec![f32::NEG_INFINITY; n + 1];
            let mut suf_min_max = vec![f32::INFINITY; n + 1];
            for i in (0..n).rev() {
                suf_max_min[i] = suf_max_min[i + 1].max(blocks[i].min);
                suf_min_max[i] = suf_min_max[i + 1].min(blocks[i].max);
            }
            for i in 0..n {
                let a = &blocks[i];
                if suf_max_min[i + 1] < a.max + DEPTH_SEP && suf_min_max[i + 1] > a.min - DEPTH_SEP
                {
                    continue;
                }
                for (j, b) in blocks.iter().enumerate().skip(i + 1) {
                    if far_ok(a, b, min_dist) {
                        return Some((i, j));
                    }
                }
                budget = budget.saturating_sub((n - i) as u64);
                if budget == 0 {
                    return None;
                }
            }
            None
        }
        PairKind::Near => {
            // Row index: each row's candidate order positions, ascending, packed row after
            // row (`order[starts[y]..starts[y + 1]]`).
            let h = blocks.iter().map(|b| b.y as usize).max()? + 1;
            let mut starts = vec![0usize; h + 1];
            for b in blocks {
                starts[b.y as usize + 1] += 1;
            }
            for y in 0..h {
                starts[y + 1] += starts[y];
            }
            let mut order = vec![0u32; n];
            let mut fill = starts.clone();
            for (i, b) in blocks.iter().enumerate() {
                order[fill[b.y as usize]] = i as u32;
                fill[b.y as usize] += 1;
            }
            for (i, a) in blocks.iter().enumerate() {
                let y = a.y as usize;
                let y0 = y.saturating_sub(NEAR_ROW_BAND as usize - 1);
                let y1 = (y + NEAR_ROW_BAND as usize - 1).min(h - 1);
                let mut best: Option<usize> = None;
                for row in (y0..=y1).map(|y| &order[starts[y]..starts[y + 1]]) {
                    let start = row.partition_point(|&j| j as usize <= i);
                    for j in row[start..].iter().map(|&j| j as usize) {
                        if best.is_some_and(|b| j >= b) {
                            break;
                        }
                        budget = budget.saturating_sub(1);
                        if near_ok(a, &blocks[j], min_dist) {
                            best = Some(j);
                            break;
                        }
                    }
                }
                if let Some(j) = best {
                    return Some((i, j));
                }
                if budget == 0 {
                    return None;
                }
            }
            None
        }
    }
}

/// The official answer tables (`Position.py`): returns the answer text and the option set.
pub fn sign_answer(
    kind: PairKind,
    facing: usize,
    dx: f64,
    dd: f64,
    x_gap: i64,
) -> (String, [&'static str; 4], bool) {
    const SINGLE: [&str; 4] = ["Left", "Right", "Front", "Back"];
    const DOUBLE: [&str; 4] = ["Left-Front", "Right-Front", "Right-Back", "Left-Back"];
    let (px, pd) = (dx >= 0.0, dd >= 0.0);
    match kind {
        PairKind::Near => {
            let t = match (facing, px) {
                (0, true) => "Back",
                (0, false) => "Front",
                (1, true) => "Front",
                (1, false) => "Back",
                (2, true) => "Left",
                (2, false) => "Right",
                (_, true) => "Right",
                (_, false) => "Left",
            };
            (t.into(), SINGLE, false)
        }
        PairKind::Far if x_gap > DIFF_X_PX => {
            let t = match (facing, px, pd) {
                (0, true, true) => "Right-Back",
                (0, true, false) => "Left-Back",
                (0, false, true) => "Right-Front",
                (0, false, false) => "Left-Front",
                (1, true, true) => "Left-Front",
                (1, true, false) => "Right-Front",
                (1, false, true) => "Left-Back",
                (1, false, false) => "Right-Back",
                (2, true, true) => "Left-Back",
                (2, true, false) => "Left-Front",
                (2, false, true) => "Right-Back",
                (2, false, false) => "Right-Front",
                (_, true, true) => "Right-Front",
                (_, true, false) => "Right-Back",
                (_, false, true) => "Left-Front",
                (_, false, false) => "Left-Back",
            };
            (t.into(), DOUBLE, true)
        }
        PairKind::Far => {
            let t = match (facing, pd) {
                (0, true) => "Right",
                (0, false) => "Left",
                (1, true) => "Left",
                (1, false) => "Right",
                (2, true) => "Back",
                (2, false) => "Front",
                (_, true) => "Front",
                (_, false) => "Back",
            };
            (t.into(), SINGLE, false)
        }
    }
}

/// Orientation angle θ (degrees, counter-clockwise from the camera z axis) per facing index.
pub const FACING_THETA: [f64; 4] = [90.0, 270.0, 180.0, 0.0];

/// Eq. 7–9: rotate the target's offset into the hypothetical camera's frame and threshold.
/// Returns `(x̃, z̃, δx, δz, lateral label, depth label)`.
pub fn metric_labels(
    facing: usize,
    d_x: f64,
    d_z: f64,
    delta_lateral: f64,
    delta_depth: f64,
) -> (
    f64,
    f64,
    f64,
    f64,
    Option<&'static str>,
    Option<&'static str>,
) {
    let t = FACING_THETA[facing].to_radians();
    let (s, c) = t.sin_cos();
    let (s, c) = (s.round_ties_even_if_tiny(), c.round_ties_even_if_tiny());
    let xt = c * d_x + s * d_z;
    let zt = -s * d_x + c * d_z;
    // Table 8: for θ = 0°/180° x̃ comes from the lateral offset; for 90°/270° from depth.
    let (dxs, dzs) = if facing >= 2 {
        (delta_lateral, delta_depth)
    } else {
        (delta_depth, delta_lateral)
    };
    let lx = if xt > dxs {
        Some("Right")
    } else if xt < -dxs {
        Some("Left")
    } else {
        None
    };
    let lz = if zt > dzs {
        Some("Front")
    } else if zt < -dzs {
        Some("Back")
    } else {
        None
    };
    (xt, zt, dxs, dzs, lx, lz)
}

trait Tiny {
    fn round_ties_even_if_tiny(self) -> f64;
}
impl Tiny for f64 {
    fn round_ties_even_if_tiny(self) -> f64 {
        if self.abs() < 1e-12 {
            0.0
        } else {
            self
        }
    }
}

/// Marks two regions 1 and 2, places a hypothetical camera at one facing one of four ways,
/// and asks where the other region is from that camera. Near pairs (similar depth, same row
/// band) and far pairs (depth intervals ≥ 0.25 apart) are drawn with equal probability; when
/// the frame has no pair of the drawn kind the other kind is tried.
pub fn generate(
    frame: &RgbdFrame,
    rng: &mut Rng,
    geometry: Geometry,
) -> Result<Generated, SkipReason> {
    let (w, h) = (frame.width(), frame.height());
    if geometry == Geometry::Metric && (frame.intrinsics.is_none() || !frame.metric) {
        return Err(SkipReason::NoIntrinsics);
    }
    let norm = normalise(&frame.depth).ok_or(SkipReason::InvalidDepth)?;
    let blocks = candidate_blocks(&norm, w, h);
    let min_dist = (w.min(h) / 8) as f64;
    let first = if rng.bool() {
        PairKind::Near
    } else {
        PairKind::Far
    };
    let second = if first == PairKind::Near {
        PairKind::Far
    } else {
        PairKind::Near
    };
    let (kind, (i, j)) = match find_pair(&blocks, first, min_dist) {
        Some(p) => (first, p),
        None => (
            second,
            find_pair(&blocks, second, min_dist).ok_or(SkipReason::NoPair)?,
        ),
    };
    let centres = [blocks[i], blocks[j]];
    // Raw depth: nanmax over the block, as the official script reads it.
    let half = BLOCK / 2;
    let raw: Vec<f64> = centres
        .iter()
        .map(|b| {
            let mut m = f32::NEG_INFINITY;
            let (bx, by) = b.at();
            for y in by - half..=by + half {
                for x in bx - half..=bx + half {
                    let v = frame.depth[y * w + x];
                    if v.is_finite() {
                        m = m.max(v);
                    }
                }
            }
            f64::from(m)
        })
        .collect();
    let mut order = [1u8, 2];
    rng.shuffle(&mut order);
    let facing = rng.weighted(&FACING_WEIGHTS);
    let mut view = [0usize, 1];
    rng.shuffle(&mut view);
    let (cam, tgt) = (view[0], view[1]);
    let dx = centres[tgt].x as f64 - centres[cam].x as f64;
    let dd = raw[tgt] - raw[cam];
    let x_gap = (centres[0].x as i64 - centres[1].x as i64).abs();
    let mut extra = serde_json::Map::new();
    let (answer_text, base): (String, [&str; 4]) = match geometry {
        Geometry::Sign => {
            let (t, base, diff_x) = sign_answer(kind, facing, dx, dd, x_gap);
            extra.insert(
                "far_mode".into(),
                match kind {
                    PairKind::Far if diff_x => json!("diff_x"),
                    PairKind::Far => json!("same_x"),
                    PairKind::Near => json!(null),
                },
            );
            (t, base)
        }
        Geometry::Metric => {
            let k = frame.intrinsics.ok_or(SkipReason::NoIntrinsics)?;
            let xs: Vec<f64> = centres
                .iter()
                .zip(&raw)
                .map(|(b, z)| (b.x as f64 + 0.5 - k.cx) * z / k.fx)
                .collect();
            let d_x = xs[tgt] - xs[cam];
            let d_z = raw[tgt] - raw[cam];
            let (lo, hi) = frame
                .depth
                .iter()
                .filter(|v| v.is_finite())
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v), b.max(v))
                });
            let delta_depth = f64::from(DEPTH_SEP) * f64::from(hi - lo);
            let delta_lateral = DIFF_X_PX as f64 * 0.5 * (raw[0] + raw[1]) / k.fx;
            let (xt, zt, dxs, dzs, lx, lz) =
                metric_labels(facing, d_x, d_z, delta_lateral, delta_depth);
            for (key, v) in [
                ("x_tilde", xt),
                ("z_tilde", zt),
                ("delta_x", dxs),
                ("delta_z", dzs),
                ("d_x_m", d_x),
                ("d_z_m", d_z),
            ] {
                extra.insert(key.into(), json!(v));
            }
            match (lx, lz) {
                (Some(a), Some(b)) => (
                    format!("{a}-{b}"),
                    ["Left-Front", "Right-Front", "Right-Back", "Left-Back"],
                ),
                (Some(a), None) | (None, Some(a)) => {
                    (a.to_string(), ["Left", "Right", "Front", "Back"])
                }
                (None, None) => return Err(SkipReason::NoPair),
            }
        }
    };
    let mut options: [String; 4] = base.map(String::from);
    rng.shuffle(&mut options);
    let slot = options
        .iter()
        .position(|o| *o == answer_text)
        .expect("answer is one of the options");
    let style = MarkerStyle::matplotlib_like(w as u32, h as u32, 12.0, 0.25, 1.2);
    let mut img = frame.rgb.clone();
    for (idx, b) in centres.iter().enumerate() {
        draw::marker(
            &mut img,
            b.x as f32 + 0.5,
            b.y as f32 + 0.5,
            &order[idx].to_string(),
            &style,
        );
    }
    let far = kind == PairKind::Far;
    let problem = templates::position(order[cam], order[tgt], facing, &options, far);
    let markers: Vec<_> = centres
        .iter()
        .enumerate()
        .map(|(idx, b)| {
            json!({"label": order[idx], "center": [b.x, b.y], "depth": raw[idx], "norm_min": b.min, "norm_max": b.max})
        })
        .collect();
    let mut meta = json!({
        "variant": if far { "far" } else { "near" },
        "pair": if far { "far" } else { "near" },
        "geometry": geometry,
        "markers": markers,
        "camera_label": order[cam],
        "target_label": order[tgt],
        "facing": facing,
        "facing_text": templates::FACING[facing],
        "dx": dx,
        "dd": dd,
        "x_gap": x_gap,
        "options": options,
        "answer_text": answer_text,
        "block": BLOCK,
        "min_dist": min_dist,
        "candidates": blocks.len(),
        "marker": style,
        "size": [w, h],
    });
    if let Some(m) = meta.as_object_mut() {
        m.extend(extra);
    }
    Ok(Generated {
        problem,
        answer: ["A", "B", "C", "D"][slot].to_string(),
        images: vec![img],
        meta,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The radix sort orders as the comparison sort it replaced, on random keys and on the
    /// official frames' candidate blocks.
    #[test]
    fn radix_sort_orders_as_the_comparison_sort() {
        let mut r = crate::rng::Rng::keyed(5, &[]);
        let mut v: Vec<u64> = (0..50_000).map(|_| r.below(1 << 40) as u64).collect();
        v.sort_unstable();
        v.dedup();
        let mut shuffled = v.clone();
        r.shuffle(&mut shuffled);
        assert_eq!(stable_sort_by_key(shuffled, |k| *k), v);
        assert!(stable_sort_by_key(Vec::<u64>::new(), |k| *k).is_empty());
        // Stable: equal keys keep their order (the low bits of these values ride along).
        let pairs: Vec<u64> = (0..40_000u64)
            .map(|i| ((r.below(300) as u64) << 20) | i)
            .collect();
        let mut want = pairs.clone();
        want.sort_by_key(|p| p >> 20);
        assert_eq!(stable_sort_by_key(pairs, |p| p >> 20), want);
        for f in ["RGB-D_depth1.h5", "RGB-D_depth2.h5"] {
            let src = crate::tasks::source::RgbdSource {
                layout: crate::tasks::source::Layout::Megadepth,
                color: std::path::PathBuf::new(),
                depth: std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("fixtures/official")
                    .join(f),
                mask: None,
                encoding: crate::tasks::source::DepthEncoding::H5,
                resample_depth: false,
                intrinsics: None,
                metric: false,
            };
            let (w, h, depth) = crate::tasks::source::load_depth(&src).unwrap();
            let norm = normalise(&depth).unwrap();
            let got = candidate_blocks(&norm, w, h);
            let mut want = got.clone();
            want.sort_unstable_by_key(|b| (b.dist2(w, h), b.y, b.x));
            assert!(got.len() > 100_000, "{f}: {}", got.len());
            assert!(
                got.iter().zip(&want).all(|(a, b)| (a.y, a.x) == (b.y, b.x)),
                "{f}"
            );
        }
    }

    /// The official tables are Eq. 7 with camera x right, z forward: check every cell.
    #[test]
    fn sign_tables_agree_with_the_rotation() {
        for facing in 0..4 {
            for (dx, dd) in [(5.0, 3.0), (5.0, -3.0), (-5.0, 3.0), (-5.0, -3.0)] {
                let (_, _, _, _, lx, lz) = metric_labels(facing, dx, dd, 0.0, 0.0);
                let (far, _, diff) = sign_answer(PairKind::Far, facing, dx, dd, 500);
                assert!(diff);
                assert_eq!(
                    far,
                    format!("{}-{}", lx.unwrap(), lz.unwrap()),
                    "facing {facing} dx {dx} dd {dd}"
                );
                // same-x: only depth; near: only lateral.
                let (_, _, _, _, lx, lz) = metric_labels(facing, 0.0, dd, 0.0, 0.0);
                let (same, _, _) = sign_answer(PairKind::Far, facing, 0.0, dd, 10);
                assert_eq!(Some(same.as_str()), lx.or(lz));
                let (_, _, _, _, lx, lz) = metric_labels(facing, dx, 0.0, 0.0, 0.0);
                let (near, _, _) = sign_answer(PairKind::Near, facing, dx, 0.0, 0);
                assert_eq!(Some(near.as_str()), lx.or(lz));
            }
        }
    }

    #[test]
    fn candidates_are_ordered_by_distance_then_raster() {
        let (w, h) = (37usize, 23usize);
        let norm: Vec<f32> = (0..w * h).map(|i| ((i * 31) % 17) as f32 / 400.0).collect();
        let b = candidate_blocks(&norm, w, h);
        assert!(!b.is_empty());
        for p in b.windows(2) {
            let key = |b: &Block| (b.dist2(w, h), b.y, b.x);
            assert!(key(&p[0]) < key(&p[1]));
        }
    }

    /// The pruned search returns exactly the brute-force first pair.
    #[test]
    fn pair_search_equals_brute_force() {
        let mut r = Rng::keyed(11, &[]);
        for trial in 0..30 {
            let n = 60 + trial * 7;
            let blocks: Vec<Block> = (0..n)
                .map(|_| {
                    let lo = r.f64() as f32 * 0.85;
                    Block {
                        y: r.below(120) as u32,
                        x: r.below(200) as u32,
                        min: lo,
                        max: lo + r.f64() as f32 * 0.15,
                    }
                })
                .collect();
            for (kind, ok) in [
                (PairKind::Far, far_ok as fn(&Block, &Block, f64) -> bool),
                (PairKind::Near, near_ok),
            ] {
                let brute = (0..n).find_map(|i| {
                    (i + 1..n)
                        .find(|&j| ok(&blocks[i], &blocks[j], 40.0))
                        .map(|j| (i, j))
                });
                assert_eq!(
                    find_pair(&blocks, kind, 40.0),
                    brute,
                    "trial {trial} {kind:?}"
                );
            }
        }
    }
}
