//! LBW-Net's semi-analytical quantizer: a closed-form scale with one free parameter.

use super::{
    Bits, Code, GroupScale, Method, Quantizer, check_finite, nearest_exponent, objective,
    stored_alpha,
};
use crate::error::{Error, Result};

/// `alpha = c * mean|W|`, then nearest-level rounding of `|w| / alpha` (see the [module
/// docs](super)). `O(N)`: one pass for the mean and one for the codes.
///
/// The rule. LBW-Net (Yin, Zhang, Qi, Xin) quantizes `b >= 3` bits with a scale proportional to a
/// statistic of the weights, with one free parameter tuned by retraining. We use the mean absolute
/// weight, `alpha = c * ||W||_1 / N`, rather than `max |W|`:
/// * For any weight distribution of a fixed shape (Gaussian, Laplacian, ...) the optimal scale is
///   proportional to the distribution's scale, and `mean |W|` estimates that scale with a ratio
///   `alpha* / mean|W|` that does not depend on `N`, while `max |W|` grows with `N` and follows
///   single outliers — exactly the weights that clipping to `±alpha` should be free to sacrifice.
/// * Measured on the 85 conv layers of yolo-fastest-voc (per tensor), the ratio of the optimal scale
///   ([`super::OptimalSweep`]) to `mean|W|` varies much less across layers than its ratio to
///   `max |W|` (`tests/quant_real_models.rs` prints both).
///
/// The default `c` depends on the bit-width (more levels reach further down, so the top level moves
/// out into the tail as `b` grows) and is the value that minimises the mean relative L2 error
/// `||W - alpha Q|| / ||W||` over the yolo-fastest-voc conv layers (per tensor): see
/// [`LbwThreshold::default_scale`]. It is a starting point; the paper tunes `c` by retraining and
/// detection tests, which is what `scale` is exposed for.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LbwThreshold {
    /// The free parameter `c`; `None` uses [`LbwThreshold::default_scale`] for the bit-width.
    pub scale: Option<f32>,
}

impl LbwThreshold {
    pub fn with_scale(c: f32) -> Result<LbwThreshold> {
        if c.is_finite() && c > 0.0 {
            Ok(LbwThreshold { scale: Some(c) })
        } else {
            Err(Error::Input(format!(
                "the lbw scale parameter must be finite and positive, got {c}"
            )))
        }
    }

    /// The default `c` for a bit-width, fitted on yolo-fastest-voc (see the type's docs).
    pub fn default_scale(bits: Bits) -> f32 {
        DEFAULT_SCALES[usize::from(bits.get() - Bits::MIN)]
    }

    /// The scale this quantizer uses for a bit-width.
    pub fn scale_for(&self, bits: Bits) -> f32 {
        self.scale.unwrap_or_else(|| Self::default_scale(bits))
    }
}

/// `c` for b = 2..=8.
const DEFAULT_SCALES: [f32; 7] = [1.5, 2.0, 2.5, 3.0, 3.0, 3.0, 3.0];

impl Quantizer for LbwThreshold {
    fn method(&self) -> Method {
        Method::Lbw
    }

    fn quantize_into(&self, w: &[f32], bits: Bits, codes: &mut [Code]) -> Result<GroupScale> {
        check_finite(w)?;
        debug_assert_eq!(w.len(), codes.len());
        let mean_abs = if w.is_empty() {
            0.0
        } else {
            w.iter().map(|x| f64::from(x.abs())).sum::<f64>() / w.len() as f64
        };
        if mean_abs == 0.0 {
            codes.fill(Code::ZERO);
            return Ok(GroupScale {
                alpha: 1.0,
                objective: objective(w, codes, 1.0),
            });
        }
        let alpha = stored_alpha(f64::from(self.scale_for(bits)) * mean_abs)?;
        let inv = 1.0 / f64::from(alpha);
        let n = bits.exponents();
        for (c, &x) in codes.iter_mut().zip(w) {
            *c = match nearest_exponent(f64::from(x.abs()) * inv, n) {
                None => Code::ZERO,
                Some(e) => Code::new(x < 0.0, e),
            };
        }
        Ok(GroupScale {
            alpha,
            objective: objective(w, codes, alpha),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_nearest_level_for_its_alpha() {
        let q = LbwThreshold::with_scale(1.0).unwrap();
        // mean |w| = 1 -> alpha = 1; levels 1, 1/2 at 3 bits.
        let w = [1.9f32, -0.8, 0.6, -0.3, 0.2, 2.2];
        let mut codes = [Code::ZERO; 6];
        let s = q
            .quantize_into(&w, Bits::new(3).unwrap(), &mut codes)
            .unwrap();
        assert!((s.alpha - 1.0).abs() < 1e-6);
        let v: Vec<f32> = codes.iter().map(|c| c.value()).collect();
        assert_eq!(v, vec![1.0, -1.0, 0.5, -0.5, 0.0, 1.0]);
    }

    #[test]
    fn rejects_bad_parameters() {
        assert!(LbwThreshold::with_scale(0.0).is_err());
        assert!(LbwThreshold::with_scale(-1.0).is_err());
        assert!(LbwThreshold::with_scale(f32::NAN).is_err());
    }
}
