//! The image preprocessor (smart_resize, Pillow-exact bicubic resize, rescale and normalise,
//! patchify) per image at the rollout bench's 448×336 (no resize needed), COCO's 640×480 and a
//! 1280×960 photo, on one thread: into a fresh buffer, and into one buffer reused from image to
//! image (as the engine's workers do).
//!
//! `cargo bench --bench preprocess`.

use spatial_ssrl::model::processor::{preprocess, preprocess_into, PreprocessorConfig};
use std::hint::black_box;
mod common;
use common::median_s;

fn main() {
    let cfg = PreprocessorConfig::default();
    for (w, h, reps) in [(448u32, 336u32, 200usize), (640, 480, 100), (1280, 960, 30)] {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7 + y) as u8, (y * 3) as u8, ((x ^ y) * 5) as u8])
        });
        let fresh = 1e3
            * median_s(reps, || {
                black_box(preprocess(black_box(&img), &cfg).unwrap());
            });
        let mut buf = Vec::new();
        let reused = 1e3
            * median_s(reps, || {
                black_box(preprocess_into(black_box(&img), &cfg, &mut buf).unwrap());
            });
        let p = preprocess(&img, &cfg).unwrap();
        println!(
            "{w:>5} × {h:<4} → grid {:?}: {fresh:.2} ms per image into a fresh buffer, \
             {reused:.2} ms into a reused one (medians of {reps})",
            p.grid_thw,
        );
    }
}
