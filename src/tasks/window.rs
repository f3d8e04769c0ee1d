//! O(H·W) square-window statistics over depth maps (van Herk / Gil–Werman min and max, and an
//! integral image of invalid pixels), so region searches that the official scripts run as
//! per-pixel Python loops take milliseconds.

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

/// Min and max over every `k×k` window; NaN pixels are ignored (a window of only NaN gives
/// `min = +inf`, `max = -inf`). Index `[y0 * ow + x0]` is the window with top-left `(x0, y0)`.
pub struct MinMax {
    pub ow: usize,
    pub oh: usize,
    pub min: Vec<f32>,
    pub max: Vec<f32>,
}

pub fn min_max(src: &[f32], w: usize, h: usize, k: usize) -> MinMax {
    if k == 0 || w < k || h < k {
        return MinMax {
            ow: 0,
            oh: 0,
            min: vec![],
            max: vec![],
        };
    }
    let (ow, oh) = (w - k + 1, h - k + 1);
    let min = pass::<false>(src, w, h, k);
    let max = pass::<true>(src, w, h, k);
    debug_assert_eq!(min.len(), ow * oh);
    MinMax { ow, oh, min, max }
}

/// Window min/max by doubling: after the pass for span `p`, `v[i]` covers `i..i+2p`; a window
/// of `k` is then two overlapping spans. ⌊log₂k⌋ + 1 vectorised passes per axis.
fn pass<const MAX: bool>(src: &[f32], w: usize, h: usize, k: usize) -> Vec<f32> {
    let (ow, oh) = (w - k + 1, h - k + 1);
    let fill = if MAX {
        f32::NEG_INFINITY
    } else {
        f32::INFINITY
    };
    let pick = pick::<MAX>;
    let mut span = 1;
    while span * 2 <= k {
        span *= 2;
    }
    // Horizontal, ping-ponging between two row buffers.
    let mut rows = vec![0f32; ow * h];
    let (mut b, mut c) = (vec![0f32; w], vec![0f32; w]);
    for y in 0..h {
        for (d, s) in b.iter_mut().zip(&src[y * w..(y + 1) * w]) {
            *d = if s.is_nan() { fill } else { *s };
        }
        let mut p = 1;
        while p < span {
            let n = w + 1 - 2 * p;
            for ((d, x), z) in c[..n].iter_mut().zip(&b[..n]).zip(&b[p..p + n]) {
                *d = pick(*x, *z);
            }
            std::mem::swap(&mut b, &mut c);
            p *= 2;
        }
        let out = &mut rows[y * ow..(y + 1) * ow];
        for ((o, x), z) in out
            .iter_mut()
            .zip(&b[..ow])
            .zip(&b[k - span..k - span + ow])
        {
            *o = pick(*x, *z);
        }
    }
    // Vertical, on whole rows.
    let mut p = 1;
    while p < span {
        for y in 0..=h - 2 * p {
            let (a, c) = rows.split_at_mut((y + p) * ow);
            for (d, s) in a[y * ow..(y + 1) * ow].iter_mut().zip(&c[..ow]) {
                *d = pick(*d, *s);
            }
        }
        p *= 2;
    }
    let mut dst = vec![0f32; ow * oh];
    for y0 in 0..oh {
        let (a, c) = (
            &rows[y0 * ow..(y0 + 1) * ow],
            &rows[(y0 + k - span) * ow..(y0 + k - span + 1) * ow],
        );
        for ((d, x), z) in dst[y0 * ow..(y0 + 1) * ow].iter_mut().zip(a).zip(c) {
            *d = pick(*x, *z);
        }
    }
    dst
}

/// Integral image of NaN pixels: `count(x0, y0, k)` gives the NaNs in a `k×k` window.
pub struct NanCount {
    w: usize,
    sums: Vec<u32>,
}

impl NanCount {
    pub fn new(src: &[f32], w: usize, h: usize) -> Self {
        let mut sums = vec![0u32; (w + 1) * (h + 1)];
        for y in 0..h {
            let mut row = 0u32;
            for x in 0..w {
                row += u32::from(src[y * w + x].is_nan());
                sums[(y + 1) * (w + 1) + x + 1] = sums[y * (w + 1) + x + 1] + row;
            }
        }
        NanCount { w, sums }
    }

    pub fn count(&self, x0: usize, y0: usize, k: usize) -> u32 {
        let s = |x: usize, y: usize| self.sums[y * (self.w + 1) + x];
        s(x0 + k, y0 + k) + s(x0, y0) - s(x0 + k, y0) - s(x0, y0 + k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_brute_force_with_nans() {
        for k in [1usize, 2, 3, 4, 5, 8, 9] {
            check(23, 17, k);
        }
    }

    fn check(w: usize, h: usize, k: usize) {
        let mut r = crate::rng::Rng::keyed(5, &[]);
        let src: Vec<f32> = (0..w * h)
            .map(|_| {
                if r.below(7) == 0 {
                    f32::NAN
                } else {
                    r.f64() as f32
                }
            })
            .collect();
        let mm = min_max(&src, w, h, k);
        let nc = NanCount::new(&src, w, h);
        for y0 in 0..=h - k {
            for x0 in 0..=w - k {
                let (mut lo, mut hi, mut nans) = (f32::INFINITY, f32::NEG_INFINITY, 0);
                for y in y0..y0 + k {
                    for x in x0..x0 + k {
                        let v = src[y * w + x];
                        if v.is_nan() {
                            nans += 1;
                        } else {
                            lo = lo.min(v);
                            hi = hi.max(v);
                        }
                    }
                }
                assert_eq!(mm.min[y0 * mm.ow + x0], lo);
                assert_eq!(mm.max[y0 * mm.ow + x0], hi);
                assert_eq!(nc.count(x0, y0, k), nans);
            }
        }
    }
}
