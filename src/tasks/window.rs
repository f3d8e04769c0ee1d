//! O(H·W) square-window statistics over depth maps (min and max by doubling along rows and
//! van Herk / Gil–Werman down columns; invalid pixels left out or spoiling their windows), so
//! region searches that the official scripts run as per-pixel Python loops take milliseconds.

/// Branch-free min or max for NaN-free input (compiles to `minps` / `maxps`).
#[inline(always)]
fn pick<const MAX: bool>(a: f32, b: f32) -> f32 {
    if MAX {
        if a > b {
            a
        } else {
            b
        }
    } else if a < b {
        a
    } else {
        b
    }
}

/// `d[i] = pick(a[i], b[i])` (vectorised). `d` is never one of the sources: `d = pick(d, s)`
/// becomes a store only where `s` wins, which AVX2 code makes a masked store (slow on some
/// CPUs).
#[inline(always)]
fn pick_into<const MAX: bool>(d: &mut [f32], a: &[f32], b: &[f32]) {
    for (d, (x, z)) in d.iter_mut().zip(a.iter().zip(b)) {
        *d = pick::<MAX>(*x, *z);
    }
}

/// What a NaN pixel does to the windows that hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nans {
    /// Left out, and so are ±inf pixels: a window's statistics are those of its finite pixels
    /// (a window of none gives `min = +inf`, `max = -inf`).
    Skip,
    /// Spoil the window: `min = -inf`, `max = +inf`, so its range is infinite.
    Spoil,
}

/// Min and max over every `k×k` window, NaN pixels treated as `nans` says. Index
/// `[y0 * ow + x0]` is the window with top-left `(x0, y0)`.
pub struct MinMax {
    pub ow: usize,
    pub oh: usize,
    pub min: Vec<f32>,
    pub max: Vec<f32>,
    /// In `Skip` mode, the range of the map's finite pixels, found on the way (`(+inf, -inf)`
    /// when none is finite); `(+inf, -inf)` in `Spoil` mode.
    pub range: (f32, f32),
}

/// `acc` lane-wise folded with `row` by `pick` (eight lanes: vectorised; the rest into lane 0).
#[inline(always)]
fn fold_lanes<const MAX: bool>(acc: &mut [f32; 8], row: &[f32]) {
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = pick::<MAX>(v, *a);
        }
    }
    for &v in chunks.remainder() {
        acc[0] = pick::<MAX>(v, acc[0]);
    }
}

/// The suffix statistics of a block of `k` rows (`ow` wide) of minima and maxima, into `suf`:
/// row j covers rows j..k.
#[inline(always)]
fn suffixes(raw: &(Vec<f32>, Vec<f32>), suf: &mut (Vec<f32>, Vec<f32>), k: usize, ow: usize) {
    let last = (k - 1) * ow..k * ow;
    suf.0[last.clone()].copy_from_slice(&raw.0[last.clone()]);
    suf.1[last.clone()].copy_from_slice(&raw.1[last]);
    for j in (0..k - 1).rev() {
        let row = j * ow..(j + 1) * ow;
        let (a, b) = suf.0.split_at_mut((j + 1) * ow);
        pick_into::<false>(&mut a[j * ow..], &raw.0[row.clone()], &b[..ow]);
        let (a, b) = suf.1.split_at_mut((j + 1) * ow);
        pick_into::<true>(&mut a[j * ow..], &raw.1[row], &b[..ow]);
    }
}

/// The horizontal pass of [`min_max`]: its settings and row buffers.
struct Rows<'a> {
    src: &'a [f32],
    w: usize,
    k: usize,
    /// The largest power of two ≤ k.
    span: usize,
    nans: Nans,
    lo: [Vec<f32>; 2],
    hi: [Vec<f32>; 2],
    /// Lane-wise min and max of every pixel read, left-out pixels as their fill.
    seen: ([f32; 8], [f32; 8]),
}

impl Rows<'_> {
    /// Row y's window statistics along x into (lo, hi) (each `ow` long).
    #[inline(always)]
    fn horizontal(&mut self, y: usize, lo: &mut [f32], hi: &mut [f32]) {
        let Rows {
            src,
            w,
            k,
            span,
            nans,
            lo: [b_lo, c_lo],
            hi: [b_hi, c_hi],
            seen,
        } = self;
        let (w, k, span, ow) = (*w, *k, *span, lo.len());
        // (selects, not branches: NaN pixels come in irregular patterns)
        let row = &src[y * w..(y + 1) * w];
        let (nan_lo, nan_hi) = match nans {
            Nans::Skip => (f32::INFINITY, f32::NEG_INFINITY),
            Nans::Spoil => (f32::NEG_INFINITY, f32::INFINITY),
        };
        let left_out = |s: f32| match nans {
            Nans::Skip => !s.is_finite(),
            Nans::Spoil => s.is_nan(),
        };
        for (l, &s) in b_lo.iter_mut().zip(row) {
            *l = if left_out(s) { nan_lo } else { s };
        }
        for (u, &s) in b_hi.iter_mut().zip(row) {
            *u = if left_out(s) { nan_hi } else { s };
        }
        if let Nans::Skip = nans {
            fold_lanes::<false>(&mut seen.0, b_lo);
            fold_lanes::<true>(&mut seen.1, b_hi);
        }
        let mut p = 1;
        while p < span {
            let n = w + 1 - 2 * p;
            pick_into::<false>(&mut c_lo[..n], &b_lo[..n], &b_lo[p..p + n]);
            pick_into::<true>(&mut c_hi[..n], &b_hi[..n], &b_hi[p..p + n]);
            std::mem::swap(b_lo, c_lo);
            std::mem::swap(b_hi, c_hi);
            p *= 2;
        }
        let far = k - span;
        pick_into::<false>(lo, &b_lo[..ow], &b_lo[far..far + ow]);
        pick_into::<true>(hi, &b_hi[..ow], &b_hi[far..far + ow]);
    }
}

avx2_twin! {
/// Both statistics in one sweep, in cache-sized pieces: each source row once through a
/// vectorised doubling pass along the row (⌊log₂k⌋ + 1 steps), then the column direction by
/// van Herk / Gil–Werman over blocks of `k` rows (a block's suffixes and the next block's
/// running prefix, three whole-row operations per row) — the working set is two blocks of rows,
/// never the whole map.
///
/// Compiled for AVX2 as well where the CPU has it (checked at run time; min and max are exact,
/// so the same statistics bit for bit).
pub fn min_max / min_max_baseline(src: &[f32], w: usize, h: usize, k: usize, nans: Nans) -> MinMax {
    if k == 0 || w < k || h < k {
        // No window: the range still, by a plain pass.
        let mut range = (f32::INFINITY, f32::NEG_INFINITY);
        if nans == Nans::Skip {
            for &v in src.iter().filter(|v| v.is_finite()) {
                range = (pick::<false>(v, range.0), pick::<true>(v, range.1));
            }
        }
        return MinMax {
            ow: 0,
            oh: 0,
            min: vec![],
            max: vec![],
            range,
        };
    }
    let (ow, oh) = (w - k + 1, h - k + 1);
    let mut span = 1;
    while span * 2 <= k {
        span *= 2;
    }
    let mut rows = Rows {
        src,
        w,
        k,
        span,
        nans,
        lo: [vec![0f32; w], vec![0f32; w]],
        hi: [vec![0f32; w], vec![0f32; w]],
        seen: ([f32::INFINITY; 8], [f32::NEG_INFINITY; 8]),
    };
    // `cur`: block b's rows as suffix statistics (row j covers rows j..k of the block);
    // `next`: block b + 1's rows as read; `pre`: the running prefix of `next` (and a spare).
    let mut cur = (vec![0f32; k * ow], vec![0f32; k * ow]);
    let mut next = (vec![0f32; k * ow], vec![0f32; k * ow]);
    let mut pre = (vec![0f32; ow], vec![0f32; ow]);
    let mut pre_spare = (vec![0f32; ow], vec![0f32; ow]);
    for j in 0..k {
        let r = j * ow..(j + 1) * ow;
        rows.horizontal(j, &mut next.0[r.clone()], &mut next.1[r]);
    }
    suffixes(&next, &mut cur, k, ow);
    let mut min = Vec::with_capacity(ow * oh);
    let mut max = Vec::with_capacity(ow * oh);
    let mut base = 0;
    loop {
        // Window rows y0 = base + j: block b's suffix from row j, and block b + 1's prefix
        // up to row j − 1 (rows base + k … y0 + k − 1).
        min.extend_from_slice(&cur.0[..ow]);
        max.extend_from_slice(&cur.1[..ow]);
        for j in 1..k.min(oh - base) {
            let r = (j - 1) * ow..j * ow;
            rows.horizontal(
                base + k + j - 1,
                &mut next.0[r.clone()],
                &mut next.1[r.clone()],
            );
            if j == 1 {
                pre.0.copy_from_slice(&next.0[r.clone()]);
                pre.1.copy_from_slice(&next.1[r.clone()]);
            } else {
                pick_into::<false>(&mut pre_spare.0, &pre.0, &next.0[r.clone()]);
                pick_into::<true>(&mut pre_spare.1, &pre.1, &next.1[r.clone()]);
                std::mem::swap(&mut pre, &mut pre_spare);
            }
            let row = j * ow..(j + 1) * ow;
            min.extend(
                cur.0[row.clone()]
                    .iter()
                    .zip(&pre.0)
                    .map(|(a, b)| pick::<false>(*a, *b)),
            );
            max.extend(
                cur.1[row]
                    .iter()
                    .zip(&pre.1)
                    .map(|(a, b)| pick::<true>(*a, *b)),
            );
        }
        base += k;
        if base >= oh {
            break;
        }
        // Block b + 1 has a window row, so all its k rows exist: read its last, and its
        // suffixes become the current block.
        let r = (k - 1) * ow..k * ow;
        rows.horizontal(base + k - 1, &mut next.0[r.clone()], &mut next.1[r]);
        suffixes(&next, &mut cur, k, ow);
    }
    debug_assert_eq!(min.len(), ow * oh);
    let (lo, hi) = &rows.seen;
    let range = (
        lo.iter().fold(f32::INFINITY, |a, &v| pick::<false>(v, a)),
        hi.iter().fold(f32::NEG_INFINITY, |a, &v| pick::<true>(v, a)),
    );
    MinMax {
        ow,
        oh,
        min,
        max,
        range,
    }
}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_brute_force_with_nans() {
        for k in [1usize, 2, 3, 4, 5, 8, 9, 16, 17] {
            check(23, 17, k);
        }
        // Heights that are and are not a multiple of k, windows as wide as the map.
        for (w, h, k) in [
            (9, 40, 4),
            (9, 41, 4),
            (5, 30, 5),
            (40, 9, 9),
            (7, 7, 7),
            (1, 12, 1),
        ] {
            check(w, h, k);
        }
    }

    /// A map smaller than the window has no windows, and still its finite range.
    #[test]
    fn no_window_still_gives_the_range() {
        let src = [3.0, f32::NAN, -1.0, f32::INFINITY, 2.0, f32::NEG_INFINITY];
        let m = min_max(&src, 3, 2, 3, Nans::Skip);
        assert_eq!((m.ow, m.oh, m.min.len()), (0, 0, 0));
        assert_eq!(m.range, (-1.0, 3.0));
        let none = min_max(&[f32::NAN; 4], 2, 2, 3, Nans::Skip);
        assert_eq!(none.range, (f32::INFINITY, f32::NEG_INFINITY));
    }

    fn check(w: usize, h: usize, k: usize) {
        let mut r = crate::rng::Rng::keyed(5, &[]);
        let src: Vec<f32> = (0..w * h)
            .map(|_| match r.below(40) {
                0..=5 => f32::NAN,
                6 => f32::INFINITY,
                7 => f32::NEG_INFINITY,
                _ => r.f64() as f32,
            })
            .collect();
        let skip = min_max(&src, w, h, k, Nans::Skip);
        let spoil = min_max(&src, w, h, k, Nans::Spoil);
        // The AVX2 build (where the CPU has it) and the baseline build agree to the bit.
        for (got, nans) in [(&skip, Nans::Skip), (&spoil, Nans::Spoil)] {
            let base = min_max_baseline(&src, w, h, k, nans);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.min), bits(&base.min), "{w}×{h} k {k} {nans:?}");
            assert_eq!(bits(&got.max), bits(&base.max), "{w}×{h} k {k} {nans:?}");
        }
        assert_eq!((skip.ow, skip.oh), (w - k + 1, h - k + 1));
        let finite = src.iter().filter(|v| v.is_finite());
        let range = finite.fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
        assert_eq!(skip.range, range, "{w}×{h} k {k}");
        assert_eq!(
            (skip.min.len(), spoil.max.len()),
            (skip.ow * skip.oh, skip.ow * skip.oh)
        );
        for y0 in 0..=h - k {
            for x0 in 0..=w - k {
                // Skip: the finite pixels; Spoil: every pixel, a NaN spoiling the window.
                let (mut lo, mut hi, mut nans) = (f32::INFINITY, f32::NEG_INFINITY, 0);
                let (mut all_lo, mut all_hi) = (f32::INFINITY, f32::NEG_INFINITY);
                for y in y0..y0 + k {
                    for x in x0..x0 + k {
                        let v = src[y * w + x];
                        if v.is_nan() {
                            nans += 1;
                        } else {
                            (all_lo, all_hi) = (all_lo.min(v), all_hi.max(v));
                            if v.is_finite() {
                                (lo, hi) = (lo.min(v), hi.max(v));
                            }
                        }
                    }
                }
                let i = y0 * skip.ow + x0;
                assert_eq!(
                    (skip.min[i], skip.max[i]),
                    (lo, hi),
                    "{w}×{h} k {k} at {x0},{y0}"
                );
                let spoilt = match nans {
                    0 => (all_lo, all_hi),
                    _ => (f32::NEG_INFINITY, f32::INFINITY),
                };
                assert_eq!(
                    (spoil.min[i], spoil.max[i]),
                    spoilt,
                    "{w}×{h} k {k} at {x0},{y0}"
                );
            }
        }
    }
}
