//! Relative 3D position (`data_process/Position.py`, paper §3.1.2 Eq. 7–9, Table 8).
//!
//! Candidate 15×15 blocks of nearly constant normalised depth are ranked by distance to the
//! image centre, and the first pair (in that order) that satisfies the "near" or "far" rule is
//! marked. The official search is a quadratic Python loop with a 15 s timeout; here block
//! statistics come from O(H·W) sliding windows of the raw depth, and the pair is found from the
//! block nearest the centre by rings outwards (the first pair on real frames starts there);
//! only when the first few blocks have no partner are all candidates ordered and searched, with
//! suffix bounds (far) or a row index (near). The same first pair, in milliseconds.

use super::draw::{self, MarkerStyle};
use super::source::RgbdFrame;
use super::templates;
use super::window;
use super::{Generated, SkipReason};
use crate::rng::Rng;
use serde_json::json;
use std::cell::OnceCell;
use std::ops::Range;

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
        off_centre(self.y as usize, h).pow(2) + off_centre(self.x as usize, w).pow(2)
    }
}

/// |2v − n|: how far row or column `v` is from the centre of `n`, in half pixels.
fn off_centre(v: usize, n: usize) -> u64 {
    (2 * v as i64 - n as i64).unsigned_abs()
}

/// Whether a block of window range `[min, max]` (normalised) is a candidate: valid depth
/// spanning at most 0.15. (Without branches: tested on every block.)
#[inline(always)]
fn qualifies(min: f32, max: f32) -> bool {
    min.is_finite() & (max - min <= INNER_THR)
}

avx2_twin! {
/// One row of window statistics: finite values min-max normalised over `[lo, hi]` in place
/// (all 1 when `lo == hi`; the rest left as they are), and how many of its blocks qualify.
fn normalise_row / normalise_row_baseline(min: &mut [f32], max: &mut [f32], lo: f32, hi: f32) -> usize {
    for vs in [&mut *min, &mut *max] {
        if hi == lo {
            for v in vs {
                *v = if v.is_finite() { 1.0 } else { *v };
            }
        } else {
            let span = hi - lo;
            for v in vs {
                let n = (*v - lo) / span;
                *v = if v.is_finite() { n } else { *v };
            }
        }
    }
    min.iter()
        .zip(max.iter())
        .map(|(&l, &u)| usize::from(qualifies(l, u)))
        .sum()
}
}

/// How many of the blocks nearest the centre [`Candidates::find_pair`] pairs by a pass over
/// the window statistics before it orders every candidate.
const NEAREST: usize = 4;

/// A frame's candidate blocks: every 15×15 block centred within ±45 % of the image centre whose
/// valid depth, min-max normalised over the frame, spans at most 0.15. The search walks them in
/// order of distance to the centre, ties by row then column ([`Candidates::sorted`]).
///
/// On real frames the pair found starts at the block nearest the centre, so the search takes
/// that block (or one of the few next to it) and finds its partner in rings outwards over the
/// window statistics, keeping the partner that comes first in the order, rather than ordering a
/// million blocks to walk them; it orders them only when those first blocks have no partner.
pub struct Candidates {
    w: usize,
    h: usize,
    /// Window statistics of the depth (window top-left `(x − 7, y − 7)` for the block centred
    /// at `(x, y)`), normalised where a candidate can be centred (rows `ys`, columns `xs`).
    mm: window::MinMax,
    /// Centre rows and columns inside the margin (empty ranges when none).
    ys: Range<usize>,
    xs: Range<usize>,
    len: usize,
    sorted: OnceCell<Vec<Block>>,
    /// The range of the frame's valid depth.
    pub depth_range: (f32, f32),
}

impl Candidates {
    /// The candidates of a `w × h` depth map (non-finite = invalid); `None` when no pixel is
    /// valid.
    pub fn new(depth: &[f32], w: usize, h: usize) -> Option<Self> {
        let half = BLOCK / 2;
        // Window statistics of the raw depth, then normalised where a candidate can be centred:
        // `(d − lo) / (hi − lo)` never decreases as `d` grows (in floating point too), so the
        // normalised window's min and max are exactly the normalised min and max — no
        // normalised copy of the map. (The range comes from the same sweep.)
        let mut mm = window::min_max(depth, w, h, BLOCK, window::Nans::Skip);
        let (lo, hi) = Some(mm.range).filter(|r| r.0.is_finite())?;
        let (cy, cx) = (h as f64 / 2.0, w as f64 / 2.0);
        let (my, mx) = (CENTER_MARGIN * h as f64, CENTER_MARGIN * w as f64);
        let (ys, xs) = if mm.ow == 0 {
            (0..0, 0..0)
        } else {
            let y_lo = half.max((cy - my).ceil().max(0.0) as usize);
            let y_hi = (h - half - 1).min((cy + my).floor() as usize);
            let x_lo = half.max((cx - mx).ceil().max(0.0) as usize);
            let x_hi = (w - half - 1).min((cx + mx).floor() as usize);
            (y_lo..(y_hi + 1).max(y_lo), x_lo..(x_hi + 1).max(x_lo))
        };
        let mut len = 0;
        for y in ys.clone() {
            let at = (y - half) * mm.ow + xs.start - half;
            let (min, max) = (&mut mm.min[at..][..xs.len()], &mut mm.max[at..][..xs.len()]);
            len += normalise_row(min, max, lo, hi);
        }
        Some(Candidates {
            w,
            h,
            mm,
            ys,
            xs,
            len,
            sorted: Default::default(),
            depth_range: (lo, hi),
        })
    }

    /// How many blocks qualify.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The window minima and maxima of the blocks centred on row `y`, columns `xs`.
    fn row(&self, y: usize) -> (&[f32], &[f32]) {
        let half = BLOCK / 2;
        let at = (y - half) * self.mm.ow + self.xs.start - half;
        let n = self.xs.len();
        (&self.mm.min[at..at + n], &self.mm.max[at..at + n])
    }

    /// Row `y`'s candidate blocks, left to right.
    fn blocks_in_row(&self, y: usize) -> impl Iterator<Item = Block> + '_ {
        self.blocks_in(y, self.xs.clone())
    }

    /// `cols` within the candidates' columns.
    fn clip(&self, cols: Range<usize>) -> Range<usize> {
        let start = cols.start.clamp(self.xs.start, self.xs.end);
        start..cols.end.clamp(start, self.xs.end)
    }

    /// Row `y`'s candidate blocks in columns `cols`, left to right.
    fn blocks_in(&self, y: usize, cols: Range<usize>) -> impl Iterator<Item = Block> + '_ {
        let cols = self.clip(cols);
        let (lo, hi) = self.row(y);
        let at = cols.start - self.xs.start..cols.end - self.xs.start;
        lo[at.clone()]
            .iter()
            .zip(&hi[at])
            .zip(cols)
            .filter(|((&l, &u), _)| qualifies(l, u))
            .map(move |((&min, &max), x)| Block {
                y: y as u32,
                x: x as u32,
                min,
                max,
            })
    }

    /// The columns `x` with |2x − w| ≤ `s` (distance to the centre's column in half pixels).
    fn cols_within(&self, s: u64) -> Range<usize> {
        let (w, s) = (self.w as i64, s.min(1 << 40) as i64);
        let lo = (w - s + 1).div_euclid(2).max(0) as usize;
        lo..(w + s).div_euclid(2) as usize + 1
    }

    /// Squared distance of row `y` to the centre's row, in half pixels.
    fn row_d2(&self, y: usize) -> u64 {
        off_centre(y, self.h).pow(2)
    }

    /// The search order's key: distance to the centre, then row, then column.
    fn key(&self, b: &Block) -> (u64, u32, u32) {
        (b.dist2(self.w, self.h), b.y, b.x)
    }

    /// Every candidate in the search order.
    pub fn sorted(&self) -> &[Block] {
        self.sorted.get_or_init(|| {
            let mut out = Vec::with_capacity(self.len);
            for y in self.ys.clone() {
                out.extend(self.blocks_in_row(y));
            }
            // Raster order is (row, column) order, so a stable sort by distance alone gives it.
            stable_sort_by_key(out, |b| b.dist2(self.w, self.h))
        })
    }

    /// The candidates' rows from the centre outwards (by distance to the centre's row), with
    /// that distance squared: no block of a later row is nearer the centre than the row itself.
    fn rows_outward(&self) -> Vec<(u64, usize)> {
        let mut rows: Vec<(u64, usize)> = self.ys.clone().map(|y| (self.row_d2(y), y)).collect();
        rows.sort_unstable();
        rows
    }

    /// The first `k` candidates of the search order (all of them when there are fewer).
    fn nearest(&self, k: usize) -> Vec<Block> {
        let mut best: Vec<Block> = Vec::with_capacity(k + 1);
        for (d2, y) in self.rows_outward() {
            if best.len() == k && best.last().is_some_and(|b| d2 > b.dist2(self.w, self.h)) {
                break;
            }
            for b in self.blocks_in_row(y) {
                if best.len() == k && best.last().is_some_and(|l| self.key(&b) > self.key(l)) {
                    continue;
                }
                let at = best.partition_point(|o| self.key(o) < self.key(&b));
                best.insert(at, b);
                best.truncate(k);
            }
        }
        best
    }

    /// The first candidate after `a` in the search order that pairs with it under `kind`.
    ///
    /// Found by rings around the centre, each a quarter more in area than the discs inside it:
    /// every candidate of a ring is tested, and the first ring that holds a partner holds the
    /// first one in the order — so about the disc out to the partner is read, not the frame.
    fn first_partner(&self, a: &Block, kind: PairKind, min_dist: f64) -> Option<Block> {
        match kind {
            PairKind::Far => self.first_partner_by(
                a,
                kind,
                |min, max| far_depth(a, min, max),
                |b| far_place(a, b, min_dist),
            ),
            PairKind::Near => self.first_partner_by(
                a,
                kind,
                |min, max| near_depth(a, min, max),
                |b| near_place(a, b, min_dist),
            ),
        }
    }

    /// [`Candidates::first_partner`] for a rule in two parts: on the depth ranges, tested on
    /// every block of a ring without branches, and on the places of the few that pass.
    fn first_partner_by(
        &self,
        a: &Block,
        kind: PairKind,
        depth_ok: impl Fn(f32, f32) -> bool,
        place_ok: impl Fn(&Block) -> bool,
    ) -> Option<Block> {
        let rows = match kind {
            PairKind::Far => self.ys.clone(),
            PairKind::Near => {
                let band = NEAR_ROW_BAND as usize - 1;
                let y = a.y as usize;
                self.ys.start.max(y.saturating_sub(band))..self.ys.end.min(y + band + 1)
            }
        };
        if rows.is_empty() || self.xs.is_empty() {
            return None;
        }
        // The farthest candidate: a corner of the candidates' rectangle.
        let edge = |r: &Range<usize>, n: usize| {
            off_centre(r.start, n).max(off_centre(r.end - 1, n)).pow(2)
        };
        let farthest = edge(&self.ys, self.h) + edge(&self.xs, self.w);
        let after = self.key(a);
        let (mut inner, mut outer) = (None::<u64>, (1u64 << 14).min(farthest));
        loop {
            let mut best: Option<(Block, (u64, u32, u32))> = None;
            for y in rows.clone() {
                let dy2 = self.row_d2(y);
                if dy2 > outer {
                    continue;
                }
                let out = self.cols_within((outer - dy2).isqrt());
                let done = match inner {
                    Some(d2) if d2 >= dy2 => self.cols_within((d2 - dy2).isqrt()),
                    _ => out.start..out.start,
                };
                let (lo, hi) = self.row(y);
                for cols in [out.start..done.start, done.end..out.end] {
                    let cols = self.clip(cols);
                    let at = cols.start - self.xs.start..cols.end - self.xs.start;
                    let (lo, hi) = (&lo[at.clone()], &hi[at]);
                    for (c, (lo, hi)) in lo.chunks(32).zip(hi.chunks(32)).enumerate() {
                        let mut hits = 0u32;
                        for (k, (&min, &max)) in lo.iter().zip(hi).enumerate() {
                            let pass = qualifies(min, max) & depth_ok(min, max);
                            hits |= u32::from(pass) << k;
                        }
                        while hits != 0 {
                            let k = hits.trailing_zeros() as usize;
                            hits &= hits - 1;
                            let i = c * 32 + k;
                            let b = Block {
                                y: y as u32,
                                x: (cols.start + i) as u32,
                                min: lo[k],
                                max: hi[k],
                            };
                            if place_ok(&b) {
                                let key = self.key(&b);
                                if key > after && best.is_none_or(|(_, bk)| key < bk) {
                                    best = Some((b, key));
                                }
                            }
                        }
                    }
                }
            }
            if best.is_some() || outer >= farthest {
                return best.map(|(b, _)| b);
            }
            inner = Some(outer);
            outer = (outer + outer / 4).min(farthest);
        }
    }

    /// The first pair `(a, b)`, `a` before `b` in the search order, satisfying the rule of
    /// `kind` — the pair [`find_pair`] finds in [`Candidates::sorted`].
    pub fn find_pair(&self, kind: PairKind, min_dist: f64) -> Option<(Block, Block)> {
        self.find_pair_from(kind, min_dist, NEAREST).0
    }

    /// [`Candidates::find_pair`] trying the `k` nearest blocks by rings first; also says
    /// whether it came to ordering every candidate.
    fn find_pair_from(
        &self,
        kind: PairKind,
        min_dist: f64,
        k: usize,
    ) -> (Option<(Block, Block)>, bool) {
        // Within the budget by far: the ordered search spends at most `len` comparisons on
        // each of these first blocks, so it could not have given up before them.
        if (self.len as u64).saturating_mul(k as u64) < SEARCH_BUDGET {
            let first = self.nearest(k);
            for a in &first {
                if let Some(b) = self.first_partner(a, kind, min_dist) {
                    return (Some((*a, b)), false);
                }
            }
            if first.len() == self.len {
                return (None, false);
            }
        }
        let blocks = self.sorted();
        let pair = find_pair(blocks, kind, min_dist).map(|(i, j)| (blocks[i], blocks[j]));
        (pair, true)
    }
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
    far_depth(a, b.min, b.max) && far_place(a, b, min_dist)
}

fn near_ok(a: &Block, b: &Block, min_dist: f64) -> bool {
    near_depth(a, b.min, b.max) && near_place(a, b, min_dist)
}

/// The far rule's depth part for a block `b` of range `[min, max]`: the ranges at least 0.25
/// apart. (Without branches: tested on every candidate. `f32::max` and `f32::min` as selects,
/// which equal them on the finite ranges of candidates.)
#[inline(always)]
fn far_depth(a: &Block, min: f32, max: f32) -> bool {
    let hi_min = if a.min > min { a.min } else { min };
    let lo_max = if a.max < max { a.max } else { max };
    hi_min - lo_max >= DEPTH_SEP
}

/// The far rule's place part: centres at least `min_dist` apart.
fn far_place(a: &Block, b: &Block, min_dist: f64) -> bool {
    ((a.y as f64 - b.y as f64).powi(2) + (a.x as f64 - b.x as f64).powi(2)).sqrt() >= min_dist
}

/// The near rule's depth part: each range's top within 0.25 of the other's bottom.
#[inline(always)]
fn near_depth(a: &Block, min: f32, max: f32) -> bool {
    ((a.max - min).abs() <= DEPTH_SEP) & ((max - a.min).abs() <= DEPTH_SEP)
}

/// The near rule's place part: rows less than 30 apart, columns at least `min_dist` apart.
fn near_place(a: &Block, b: &Block, min_dist: f64) -> bool {
    (b.y as i64 - a.y as i64).abs() < NEAR_ROW_BAND && (a.x as f64 - b.x as f64).abs() >= min_dist
}

/// The first pair `(i, j)`, `i < j` in the order of `blocks`, satisfying the rule of `kind`.
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
    generate_shared(frame, &Shared::default(), rng, geometry)
}

/// What every sample of one frame computes alike, kept for the frame's next samples (`ssrl
/// tasks --per-image N`): the candidates and, per rule as first needed, the first pair — a
/// frame's samples differ only in the rule drawn, the labels and the facing.
#[derive(Default)]
pub struct Shared {
    blocks: OnceCell<Option<Candidates>>,
    pairs: [OnceCell<Option<(Block, Block)>>; 2],
}

/// [`generate`] with what `shared` holds of this frame (a `Shared` serves one frame only).
pub fn generate_shared(
    frame: &RgbdFrame,
    shared: &Shared,
    rng: &mut Rng,
    geometry: Geometry,
) -> Result<Generated, SkipReason> {
    let (w, h) = (frame.width(), frame.height());
    if geometry == Geometry::Metric && (frame.intrinsics.is_none() || !frame.metric) {
        return Err(SkipReason::NoIntrinsics);
    }
    let blocks = shared
        .blocks
        .get_or_init(|| Candidates::new(&frame.depth, w, h))
        .as_ref()
        .ok_or(SkipReason::InvalidDepth)?;
    let min_dist = (w.min(h) / 8) as f64;
    let pair = |kind: PairKind| {
        *shared.pairs[kind as usize].get_or_init(|| blocks.find_pair(kind, min_dist))
    };
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
    let (kind, (a, b)) = match pair(first) {
        Some(p) => (first, p),
        None => (second, pair(second).ok_or(SkipReason::NoPair)?),
    };
    let centres = [a, b];
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
            let (lo, hi) = blocks.depth_range;
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
            let (w, h, depth) = official_depth(f);
            let c = Candidates::new(&depth, w, h).unwrap();
            let got = c.sorted();
            let mut want = got.to_vec();
            want.sort_unstable_by_key(|b| (b.dist2(w, h), b.y, b.x));
            assert!(got.len() > 100_000, "{f}: {}", got.len());
            assert!(
                got.iter().zip(&want).all(|(a, b)| (a.y, a.x) == (b.y, b.x)),
                "{f}"
            );
        }
    }

    fn official_depth(f: &str) -> (usize, usize, Vec<f32>) {
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
        crate::tasks::source::load_depth(&src).unwrap()
    }

    /// The candidates as the official script finds them: the map min-max normalised first
    /// (invalid → NaN, a constant map → 1), then each block's range over its valid pixels.
    fn candidates_by_definition(depth: &[f32], w: usize, h: usize) -> Vec<Block> {
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for &d in depth.iter().filter(|d| d.is_finite()) {
            (lo, hi) = (lo.min(d), hi.max(d));
        }
        let norm: Vec<f32> = depth
            .iter()
            .map(|&d| match d.is_finite() {
                false => f32::NAN,
                true if hi == lo => 1.0,
                true => (d - lo) / (hi - lo),
            })
            .collect();
        let half = BLOCK as i64 / 2;
        let (cy, cx) = (h as f64 / 2.0, w as f64 / 2.0);
        let (my, mx) = (CENTER_MARGIN * h as f64, CENTER_MARGIN * w as f64);
        let mut out = vec![];
        for y in half..h as i64 - half {
            for x in half..w as i64 - half {
                if (y as f64 - cy).abs() > my || (x as f64 - cx).abs() > mx {
                    continue;
                }
                let (mut mn, mut mxv) = (f32::INFINITY, f32::NEG_INFINITY);
                for yy in y - half..=y + half {
                    for xx in x - half..=x + half {
                        let v = norm[yy as usize * w + xx as usize];
                        if !v.is_nan() {
                            (mn, mxv) = (mn.min(v), mxv.max(v));
                        }
                    }
                }
                if mn.is_finite() && mxv - mn <= INNER_THR {
                    out.push(Block {
                        y: y as u32,
                        x: x as u32,
                        min: mn,
                        max: mxv,
                    });
                }
            }
        }
        out.sort_by_key(|b| (b.dist2(w, h), b.y, b.x));
        out
    }

    /// A depth map with planes, steps, a ramp, noise, invalid patches and a few ±inf pixels.
    fn scene(r: &mut Rng, w: usize, h: usize) -> Vec<f32> {
        let (a, b) = (r.f64() as f32 * 4.0, r.f64() as f32 * 0.02);
        let step = r.below(w);
        let hole = (r.below(w), r.below(h));
        (0..w * h)
            .map(|i| {
                let (x, y) = (i % w, i / w);
                let mut d = 1.0 + a + b * y as f32;
                if x > step {
                    d += 0.3 + r.f64() as f32;
                }
                d += (r.f64() as f32 - 0.5) * 0.02;
                if x.abs_diff(hole.0) < 9 && y.abs_diff(hole.1) < 6 {
                    d = f32::NAN;
                }
                match r.below(500) {
                    0 => f32::INFINITY,
                    1 => f32::NEG_INFINITY,
                    2 => f32::NAN,
                    _ => d,
                }
            })
            .collect()
    }

    /// The blocks from the window statistics of the raw depth, normalised after, are the
    /// blocks of the normalised map, to the bit; ordered by distance, then row, then column.
    #[test]
    fn candidates_are_the_blocks_of_the_normalised_map() {
        let mut r = Rng::keyed(3, &[]);
        for (w, h) in [(60, 40), (41, 57), (90, 33), (16, 16), (15, 30)] {
            let depth = scene(&mut r, w, h);
            let c = Candidates::new(&depth, w, h).unwrap();
            let want = candidates_by_definition(&depth, w, h);
            let got = c.sorted();
            assert_eq!(c.len(), want.len(), "{w}×{h}");
            for (g, e) in got.iter().zip(&want) {
                assert_eq!(
                    (g.x, g.y, g.min.to_bits(), g.max.to_bits()),
                    (e.x, e.y, e.min.to_bits(), e.max.to_bits()),
                    "{w}×{h}"
                );
            }
        }
        // A constant map normalises to 1; a map with no valid pixel has no candidates.
        let c = Candidates::new(&[2.5; 40 * 30], 40, 30).unwrap();
        assert!(c.sorted().iter().all(|b| (b.min, b.max) == (1.0, 1.0)));
        assert_eq!(
            c.len(),
            candidates_by_definition(&[2.5; 40 * 30], 40, 30).len()
        );
        assert!(Candidates::new(&[f32::NAN; 40 * 30], 40, 30).is_none());
        assert!(Candidates::new(&[1.0; 10 * 10], 10, 10).unwrap().is_empty());
    }

    /// The AVX2 build (where the CPU has it) of the row normalisation gives the baseline
    /// build's bits.
    #[test]
    fn avx2_rows_equal_the_baseline() {
        let mut r = Rng::keyed(4, &[]);
        for n in [0usize, 1, 7, 8, 9, 100, 1001] {
            let mut v = scene(&mut r, n.max(1), 1);
            v.truncate(n);
            let finite = v.iter().filter(|x| x.is_finite());
            let (lo, hi) = finite.fold((0f32, 0f32), |(a, b), &x| (a.min(x), b.max(x)));
            for (lo, hi) in [(lo, hi), (lo, lo)] {
                let (mut a, mut b) = (v.clone(), v.iter().map(|x| x + 0.1).collect::<Vec<_>>());
                let (mut c, mut d) = (a.clone(), b.clone());
                let n1 = normalise_row(&mut a, &mut b, lo, hi);
                let n2 = normalise_row_baseline(&mut c, &mut d, lo, hi);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!((n1, bits(&a), bits(&b)), (n2, bits(&c), bits(&d)), "{n}");
            }
        }
    }

    /// The search from the nearest blocks finds the pair the ordered search finds — on the
    /// official frames, and on synthetic scenes where it must fall back to ordering them all.
    #[test]
    fn pairs_from_the_nearest_blocks_equal_the_ordered_search() {
        for f in ["RGB-D_depth1.h5", "RGB-D_depth2.h5"] {
            let (w, h, depth) = official_depth(f);
            let c = Candidates::new(&depth, w, h).unwrap();
            let md = (w.min(h) / 8) as f64;
            for kind in [PairKind::Far, PairKind::Near] {
                let (got, ordered) = c.find_pair_from(kind, md, NEAREST);
                let want =
                    find_pair(c.sorted(), kind, md).map(|(i, j)| (c.sorted()[i], c.sorted()[j]));
                assert!(!ordered && got.is_some(), "{f} {kind:?}");
                assert_eq!(got.map(at), want.map(at), "{f} {kind:?}");
            }
        }
        let mut r = Rng::keyed(9, &[]);
        let (mut by_pass, mut by_order) = (0, 0);
        for trial in 0..60 {
            let (w, h) = (40 + r.below(50), 30 + r.below(40));
            let depth = scene(&mut r, w, h);
            let c = Candidates::new(&depth, w, h).unwrap();
            let md = [4.0, 10.0, 25.0][trial % 3];
            for kind in [PairKind::Far, PairKind::Near] {
                let sorted = c.sorted();
                let want = find_pair(sorted, kind, md).map(|(i, j)| (sorted[i], sorted[j]));
                for k in [1, 2, 4] {
                    let (got, ordered) = c.find_pair_from(kind, md, k);
                    assert_eq!(got.map(at), want.map(at), "trial {trial} {kind:?} k {k}");
                    if ordered {
                        by_order += 1;
                    } else {
                        by_pass += 1;
                    }
                }
            }
        }
        assert!(by_pass > 20 && by_order > 20, "{by_pass} {by_order}");
    }

    fn at(p: (Block, Block)) -> ((usize, usize), (usize, usize)) {
        (p.0.at(), p.1.at())
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
        // Small variations, and one far pixel in a corner that sets the normalising range.
        let mut depth: Vec<f32> = (0..w * h).map(|i| ((i * 31) % 17) as f32 / 400.0).collect();
        depth[0] = 10.0;
        let c = Candidates::new(&depth, w, h).unwrap();
        let b = c.sorted();
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
