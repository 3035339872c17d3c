//! Quantizer throughput from 1e3 to 2.5e7 weights, against a baseline that only sorts |W|.
//!
//! `ExactTernary` is a sort plus linear passes, so "ternary within 2x of sort" reads straight off the
//! `sort_abs` and `ternary` rows at the same size. Sample counts are small so the whole bench runs
//! in a few minutes on two cores: `cargo bench --bench quantizers`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use lbw::quant::{
    Bits, ExactTernary, LbwThreshold, OptimalSweep, Quantizer, sort_magnitudes_descending,
};

/// Laplace-distributed weights (conv weights are heavy-tailed), deterministic.
fn weights(n: usize) -> Vec<f32> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let u = ((s >> 11) as f64 / (1u64 << 53) as f64).max(1e-12);
            let sign = if s & 1 == 0 { 1.0 } else { -1.0 };
            (sign * -u.ln() * 0.02) as f32
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let sizes = [1_000usize, 100_000, 2_500_000, 25_000_000];
    let b2 = Bits::new(2).unwrap();
    let b4 = Bits::new(4).unwrap();
    let b6 = Bits::new(6).unwrap();
    let mut g = c.benchmark_group("quantize");
    g.warm_up_time(Duration::from_millis(300));
    g.measurement_time(Duration::from_secs(2));
    for &n in &sizes {
        let w = weights(n);
        // Criterion needs at least 10 samples; large inputs get the minimum, and flat sampling (the
        // same iteration count per sample) instead of linear (1, 2, ..., 10 iterations: 55 runs).
        let large = n >= 2_500_000;
        g.sample_size(if large { 10 } else { 30 });
        g.sampling_mode(if large {
            SamplingMode::Flat
        } else {
            SamplingMode::Auto
        });
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("sort_abs", n), &w, |b, w| {
            b.iter(|| black_box(sort_magnitudes_descending(w)))
        });
        g.bench_with_input(BenchmarkId::new("ternary", n), &w, |b, w| {
            b.iter(|| black_box(ExactTernary.quantize(w, b2).unwrap()))
        });
        g.bench_with_input(BenchmarkId::new("optimal_b2", n), &w, |b, w| {
            b.iter(|| black_box(OptimalSweep.quantize(w, b2).unwrap()))
        });
        g.bench_with_input(BenchmarkId::new("optimal_b4", n), &w, |b, w| {
            b.iter(|| black_box(OptimalSweep.quantize(w, b4).unwrap()))
        });
        g.bench_with_input(BenchmarkId::new("lbw_b4", n), &w, |b, w| {
            b.iter(|| black_box(LbwThreshold::default().quantize(w, b4).unwrap()))
        });
        // b = 6 (n = 16 exponents) takes the heap merge; skip the largest size to bound the time.
        if n <= 2_500_000 {
            g.bench_with_input(BenchmarkId::new("optimal_b6", n), &w, |b, w| {
                b.iter(|| black_box(OptimalSweep.quantize(w, b6).unwrap()))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
