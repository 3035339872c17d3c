//! 8-bit activation quantization: per-tensor affine parameters and their calibration.
//!
//! Every activation the shift-add engine stores is a `u8` code `q` standing for `scale * (q - zp)`.
//! One unsigned type with a zero point serves ReLU outputs (`zp = 0`), LeakyReLU outputs (a small
//! `zp`: the negative side is only `0.1x` wide) and linear conv / residual outputs (`zp` near the
//! middle) without wasting a bit on a sign the value rarely needs. The zero point costs nothing in
//! the conv inner loop: `sum w (q - zp) = sum w q - zp sum w`, and `zp sum w` is a per-channel
//! constant folded into the bias (padding is filled with `zp`, i.e. the real value 0, so it holds at
//! the borders too). Zero is always exactly representable.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::engine::reference::ReferenceInterpreter;
use crate::error::{Error, Result};
use crate::model::{Graph, Tensor};

/// `x ≈ scale * (q - zero_point)`, `q` in `0..=255`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QParams {
    pub scale: f32,
    pub zero_point: u8,
}

impl QParams {
    /// The grid covering `[min, max]` widened to include 0.
    pub fn from_range(min: f32, max: f32) -> QParams {
        let lo = min.min(0.0);
        let hi = max.max(0.0);
        let span = hi - lo;
        if !(span.is_finite() && span > 1e-12) {
            return QParams {
                scale: 1.0 / 255.0,
                zero_point: 0,
            };
        }
        let scale = span / 255.0;
        let zero_point = (-lo / scale).round_ties_even().clamp(0.0, 255.0) as u8;
        QParams { scale, zero_point }
    }

    /// Nearest code (ties to even, as the SIMD conversion does), saturated to `0..=255`.
    #[inline]
    pub fn quantize(self, x: f32) -> u8 {
        // A multiply by the reciprocal (hoisted out of loops) rather than a divide: the FP32
        // simulation calls this same function, so both round identically.
        let r = round_half_even_small((x * (1.0 / self.scale)).clamp(-1024.0, 1024.0));
        (r as i32 + i32::from(self.zero_point)).clamp(0, 255) as u8
    }

    #[inline]
    pub fn dequantize(self, q: u8) -> f32 {
        (f32::from(q) - f32::from(self.zero_point)) * self.scale
    }

    /// `dequantize(quantize(x))`: the value the integer engine actually carries.
    #[inline]
    pub fn fake_quant(self, x: f32) -> f32 {
        self.dequantize(self.quantize(x))
    }

    /// Real range the codes cover.
    pub fn range(self) -> (f32, f32) {
        (self.dequantize(0), self.dequantize(255))
    }
}

/// Rounds `|t| <= 2^22` to the nearest integer, ties to even, with two adds: adding `1.5 * 2^23`
/// leaves no fraction bits, so the FPU's default rounding does the work. Unlike
/// `f32::round_ties_even` (a libm call without SSE4.1) it vectorises on every x86_64.
#[inline]
pub fn round_half_even_small(t: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (t + MAGIC) - MAGIC
}

/// How a tensor's range is taken from the calibration images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RangeObserver {
    /// The mean over images of each image's min and max. One image with an outlier activation
    /// moves the range by 1/N of the outlier instead of stretching the grid for every image, so
    /// the common case keeps its resolution (the tail is clipped); this is the default.
    MeanMinMax,
    /// The min and max over all images: nothing clips, at the cost of resolution.
    MinMax,
}

/// Per-value min/max statistics collected over calibration images.
#[derive(Debug, Clone, Default)]
pub struct RangeStats {
    /// value name -> (sum of per-image min, sum of per-image max, global min, global max)
    stats: BTreeMap<String, [f64; 4]>,
    images: usize,
}

impl RangeStats {
    pub fn images(&self) -> usize {
        self.images
    }

    /// Runs `graph` in f32 on `input` and adds every value's range.
    pub fn observe(&mut self, interp: &ReferenceInterpreter, input: Tensor) -> Result<()> {
        let stats = &mut self.stats;
        interp.run_observed(input, &mut |name, t| {
            let (mn, mx) = t
                .data
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
                    (a.min(x), b.max(x))
                });
            let e = stats.entry(name.to_string()).or_insert([
                0.0,
                0.0,
                f64::INFINITY,
                f64::NEG_INFINITY,
            ]);
            e[0] += f64::from(mn);
            e[1] += f64::from(mx);
            e[2] = e[2].min(f64::from(mn));
            e[3] = e[3].max(f64::from(mx));
        })?;
        self.images += 1;
        Ok(())
    }

    /// One grid per observed value.
    pub fn finish(&self, observer: RangeObserver) -> Result<ActivationScales> {
        if self.images == 0 {
            return Err(Error::Input("calibration needs at least one image".into()));
        }
        let n = self.images as f64;
        let scales = self
            .stats
            .iter()
            .map(|(k, s)| {
                let (lo, hi) = match observer {
                    RangeObserver::MeanMinMax => (s[0] / n, s[1] / n),
                    RangeObserver::MinMax => (s[2], s[3]),
                };
                (k.clone(), QParams::from_range(lo as f32, hi as f32))
            })
            .collect();
        Ok(ActivationScales { scales })
    }
}

/// Activation grids by value name: what calibration produces and the engine consumes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ActivationScales {
    pub scales: BTreeMap<String, QParams>,
}

impl ActivationScales {
    pub fn get(&self, name: &str) -> Option<QParams> {
        self.scales.get(name).copied()
    }

    /// The subset for the named values, as a map for [`ReferenceInterpreter::with_fake_quant`].
    pub fn select<'a>(
        &self,
        names: impl IntoIterator<Item = &'a String>,
    ) -> Result<HashMap<String, QParams>> {
        names
            .into_iter()
            .map(|n| {
                self.get(n)
                    .map(|p| (n.clone(), p))
                    .ok_or_else(|| Error::Model(format!("no activation scale for value {n:?}")))
            })
            .collect()
    }
}

/// Observes `images` (already preprocessed inputs) on `graph` in f32 and returns every value's grid.
///
/// Pass the graph with the weights the engine will run (the dequantized power-of-two weights),
/// not the FP32 original: quantized weights change the activation ranges.
pub fn calibrate(
    graph: &Graph,
    images: impl IntoIterator<Item = Tensor>,
    observer: RangeObserver,
) -> Result<ActivationScales> {
    let interp = ReferenceInterpreter::new(graph)?;
    let mut stats = RangeStats::default();
    for img in images {
        stats.observe(&interp, img)?;
    }
    stats.finish(observer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_contains_zero_and_endpoints() {
        let p = QParams::from_range(-1.0, 3.0);
        assert_eq!(p.fake_quant(0.0), 0.0);
        assert!((p.fake_quant(3.0) - 3.0).abs() <= p.scale);
        assert!((p.fake_quant(-1.0) + 1.0).abs() <= p.scale);
        assert_eq!(p.quantize(100.0), 255);
        assert_eq!(p.quantize(-100.0), 0);
        let relu = QParams::from_range(0.5, 2.0);
        assert_eq!(relu.zero_point, 0);
        for t in [-2.5f32, -1.5, -0.5, 0.5, 1.5, 2.5, 3.49, -1023.5, 1024.0] {
            assert_eq!(round_half_even_small(t), t.round_ties_even(), "{t}");
        }
        let unit = QParams::from_range(0.0, 1.0);
        for px in 0..=255u8 {
            assert_eq!(unit.quantize(f32::from(px) / 255.0), px);
        }
    }
}
