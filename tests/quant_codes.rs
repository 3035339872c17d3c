//! Code packing, `.npy` I/O and the tensor-level entry point used by `lbw quantize-tensor`.

use lbw::Error;
use lbw::quant::{
    Bits, Code, Method, pack_codes, packed_len, quantize_tensor, read_npy, unpack_codes, write_npy,
};
use proptest::prelude::*;

/// Any valid code for a bit-width: zero, or a sign and an exponent below `n`.
fn codes(bits: Bits) -> impl Strategy<Value = Vec<Code>> {
    let n = bits.exponents() as u8;
    let code = prop_oneof![
        1 => Just(Code::ZERO),
        3 => (any::<bool>(), 0..n).prop_map(|(neg, e)| Code::new(neg, e)),
    ];
    prop::collection::vec(code, 0..300)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn pack_unpack_round_trips((b, cs) in (2u8..=8).prop_flat_map(|b| (Just(b), codes(Bits::new(b).unwrap())))) {
        let bits = Bits::new(b).unwrap();
        let packed = pack_codes(&cs, bits);
        prop_assert_eq!(packed.len(), packed_len(cs.len(), bits));
        prop_assert_eq!(packed.len(), (cs.len() * usize::from(b)).div_ceil(8));
        let back = unpack_codes(&packed, cs.len(), bits).unwrap();
        prop_assert_eq!(back, cs);
    }

    #[test]
    fn unpacking_random_bytes_never_panics(b in 2u8..=8, bytes in prop::collection::vec(any::<u8>(), 0..200), count in 0usize..400) {
        let bits = Bits::new(b).unwrap();
        match unpack_codes(&bytes, count, bits) {
            // Whatever decodes re-encodes to the same bytes: the decoding is a bijection.
            Ok(cs) => prop_assert_eq!(pack_codes(&cs, bits), bytes),
            Err(e) => prop_assert!(matches!(e, Error::Model(_))),
        }
    }

    #[test]
    fn npy_round_trips(shape in prop::collection::vec(0usize..6, 0..4), seed in any::<u32>()) {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|i| f32::from_bits(seed.wrapping_mul(i as u32 + 1) & 0xbf7f_ffff)).collect();
        let bytes = write_npy(&shape, &values).unwrap();
        let t = read_npy(&bytes).unwrap();
        prop_assert_eq!(t.shape, shape);
        prop_assert_eq!(t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), values.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }

    #[test]
    fn npy_reader_survives_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut with_magic = b"\x93NUMPY\x01\x00".to_vec();
        with_magic.extend_from_slice(&bytes);
        let _ = read_npy(&bytes);
        let _ = read_npy(&with_magic);
    }
}

#[test]
fn every_field_decodes_to_its_code_or_is_refused() {
    for b in 2..=8u8 {
        let bits = Bits::new(b).unwrap();
        let n = bits.exponents() as u32;
        let mut valid = 0;
        for field in 0..(1u32 << b) {
            match Code::from_field(field, bits) {
                Some(c) => {
                    valid += 1;
                    assert_eq!(c.to_field(bits), field);
                }
                None => {
                    let mag = field & ((1 << (b - 1)) - 1);
                    assert!(mag == 0 || mag > n, "b={b} field {field:#b}");
                }
            }
        }
        assert_eq!(valid, 2 * n + 1, "b={b}: zero and 2n signed powers of two");
    }
}

#[test]
fn quantize_tensor_reports() {
    let shape = [4usize, 2, 3, 3];
    let w: Vec<f32> = (0..72)
        .map(|i| ((i * 29 % 71) as f32 / 35.0 - 1.0) * 0.1)
        .collect();
    for (bits, method) in [(2, Method::Ternary), (3, Method::Lbw), (5, Method::Optimal)] {
        for per_channel in [false, true] {
            let r = quantize_tensor(&w, &shape, bits, method, None, per_channel).unwrap();
            assert_eq!(r.alphas.len(), if per_channel { 4 } else { 1 });
            assert_eq!(r.values, r.quantized.dequantize());
            let direct: f64 = w
                .iter()
                .zip(&r.values)
                .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
                .sum();
            assert!((direct - r.objective).abs() <= 1e-9 * direct.max(1e-30));
            let norm = w.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
            assert!((r.relative_error - direct.sqrt() / norm).abs() < 1e-9);
            assert!(r.relative_error > 0.0 && r.relative_error < 1.0);
            assert!((0.0..1.0).contains(&r.zero_fraction));
            assert_eq!(
                r.packed_bytes,
                (72 * usize::from(bits)).div_ceil(8) + 4 * r.alphas.len()
            );
        }
    }
    // A free parameter only for lbw; bit-widths 2..=8; ternary is 2-bit only; shapes must fit.
    assert!(quantize_tensor(&w, &shape, 3, Method::Lbw, Some(0.7), false).is_ok());
    assert!(quantize_tensor(&w, &shape, 3, Method::Optimal, Some(0.7), false).is_err());
    assert!(quantize_tensor(&w, &shape, 3, Method::Lbw, Some(-1.0), false).is_err());
    assert!(quantize_tensor(&w, &shape, 9, Method::Optimal, None, false).is_err());
    assert!(quantize_tensor(&w, &shape, 1, Method::Optimal, None, false).is_err());
    assert!(quantize_tensor(&w, &shape, 3, Method::Ternary, None, false).is_err());
    assert!(quantize_tensor(&w, &[5, 2, 3, 3], 3, Method::Lbw, None, false).is_err());
    let mut bad = w.clone();
    bad[5] = f32::NAN;
    assert!(matches!(
        quantize_tensor(&bad, &shape, 4, Method::Optimal, None, true),
        Err(Error::Input(_))
    ));
}
