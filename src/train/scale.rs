//! Dynamic loss scaling for fp16 training graphs, as `torch.amp.GradScaler` does it: the
//! backward pass runs on loss · scale so that fp16 gradients stay above the type's underflow
//! (2⁻²⁴), and the graph divides the fp32 LoRA gradients back. A micro-batch whose gradients
//! overflow is run again at half the scale (nothing is skipped: micro-batch gradients are
//! unscaled in the graph, so micro-batches at different scales add up); after
//! [`GROWTH_INTERVAL`] optimizer steps without an overflow the scale doubles. fp32 and bf16
//! graphs run at scale 1 (bf16 has fp32's range).

use serde::{Deserialize, Serialize};

/// The first scale (torch's `init_scale`).
pub const INIT: f32 = 65536.0;
/// Optimizer steps without an overflow before the scale doubles (torch's `growth_interval`).
pub const GROWTH_INTERVAL: u32 = 2000;
/// The scale backs off no lower: gradients that overflow at 2⁻¹⁴ are not finite at any scale
/// (the step then skips its update, as an fp32 run's would).
pub const MIN: f32 = 1.0 / 16384.0;
/// Nor grows past 2²⁴.
pub const MAX: f32 = 16_777_216.0;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    pub scale: f32,
    /// Optimizer steps since the last overflow or growth.
    pub good_steps: u32,
}

impl Default for LossScale {
    fn default() -> Self {
        LossScale {
            scale: INIT,
            good_steps: 0,
        }
    }
}

impl LossScale {
    /// After a micro-batch whose gradients were not finite: halves the scale. False where it
    /// is at [`MIN`] already (run the micro-batch no more).
    pub fn back_off(&mut self) -> bool {
        self.good_steps = 0;
        if self.scale <= MIN {
            return false;
        }
        self.scale = (self.scale * 0.5).max(MIN);
        true
    }

    /// After an optimizer step whose micro-batches were all finite at the scale they ran at.
    pub fn step_done(&mut self) {
        self.good_steps += 1;
        if self.good_steps >= GROWTH_INTERVAL {
            self.scale = (self.scale * 2.0).min(MAX);
            self.good_steps = 0;
        }
    }
}

/// Whether every value of every gradient is finite.
pub fn all_finite(grads: &[Vec<f32>]) -> bool {
    grads.iter().all(|g| finite(g))
}

/// Whether every value is finite.
pub fn finite(values: &[f32]) -> bool {
    values.iter().all(|g| g.is_finite())
}

/// Whether a micro-batch runs again: with loss scaling (`scale` is some, fp16), when its
/// gradients overflowed (`finite` says they did not) and the scale could back off. Without it
/// `finite` is not called, so the gradients are not scanned (an fp32 run's non-finite norm
/// skips the update instead).
pub fn rerun(scale: &mut Option<LossScale>, finite: impl FnOnce() -> bool) -> bool {
    match scale {
        Some(s) => !finite() && s.back_off(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Overflows halve the scale down to its floor; a run of good steps doubles it, up to its
    /// ceiling; an overflow restarts the count.
    #[test]
    fn scale_backs_off_and_grows_as_torch_grad_scaler() {
        let mut s = LossScale::default();
        assert_eq!(s.scale, 65536.0);
        assert!(s.back_off());
        assert_eq!(s.scale, 32768.0);
        for _ in 0..GROWTH_INTERVAL - 1 {
            s.step_done();
        }
        assert_eq!(s.scale, 32768.0);
        assert!(s.back_off());
        assert_eq!((s.scale, s.good_steps), (16384.0, 0));
        for _ in 0..GROWTH_INTERVAL {
            s.step_done();
        }
        assert_eq!((s.scale, s.good_steps), (32768.0, 0));
        let mut n = 0;
        while s.back_off() {
            n += 1;
        }
        assert_eq!((s.scale, n), (MIN, 29));
        s.scale = MAX;
        for _ in 0..GROWTH_INTERVAL {
            s.step_done();
        }
        assert_eq!(s.scale, MAX);
        assert!(all_finite(&[vec![1.0, -2.0], vec![]]));
        assert!(!all_finite(&[vec![1.0], vec![f32::INFINITY]]));
        assert!(!all_finite(&[vec![f32::NAN]]));
        // Only an overflow under loss scaling runs a micro-batch again, and halves the scale.
        let (ok, bad) = (vec![vec![1.0f32]], vec![vec![f32::INFINITY]]);
        let mut on = Some(LossScale::default());
        assert!(!rerun(&mut on, || all_finite(&ok)));
        assert_eq!(on.unwrap().scale, INIT);
        assert!(rerun(&mut on, || all_finite(&bad)));
        assert_eq!(on.unwrap().scale, INIT / 2.0);
        // Without loss scaling the gradients are not even looked at.
        assert!(!rerun(&mut None, || unreachable!(
            "scanned without loss scaling"
        )));
    }
}
