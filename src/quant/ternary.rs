//! Exact ternary quantization (`b = 2`): `Q` in `{0, ±1}`.

use super::{Bits, Code, GroupScale, Method, Quantizer, check_finite, stored_alpha};
use crate::error::{Error, Result};

/// The exact minimiser of `||W - alpha Q||^2` over `alpha > 0`, `Q` in `{0, ±1}^N`, in `O(N log N)`.
///
/// With `k` non-zeros the best choice is the `k` largest `|w|` with their signs and
/// `alpha = S_k / k` (`S_k` their sum), leaving `||W||^2 - S_k^2 / k`; so sort `|W|` descending, take
/// prefix sums and maximise `S_k^2 / k`. Only `k` at the end of a run of equal magnitudes are
/// candidates: if the optimum split a run, each tied weight would sit exactly at the cut `alpha / 2`
/// and could go either way at equal cost, so including the whole run is optimal too. That keeps
/// the result a function of `|w|` alone — equal weights always get equal codes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExactTernary;

impl Quantizer for ExactTernary {
    fn method(&self) -> Method {
        Method::Ternary
    }

    fn quantize_into(&self, w: &[f32], bits: Bits, codes: &mut [Code]) -> Result<GroupScale> {
        if bits.get() != 2 {
            return Err(Error::Input(format!(
                "exact ternary quantization is for 2 bits, not {bits} (use lbw or optimal)"
            )));
        }
        debug_assert_eq!(w.len(), codes.len());
        // Ascending |w| bit patterns; this pass also rejects NaN and infinities.
        let keys = sorted_abs_keys(w)?;
        let zeros = keys.partition_point(|&k| k == 0);
        // Scan k = 1, 2, ... largest magnitudes, i.e. the keys from the top down.
        let mut sum = 0.0f64;
        let mut best: Option<(f64, usize, f64)> = None; // (gain, k, S_k)
        let top = &keys[zeros..];
        for (i, &key) in top.iter().enumerate().rev() {
            sum += f64::from(f32::from_bits(key));
            let k = top.len() - i;
            // Only at the end of a run of equal magnitudes (see the type's docs).
            if i == 0 || top[i - 1] != key {
                let gain = sum * sum / k as f64;
                if best.is_none_or(|(g, _, _)| gain > g) {
                    best = Some((gain, k, sum));
                }
            }
        }
        let Some((_, k, sum)) = best else {
            // All zero (or empty): alpha 1, zero codes, and W itself is 0.
            codes.fill(Code::ZERO);
            return Ok(GroupScale {
                alpha: 1.0,
                objective: 0.0,
            });
        };
        let threshold = f32::from_bits(top[top.len() - k]);
        let alpha = stored_alpha(sum / k as f64)?;
        // Codes and objective in one pass, branch-free: which side of the threshold a weight falls
        // on is a coin toss for the branch predictor. With s = 1 for a kept weight and 0 otherwise,
        // (w - alpha q)^2 = (|w| - alpha s)^2.
        let a = f64::from(alpha);
        let (plus, minus) = (Code::new(false, 0), Code::new(true, 0));
        let mut objective = 0.0f64;
        for (c, &x) in codes.iter_mut().zip(w) {
            let keep = x.abs() >= threshold;
            let signed = if x < 0.0 { minus } else { plus };
            *c = if keep { signed } else { Code::ZERO };
            let d = f64::from(x.abs()) - a * f64::from(u8::from(keep));
            objective += d * d;
        }
        Ok(GroupScale { alpha, objective })
    }
}

/// `|w|` as `u32` bit patterns, ascending. Non-negative finite floats order like their bit
/// patterns, so the sort runs on integers, which is markedly faster than a float comparator.
/// Patterns at or above that of infinity are NaN or infinite weights: an error.
pub(super) fn sorted_abs_keys(w: &[f32]) -> Result<Vec<u32>> {
    const INF: u32 = 0x7f80_0000;
    let mut keys: Vec<u32> = w.iter().map(|x| x.to_bits() & 0x7fff_ffff).collect();
    if keys.iter().any(|&k| k >= INF) {
        check_finite(w)?;
    }
    keys.sort_unstable();
    Ok(keys)
}

/// `|w|` sorted largest first: the baseline the benches compare [`ExactTernary`] against (the sort
/// it is built on, and nothing else).
pub fn sort_magnitudes_descending(w: &[f32]) -> Vec<f32> {
    let mut keys: Vec<u32> = w.iter().map(|x| x.to_bits() & 0x7fff_ffff).collect();
    keys.sort_unstable_by(|a, b| b.cmp(a));
    keys.into_iter().map(f32::from_bits).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(w: &[f32]) -> (Vec<f32>, GroupScale) {
        let mut codes = vec![Code::ZERO; w.len()];
        let s = ExactTernary
            .quantize_into(w, Bits::new(2).unwrap(), &mut codes)
            .unwrap();
        (codes.iter().map(|c| c.value()).collect(), s)
    }

    #[test]
    fn small_cases() {
        let (q, s) = run(&[1.0, -1.0, 0.1]);
        assert_eq!(q, vec![1.0, -1.0, 0.0]);
        assert_eq!(s.alpha, 1.0);
        assert!((s.objective - 0.01).abs() < 1e-7);

        // All zero: alpha 1, all codes zero, objective 0.
        let (q, s) = run(&[0.0, -0.0, 0.0]);
        assert_eq!(q, vec![0.0; 3]);
        assert_eq!(s.alpha, 1.0);
        assert_eq!(s.objective, 0.0);

        let (q, s) = run(&[]);
        assert!(q.is_empty());
        assert_eq!(s.objective, 0.0);
    }

    #[test]
    fn ties_get_equal_codes() {
        // S_k^2/k for 3,1,1,1: 9, 8, 7.33, 9 -> k = 1 and k = 4 tie; either way the three 1s match.
        let (q, _) = run(&[3.0, 1.0, -1.0, 1.0]);
        assert_eq!(q[1].abs(), q[2].abs());
        assert_eq!(q[2].abs(), q[3].abs());
    }

    #[test]
    fn rejects_other_bit_widths() {
        let mut codes = [Code::ZERO; 2];
        assert!(
            ExactTernary
                .quantize_into(&[1.0, 2.0], Bits::new(3).unwrap(), &mut codes)
                .is_err()
        );
    }
}
