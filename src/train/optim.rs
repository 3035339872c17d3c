//! Adam on host-side parameter vectors, and the learning-rate schedule.
//!
//! The parameters of these detectors are small (0.3-1 M floats), so the update costs nothing next to
//! a forward/backward pass; keeping the shadow weights and the moments as plain `Vec<f32>` makes the
//! quantizers (which work on slices), checkpoints and determinism straightforward.

use serde::{Deserialize, Serialize};

/// Adam's hyper-parameters. No weight decay: it would pull shadow weights towards zero, i.e.
/// towards the zero code, which is a different regulariser from the one the quantizer imposes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
        }
    }
}

/// First and second moments of one parameter tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamState {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl AdamState {
    pub fn zeros(len: usize) -> Self {
        AdamState {
            m: vec![0.0; len],
            v: vec![0.0; len],
        }
    }
}

/// One Adam step on `param` with gradient `grad`; `t` is the 1-based step count (for bias
/// correction).
pub fn adam_step(
    cfg: &AdamConfig,
    lr: f64,
    t: u64,
    param: &mut [f32],
    grad: &[f32],
    state: &mut AdamState,
) {
    let t = t.max(1) as i32;
    let c1 = 1.0 - cfg.beta1.powi(t);
    let c2 = 1.0 - cfg.beta2.powi(t);
    let (b1, b2) = (cfg.beta1 as f32, cfg.beta2 as f32);
    let step = (lr / c1) as f32;
    let c2 = c2 as f32;
    let eps = cfg.epsilon as f32;
    for (((p, &g), m), v) in param
        .iter_mut()
        .zip(grad)
        .zip(state.m.iter_mut())
        .zip(state.v.iter_mut())
    {
        // A non-finite gradient (an overflow somewhere) must not poison the weights forever.
        let g = if g.is_finite() { g } else { 0.0 };
        *m = b1 * *m + (1.0 - b1) * g;
        *v = b2 * *v + (1.0 - b2) * g * g;
        *p -= step * *m / ((*v / c2).sqrt() + eps);
    }
}

/// Linear warm-up from `lr / warmup` to `lr`, then a cosine decay to `final_fraction * lr` at the
/// last step. Warm-up matters here: the first steps see gradients through freshly quantized weights,
/// and Adam's second-moment estimate is still noisy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub final_fraction: f64,
}

impl Schedule {
    /// Learning rate for the 0-based `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.lr * (self.final_fraction + (1.0 - self.final_fraction) * cosine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let s = Schedule {
            lr: 1e-3,
            warmup_steps: 10,
            total_steps: 110,
            final_fraction: 0.0,
        };
        assert!((s.lr_at(0) - 1e-4).abs() < 1e-12);
        assert!((s.lr_at(9) - 1e-3).abs() < 1e-12);
        assert!((s.lr_at(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr_at(60) - 5e-4).abs() < 1e-9);
        assert!(s.lr_at(109) < 1e-6);
    }

    #[test]
    fn adam_moves_against_the_gradient() {
        let mut p = vec![1.0f32, -1.0];
        let mut st = AdamState::zeros(2);
        adam_step(
            &AdamConfig::default(),
            0.1,
            1,
            &mut p,
            &[2.0, -3.0],
            &mut st,
        );
        // The first Adam step is lr * sign(g).
        assert!((p[0] - 0.9).abs() < 1e-5 && (p[1] + 0.9).abs() < 1e-5);
    }
}
