//! LBW-Net's semi-analytical quantizer: a closed-form scale with one free parameter.

use super::{
    Bits, Code, GroupScale, Method, QuantizedTensor, Quantizer, check_finite, objective,
    quantize_groups, round_to_levels, stored_alpha,
};
use crate::error::{Error, Result};

/// `alpha = c * max|W|`, then nearest-level rounding of `|w| / alpha` (see the [module
/// docs](super)). `O(N)`: one pass for the maximum and one for the codes.
///
/// The rule. LBW-Net (Yin, Zhang, Qi, Xin) quantizes `b >= 3` bits with a scale proportional to a
/// statistic of the weights, with one free parameter tuned by retraining. We use the largest
/// magnitude, `alpha = c * ||W||_inf`, rather than the mean magnitude, because on real detector
/// layers it is the statistic the optimal scale follows: over the 85 conv layers of
/// yolo-fastest-voc (per tensor), the ratio of [`super::OptimalSweep`]'s exact scale to `max|W|`
/// varies across layers 2-3x less (coefficient of variation 0.47 / 0.36 / 0.23 / 0.14 at b = 2 / 3
/// / 4 / 5+) than its ratio to `mean|W|` (0.93 / 0.78 / 0.53 / 0.43). The reason is structural:
/// the top level `alpha` has to sit near the largest weights, and with BatchNorm folded into the
/// convs a layer's weights are a mixture of channels of very different scales, so the mean says
/// little about where the top of the distribution is. From 5 bits on there are enough levels that
/// the optimum puts `alpha` at the largest weight (`alpha* / max|W|` = 0.98 on average).
/// `tests/quant_real_models.rs` recomputes these numbers and checks the claims.
///
/// The default `c` depends on the bit-width (with few levels it pays to clip the tail so the
/// levels cover the bulk of the weights) and on the grouping (a whole tensor's tail is longer than
/// one channel's), and is the value, on a 0.01 grid, that minimises the mean relative L2 error
/// `||W - alpha Q|| / ||W||` over the yolo-fastest-voc conv layers: see
/// [`LbwThreshold::default_scale`]. The paper tunes `c` by retraining and detection tests, which is
/// what `scale` is exposed for and what `bench/sweep_lbw_param.sh` does: at 4 bits per channel the
/// fitted 0.95 retrained best of 0.75 / 0.85 / 0.95 / 1.05 (docs/ACCURACY.md), so the fits stay.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LbwThreshold {
    /// The free parameter `c`; `None` uses [`LbwThreshold::default_scale`] for the bit-width and
    /// grouping (per tensor when called through [`Quantizer::quantize_into`] directly).
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

    /// The default `c` for a bit-width and grouping, fitted on yolo-fastest-voc (see the type's
    /// docs; `tests/quant_real_models.rs` refits it and checks these values).
    pub fn default_scale(bits: Bits, per_channel: bool) -> f32 {
        let i = usize::from(bits.get() - Bits::MIN);
        if per_channel {
            DEFAULT_SCALES_PER_CHANNEL[i]
        } else {
            DEFAULT_SCALES_PER_TENSOR[i]
        }
    }
}

/// `c` for b = 2..=8, one alpha per tensor. Mean relative error at these values: 0.531, 0.380,
/// 0.220, 0.187 from b = 5 on (the exact optimum: 0.482, 0.339, 0.206, 0.182).
const DEFAULT_SCALES_PER_TENSOR: [f32; 7] = [0.28, 0.40, 0.79, 0.96, 0.96, 0.96, 0.96];
/// `c` for b = 2..=8, one alpha per output channel. Mean relative error: 0.442, 0.276, 0.169,
/// 0.164 from b = 5 on (the exact optimum: 0.401, 0.251, 0.152, 0.147).
const DEFAULT_SCALES_PER_CHANNEL: [f32; 7] = [0.57, 0.78, 0.95, 0.96, 0.96, 0.96, 0.96];

impl Quantizer for LbwThreshold {
    fn method(&self) -> Method {
        Method::Lbw
    }

    /// As the trait's, but an unset scale defaults according to the grouping.
    fn quantize_tensor(
        &self,
        w: &[f32],
        shape: &[usize],
        bits: Bits,
        per_channel: bool,
    ) -> Result<QuantizedTensor> {
        let q = LbwThreshold {
            scale: Some(
                self.scale
                    .unwrap_or_else(|| Self::default_scale(bits, per_channel)),
            ),
        };
        quantize_groups(&q, w, shape, bits, per_channel)
    }

    fn quantize_into(&self, w: &[f32], bits: Bits, codes: &mut [Code]) -> Result<GroupScale> {
        check_finite(w)?;
        debug_assert_eq!(w.len(), codes.len());
        let max_abs = w.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        if max_abs == 0.0 {
            codes.fill(Code::ZERO);
            return Ok(GroupScale {
                alpha: 1.0,
                objective: objective(w, codes, 1.0),
            });
        }
        let c = self
            .scale
            .unwrap_or_else(|| Self::default_scale(bits, false));
        let alpha = stored_alpha(f64::from(c) * f64::from(max_abs))?;
        round_to_levels(w, alpha, bits, codes);
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
        // max |w| = 2, c = 0.5 -> alpha = 1; levels 1, 1/2 at 3 bits.
        let q = LbwThreshold::with_scale(0.5).unwrap();
        let w = [1.9f32, -0.8, 0.6, -0.3, 0.2, 2.0];
        let mut codes = [Code::ZERO; 6];
        let s = q
            .quantize_into(&w, Bits::new(3).unwrap(), &mut codes)
            .unwrap();
        assert_eq!(s.alpha, 1.0);
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
