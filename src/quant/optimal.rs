//! The exact global optimum for any bit-width, by sweeping the scale through its breakpoints.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::ternary::sorted_abs_keys;
use super::{Bits, Code, GroupScale, Method, Quantizer, finish_with_best_alpha, pow2_neg};
use crate::error::Result;

/// The exact minimiser of `||W - alpha Q||^2` over `alpha > 0` and `Q` in the `b`-bit set, for any
/// `b`, in `O(N log N + N n log n)` time and `O(N)` memory.
///
/// At the optimum, `Q` is the nearest-level rounding for `alpha` and `alpha` is
/// `A / B = <|W|, |Q|> / ||Q||^2` for `Q`, so the optimum is `||W||^2 - A^2 / B` for one of the
/// roundings that some `alpha` produces; and every rounding's `||W||^2 - A^2 / B` is attained by a
/// feasible pair. So it suffices to visit every rounding and keep the largest `A^2 / B`.
///
/// A weight's rounding changes only at `n` breakpoints of `alpha`: it enters the smallest level when
/// `alpha` falls to `|w| 2^n` and moves from `2^-(e+1)` up to `2^-e` when `alpha` falls to
/// `|w| 2^(e+2) / 3`. Sweeping `alpha` from infinity (everything zero) downwards, every event only
/// adds to `A` and `B` (`|w| 2^(1-n)` and `4^(1-n)` on entry; `|w| 2^-(e+1)` and `3 * 4^-(e+1)` on a
/// promotion), so the running sums never cancel — important because `A^2 / B` for a state with a
/// tiny `B` would be garbage if `B` were a difference of large numbers. The sums are also
/// compensated (Neumaier), so their relative error stays near one rounding.
///
/// The breakpoints are kept exact by sorting on `3 alpha` instead of `alpha`: `3 |w| 2^n` and
/// `|w| 2^(e+2)` are exact in `f64` for every finite `f32` `w`, so equal breakpoints compare equal.
/// The events of one kind are the sorted `|w|` times a constant, so the `n` event streams are merged
/// rather than materialising and sorting `N n` events. Candidates are evaluated only after a whole
/// run of equal breakpoints: a state inside the run is not the rounding of any `alpha`, and at the
/// shared breakpoint the states before and after the run both round optimally (the weights on the
/// cut are equally near either level), so nothing is lost. Equal `|w|` thus get equal codes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OptimalSweep;

impl Quantizer for OptimalSweep {
    fn method(&self) -> Method {
        Method::Optimal
    }

    fn quantize_into(&self, w: &[f32], bits: Bits, codes: &mut [Code]) -> Result<GroupScale> {
        debug_assert_eq!(w.len(), codes.len());
        let n = bits.exponents();
        let streams = Streams::new(n);
        // Ascending |w| bit patterns; this also rejects NaN and infinities.
        let keys = sorted_abs_keys(w)?;
        let mags: Vec<f64> = keys
            .iter()
            .rev()
            .take_while(|&&k| k != 0)
            .map(|&k| f64::from(f32::from_bits(k)))
            .collect();
        drop(keys);
        match best_breakpoint(&mags, &streams) {
            None => codes.fill(Code::ZERO),
            Some(key) => {
                let mut top = u8::MAX;
                for (c, &x) in codes.iter_mut().zip(w) {
                    *c = match streams.exponent_at(f64::from(x.abs()), key) {
                        None => Code::ZERO,
                        Some(e) => {
                            top = top.min(e);
                            Code::new(x < 0.0, e)
                        }
                    };
                }
                // Several states can share the best A^2 / B: doubling every level and halving
                // alpha changes nothing (one weight alone scores w^2 at every level). Shift the
                // exponents so the largest level is 1, which keeps alpha near max |w| instead of
                // up to 2^(n-1) times it, where it could overflow f32.
                if top != u8::MAX && top > 0 {
                    for c in codes.iter_mut() {
                        if let Some(e) = c.exponent() {
                            *c = Code::new(c.is_negative(), e - top);
                        }
                    }
                }
            }
        }
        finish_with_best_alpha(w, codes)
    }
}

/// The `n` kinds of events. Stream 0 is entering the smallest level; stream `s >= 1` is the promotion
/// into exponent `e = n - 1 - s`. A weight's event in stream `s` happens at `3 alpha = |w| * mult[s]`,
/// and `mult` decreases with `s`, so each weight's events come in stream order.
struct Streams {
    n: usize,
    mult: Vec<f64>,
    a_inc: Vec<f64>,
    b_inc: Vec<f64>,
}

impl Streams {
    fn new(n: usize) -> Streams {
        let mut mult = Vec::with_capacity(n);
        let mut a_inc = Vec::with_capacity(n);
        let mut b_inc = Vec::with_capacity(n);
        let smallest = pow2_neg(n as u32 - 1);
        mult.push(3.0 / pow2_neg(n as u32));
        a_inc.push(smallest);
        b_inc.push(smallest * smallest);
        for s in 1..n {
            let e = (n - 1 - s) as u32;
            mult.push(4.0 / pow2_neg(e));
            let half = pow2_neg(e + 1);
            a_inc.push(half);
            b_inc.push(3.0 * half * half);
        }
        Streams {
            n,
            mult,
            a_inc,
            b_inc,
        }
    }

    /// The exponent of a weight of magnitude `m` in the state after all events with key `>= key`:
    /// zero if it has not entered, else the smallest `e` whose promotion it has passed.
    fn exponent_at(&self, m: f64, key: f64) -> Option<u8> {
        if m * self.mult[0] < key {
            return None;
        }
        // Promotion into e happens at key m * 2^(e+2); the lowest e passed is the exponent.
        let mut e = 0;
        while e + 1 < self.n && m * (4.0 / pow2_neg(e as u32)) < key {
            e += 1;
        }
        Some(e as u8)
    }
}

/// Neumaier's compensated sum: keeps the rounding error of long running sums near one ulp.
#[derive(Default, Clone, Copy)]
struct CompensatedSum {
    sum: f64,
    carry: f64,
}

impl CompensatedSum {
    #[inline]
    fn add(&mut self, x: f64) {
        let t = self.sum + x;
        if self.sum.abs() >= x.abs() {
            self.carry += (self.sum - t) + x;
        } else {
            self.carry += (x - t) + self.sum;
        }
        self.sum = t;
    }

    fn value(self) -> f64 {
        self.sum + self.carry
    }
}

/// Sweeps all breakpoints of the non-zero magnitudes `mags` (largest first) and returns the key
/// (`3 alpha`) of the last event of the best state, or `None` when there are none.
fn best_breakpoint(mags: &[f64], streams: &Streams) -> Option<f64> {
    if mags.is_empty() {
        return None;
    }
    let mut sweep = Sweep {
        mags,
        streams,
        pos: vec![0; streams.n],
        a: CompensatedSum::default(),
        b: CompensatedSum::default(),
        best_gain: -1.0,
        best_key: f64::INFINITY,
    };
    // A linear scan for the next event beats a heap for the few streams of b <= 5.
    if streams.n <= 8 {
        sweep.run_linear();
    } else {
        sweep.run_heap();
    }
    Some(sweep.best_key)
}

struct Sweep<'a> {
    mags: &'a [f64],
    streams: &'a Streams,
    /// Events consumed per stream.
    pos: Vec<usize>,
    a: CompensatedSum,
    b: CompensatedSum,
    best_gain: f64,
    best_key: f64,
}

impl Sweep<'_> {
    #[inline]
    fn next_key(&self, s: usize) -> Option<f64> {
        self.mags
            .get(self.pos[s])
            .map(|&m| m * self.streams.mult[s])
    }

    #[inline]
    fn apply(&mut self, s: usize) {
        let m = self.mags[self.pos[s]];
        self.a.add(m * self.streams.a_inc[s]);
        self.b.add(self.streams.b_inc[s]);
        self.pos[s] += 1;
    }

    /// Called after the last event of a run of equal keys.
    #[inline]
    fn evaluate(&mut self, key: f64) {
        let (a, b) = (self.a.value(), self.b.value());
        let gain = a * a / b;
        if gain > self.best_gain {
            self.best_gain = gain;
            self.best_key = key;
        }
    }

    fn max_stream(&self) -> Option<(usize, f64)> {
        let mut best: Option<(usize, f64)> = None;
        for s in 0..self.streams.n {
            if let Some(k) = self.next_key(s)
                && best.is_none_or(|(_, bk)| k > bk)
            {
                best = Some((s, k));
            }
        }
        best
    }

    fn run_linear(&mut self) {
        let mut next = self.max_stream();
        while let Some((s, key)) = next {
            self.apply(s);
            next = self.max_stream();
            if next.is_none_or(|(_, k)| k < key) {
                self.evaluate(key);
            }
        }
    }

    fn run_heap(&mut self) {
        let mut heap: BinaryHeap<Event> = (0..self.streams.n)
            .filter_map(|s| self.next_key(s).map(|key| Event { key, stream: s }))
            .collect();
        while let Some(Event { key, stream }) = heap.pop() {
            self.apply(stream);
            if let Some(k) = self.next_key(stream) {
                heap.push(Event { key: k, stream });
            }
            if heap.peek().is_none_or(|e| e.key < key) {
                self.evaluate(key);
            }
        }
    }
}

/// The next event of one stream, ordered by key (keys are positive and finite).
#[derive(PartialEq)]
struct Event {
    key: f64,
    stream: usize,
}

impl Eq for Event {}

impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Event {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key
            .total_cmp(&other.key)
            .then(other.stream.cmp(&self.stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(w: &[f32], b: u8) -> (Vec<f32>, GroupScale) {
        let mut codes = vec![Code::ZERO; w.len()];
        let s = OptimalSweep
            .quantize_into(w, Bits::new(b).unwrap(), &mut codes)
            .unwrap();
        (codes.iter().map(|c| c.value()).collect(), s)
    }

    #[test]
    fn representable_weights_are_exact() {
        let w = [0.5f32, -0.25, 0.125, 0.0, -0.5, 0.0625];
        let (q, s) = run(&w, 4);
        assert_eq!(s.objective, 0.0);
        let deq: Vec<f32> = q.iter().map(|v| v * s.alpha).collect();
        assert_eq!(deq, w);
    }

    #[test]
    fn matches_ternary_at_two_bits() {
        let w = [0.9f32, -0.3, 0.05, 0.4, -1.2, 0.0, 0.33];
        let (_, s) = run(&w, 2);
        let mut codes = vec![Code::ZERO; w.len()];
        let t = super::super::ExactTernary
            .quantize_into(&w, Bits::new(2).unwrap(), &mut codes)
            .unwrap();
        assert!((s.objective - t.objective).abs() < 1e-12);
    }

    #[test]
    fn heap_and_linear_sweeps_agree() {
        // b = 6 (n = 16) takes the heap path; compare with the linear scan on the same data.
        let w: Vec<f32> = (0..500)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0).powi(3))
            .collect();
        let streams = Streams::new(16);
        let mags: Vec<f64> = super::super::sort_magnitudes_descending(&w)
            .into_iter()
            .take_while(|&m| m > 0.0)
            .map(f64::from)
            .collect();
        let mk = || Sweep {
            mags: &mags,
            streams: &streams,
            pos: vec![0; 16],
            a: CompensatedSum::default(),
            b: CompensatedSum::default(),
            best_gain: -1.0,
            best_key: f64::INFINITY,
        };
        let (mut l, mut h) = (mk(), mk());
        l.run_linear();
        h.run_heap();
        assert_eq!(l.best_key, h.best_key);
        assert_eq!(l.best_gain, h.best_gain);
    }
}
