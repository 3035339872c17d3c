//! Weight quantizers: conv weights to a scale times zero or a signed power of two.
//!
//! # The quantized set
//!
//! This is the one place the set is defined; everything else (quantizers, bit packing, the `.lbw`
//! file, the shift-add engine) goes through [`Bits`] and [`Code`].
//!
//! For a bit-width `b` in `2..=8` a group of weights `W` (a whole tensor, or one output channel)
//! becomes `alpha * Q` with `alpha > 0` and every `Q_i` in
//!
//! ```text
//! { 0, ±2^(1-n), ..., ±2^-1, ±1 },   n = 2^(b-2)
//! ```
//!
//! (the INQ / LBW-Net convention): `b = 2` is ternary `{0, ±1}`, `b = 3` is `{0, ±1/2, ±1}`,
//! `b = 6` has the 16 exponents `2^0 .. 2^-15`, `b = 8` has 64, down to `2^-63`. One code is zero and
//! `2n` codes are a sign and an exponent index `e` in `0..n` (the value `±2^-e`), so `2n + 1 <= 2^b`
//! codes fit in `b` bits. `b` stops at 8 because `2^-127` would no longer be a normal `f32`.
//!
//! Each quantizer minimises (exactly or approximately) the objective `||W - alpha Q||^2`:
//! * [`ExactTernary`] — `b = 2`, exact, `O(N log N)`.
//! * [`LbwThreshold`] — any `b`, LBW-Net's semi-analytical rule: `alpha` from a weight statistic with
//!   one free parameter, then nearest-level rounding. Cheap (`O(N)`), not optimal.
//! * [`OptimalSweep`] — any `b`, the exact global optimum in `O(N log N + N n log n)`.
//!
//! For a fixed `alpha` the best `Q` is nearest-level rounding of `|w| / alpha` with the sign of `w`:
//! below `2^-n` (half the smallest level) it is 0, between `2^-(e+1)` and `2^-e` the cut is at the
//! midpoint `3/4 * 2^-e`, and everything above 1 clips to 1. For a fixed `Q` the best `alpha` is
//! `<|W|, |Q|> / ||Q||^2`. A group of all-zero weights gets `alpha = 1` and all-zero codes: `alpha` is
//! always finite and positive, so engines may divide by it or take its logarithm.

mod lbw_threshold;
mod model;
mod npy;
mod optimal;
mod pack;
mod ternary;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::Tensor;

pub use lbw_threshold::LbwThreshold;
pub use model::{
    LayerKind, LayerReport, QuantReport, QuantizeOptions, QuantizedModel, quantize_graph,
    simulate_graph,
};
pub use npy::{read_npy, read_npy_file, write_npy, write_npy_file};
pub use optimal::OptimalSweep;
pub use pack::{pack_codes, packed_len, unpack_codes};
pub use ternary::{ExactTernary, sort_magnitudes_descending};

/// A validated bit-width `b` in `2..=8`; see the [module docs](self) for the set it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Bits(u8);

impl Bits {
    pub const MIN: u8 = 2;
    pub const MAX: u8 = 8;

    pub fn new(bits: u8) -> Result<Bits> {
        if (Self::MIN..=Self::MAX).contains(&bits) {
            Ok(Bits(bits))
        } else {
            Err(Error::Input(format!(
                "bit-width must be in {}..={}, got {bits}",
                Self::MIN,
                Self::MAX
            )))
        }
    }

    pub fn get(self) -> u8 {
        self.0
    }

    /// `n = 2^(b-2)`: how many non-zero magnitudes `2^0 .. 2^(1-n)` there are.
    pub fn exponents(self) -> usize {
        1 << (self.0 - 2)
    }

    /// The non-zero magnitudes, largest first: `1, 1/2, ..., 2^(1-n)`.
    pub fn levels(self) -> impl Iterator<Item = f64> {
        (0..self.exponents()).map(|e| pow2_neg(e as u32))
    }
}

impl TryFrom<u8> for Bits {
    type Error = Error;
    fn try_from(b: u8) -> Result<Bits> {
        Bits::new(b)
    }
}

impl From<Bits> for u8 {
    fn from(b: Bits) -> u8 {
        b.0
    }
}

impl fmt::Display for Bits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// `2^-e` as an f64, exact for `e <= 1022`.
fn pow2_neg(e: u32) -> f64 {
    f64::from_bits(((1023 - e as u64) & 0x7ff) << 52)
}

/// One quantized weight: zero, or a sign and an exponent index `e` (the value `±2^-e`).
///
/// The in-memory form does not depend on the bit-width (bit 7 is the sign, the low 7 bits are 0 for
/// zero and `e + 1` otherwise) so one buffer type serves every `b`; [`Code::to_field`] and
/// [`Code::from_field`] convert to and from the `b`-bit field stored in files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Code(u8);

impl Code {
    pub const ZERO: Code = Code(0);
    const SIGN: u8 = 0x80;

    /// `±2^-exponent`. `exponent` must be below the bit-width's [`Bits::exponents`] (at most 63).
    pub fn new(negative: bool, exponent: u8) -> Code {
        debug_assert!(exponent < 64);
        Code((if negative { Self::SIGN } else { 0 }) | (exponent + 1))
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    pub fn is_negative(self) -> bool {
        self.0 & Self::SIGN != 0
    }

    /// `Some(e)` for `±2^-e`, `None` for zero.
    pub fn exponent(self) -> Option<u8> {
        (self.0 & !Self::SIGN).checked_sub(1)
    }

    /// The level as a float: `0` or `±2^-e` (exact).
    pub fn value(self) -> f32 {
        match self.exponent() {
            None => 0.0,
            Some(e) => {
                let m = f32::from_bits((127 - u32::from(e)) << 23);
                if self.is_negative() { -m } else { m }
            }
        }
    }

    /// `|value|` as an f64.
    fn magnitude(self) -> f64 {
        self.exponent().map_or(0.0, |e| pow2_neg(u32::from(e)))
    }

    /// The `b`-bit field: the top bit is the sign, the low `b - 1` bits are 0 for zero and `e + 1`
    /// otherwise. Sign-magnitude keeps the shift amount readable straight off the field.
    pub fn to_field(self, bits: Bits) -> u32 {
        let mag = u32::from(self.0 & !Self::SIGN);
        let sign = u32::from(self.is_negative()) << (bits.get() - 1);
        sign | mag
    }

    /// Decodes a `b`-bit field; `None` for the fields no quantizer writes (a magnitude past `n`, or a
    /// negative zero), which a loader must treat as corruption.
    pub fn from_field(field: u32, bits: Bits) -> Option<Code> {
        let b = bits.get();
        if field >> b != 0 {
            return None;
        }
        let negative = field >> (b - 1) != 0;
        let mag = field & ((1 << (b - 1)) - 1);
        match mag {
            0 if negative => None,
            0 => Some(Code::ZERO),
            m if m as usize <= bits.exponents() => Some(Code::new(negative, (m - 1) as u8)),
            _ => None,
        }
    }
}

/// A weight tensor in quantized form: codes in the tensor's C order and one `alpha` per group.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedTensor {
    pub bits: Bits,
    pub shape: Vec<usize>,
    /// One scale for the whole tensor, or one per output channel (the first axis).
    pub alphas: Vec<f32>,
    pub codes: Vec<Code>,
    /// `||W - alpha Q||^2` summed over groups, for the weights this was made from (with the `f32`
    /// alphas actually stored).
    pub objective: f64,
}

impl QuantizedTensor {
    pub fn len(&self) -> usize {
        self.codes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }

    pub fn is_per_channel(&self) -> bool {
        self.alphas.len() != 1
    }

    /// Weights per `alpha`.
    pub fn group_len(&self) -> usize {
        if self.alphas.is_empty() {
            0
        } else {
            self.codes.len() / self.alphas.len()
        }
    }

    /// `alpha * Q` as floats, in C order.
    pub fn dequantize(&self) -> Vec<f32> {
        let g = self.group_len().max(1);
        self.codes
            .chunks(g)
            .zip(&self.alphas)
            .flat_map(|(codes, &a)| codes.iter().map(move |c| a * c.value()))
            .collect()
    }

    pub fn to_tensor(&self) -> Tensor {
        Tensor {
            shape: self.shape.clone(),
            data: self.dequantize(),
        }
    }

    pub fn zero_fraction(&self) -> f64 {
        if self.codes.is_empty() {
            return 0.0;
        }
        self.codes.iter().filter(|c| c.is_zero()).count() as f64 / self.codes.len() as f64
    }

    /// Bytes of the codes packed at `b` bits per weight.
    pub fn packed_code_bytes(&self) -> usize {
        packed_len(self.codes.len(), self.bits)
    }

    /// Bytes to store this tensor: packed codes plus the `f32` alphas.
    pub fn packed_bytes(&self) -> usize {
        self.packed_code_bytes() + 4 * self.alphas.len()
    }

    /// Checks the invariants a loader or engine relies on: the shape matches the codes, alphas are
    /// per tensor or per output channel, finite and positive, and every code is in the set.
    pub fn validate(&self) -> Result<()> {
        let n = checked_product(&self.shape)
            .ok_or_else(|| Error::Model(format!("shape {:?} overflows", self.shape)))?;
        if n != self.codes.len() {
            return Err(Error::Model(format!(
                "quantized tensor of shape {:?} has {} codes",
                self.shape,
                self.codes.len()
            )));
        }
        let groups_ok = self.alphas.len() == 1
            || (self.shape.first() == Some(&self.alphas.len()) && !self.alphas.is_empty());
        if !groups_ok {
            return Err(Error::Model(format!(
                "{} alphas for a tensor of shape {:?}: need 1 or one per output channel",
                self.alphas.len(),
                self.shape
            )));
        }
        if let Some(a) = self.alphas.iter().find(|a| !(a.is_finite() && **a > 0.0)) {
            return Err(Error::Model(format!(
                "alpha {a} is not finite and positive"
            )));
        }
        let n_exp = self.bits.exponents();
        if self
            .codes
            .iter()
            .any(|c| c.exponent().is_some_and(|e| e as usize >= n_exp))
        {
            return Err(Error::Model(format!(
                "a code has an exponent outside the {}-bit set",
                self.bits
            )));
        }
        Ok(())
    }
}

/// Product of dimensions, `None` on overflow.
pub(crate) fn checked_product(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// One group's result: its scale and its share of the objective.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupScale {
    pub alpha: f32,
    pub objective: f64,
}

/// A weight quantizer. Implementations quantize one group with one scale; per-channel quantization
/// and tensor bookkeeping are provided on top.
pub trait Quantizer: Sync {
    fn method(&self) -> Method;

    /// Quantizes `w` with one scale, writing one code per weight into `codes` (same length).
    /// Non-finite weights are an [`Error::Input`].
    fn quantize_into(&self, w: &[f32], bits: Bits, codes: &mut [Code]) -> Result<GroupScale>;

    /// Quantizes a flat group with one scale (shape `[N]`).
    fn quantize(&self, w: &[f32], bits: Bits) -> Result<QuantizedTensor> {
        self.quantize_tensor(w, &[w.len()], bits, false)
    }

    /// Quantizes a tensor, with one scale or one per output channel (the first axis, as in a conv
    /// weight `[out, in / groups, kh, kw]`).
    fn quantize_tensor(
        &self,
        w: &[f32],
        shape: &[usize],
        bits: Bits,
        per_channel: bool,
    ) -> Result<QuantizedTensor> {
        quantize_groups(self, w, shape, bits, per_channel)
    }
}

/// The shared body of [`Quantizer::quantize_tensor`]: splits into groups, quantizes each with
/// [`Quantizer::quantize_into`], and collects alphas and the objective.
pub fn quantize_groups<Q: Quantizer + ?Sized>(
    q: &Q,
    w: &[f32],
    shape: &[usize],
    bits: Bits,
    per_channel: bool,
) -> Result<QuantizedTensor> {
    if checked_product(shape) != Some(w.len()) {
        return Err(Error::Input(format!(
            "shape {shape:?} does not hold {} values",
            w.len()
        )));
    }
    check_finite(w)?;
    let mut codes = vec![Code::ZERO; w.len()];
    let groups = if per_channel {
        match shape.first() {
            Some(&c) if c > 0 => c,
            _ => {
                return Err(Error::Input(format!(
                    "per-channel quantization needs a non-empty first axis, shape is {shape:?}"
                )));
            }
        }
    } else {
        1
    };
    let g = w.len() / groups;
    let mut alphas = Vec::with_capacity(groups);
    let mut objective = 0.0;
    if g == 0 {
        alphas.resize(groups, 1.0);
    } else {
        for (wg, cg) in w.chunks(g).zip(codes.chunks_mut(g)) {
            let s = q.quantize_into(wg, bits, cg)?;
            alphas.push(s.alpha);
            objective += s.objective;
        }
    }
    Ok(QuantizedTensor {
        bits,
        shape: shape.to_vec(),
        alphas,
        codes,
        objective,
    })
}

/// Codes for given scales: one alpha per tensor (`alphas.len() == 1`) or per output channel, each
/// weight rounded to the nearest level of its group's `alpha * {0, ±2^-e}`. For a fixed alpha this
/// is the least-squares choice of codes whatever the method, which is why retraining with learned
/// scales (`lbw finetune`) can share it across `lbw`, `optimal` and `ternary`.
pub fn quantize_with_alphas(
    w: &[f32],
    shape: &[usize],
    bits: Bits,
    alphas: &[f32],
) -> Result<QuantizedTensor> {
    if checked_product(shape) != Some(w.len()) {
        return Err(Error::Input(format!(
            "shape {shape:?} does not hold {} values",
            w.len()
        )));
    }
    let groups = alphas.len();
    if groups != 1 && shape.first() != Some(&groups) {
        return Err(Error::Input(format!(
            "{groups} scales fit neither one per tensor nor one per output channel of shape \
             {shape:?}"
        )));
    }
    check_finite(w)?;
    let alphas = alphas
        .iter()
        .map(|&a| stored_alpha(f64::from(a)))
        .collect::<Result<Vec<f32>>>()?;
    let mut codes = vec![Code::ZERO; w.len()];
    let g = w.len() / groups;
    let mut objective_sum = 0.0;
    if g > 0 {
        for ((wg, cg), &alpha) in w.chunks(g).zip(codes.chunks_mut(g)).zip(&alphas) {
            round_to_levels(wg, alpha, bits, cg);
            objective_sum += objective(wg, cg, alpha);
        }
    }
    Ok(QuantizedTensor {
        bits,
        shape: shape.to_vec(),
        alphas,
        codes,
        objective: objective_sum,
    })
}

/// Rejects NaN and infinite weights, naming the first one.
pub fn check_finite(w: &[f32]) -> Result<()> {
    match w.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::Input(format!(
            "weight {i} is {}: only finite weights can be quantized",
            w[i]
        ))),
    }
}

/// The best scale for fixed codes, `<|W|, |Q|> / ||Q||^2`, or 1 when every code is zero.
fn best_alpha(w: &[f32], codes: &[Code]) -> f64 {
    let (mut a, mut b) = (0.0f64, 0.0f64);
    for (&x, &c) in w.iter().zip(codes) {
        let m = c.magnitude();
        a += f64::from(x.abs()) * m;
        b += m * m;
    }
    if b > 0.0 { a / b } else { 1.0 }
}

/// Rounds a scale to the `f32` that is stored, refusing one that does not fit (weights near
/// `f32::MAX` can need `alpha` up to 4/3 of the largest).
fn stored_alpha(alpha: f64) -> Result<f32> {
    let a = alpha as f32;
    if a.is_finite() && a > 0.0 {
        Ok(a)
    } else {
        Err(Error::Input(format!(
            "the scale {alpha:e} does not fit a positive f32 (weights too large or too small)"
        )))
    }
}

/// `||W - alpha Q||^2` in f64 with the stored `f32` alpha.
fn objective(w: &[f32], codes: &[Code], alpha: f32) -> f64 {
    let a = f64::from(alpha);
    w.iter()
        .zip(codes)
        .map(|(&x, &c)| {
            let q = f64::from(c.value());
            let d = f64::from(x) - a * q;
            d * d
        })
        .sum()
}

/// Finishes a group whose codes are fixed: the best alpha for them, stored as f32, and the objective.
fn finish_with_best_alpha(w: &[f32], codes: &[Code]) -> Result<GroupScale> {
    let alpha = stored_alpha(best_alpha(w, codes))?;
    Ok(GroupScale {
        alpha,
        objective: objective(w, codes, alpha),
    })
}

/// Each weight's nearest level of `alpha * {0, ±2^-e}` (`alpha > 0`).
fn round_to_levels(w: &[f32], alpha: f32, bits: Bits, codes: &mut [Code]) {
    let inv = 1.0 / f64::from(alpha);
    let n = bits.exponents();
    for (c, &x) in codes.iter_mut().zip(w) {
        *c = match nearest_exponent(f64::from(x.abs()) * inv, n) {
            None => Code::ZERO,
            Some(e) => Code::new(x < 0.0, e),
        };
    }
}

/// Nearest-level rounding of `x = |w| / alpha >= 0`: `None` for zero, else the exponent index.
///
/// Below `2^-n` (half the smallest level) is zero; otherwise the exponent is the smallest `e` with
/// `x >= 3/4 * 2^-e`, clipped to `n - 1`. Exactly-on-threshold inputs may go either way: both
/// neighbours are then equally near.
fn nearest_exponent(x: f64, n: usize) -> Option<u8> {
    // x is never NaN here (|w| and alpha are finite, alpha > 0).
    if x < pow2_neg(n as u32) {
        return None;
    }
    if x >= 0.75 {
        return Some(0);
    }
    // y = x / (3/4) lies in [2^-e, 2^(1-e)) exactly when 3/4 * 2^-e <= x < 3/4 * 2^(1-e); its binary
    // exponent is -e.
    let y = x * (4.0 / 3.0);
    let biased = ((y.to_bits() >> 52) & 0x7ff) as i64;
    let e = (1023 - biased).clamp(0, n as i64 - 1);
    Some(e as u8)
}

/// Which quantizer to run: `ternary` ([`ExactTernary`], 2 bits only), `lbw` ([`LbwThreshold`]) or
/// `optimal` ([`OptimalSweep`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Ternary,
    Lbw,
    Optimal,
}

impl Method {
    pub const ALL: [Method; 3] = [Method::Ternary, Method::Lbw, Method::Optimal];

    pub fn name(self) -> &'static str {
        match self {
            Method::Ternary => "ternary",
            Method::Lbw => "lbw",
            Method::Optimal => "optimal",
        }
    }

    /// The quantizer for this method. `param` is [`LbwThreshold`]'s free parameter (its default
    /// for the bit-width and grouping when `None`); the exact methods have none and refuse one.
    pub fn quantizer(self, param: Option<f32>) -> Result<Box<dyn Quantizer>> {
        match (self, param) {
            (Method::Lbw, None) => Ok(Box::new(LbwThreshold::default())),
            (Method::Lbw, Some(c)) => Ok(Box::new(LbwThreshold::with_scale(c)?)),
            (Method::Ternary, None) => Ok(Box::new(ExactTernary)),
            (Method::Optimal, None) => Ok(Box::new(OptimalSweep)),
            (m, Some(_)) => Err(Error::Input(format!(
                "method {m} is exact and takes no free parameter"
            ))),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Method> {
        Method::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                Error::Input(format!(
                    "unknown quantization method {s:?}: expected ternary, lbw or optimal"
                ))
            })
    }
}

/// What `lbw quantize-tensor` prints and writes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorReport {
    pub bits: u8,
    pub method: Method,
    pub per_channel: bool,
    pub shape: Vec<usize>,
    pub alphas: Vec<f32>,
    /// `||W - alpha Q||^2`.
    pub objective: f64,
    /// `||W - alpha Q|| / ||W||` (0 for an all-zero tensor).
    pub relative_error: f64,
    pub zero_fraction: f64,
    pub packed_bytes: usize,
    /// `alpha * Q` in C order.
    #[serde(skip)]
    pub values: Vec<f32>,
    #[serde(skip)]
    pub quantized: QuantizedTensor,
}

/// Quantizes one tensor with the chosen method (the library side of `lbw quantize-tensor`).
pub fn quantize_tensor(
    values: &[f32],
    shape: &[usize],
    bits: u8,
    method: Method,
    param: Option<f32>,
    per_channel: bool,
) -> Result<TensorReport> {
    let bits = Bits::new(bits)?;
    let q = method.quantizer(param)?;
    let qt = q.quantize_tensor(values, shape, bits, per_channel)?;
    Ok(TensorReport {
        bits: bits.get(),
        method,
        per_channel,
        shape: shape.to_vec(),
        alphas: qt.alphas.clone(),
        objective: qt.objective,
        relative_error: relative_error(values, qt.objective),
        zero_fraction: qt.zero_fraction(),
        packed_bytes: qt.packed_bytes(),
        values: qt.dequantize(),
        quantized: qt,
    })
}

/// `sqrt(objective) / ||W||`, 0 when `W` is all zero.
pub fn relative_error(w: &[f32], objective: f64) -> f64 {
    let norm2: f64 = w.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    if norm2 > 0.0 {
        (objective / norm2).sqrt()
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_define_the_set() {
        assert!(Bits::new(1).is_err());
        assert!(Bits::new(9).is_err());
        let levels: Vec<f64> = Bits::new(3).unwrap().levels().collect();
        assert_eq!(levels, vec![1.0, 0.5]);
        assert_eq!(Bits::new(2).unwrap().exponents(), 1);
        assert_eq!(Bits::new(6).unwrap().exponents(), 16);
        let b8: Vec<f64> = Bits::new(8).unwrap().levels().collect();
        assert_eq!(b8.len(), 64);
        assert_eq!(*b8.last().unwrap(), 2f64.powi(-63));
    }

    #[test]
    fn code_values_and_fields() {
        for b in 2..=8 {
            let bits = Bits::new(b).unwrap();
            let n = bits.exponents();
            assert_eq!(Code::from_field(0, bits), Some(Code::ZERO));
            // Negative zero is reserved.
            assert_eq!(Code::from_field(1 << (b - 1), bits), None);
            for e in 0..n as u8 {
                for neg in [false, true] {
                    let c = Code::new(neg, e);
                    let v = c.value();
                    assert_eq!(v.abs(), 2f32.powi(-i32::from(e)));
                    assert_eq!(v < 0.0, neg);
                    let f = c.to_field(bits);
                    assert!(f < 1 << b);
                    assert_eq!(Code::from_field(f, bits), Some(c));
                }
            }
            // One past the last magnitude is invalid where it fits in the field.
            if n + 1 < 1 << (b - 1) {
                assert_eq!(Code::from_field(n as u32 + 1, bits), None);
            }
        }
    }

    #[test]
    fn nearest_rounding_thresholds() {
        // n = 2: levels 1, 1/2; zero below 1/4, cut between 1/2 and 1 at 3/4.
        assert_eq!(nearest_exponent(0.0, 2), None);
        assert_eq!(nearest_exponent(0.2499, 2), None);
        assert_eq!(nearest_exponent(0.2501, 2), Some(1));
        assert_eq!(nearest_exponent(0.7499, 2), Some(1));
        assert_eq!(nearest_exponent(0.7501, 2), Some(0));
        assert_eq!(nearest_exponent(50.0, 2), Some(0));
        // n = 4: levels 1 .. 1/8, zero below 1/16.
        assert_eq!(nearest_exponent(0.1, 4), Some(3));
        assert_eq!(nearest_exponent(0.2, 4), Some(2));
        assert_eq!(nearest_exponent(0.0624, 4), None);
        // Brute force over a grid.
        for n in [1usize, 2, 3, 8] {
            for i in 0..4000 {
                let x = i as f64 / 1000.0 + 1e-7;
                let levels: Vec<f64> = (0..n).map(|e| pow2_neg(e as u32)).collect();
                let best_zero = x * x;
                let (be, bd) = levels
                    .iter()
                    .enumerate()
                    .map(|(e, l)| (e, (x - l).abs()))
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .unwrap();
                let got = nearest_exponent(x, n);
                let want = if best_zero.sqrt() < bd {
                    None
                } else {
                    Some(be as u8)
                };
                assert_eq!(got, want, "x={x} n={n}");
            }
        }
    }

    #[test]
    fn method_parses() {
        assert_eq!("lbw".parse::<Method>().unwrap(), Method::Lbw);
        assert_eq!("Optimal".parse::<Method>().unwrap(), Method::Optimal);
        assert_eq!("ternary".parse::<Method>().unwrap(), Method::Ternary);
        assert!("int8".parse::<Method>().is_err());
    }

    #[test]
    fn non_finite_weights_are_errors() {
        let bits = Bits::new(3).unwrap();
        for m in Method::ALL {
            let q = m.quantizer(None).unwrap();
            let bits = if m == Method::Ternary {
                Bits::new(2).unwrap()
            } else {
                bits
            };
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let w = [0.5, bad, 1.0];
                assert!(matches!(q.quantize(&w, bits), Err(Error::Input(_))));
                let mut codes = [Code::ZERO; 3];
                assert!(q.quantize_into(&w, bits, &mut codes).is_err());
            }
        }
    }
}
