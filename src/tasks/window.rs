//! O(H·W) square-window statistics over depth maps (van Herk / Gil–Werman min and max, and an
//! integral image of invalid pixels), so region searches that the official scripts run as
//! per-pixel Python loops take milliseconds.

/// Sliding minimum (or maximum with `max = true`) of window `k` over `src`; `out.len() == n-k+1`.
fn slide_1d(src: &[f32], k: usize, max: bool, out: &mut Vec<f32>) {
    let n = src.len();
    out.clear();
    if k == 0 || n < k {
        return;
    }
    let pick = |a: f32, b: f32| if max { a.max(b) } else { a.min(b) };
    let mut pre = vec![0f32; n];
    let mut suf = vec![0f32; n];
    for i in 0..n {
        pre[i] = if i % k == 0 { src[i] } else { pick(pre[i - 1], src[i]) };
    }
    for i in (0..n).rev() {
        suf[i] = if i == n - 1 || (i + 1) % k == 0 { src[i] } else { pick(suf[i + 1], src[i]) };
    }
    out.extend((0..=n - k).map(|i| pick(suf[i], pre[i + k - 1])));
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
    if w < k || h < k {
        return MinMax { ow: 0, oh: 0, min: vec![], max: vec![] };
    }
    let (ow, oh) = (w - k + 1, h - k + 1);
    let mut out = MinMax { ow, oh, min: vec![0.0; ow * oh], max: vec![0.0; ow * oh] };
    for (is_max, dst) in [(false, &mut out.min), (true, &mut out.max)] {
        let fill = if is_max { f32::NEG_INFINITY } else { f32::INFINITY };
        let mut rows = vec![0f32; ow * h];
        let mut row_in = vec![0f32; w];
        let mut tmp = Vec::with_capacity(w);
        for y in 0..h {
            for (d, s) in row_in.iter_mut().zip(&src[y * w..(y + 1) * w]) {
                *d = if s.is_nan() { fill } else { *s };
            }
            slide_1d(&row_in, k, is_max, &mut tmp);
            rows[y * ow..(y + 1) * ow].copy_from_slice(&tmp);
        }
        let mut col = vec![0f32; h];
        for x in 0..ow {
            for y in 0..h {
                col[y] = rows[y * ow + x];
            }
            slide_1d(&col, k, is_max, &mut tmp);
            for (y, v) in tmp.iter().enumerate() {
                dst[y * ow + x] = *v;
            }
        }
    }
    out
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
        let (w, h, k) = (13usize, 9usize, 5usize);
        let mut r = crate::rng::Rng::keyed(5, &[]);
        let src: Vec<f32> = (0..w * h)
            .map(|_| if r.below(7) == 0 { f32::NAN } else { r.f64() as f32 })
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
