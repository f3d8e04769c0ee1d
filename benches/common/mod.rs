//! What the hand-rolled benches share.

use std::time::Instant;

/// Median seconds of `reps` calls of `f`, after one call to warm up.
pub fn median_s(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}
