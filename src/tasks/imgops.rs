//! Pixel operations shared by the tasks: crops, flips, rotations, OpenCV-style bilinear
//! resize and an image distance used to keep answer options visually distinct.

use image::{imageops, RgbImage};

/// Copy of the `w × h` region at `(x, y)`.
pub fn crop(img: &RgbImage, x: u32, y: u32, w: u32, h: u32) -> RgbImage {
    imageops::crop_imm(img, x, y, w, h).to_image()
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

/// Bilinear resize with OpenCV's `INTER_LINEAR` sampling (half-pixel centres, edge clamp,
/// no anti-aliasing), which is what the official generators use through `cv2.resize`.
pub fn resize_bilinear(src: &RgbImage, dw: u32, dh: u32) -> RgbImage {
    let (sw, sh) = src.dimensions();
    if (sw, sh) == (dw, dh) {
        return src.clone();
    }
    let sx = f64::from(sw) / f64::from(dw);
    let sy = f64::from(sh) / f64::from(dh);
    let taps = |d: u32, scale: f64, n: u32| -> (usize, usize, f32) {
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
    };
    let xt: Vec<_> = (0..dw).map(|x| taps(x, sx, sw)).collect();
    let raw = src.as_raw();
    let stride = sw as usize * 3;
    let mut out = vec![0u8; dw as usize * dh as usize * 3];
    for (y, row) in out.chunks_exact_mut(dw as usize * 3).enumerate() {
        let (y0, y1, b) = taps(y as u32, sy, sh);
        let r0 = &raw[y0 * stride..(y0 + 1) * stride];
        let r1 = &raw[y1 * stride..(y1 + 1) * stride];
        for (x, &(x0, x1, a)) in xt.iter().enumerate() {
            for c in 0..3 {
                let p00 = f32::from(r0[x0 * 3 + c]);
                let p01 = f32::from(r0[x1 * 3 + c]);
                let p10 = f32::from(r1[x0 * 3 + c]);
                let p11 = f32::from(r1[x1 * 3 + c]);
                let top = p00 + (p01 - p00) * a;
                let bot = p10 + (p11 - p10) * a;
                row[x * 3 + c] = (top + (bot - top) * b).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    RgbImage::from_raw(dw, dh, out).expect("buffer size matches")
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
    for y in (0..h as usize).step_by(2) {
        let (pa, pb) = (
            &ra[y * stride..(y + 1) * stride],
            &rb[y * stride..(y + 1) * stride],
        );
        for x in (0..w as usize).step_by(2) {
            for c in 0..3 {
                s += u64::from(pa[x * 3 + c].abs_diff(pb[x * 3 + c]));
            }
            n += 3;
        }
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
