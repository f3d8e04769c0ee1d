//! Pixel operations shared by the tasks: crops, flips, rotations, OpenCV-style bilinear
//! resize and an image distance used to keep answer options visually distinct.

use image::{imageops, RgbImage};

/// Copy of the `w × h` region at `(x, y)`.
/// The region must lie inside the image.
pub fn crop(img: &RgbImage, x: u32, y: u32, w: u32, h: u32) -> RgbImage {
    assert!(
        x + w <= img.width() && y + h <= img.height(),
        "crop outside the image"
    );
    let stride = img.width() as usize * 3;
    let (x0, row) = (x as usize * 3, w as usize * 3);
    let mut out = Vec::with_capacity(row * h as usize);
    for src in img
        .as_raw()
        .chunks_exact(stride)
        .skip(y as usize)
        .take(h as usize)
    {
        out.extend_from_slice(&src[x0..x0 + row]);
    }
    RgbImage::from_raw(w, h, out).expect("buffer size matches")
}

/// Flip around the x-axis (upside down), `cv2.flip(img, 0)`.
pub fn flip_vertical(img: &RgbImage) -> RgbImage {
    imageops::flip_vertical(img)
}

/// Flip around the y-axis (mirror), `cv2.flip(img, 1)`.
pub fn flip_horizontal(img: &RgbImage) -> RgbImage {
    imageops::flip_horizontal(img)
}

/// `cv2.rotate(img, ROTATE_90_CLOCKWISE)`.
pub fn rotate_cw(img: &RgbImage) -> RgbImage {
    imageops::rotate90(img)
}

/// `cv2.rotate(img, ROTATE_90_COUNTERCLOCKWISE)`.
pub fn rotate_ccw(img: &RgbImage) -> RgbImage {
    imageops::rotate270(img)
}

/// The two source samples of output position `d` and the second one's weight, for a scale of
/// `scale` source pixels per output pixel over `n` source pixels (half-pixel centres, edges
/// clamped).
fn taps(d: u32, scale: f64, n: u32) -> (usize, usize, f32) {
    let f = (f64::from(d) + 0.5) * scale - 0.5;
    let i = f.floor();
    let mut a = (f - i) as f32;
    let mut i0 = i as i64;
    if i0 < 0 {
        i0 = 0;
        a = 0.0;
    }
    let last = i64::from(n) - 1;
    if i0 >= last {
        i0 = last;
        a = 0.0;
    }
    let i1 = (i0 + 1).min(last);
    (i0 as usize, i1 as usize, a)
}

/// Bilinear resize with OpenCV's `INTER_LINEAR` sampling (half-pixel centres, edge clamp,
/// no anti-aliasing), which is what the official generators use through `cv2.resize`.
pub fn resize_bilinear(src: &RgbImage, dw: u32, dh: u32) -> RgbImage {
    let (sw, sh) = src.dimensions();
    if (sw, sh) == (dw, dh) {
        return src.clone();
    }
    let sx = f64::from(sw) / f64::from(dw);
    let sy = f64::from(sh) / f64::from(dh);
    // Each output column's two source pixels (as byte offsets in a row) and weight.
    let xt: Vec<_> = (0..dw)
        .map(|x| {
            let (x0, x1, a) = taps(x, sx, sw);
            (x0 * 3, x1 * 3, a)
        })
        .collect();
    let raw = src.as_raw();
    let stride = sw as usize * 3;
    // Two passes with the one-pass arithmetic, operation for operation (so the same bits): each
    // source row interpolated along x once (`top` / `bot` of every output pixel), then the rows
    // blended along y, a loop the compiler vectorises.
    let horizontal = |r: usize, dst: &mut [f32]| {
        let row = &raw[r * stride..(r + 1) * stride];
        for (o, &(i0, i1, a)) in dst.chunks_exact_mut(3).zip(&xt) {
            let (p, q) = (&row[i0..i0 + 3], &row[i1..i1 + 3]);
            for c in 0..3 {
                let (p0, p1) = (f32::from(p[c]), f32::from(q[c]));
                o[c] = p0 + (p1 - p0) * a;
            }
        }
    };
    let n = dw as usize * 3;
    let (mut top, mut bot) = (vec![0f32; n], vec![0f32; n]);
    let (mut have_top, mut have_bot) = (usize::MAX, usize::MAX);
    let mut out = vec![0u8; n * dh as usize];
    for (y, row) in out.chunks_exact_mut(n).enumerate() {
        let (y0, y1, b) = taps(y as u32, sy, sh);
        if have_top != y0 {
            if have_bot == y0 {
                std::mem::swap(&mut top, &mut bot);
                have_bot = usize::MAX;
            } else {
                horizontal(y0, &mut top);
            }
            have_top = y0;
        }
        if have_bot != y1 {
            horizontal(y1, &mut bot);
            have_bot = y1;
        }
        for ((o, &t), &u) in row.iter_mut().zip(&top).zip(&bot) {
            *o = round_blend(t + (u - t) * b);
        }
    }
    RgbImage::from_raw(dw, dh, out).expect("buffer size matches")
}

/// `v.round().clamp(0.0, 255.0) as u8` (halves away from zero) without the libm call, for a
/// blend of two values in 0..=255 with a weight in [0, 1] (within an ulp of that range): for
/// v ≥ 0 the fraction `v - trunc(v)` is exact, and such a value needs no saturating conversion,
/// so the loop vectorises (the checked conversion kept it scalar, 40 % of the resize).
#[inline]
fn round_blend(v: f32) -> u8 {
    debug_assert!((-1.0..=256.0).contains(&v), "{v}");
    // SAFETY: v is finite and far inside i32's range (the blend's inputs are bytes).
    let i: i32 = unsafe { v.to_int_unchecked() };
    let up = i32::from(v - i as f32 >= 0.5);
    (i + up).clamp(0, 255) as u8
}

/// Mean absolute difference per channel value (0..255) between two images of equal size.
pub fn mean_abs_diff(a: &RgbImage, b: &RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let s: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| u64::from(x.abs_diff(*y)))
        .sum();
    s as f64 / a.as_raw().len().max(1) as f64
}

/// [`mean_abs_diff`] on every other row and column: a quarter of the work, for threshold tests.
pub fn mean_abs_diff_sampled(a: &RgbImage, b: &RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let (w, h) = a.dimensions();
    let stride = w as usize * 3;
    let (ra, rb) = (a.as_raw(), b.as_raw());
    let (mut s, mut n) = (0u64, 0u64);
    let cols = (w as usize).div_ceil(2);
    for y in (0..h as usize).step_by(2) {
        let (pa, pb) = (
            &ra[y * stride..(y + 1) * stride],
            &rb[y * stride..(y + 1) * stride],
        );
        // Pixels 0, 2, 4, …: the first three bytes of every six (the last pixel alone when
        // the width is odd).
        let (ca, cb) = (pa.chunks_exact(6), pb.chunks_exact(6));
        let pair = |x: &[u8], y: &[u8]| {
            u32::from(x[0].abs_diff(y[0]))
                + u32::from(x[1].abs_diff(y[1]))
                + u32::from(x[2].abs_diff(y[2]))
        };
        let mut row = if ca.remainder().is_empty() {
            0
        } else {
            pair(ca.remainder(), cb.remainder())
        };
        for (x, y) in ca.zip(cb) {
            row += pair(x, y);
        }
        s += u64::from(row);
        n += 3 * cols as u64;
    }
    s as f64 / n.max(1) as f64
}

/// Fill a rectangle with one colour.
pub fn fill_rect(img: &mut RgbImage, x: u32, y: u32, w: u32, h: u32, rgb: [u8; 3]) {
    for yy in y..(y + h).min(img.height()) {
        for xx in x..(x + w).min(img.width()) {
            img.put_pixel(xx, yy, image::Rgb(rgb));
        }
    }
}

/// Paste `src` into `dst` with its top-left corner at `(x, y)`.
pub fn paste(dst: &mut RgbImage, src: &RgbImage, x: u32, y: u32) {
    imageops::replace(dst, src, i64::from(x), i64::from(y));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 10) as u8, (y * 10) as u8, 7]))
    }

    #[test]
    fn rotations_and_flips_are_exact() {
        let img = ramp(5, 3);
        let cw = rotate_cw(&img);
        assert_eq!(cw.dimensions(), (3, 5));
        // cv2 ROTATE_90_CLOCKWISE: out(r, c) = in(H-1-c, r)
        assert_eq!(cw.get_pixel(0, 0), img.get_pixel(0, 2));
        let ccw = rotate_ccw(&img);
        assert_eq!(ccw.get_pixel(0, 0), img.get_pixel(4, 0));
        assert_eq!(flip_vertical(&img).get_pixel(1, 0), img.get_pixel(1, 2));
        assert_eq!(flip_horizontal(&img).get_pixel(0, 1), img.get_pixel(4, 1));
    }

    /// The one-pass resize the two-pass one replaced (the same taps), kept to prove the bits
    /// unchanged.
    fn resize_one_pass(src: &RgbImage, dw: u32, dh: u32) -> RgbImage {
        let (sw, sh) = src.dimensions();
        let (sx, sy) = (f64::from(sw) / f64::from(dw), f64::from(sh) / f64::from(dh));
        RgbImage::from_fn(dw, dh, |x, y| {
            let (x0, x1, a) = taps(x, sx, sw);
            let (y0, y1, b) = taps(y, sy, sh);
            let p = |x: usize, y: usize, c: usize| f32::from(src.get_pixel(x as u32, y as u32)[c]);
            image::Rgb(std::array::from_fn(|c| {
                let top = p(x0, y0, c) + (p(x1, y0, c) - p(x0, y0, c)) * a;
                let bot = p(x0, y1, c) + (p(x1, y1, c) - p(x0, y1, c)) * a;
                (top + (bot - top) * b).round().clamp(0.0, 255.0) as u8
            }))
        })
    }

    fn noise(w: u32, h: u32, seed: u64) -> RgbImage {
        let mut r = crate::rng::Rng::keyed(seed, &[]);
        RgbImage::from_fn(w, h, |_, _| {
            image::Rgb([r.below(256) as u8, r.below(256) as u8, r.below(256) as u8])
        })
    }

    #[test]
    fn two_pass_resize_gives_the_one_pass_bits() {
        // Down, up, non-integer and mixed factors, odd sizes, and a real photo.
        let photo = crate::data::images::load_rgb(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/photos/coffee.png"),
        )
        .unwrap();
        let cases = [
            (noise(97, 61, 1), 45, 30),
            (noise(40, 40, 2), 113, 77),
            (noise(451, 451, 3), 225, 225),
            (noise(33, 90, 4), 50, 20),
            (noise(5, 5, 5), 1, 9),
            (photo.clone(), 300, 200),
            (photo, 451, 451),
        ];
        for (src, w, h) in &cases {
            let got = resize_bilinear(src, *w, *h);
            assert_eq!(
                got,
                resize_one_pass(src, *w, *h),
                "{:?} → {w}×{h}",
                src.dimensions()
            );
        }
    }

    #[test]
    fn rounding_is_libm_round() {
        let libm = |v: f32| v.round().clamp(0.0, 255.0) as u8;
        for v in [
            0.0f32, 0.49999997, 0.5, 1.5, 2.5, 254.5, 254.49998, 255.0, -1e-5, 255.00002,
        ] {
            assert_eq!(round_blend(v), libm(v), "{v}");
        }
        // Over the whole range: every representable value near the halves and the ends, a
        // fine grid between.
        let mut v = -0.0001f32;
        while v <= 255.001 {
            assert_eq!(round_blend(v), libm(v), "{v}");
            let near = (v.fract() - 0.5).abs() < 1e-3 || !(0.01..=254.99).contains(&v);
            v = match near {
                true => f32::from_bits(v.to_bits() + 1).max(v + f32::EPSILON),
                false => v + 0.0009765625,
            };
        }
    }

    #[test]
    fn crop_and_sampled_distance_match_their_definitions() {
        let (a, b) = (noise(37, 23, 6), noise(37, 23, 7));
        assert_eq!(
            crop(&a, 3, 5, 20, 11),
            imageops::crop_imm(&a, 3, 5, 20, 11).to_image()
        );
        // Every other row and column, the last odd column included.
        let (mut s, mut n) = (0u64, 0u64);
        for y in (0..23).step_by(2) {
            for x in (0..37).step_by(2) {
                for c in 0..3 {
                    s += u64::from(a.get_pixel(x, y)[c].abs_diff(b.get_pixel(x, y)[c]));
                    n += 1;
                }
            }
        }
        assert_eq!(mean_abs_diff_sampled(&a, &b), s as f64 / n as f64);
    }

    #[test]
    fn bilinear_matches_opencv_on_a_ramp() {
        // 2x upscaling of a linear ramp: cv2 gives interior values on the half-pixel grid.
        let src = RgbImage::from_fn(4, 1, |x, _| image::Rgb([(x * 40) as u8, 0, 0]));
        let out = resize_bilinear(&src, 8, 1);
        let got: Vec<u8> = out.pixels().map(|p| p[0]).collect();
        // cv2.resize(np.array([[0,40,80,120]],np.uint8),(8,1)) == [0,10,30,50,70,90,110,120]
        assert_eq!(got, vec![0, 10, 30, 50, 70, 90, 110, 120]);
    }
}
