//! Regional depth ordering (`data_process/Depth.py`, paper §3.1.2 Eq. 5–6).

use super::draw::{self, MarkerStyle};
use super::source::RgbdFrame;
use super::templates;
use super::window::{self, Nans};
use super::{Generated, SkipReason};
use crate::rng::Rng;
use serde_json::json;
use std::cell::OnceCell;

/// Normalised-depth bins: 1 = near, 2 = middle, 3 = far (bounds inclusive).
pub const BINS: [(f32, f32); 3] = [(0.0, 0.3), (0.35, 0.65), (0.7, 1.0)];
/// (window side, maximum range inside the window): the 25×25 test, then the 11×11 fallback.
pub const WINDOWS: [(usize, f32); 2] = [(25, 0.15), (11, 0.2)];
pub const PERCENTILES: (f64, f64) = (0.5, 99.5);

/// `(depth − d_min) / (d_max − d_min)` for valid pixels within `[d_min, d_max]`, NaN elsewhere.
pub fn normalise(depth: &[f32]) -> Option<(Vec<f32>, f32, f32)> {
    let [d_min, d_max] = finite_percentiles(depth, [PERCENTILES.0, PERCENTILES.1])?;
    if d_max <= d_min {
        return None;
    }
    Some((normalised(depth, d_min, d_max), d_min, d_max))
}

avx2_twin! {
/// `(d − d_min) / (d_max − d_min)` for `d` within `[d_min, d_max]`, NaN elsewhere.
fn normalised / normalised_baseline(depth: &[f32], d_min: f32, d_max: f32) -> Vec<f32> {
    depth
        .iter()
        .map(|&d| {
            let n = (d - d_min) / (d_max - d_min);
            if d.is_finite() && d >= d_min && d <= d_max {
                n
            } else {
                f32::NAN
            }
        })
        .collect()
}
}

/// NumPy's default (linear) percentiles of the finite values of `v` at each of `qs`, found by a
/// radix select: a histogram of the values' top 16 bits (in total order) finds the buckets
/// that hold the order statistics, and only those buckets' values are selected among — two
/// passes over `v` and no copy of it. `None` when no value is finite.
pub fn finite_percentiles<const Q: usize>(v: &[f32], qs: [f64; Q]) -> Option<[f32; Q]> {
    // f32 → u32 keeping the total order (`f32::total_cmp`).
    let key = |x: f32| {
        let b = x.to_bits();
        if b >> 31 == 1 {
            !b
        } else {
            b | 0x8000_0000
        }
    };
    let value = |k: u32| f32::from_bits(if k >> 31 == 1 { k & 0x7FFF_FFFF } else { !k });
    // Four interleaved histograms, summed after: neighbouring pixels mostly share a bucket,
    // and one counter incremented back to back waits on its own last store.
    // Non-finite values add 0 instead of branching (invalid pixels come in irregular
    // patterns); their keys' buckets (≤ 0x007F, ≥ 0xFF80) hold no finite value.
    let mut hists = vec![0u32; 4 << 16];
    let mut quads = v.chunks_exact(4);
    for q in &mut quads {
        for (j, &x) in q.iter().enumerate() {
            hists[(j << 16) | (key(x) >> 16) as usize] += u32::from(x.is_finite());
        }
    }
    for &x in quads.remainder() {
        hists[(key(x) >> 16) as usize] += u32::from(x.is_finite());
    }
    let (hist, rest) = hists.split_at_mut(1 << 16);
    for part in rest.chunks_exact(1 << 16) {
        for (a, b) in hist.iter_mut().zip(part) {
            *a += b;
        }
    }
    let n: usize = hist.iter().map(|&c| c as usize).sum();
    if n == 0 {
        return None;
    }
    // The ranks wanted: each quantile's floor position and the one after (NumPy's linear rule).
    let spots: Vec<(usize, usize, f64)> = qs
        .iter()
        .map(|&q| {
            let pos = q / 100.0 * (n - 1) as f64;
            let lo = pos.floor() as usize;
            (lo, (lo + 1).min(n - 1), pos - lo as f64)
        })
        .collect();
    let mut ranks: Vec<usize> = spots.iter().flat_map(|&(lo, hi, _)| [lo, hi]).collect();
    ranks.sort_unstable();
    ranks.dedup();
    // Each rank's bucket and its rank within the bucket.
    let mut at = Vec::with_capacity(ranks.len());
    let (mut bucket, mut below) = (0usize, 0usize);
    for &r in &ranks {
        while below + hist[bucket] as usize <= r {
            below += hist[bucket] as usize;
            bucket += 1;
        }
        at.push((bucket as u32, r - below));
    }
    let mut buckets: Vec<u32> = at.iter().map(|a| a.0).collect();
    buckets.dedup();
    let mut members: Vec<Vec<u32>> = buckets
        .iter()
        .map(|&b| Vec::with_capacity(hist[b as usize] as usize))
        .collect();
    // Each bucket's slot among the wanted ones (NONE for the rest): one load per value.
    const NONE: u8 = u8::MAX;
    assert!(
        buckets.len() < usize::from(NONE),
        "at most 127 quantiles at once"
    );
    let mut slot = vec![NONE; 1 << 16];
    for (i, &b) in buckets.iter().enumerate() {
        slot[b as usize] = i as u8;
    }
    // (non-finite values fall in buckets that are never wanted: no test needed)
    for &x in v {
        let k = key(x);
        let s = slot[(k >> 16) as usize];
        if s != NONE {
            members[usize::from(s)].push(k);
        }
    }
    let mut stat = |r: usize| {
        let (b, within) = at[ranks.binary_search(&r).expect("a wanted rank")];
        let m = &mut members[buckets.binary_search(&b).expect("a wanted bucket")];
        value(*m.select_nth_unstable(within).1)
    };
    let mut out = [0f32; Q];
    for (o, &(lo, hi, frac)) in out.iter_mut().zip(&spots) {
        let a = f64::from(stat(lo));
        let b = if hi == lo { a } else { f64::from(stat(hi)) };
        *o = (a + (b - a) * frac) as f32;
    }
    Some(out)
}

/// Pixels (row-major index `y * w + x`) for each of the three bins.
type ByBin = [Vec<u32>; 3];

struct Region {
    x: usize,
    y: usize,
    window: usize,
    min: f32,
    max: f32,
}

/// `(x, y)` of each row-major index in `list` (ascending): one division per row reached, not
/// per pixel.
fn coords(list: &[u32], w: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    let (mut y, mut row_end) = (0, 0);
    list.iter().map(move |&i| {
        let i = i as usize;
        if i >= row_end {
            y = i / w;
            row_end = (y + 1) * w;
        }
        (i + w - row_end, y)
    })
}

avx2_twin! {
/// Every pixel at least `margin` (and half a window) inside the frame whose `k × k` window's
/// range is under `thr`, by the bin its normalised depth falls in, in row-major order. Tested
/// 32 pixels at a time without branches (which pass comes in irregular patterns), the passing
/// ones then pushed.
fn passing_pixels / passing_pixels_baseline(
    norm: &[f32],
    w: usize,
    h: usize,
    mm: &window::MinMax,
    k: usize,
    margin: usize,
    thr: f32,
) -> ByBin {
    let half = k / 2;
    let mut lists = ByBin::default();
    let (y_lo, y_hi) = (half.max(margin), h.saturating_sub(half.max(margin)));
    let (x_lo, x_hi) = (half.max(margin), w.saturating_sub(half.max(margin)));
    if x_lo >= x_hi {
        return lists;
    }
    for y in y_lo..y_hi {
        // Pixel x's window has its top-left at (x − half, y − half).
        let at = (y - half) * mm.ow;
        let lo = &mm.min[at + x_lo - half..at + x_hi - half];
        let hi = &mm.max[at + x_lo - half..at + x_hi - half];
        let depth = &norm[y * w + x_lo..y * w + x_hi];
        let chunks = lo.chunks(32).zip(hi.chunks(32)).zip(depth.chunks(32));
        for (c, ((lo, hi), depth)) in chunks.enumerate() {
            let mut bits = [0u32; 3];
            for (i, ((&l, &u), &d)) in lo.iter().zip(hi).zip(depth).enumerate() {
                // (never NaN: a window holding a NaN pixel spans −inf..+inf)
                let flat = u - l < thr;
                for (m, &(b_lo, b_hi)) in bits.iter_mut().zip(&BINS) {
                    *m |= u32::from(flat & (d >= b_lo) & (d <= b_hi)) << i;
                }
            }
            let first = (y * w + x_lo + c * 32) as u32;
            for (list, mut m) in lists.iter_mut().zip(bits) {
                while m != 0 {
                    list.push(first + m.trailing_zeros());
                    m &= m - 1;
                }
            }
        }
    }
    lists
}
}

/// Three regions, one per depth bin, each a small window of nearly constant depth, marked
/// 1–3 in random order; the answer lists the marks from nearest to farthest.
///
/// The official script shuffles every pixel of a bin and takes the first whose window passes;
/// we pick uniformly among the passing pixels, which is the same distribution. Two additions
/// keep every sample answerable: a marker must fit inside the frame and must not overlap
/// another marker.
pub fn generate(frame: &RgbdFrame, rng: &mut Rng) -> Result<Generated, SkipReason> {
    generate_shared(frame, &Shared::default(), rng)
}

/// What every sample of one frame computes alike, kept for the frame's next samples (`ssrl
/// tasks --per-image N`): the normalised depth and, per window size as first needed, the window
/// statistics and the passing pixels. Only the draws differ between samples.
#[derive(Default)]
pub struct Shared {
    norm: OnceCell<Option<(Vec<f32>, f32, f32)>>,
    stats: [OnceCell<window::MinMax>; 2],
    passing: [OnceCell<ByBin>; 2],
}

/// [`generate`] with what `shared` holds of this frame (a `Shared` serves one frame only).
pub fn generate_shared(
    frame: &RgbdFrame,
    shared: &Shared,
    rng: &mut Rng,
) -> Result<Generated, SkipReason> {
    let (w, h) = (frame.width(), frame.height());
    let (norm, d_min, d_max) = shared
        .norm
        .get_or_init(|| normalise(&frame.depth))
        .as_ref()
        .ok_or(SkipReason::InvalidDepth)?;
    let (norm, d_min, d_max) = (norm.as_slice(), *d_min, *d_max);
    let style = MarkerStyle::matplotlib_like(w as u32, h as u32, 15.0, 0.3, 1.5);
    let margin = style.radius.ceil() as usize + 1;
    let mut regions: Vec<Region> = Vec::with_capacity(3);
    // A window holding a pixel without normalised depth (invalid, or outside the percentiles)
    // never passes: such pixels spoil its range. Per window size, every pixel whose window
    // passes, by bin, in row-major order (one scan for the three bins).
    let (stats, passing) = (&shared.stats, &shared.passing);
    let apart_d2 = (2.0 * style.radius + 2.0).powi(2);
    for bin in 0..BINS.len() {
        let mut found = None;
        for (wi, (k, thr)) in WINDOWS.into_iter().enumerate() {
            let half = k / 2;
            let mm = stats[wi].get_or_init(|| window::min_max(norm, w, h, k, Nans::Spoil));
            let lists = passing[wi].get_or_init(|| passing_pixels(norm, w, h, mm, k, margin, thr));
            let apart = |&(x, y): &(usize, usize)| {
                regions.iter().all(|r| {
                    let d2 = (r.x as f32 - x as f32).powi(2) + (r.y as f32 - y as f32).powi(2);
                    d2 >= apart_d2
                })
            };
            let count = match regions.is_empty() {
                true => lists[bin].len(),
                false => coords(&lists[bin], w).filter(apart).count(),
            };
            if count > 0 {
                let pick = rng.below(count);
                let (x, y) = coords(&lists[bin], w)
                    .filter(apart)
                    .nth(pick)
                    .expect("counted");
                let at = (y - half) * mm.ow + (x - half);
                found = Some(Region {
                    x,
                    y,
                    window: k,
                    min: mm.min[at],
                    max: mm.max[at],
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

    /// NumPy's default (linear) percentile of `v` (unsorted; reordered in place), by selection:
    /// the definition the radix select is held to.
    fn percentile(v: &mut [f32], q: f64) -> f32 {
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

    /// Row-major indices back to (x, y), across skipped rows and row ends.
    #[test]
    fn coords_follow_the_rows() {
        let got: Vec<_> = coords(&[0, 3, 4, 9, 10, 11, 23], 4).collect();
        assert_eq!(
            got,
            [(0, 0), (3, 0), (0, 1), (1, 2), (2, 2), (3, 2), (3, 5)]
        );
        assert_eq!(coords(&[], 4).count(), 0);
    }

    #[test]
    fn percentile_matches_numpy_linear() {
        // np.percentile([1,2,3,4,5,6,7,8,9,10], [0.5, 99.5]) == [1.045, 9.955]
        let mut v: Vec<f32> = (1..=10).map(|x| x as f32).collect();
        assert!((percentile(&mut v, 0.5) - 1.045).abs() < 1e-5);
        assert!((percentile(&mut v, 99.5) - 9.955).abs() < 1e-5);
        let [lo, hi] = finite_percentiles(&v, [0.5, 99.5]).unwrap();
        assert!(
            (lo - 1.045).abs() < 1e-5 && (hi - 9.955).abs() < 1e-5,
            "{lo} {hi}"
        );
        let mut one = vec![4.0f32];
        assert_eq!(percentile(&mut one, 50.0), 4.0);
    }

    /// The passing pixels by bin are those of the per-pixel definition, in row-major order, in
    /// both builds: maps with invalid pixels, values on the bins' bounds and between bins, rows
    /// that are and are not multiples of 32 wide, margins that leave nothing.
    #[test]
    fn passing_pixels_are_the_definitions() {
        let mut r = crate::rng::Rng::keyed(12, &[]);
        for (w, h, k, margin, thr) in [
            (100, 40, 5, 3, 0.2f32),
            (67, 33, 11, 2, 0.3),
            (31, 50, 3, 1, 0.05),
            (40, 40, 25, 0, 0.5),
            (12, 12, 11, 9, 0.5),
        ] {
            let norm: Vec<f32> = (0..w * h)
                .map(|i| match r.below(20) {
                    0 => f32::NAN,
                    1 => [0.0, 0.3, 0.35, 0.65, 0.7, 1.0, 0.32][r.below(7)],
                    _ => ((i % w) as f32 / w as f32 + r.f64() as f32 * 0.1).min(1.0),
                })
                .collect();
            let mm = window::min_max(&norm, w, h, k, Nans::Spoil);
            let half = k / 2;
            let mut want = ByBin::default();
            for y in half.max(margin)..h.saturating_sub(half.max(margin)) {
                for x in half.max(margin)..w.saturating_sub(half.max(margin)) {
                    let at = (y - half) * mm.ow + x - half;
                    if mm.max[at] - mm.min[at] >= thr {
                        continue;
                    }
                    let c = norm[y * w + x];
                    if let Some(b) = BINS.iter().position(|&(lo, hi)| c >= lo && c <= hi) {
                        want[b].push((y * w + x) as u32);
                    }
                }
            }
            let got = passing_pixels(&norm, w, h, &mm, k, margin, thr);
            assert_eq!(got, want, "{w}×{h} k {k}");
            assert_eq!(
                passing_pixels_baseline(&norm, w, h, &mm, k, margin, thr),
                want
            );
        }
    }

    /// The AVX2 build of the normalisation (where the CPU has it) gives the baseline's bits,
    /// and NaN exactly outside the percentile range.
    #[test]
    fn avx2_normalisation_equals_the_baseline() {
        let mut r = crate::rng::Rng::keyed(8, &[]);
        let v: Vec<f32> = (0..1003)
            .map(|i| match i % 11 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => -1.0,
                _ => r.f64() as f32 * 10.0,
            })
            .collect();
        let (got, base) = (normalised(&v, 1.0, 9.0), normalised_baseline(&v, 1.0, 9.0));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&base));
        for (n, d) in got.iter().zip(&v) {
            assert_eq!(n.is_nan(), !(1.0..=9.0).contains(d), "{d}");
        }
    }

    /// The radix select gives `percentile`'s values bit for bit: random depths, heavy ties,
    /// a constant map, negatives and zeros of both signs, non-finite pixels among them.
    #[test]
    fn radix_percentiles_equal_the_definition() {
        let mut r = crate::rng::Rng::keyed(3, &[]);
        let mut cases: Vec<Vec<f32>> = vec![
            (0..100_000)
                .map(|_| r.below(1_000_000) as f32 / 997.0)
                .collect(),
            (0..50_000).map(|_| (r.below(7) as f32) * 0.5).collect(),
            vec![2.5; 1000],
            vec![
                -3.0,
                -0.0,
                0.0,
                1e-30,
                -1e-30,
                7.0,
                f32::NAN,
                f32::INFINITY,
                -1.0,
            ],
            vec![4.0],
            (0..20_000)
                .map(|i| {
                    if i % 3 == 0 {
                        f32::NAN
                    } else {
                        1.0 + (i % 101) as f32 * 1e-7
                    }
                })
                .collect(),
        ];
        // A real depth map (DIODE's, metres).
        let npy = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/official/RGB-D_depth3.npy");
        cases.push(crate::tasks::npy::read(&npy).unwrap().data);
        for (i, v) in cases.iter().enumerate() {
            let mut finite: Vec<f32> = v.iter().copied().filter(|x| x.is_finite()).collect();
            for qs in [[0.5, 99.5], [0.0, 100.0], [50.0, 37.3]] {
                let want = [
                    percentile(&mut finite, qs[0]),
                    percentile(&mut finite, qs[1]),
                ];
                let got = finite_percentiles(v, qs).unwrap();
                assert_eq!(
                    got.map(f32::to_bits),
                    want.map(f32::to_bits),
                    "case {i}, {qs:?}"
                );
            }
        }
        assert!(finite_percentiles(&[f32::NAN, f32::NEG_INFINITY], [1.0]).is_none());
    }
}
