//! The exact quantizers against brute force, and the heuristic against the exact optimum.

use lbw::Error;
use lbw::quant::{Bits, ExactTernary, LbwThreshold, Method, OptimalSweep, Quantizer};
use proptest::prelude::*;

/// min over every assignment of levels (with the weights' signs) and the best alpha for each.
/// Returns the minimum of `||W - alpha Q||^2`, computed directly from residuals in f64.
fn brute_force(w: &[f32], bits: Bits, free_signs: bool) -> f64 {
    let levels: Vec<f64> = bits.levels().collect();
    // Digit d: 0 is zero, 1..=n is +levels[d-1], and with free signs n+1..=2n is -levels[d-n-1].
    let n = levels.len();
    let radix = if free_signs { 2 * n + 1 } else { n + 1 };
    let value = |d: usize, x: f32| -> f64 {
        match d {
            0 => 0.0,
            d if d <= n => {
                let m = levels[d - 1];
                if free_signs || x >= 0.0 { m } else { -m }
            }
            d => -levels[d - n - 1],
        }
    };
    let norm2: f64 = w.iter().map(|&x| f64::from(x).powi(2)).sum();
    let mut best = norm2; // all zero
    let mut digits = vec![0usize; w.len()];
    loop {
        // Advance the odometer; stop after wrapping around.
        let mut i = 0;
        loop {
            if i == digits.len() {
                return best;
            }
            digits[i] += 1;
            if digits[i] < radix {
                break;
            }
            digits[i] = 0;
            i += 1;
        }
        let q: Vec<f64> = digits.iter().zip(w).map(|(&d, &x)| value(d, x)).collect();
        let a: f64 = q.iter().zip(w).map(|(q, &x)| q * f64::from(x)).sum();
        let b: f64 = q.iter().map(|q| q * q).sum();
        if a <= 0.0 {
            continue; // the infimum over alpha > 0 is then ||W||^2, already counted
        }
        let alpha = a / b;
        let obj: f64 = q
            .iter()
            .zip(w)
            .map(|(q, &x)| (f64::from(x) - alpha * q).powi(2))
            .sum();
        best = best.min(obj);
    }
}

fn norm2(w: &[f32]) -> f64 {
    w.iter().map(|&x| f64::from(x).powi(2)).sum()
}

/// `got` is within floating-point tolerance of the brute-force minimum, and not below it.
fn assert_optimal(w: &[f32], bits: Bits, got: f64, want: f64) {
    let tol = 1e-9 * norm2(w) + f64::MIN_POSITIVE;
    assert!(
        (got - want).abs() <= tol,
        "w={w:?} bits={bits}: objective {got:e}, brute force {want:e}"
    );
}

/// Vectors that stress the corner cases: ties, exact breakpoints, zeros, one sign, extreme scales.
fn weights(max_len: usize) -> impl Strategy<Value = Vec<f32>> {
    // Values on and around the rounding breakpoints of several scales, so ties happen often.
    let special = prop::sample::select(vec![
        0.0f32, 1.0, 0.5, 0.25, 0.75, 0.375, 0.125, 0.1875, 2.0, 3.0, 1.5, 0.0625,
    ]);
    let element = prop_oneof![
        3 => -1.0f32..1.0,
        2 => special.prop_flat_map(|v| prop::bool::ANY.prop_map(move |neg| if neg { -v } else { v })),
        1 => (-1.0f32..1.0).prop_map(|x| x * x * x * x * x),
    ];
    let scale = prop::sample::select(vec![1.0f32, 1e30, 1e-30, 1e-3, 7.0]);
    let sign = prop::sample::select(vec![0i8, 1, -1]); // 0 keeps signs, +-1 forces one sign
    (prop::collection::vec(element, 1..=max_len), scale, sign).prop_map(|(v, s, sign)| {
        v.into_iter()
            .map(|x| {
                let x = x * s;
                match sign {
                    1 => x.abs(),
                    -1 => -x.abs(),
                    _ => x,
                }
            })
            .collect()
    })
}

/// Largest N for which the brute force stays cheap at each bit-width.
fn max_len(bits: u8) -> usize {
    match bits {
        2 | 3 => 8,
        4 => 6,
        5 => 4,
        6 | 7 => 3,
        _ => 2,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn ternary_matches_brute_force(w in weights(8)) {
        let bits = Bits::new(2).unwrap();
        let q = ExactTernary.quantize(&w, bits).unwrap();
        assert_optimal(&w, bits, q.objective, brute_force(&w, bits, false));
    }

    #[test]
    fn optimal_matches_brute_force_3_bits(w in weights(8)) {
        let bits = Bits::new(3).unwrap();
        let q = OptimalSweep.quantize(&w, bits).unwrap();
        assert_optimal(&w, bits, q.objective, brute_force(&w, bits, false));
    }

    #[test]
    fn optimal_matches_brute_force_any_bits(b in 2u8..=8, w in weights(8)) {
        let bits = Bits::new(b).unwrap();
        let w = &w[..w.len().min(max_len(b))];
        let q = OptimalSweep.quantize(w, bits).unwrap();
        assert_optimal(w, bits, q.objective, brute_force(w, bits, false));
    }

    #[test]
    fn lbw_never_beats_optimal(b in 2u8..=8, w in prop::collection::vec(-1.0f32..1.0, 1..300), c in 0.2f32..6.0) {
        let bits = Bits::new(b).unwrap();
        let opt = OptimalSweep.quantize(&w, bits).unwrap().objective;
        for q in [LbwThreshold::default(), LbwThreshold::with_scale(c).unwrap()] {
            let lbw = q.quantize(&w, bits).unwrap().objective;
            prop_assert!(lbw >= opt - 1e-9 * norm2(&w), "lbw {lbw} < optimal {opt}");
        }
    }

    #[test]
    fn ternary_and_optimal_agree_on_long_vectors(w in prop::collection::vec(-1.0f32..1.0, 1..2000)) {
        let bits = Bits::new(2).unwrap();
        let t = ExactTernary.quantize(&w, bits).unwrap();
        let o = OptimalSweep.quantize(&w, bits).unwrap();
        prop_assert!((t.objective - o.objective).abs() <= 1e-9 * norm2(&w));
    }
}

/// Signs other than the weight's never help: brute force over all `(2n + 1)^N` codes agrees.
#[test]
fn sign_consistent_codes_suffice() {
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    for b in [2u8, 3] {
        let bits = Bits::new(b).unwrap();
        for len in 1..=5 {
            for _ in 0..40 {
                let w: Vec<f32> = (0..len).map(|_| next()).collect();
                let free = brute_force(&w, bits, true);
                let signed = brute_force(&w, bits, false);
                assert!((free - signed).abs() <= 1e-12 * norm2(&w), "{w:?}");
                let q = OptimalSweep.quantize(&w, bits).unwrap();
                assert_optimal(&w, bits, q.objective, free);
            }
        }
    }
}

#[test]
fn corner_cases() {
    for b in 2..=8u8 {
        let bits = Bits::new(b).unwrap();
        let methods: Vec<Box<dyn Quantizer>> = if b == 2 {
            vec![Box::new(ExactTernary), Box::new(OptimalSweep)]
        } else {
            vec![Box::new(OptimalSweep)]
        };
        for q in &methods {
            // All zero: alpha 1, zero codes, zero objective.
            let r = q.quantize(&[0.0, -0.0, 0.0], bits).unwrap();
            assert_eq!(r.alphas, vec![1.0]);
            assert_eq!(r.zero_fraction(), 1.0);
            assert_eq!(r.objective, 0.0);
            // Single element: exact.
            for x in [1.0f32, -3.5, 1e30, -1e-30, f32::MIN_POSITIVE] {
                let r = q.quantize(&[x], bits).unwrap();
                assert_eq!(r.dequantize(), vec![x], "b={b} x={x}");
                assert_eq!(r.objective, 0.0);
            }
            // All equal magnitudes: exact with one level.
            let w = [-0.3f32; 7];
            let r = q.quantize(&w, bits).unwrap();
            assert_eq!(r.dequantize(), w.to_vec());
            // Empty.
            let r = q.quantize(&[], bits).unwrap();
            assert!(r.codes.is_empty());
        }
    }
    // Exactly representable multi-level vectors are recovered exactly.
    let w = [4.0f32, -2.0, 1.0, 0.5, -0.25, 0.0, 4.0];
    let r = OptimalSweep.quantize(&w, Bits::new(5).unwrap()).unwrap();
    assert_eq!(r.objective, 0.0);
    assert_eq!(r.dequantize(), w.to_vec());
}

#[test]
fn non_finite_weights_are_input_errors() {
    for m in Method::ALL {
        let q = m.quantizer(None).unwrap();
        let bits = Bits::new(if m == Method::Ternary { 2 } else { 4 }).unwrap();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut w = vec![0.1f32; 100];
            w[37] = bad;
            let err = q.quantize(&w, bits).unwrap_err();
            assert!(
                matches!(err, Error::Input(ref m) if m.contains("37")),
                "{err}"
            );
            assert!(q.quantize_tensor(&w, &[10, 10], bits, true).is_err());
        }
    }
}

/// On a realistic size the sweep is at least as good as nearest rounding at any scale on a grid.
#[test]
fn optimal_beats_every_scale_on_a_grid() {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let w: Vec<f32> = (0..5000)
        .map(|_| {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = ((rng >> 11) as f64 / (1u64 << 53) as f64) as f32;
            // A heavy-tailed, Laplace-like sample.
            let s = if rng & 1 == 0 { 1.0 } else { -1.0 };
            s * -(1.0 - u).max(1e-7).ln() * 0.05
        })
        .collect();
    for b in 2..=8u8 {
        let bits = Bits::new(b).unwrap();
        let opt = OptimalSweep.quantize(&w, bits).unwrap().objective;
        for i in 1..400 {
            let c = i as f32 * 0.02;
            let lbw = LbwThreshold::with_scale(c)
                .unwrap()
                .quantize(&w, bits)
                .unwrap()
                .objective;
            assert!(opt <= lbw * (1.0 + 1e-12), "b={b} c={c}: {opt} > {lbw}");
        }
    }
}

#[test]
fn per_channel_is_per_tensor_on_each_channel() {
    let w: Vec<f32> = (0..4 * 3 * 3 * 3)
        .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * (1 + i / 27) as f32)
        .collect();
    let bits = Bits::new(4).unwrap();
    // LbwThreshold's *default* scale differs per grouping, so compare at a fixed one.
    let quantizers: Vec<Box<dyn Quantizer>> = vec![
        Box::new(LbwThreshold::with_scale(0.9).unwrap()),
        Box::new(OptimalSweep),
    ];
    for q in quantizers {
        let m = q.method();
        let pc = q.quantize_tensor(&w, &[4, 3, 3, 3], bits, true).unwrap();
        assert_eq!(pc.alphas.len(), 4);
        let mut sum = 0.0;
        for (c, chunk) in w.chunks(27).enumerate() {
            let one = q.quantize(chunk, bits).unwrap();
            assert_eq!(one.alphas[0], pc.alphas[c]);
            assert_eq!(one.codes[..], pc.codes[c * 27..(c + 1) * 27]);
            sum += one.objective;
        }
        assert!((pc.objective - sum).abs() <= 1e-12 * sum.max(1e-30));
        let pt = q.quantize_tensor(&w, &[4, 3, 3, 3], bits, false).unwrap();
        if m == Method::Optimal {
            assert!(pc.objective <= pt.objective);
        }
    }
    // With no scale set, lbw picks the default for the grouping.
    let lbw = LbwThreshold::default();
    let pc = lbw.quantize_tensor(&w, &[4, 3, 3, 3], bits, true).unwrap();
    let max0 = w[..27].iter().fold(0f32, |m, x| m.max(x.abs()));
    assert_eq!(pc.alphas[0], LbwThreshold::default_scale(bits, true) * max0);
    let pt = lbw.quantize_tensor(&w, &[4, 3, 3, 3], bits, false).unwrap();
    let max = w.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert_eq!(pt.alphas[0], LbwThreshold::default_scale(bits, false) * max);
}
