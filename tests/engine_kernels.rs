//! Shift-add kernels: every SIMD kernel bit-exact against the scalar specification on random
//! programs, random direct (depthwise) programs and random convs (shapes, strides, paddings,
//! dilations, groups, saturated inputs), the direct schedule against the tile schedule of the same
//! weights, the dispatcher on every kernel this CPU supports, and the engine close to the FP32
//! simulation of the same conv.

use std::collections::BTreeMap;
use std::sync::Arc;

use lbw::engine::Backend;
use lbw::engine::kernels::{
    Activation, BinaryOp, ConvProgram, ConvSpec, FlatGeometry, KernelChoice, LANES,
    MAX_TILES_PER_PASS, PhaseSplit, PlaneOut, ShiftAddKernel, TileOut, available_kernels,
    select_kernel, store_flat,
};
use lbw::engine::quant_params::{ActivationScales, QParams};
use lbw::engine::shift_add::{EngineOptions, ShiftAddEngine, fake_quant_simulation};
use lbw::model::{Conv, Graph, Node, Op, Tensor};
use lbw::quant::{Bits, Code, QuantizedTensor};
use proptest::prelude::*;

/// Every kernel this CPU runs, plus the AVX-512 one without its VBMI path where that
/// exists (the path Skylake-SP and Cascade Lake take).
fn kernels_under_test() -> Vec<Arc<dyn ShiftAddKernel>> {
    let mut kernels = available_kernels();
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = lbw::engine::kernels::x86_64::Avx512bwKernel::new()
        && k.uses_vbmi()
    {
        kernels.push(Arc::new(k.without_vbmi()));
    }
    kernels
}

/// A tiny deterministic generator so one proptest seed drives whole tensors.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    fn below(&mut self, n: u32) -> u32 {
        self.next() % n
    }
    fn unit(&mut self) -> f32 {
        self.next() as f32 / (1u64 << 31) as f32
    }
}

/// Random codes of a `b`-bit set; `zero_pct` percent zeros.
fn random_codes(rng: &mut Lcg, n: usize, bits: Bits, zero_pct: u32) -> Vec<Code> {
    (0..n)
        .map(|_| {
            if rng.below(100) < zero_pct {
                Code::ZERO
            } else {
                Code::new(rng.below(2) == 1, rng.below(bits.exponents() as u32) as u8)
            }
        })
        .collect()
}

/// `k` rows of `u8` activations, row `t` at `t * LANES` with `tiles * LANES` values after it (so
/// `tiles` tiles can be built from offset 0), and those `k` tap offsets. Saturated (0 or 255) half
/// the time: the overflow bound's worst case.
fn random_rows(rng: &mut Lcg, k: usize, tiles: usize) -> (Vec<u8>, Vec<u32>) {
    let extreme = rng.below(2) == 0;
    let src = random_u8(rng, (k + tiles) * LANES, extreme);
    let taps = (0..k as u32).map(|t| t * LANES as u32).collect();
    (src, taps)
}

/// `n` random `u8` codes; only 0 and 255 when `extreme`.
fn random_u8(rng: &mut Lcg, n: usize, extreme: bool) -> Vec<u8> {
    (0..n)
        .map(|_| {
            if extreme {
                255 * rng.below(2) as u8
            } else {
                rng.below(256) as u8
            }
        })
        .collect()
}

fn act_of(k: u32) -> Activation {
    match k {
        0 => Activation::Linear,
        1 => Activation::Relu,
        _ => Activation::Leaky(0.1),
    }
}

fn run_program(
    kernel: &dyn ShiftAddKernel,
    prog: &ConvProgram,
    tile: &[i16],
    u8_out: bool,
) -> (Vec<u8>, Vec<f32>) {
    let cout = prog.cout();
    let cout_g = cout / prog.groups();
    let mut bytes = vec![0u8; cout * LANES];
    let mut floats = vec![0f32; cout * LANES];
    for g in 0..prog.groups() {
        let first = g * cout_g;
        if u8_out {
            let out = &mut bytes[first * LANES..][..cout_g * LANES];
            kernel.run_channels(prog, first, cout_g, tile, TileOut::U8(out));
        } else {
            let out = &mut floats[first * LANES..][..cout_g * LANES];
            kernel.run_channels(prog, first, cout_g, tile, TileOut::F32(out));
        }
    }
    (bytes, floats)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Programs with many terms per exponent (segment splits), wide exponent spreads (the i32 cap
    /// and right shifts) and full-range activations.
    #[test]
    fn kernels_match_scalar_on_random_programs(
        seed in any::<u64>(),
        k in 1usize..600,
        // One output channel per group makes a direct program (tested below).
        cout in 2usize..7,
        bits in 2u8..=8,
        zero_pct in 0u32..90,
        act in 0u32..3,
        u8_out in any::<bool>(),
        zp in any::<u8>(),
    ) {
        let mut rng = Lcg(seed);
        let bits = Bits::new(bits).unwrap();
        let codes = random_codes(&mut rng, cout * k, bits, zero_pct);
        let alphas: Vec<f32> = (0..cout).map(|_| 0.01 + rng.unit()).collect();
        let bias: Vec<f32> = (0..cout).map(|_| rng.unit() - 0.5).collect();
        let prog = ConvProgram::build(&ConvSpec {
            groups: 1,
            codes: &codes,
            alphas: &alphas,
            bias: Some(&bias),
            taps: (0..k as u32).collect(),
            input_scale: 0.02,
            input_zero_point: zp,
            act: act_of(act),
            // A tiny output scale a quarter of the time: `t` past 2^31, so the kernels keep the
            // `min(t, 1024)` clamp (the build's bound fails); otherwise they may drop it.
            output: u8_out.then(|| {
                let scale = if rng.below(4) == 0 { 1e-10 } else { 0.05 + rng.unit() };
                (scale, rng.below(256) as u8)
            }),
        }).unwrap();
        let (src, taps) = random_rows(&mut rng, k, 1);
        let build = |kernel: &dyn ShiftAddKernel| {
            let mut tile = vec![0i16; prog.tile_rows() * LANES];
            kernel.build_tile(&src, &taps, 0, &mut tile);
            tile
        };
        let scalar = select_kernel(KernelChoice::Scalar).unwrap();
        let tile = build(scalar.as_ref());
        let want = run_program(scalar.as_ref(), &prog, &tile, u8_out);
        for kernel in kernels_under_test() {
            // Each kernel runs its schedule over a tile in its own layout.
            let own_tile = build(kernel.as_ref());
            let got = run_program(kernel.as_ref(), &prog, &own_tile, u8_out);
            prop_assert_eq!(&got.0, &want.0, "kernel {}", kernel.name());
            let bits_eq = got.1.iter().zip(&want.1).all(|(a, b)| a.to_bits() == b.to_bits());
            prop_assert!(bits_eq, "kernel {} f32 outputs differ", kernel.name());
        }
    }

    /// `run_channels_multi` (two or three tiles per pass over the schedules) computes what
    /// `run_channels` computes on each tile, on every kernel: segment splits, wide exponent
    /// spreads, saturated activations, both output kinds.
    #[test]
    fn paired_tiles_match_single_tiles_on_every_kernel(
        seed in any::<u64>(),
        count in 2usize..=MAX_TILES_PER_PASS,
        k in 1usize..300,
        cout in 2usize..7,
        bits in 2u8..=8,
        zero_pct in 0u32..90,
        act in 0u32..3,
        u8_out in any::<bool>(),
        zp in any::<u8>(),
    ) {
        let mut rng = Lcg(seed);
        let bits = Bits::new(bits).unwrap();
        let codes = random_codes(&mut rng, cout * k, bits, zero_pct);
        let alphas: Vec<f32> = (0..cout).map(|_| 0.01 + rng.unit()).collect();
        let prog = ConvProgram::build(&ConvSpec {
            groups: 1,
            codes: &codes,
            alphas: &alphas,
            bias: None,
            taps: (0..k as u32).collect(),
            input_scale: 0.02,
            input_zero_point: zp,
            act: act_of(act),
            output: u8_out.then_some((0.05 + rng.unit(), rng.below(256) as u8)),
        }).unwrap();
        let (src, taps) = random_rows(&mut rng, k, count);
        // Each kernel's tiles in its own layout.
        let tiles_of = |kernel: &dyn ShiftAddKernel| -> Vec<Vec<i16>> {
            (0..count)
                .map(|h| {
                    let mut tile = vec![0i16; prog.tile_rows() * LANES];
                    kernel.build_tile(&src, &taps, h * LANES, &mut tile);
                    tile
                })
                .collect()
        };
        let scalar = select_kernel(KernelChoice::Scalar).unwrap();
        let want: Vec<(Vec<u8>, Vec<f32>)> = tiles_of(scalar.as_ref())
            .iter()
            .map(|t| run_program(scalar.as_ref(), &prog, t, u8_out))
            .collect();
        // Rows of channel i at i * stride (a plane), tile j at + j * LANES; the gaps stay put.
        let stride = count * LANES + rng.below(100) as usize;
        let len = (cout - 1) * stride + count * LANES;
        for kernel in kernels_under_test() {
            let (mut bytes, mut floats) = (vec![7u8; len], vec![7f32; len]);
            let out = if u8_out {
                TileOut::U8(&mut bytes)
            } else {
                TileOut::F32(&mut floats)
            };
            let tiles = tiles_of(kernel.as_ref());
            let refs: Vec<&[i16]> = tiles.iter().map(|t| &t[..]).collect();
            kernel.run_channels_multi(&prog, 0, cout, &refs, out, stride);
            for i in 0..cout {
                for (h, want) in want.iter().enumerate() {
                    let at = i * stride + h * LANES;
                    let lanes = at..at + LANES;
                    if u8_out {
                        prop_assert_eq!(
                            &bytes[lanes],
                            &want.0[i * LANES..][..LANES],
                            "kernel {} channel {} tile {}", kernel.name(), i, h
                        );
                    } else {
                        let bits_eq = floats[lanes]
                            .iter()
                            .zip(&want.1[i * LANES..][..LANES])
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        prop_assert!(bits_eq, "kernel {} f32 channel {} tile {}", kernel.name(), i, h);
                    }
                }
                if i + 1 < cout {
                    let gap = i * stride + count * LANES..(i + 1) * stride;
                    prop_assert!(bytes[gap.clone()].iter().all(|&b| b == 7), "gap written");
                    prop_assert!(floats[gap].iter().all(|&f| f == 7.0), "gap written");
                }
            }
        }
    }

    /// A direct program (one output channel) computes what the tile schedule of the same weights
    /// computes, on every kernel: many terms (segment splits), wide exponent spreads (the i32 cap
    /// and right shifts), saturated activations, all-zero channels, and flat geometries with
    /// dropped pitch columns and a partial last block.
    #[test]
    fn direct_programs_match_the_tile_schedule_on_every_kernel(
        seed in any::<u64>(),
        k in 1usize..400,
        bits in 2u8..=8,
        zero_pct in 0u32..=100,
        act in 0u32..3,
        u8_out in any::<bool>(),
        zp in any::<u8>(),
        width in 1usize..40,
        extra in 0usize..4,
        rows in 1usize..16,
    ) {
        let mut rng = Lcg(seed);
        let bits = Bits::new(bits).unwrap();
        // Channel 0 of a two-channel program runs on tiles; the same codes alone run direct.
        let codes = random_codes(&mut rng, 2 * k, bits, zero_pct);
        let alphas = [0.01 + rng.unit()];
        let bias = [rng.unit() - 0.5; 2];
        let output = u8_out.then_some((0.05 + rng.unit(), rng.below(256) as u8));
        let taps: Vec<u32> = (0..k).map(|_| rng.below(300)).collect();
        let program = |cout: usize| {
            ConvProgram::build(&ConvSpec {
                groups: 1,
                codes: &codes[..cout * k],
                alphas: &alphas,
                bias: Some(&bias[..cout]),
                taps: taps.clone(),
                input_scale: 0.02,
                input_zero_point: zp,
                act: act_of(act),
                output,
            })
            .unwrap()
        };
        let (direct, tiled) = (program(1), program(2));
        prop_assert!(direct.is_direct() && !tiled.is_direct());
        let geom = FlatGeometry { positions: rows * (width + extra), pitch: width + extra, width };
        let extreme = rng.below(2) == 0;
        let max_tap = *taps.iter().max().unwrap() as usize;
        let src = random_u8(&mut rng, max_tap + geom.positions.next_multiple_of(LANES), extreme);
        let plane = rows * width;
        let scalar = select_kernel(KernelChoice::Scalar).unwrap();
        let mut tile = vec![0i16; tiled.tile_rows() * LANES];
        let (mut want_u8, mut want_f32) = (vec![0u8; plane], vec![0f32; plane]);
        let (mut lanes_u8, mut lanes_f32) = ([0u8; LANES], [0f32; LANES]);
        for base in (0..geom.positions).step_by(LANES) {
            scalar.build_tile(&src, &taps, base, &mut tile);
            if u8_out {
                scalar.run_channels(&tiled, 0, 1, &tile, TileOut::U8(&mut lanes_u8));
                store_flat(&lanes_u8, base, geom, &mut want_u8);
            } else {
                scalar.run_channels(&tiled, 0, 1, &tile, TileOut::F32(&mut lanes_f32));
                store_flat(&lanes_f32, base, geom, &mut want_f32);
            }
        }
        let not_src: Vec<u8> = src.iter().map(|x| !x).collect();
        let both = [src.as_slice(), &not_src].concat();
        for kernel in kernels_under_test() {
            let mut complement = vec![0u8; src.len()];
            kernel.complement_u8(&src, &mut complement);
            prop_assert_eq!(&complement, &not_src, "kernel {} complement", kernel.name());
            // The plain source, and the source with its complement half (negative terms read
            // `255 - x` there): the same bytes. Stale contents must be overwritten everywhere.
            for complemented in [false, true] {
                let name = format!("kernel {} (complement half: {complemented})", kernel.name());
                let (mut got_u8, mut got_f32) = (vec![7u8; plane], vec![f32::NAN; plane]);
                let out = if u8_out {
                    PlaneOut::U8(&mut got_u8)
                } else {
                    PlaneOut::F32(&mut got_f32)
                };
                if complemented {
                    kernel.run_direct_complemented(&direct, 0, &both, geom, out);
                } else {
                    kernel.run_direct(&direct, 0, &src, geom, out);
                }
                if u8_out {
                    prop_assert_eq!(&got_u8, &want_u8, "{}", name);
                } else {
                    let same =
                        got_f32.iter().zip(&want_f32).all(|(a, b)| a.to_bits() == b.to_bits());
                    prop_assert!(same, "{} f32 outputs differ", name);
                }
            }
        }
    }

    /// Depthwise convs (direct programs) through the engine: kernel 3 or 5, stride 1 or 2,
    /// dilation, asymmetric padding, inputs saturated at both ends of their grid, any share of
    /// zero weights; every kernel gives the scalar kernel's bytes.
    #[test]
    fn engine_kernels_agree_on_random_depthwise_convs(
        seed in any::<u64>(),
        channels in 1usize..24,
        kernel5 in any::<bool>(),
        stride in 1usize..3,
        dilation in 1usize..3,
        pads in proptest::array::uniform4(0usize..3),
        h in 3usize..24,
        w in 3usize..24,
        bits in 2u8..=8,
        act in 0u32..3,
        zero_pct in 0u32..=100,
        saturate in any::<bool>(),
    ) {
        let mut rng = Lcg(seed);
        let kernel = if kernel5 { 5 } else { 3 };
        let span = dilation * (kernel - 1) + 1;
        prop_assume!(h + pads[0] + pads[2] >= span && w + pads[1] + pads[3] >= span);
        let mut case = RandomConv::new(
            &mut rng, channels, 1, 1, kernel, stride, dilation, pads, h, w, bits, act,
        );
        case.reweight_conv1(&mut rng, Bits::new(bits).unwrap(), zero_pct);
        if saturate {
            for v in &mut case.input.data {
                *v = if *v > 0.5 { 9.0 } else { -9.0 };
            }
        }
        let want = case.run(KernelChoice::Scalar);
        for k in kernels_under_test() {
            let got = case.run(KernelChoice::parse(k.name()).unwrap());
            for (a, b) in got.iter().zip(&want) {
                let same = a.data.iter().zip(&b.data).all(|(x, y)| x.to_bits() == y.to_bits());
                prop_assert!(same, "kernel {} differs from scalar", k.name());
            }
        }
    }

    /// The padded, phase-split source: every kernel's row copies give the portable bytes, on
    /// rows long and short (masked tails, several 64- and 128-byte steps).
    #[test]
    fn kernels_split_phases_alike(
        seed in any::<u64>(),
        h in 1usize..6,
        w in 1usize..300,
        pads in proptest::array::uniform4(0usize..3),
        stride in proptest::array::uniform2(1usize..4),
    ) {
        let mut rng = Lcg(seed);
        let input: Vec<u8> = (0..h * w).map(|_| rng.below(256) as u8).collect();
        let hq = (h + pads[0] + pads[2]).div_ceil(stride[0]);
        let wq = (w + pads[1] + pads[3]).div_ceil(stride[1]);
        let geom = PhaseSplit { h, w, pads, stride, wq };
        let split = |k: &dyn ShiftAddKernel| {
            let mut phases = vec![7u8; stride[0] * stride[1] * hq * wq];
            k.split_phases(&input, geom, &mut phases);
            phases
        };
        let want = split(select_kernel(KernelChoice::Scalar).unwrap().as_ref());
        // Every input byte lands somewhere: the phase planes hold the input once.
        prop_assert_eq!(want.iter().filter(|&&v| v != 7).count(), input.iter().filter(|&&v| v != 7).count());
        for k in kernels_under_test() {
            prop_assert_eq!(&split(k.as_ref()), &want, "kernel {}", k.name());
            // The fused form writes the same bytes and their complement, leaving the rest of the
            // complement half (the caller's padding) as it was.
            let mut phases = vec![7u8; want.len()];
            let mut complement = vec![!7u8; want.len()];
            k.split_phases_complemented(&input, geom, &mut phases, &mut complement);
            prop_assert_eq!(&phases, &want, "kernel {}", k.name());
            let flipped: Vec<u8> = want.iter().map(|&b| !b).collect();
            prop_assert_eq!(complement, flipped, "kernel {}", k.name());
        }
    }

    /// Element-wise add and multiply of two `u8` tensors on three grids: every kernel gives the
    /// bytes of dequantize-op-requantize in f32 (the FP32 simulation's arithmetic), saturated
    /// codes and grids much finer or coarser than the operands' included.
    #[test]
    fn kernels_match_the_simulation_on_binary_ops(
        seed in any::<u64>(),
        n in 0usize..700,
        mul in any::<bool>(),
        extreme in any::<bool>(),
        ranges in proptest::array::uniform6(-8.0f32..8.0),
    ) {
        let mut rng = Lcg(seed);
        let grid = |lo: f32, hi: f32| QParams::from_range(lo.min(hi), lo.max(hi));
        let grids = [
            grid(ranges[0], ranges[1]),
            grid(ranges[2], ranges[3]),
            grid(ranges[4] / 4.0, ranges[5] / 4.0),
        ];
        let [pa, pb, po] = grids;
        let (a, b) = (random_u8(&mut rng, n, extreme), random_u8(&mut rng, n, extreme));
        let op = if mul { BinaryOp::Mul } else { BinaryOp::Add };
        let want: Vec<u8> = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| {
                let (u, v) = (pa.dequantize(x), pb.dequantize(y));
                po.quantize(if mul { u * v } else { u + v })
            })
            .collect();
        for k in kernels_under_test() {
            let mut got = vec![7u8; n];
            k.binary_u8(&a, &b, grids, op, &mut got);
            prop_assert_eq!(&got, &want, "kernel {}", k.name());
        }
    }

    /// Requantization lookups (a concat of differently scaled inputs): every kernel, and the
    /// AVX-512 one with and without its VBMI path, gives `table[x]` at every length.
    #[test]
    fn kernels_look_up_like_the_table(seed in any::<u64>(), n in 0usize..300) {
        let mut rng = Lcg(seed);
        let table: [u8; 256] = std::array::from_fn(|_| rng.below(256) as u8);
        let x = random_u8(&mut rng, n, false);
        let want: Vec<u8> = x.iter().map(|&q| table[usize::from(q)]).collect();
        for k in kernels_under_test() {
            let mut got = vec![7u8; n];
            k.lookup_u8(&table, &x, &mut got);
            prop_assert_eq!(&got, &want, "kernel {}", k.name());
        }
    }

    /// Quantizing the f32 graph input: every kernel gives `QParams::quantize`'s codes, ties,
    /// values far outside the grid, infinities and NaN included.
    #[test]
    fn kernels_quantize_like_the_simulation(
        seed in any::<u64>(),
        n in 0usize..400,
        lo in -4.0f32..0.0,
        hi in 0.0f32..4.0,
    ) {
        let mut rng = Lcg(seed);
        let p = QParams::from_range(lo, hi);
        let x: Vec<f32> = (0..n)
            .map(|_| match rng.below(8) {
                0 => [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30][rng.below(5) as usize],
                // Exact ties of the grid: (k + 1/2) steps from zero.
                1 => (rng.below(600) as f32 - 300.0 + 0.5) * p.scale,
                _ => (rng.unit() - 0.5) * 3.0 * (hi - lo),
            })
            .collect();
        let want: Vec<u8> = x.iter().map(|&v| p.quantize(v)).collect();
        for k in kernels_under_test() {
            let mut got = vec![7u8; n];
            k.quantize_f32(&x, p, &mut got);
            prop_assert_eq!(&got, &want, "kernel {}", k.name());
        }
    }

    /// Whole convs through the engine: every kernel gives the same bytes.
    #[test]
    fn engine_kernels_agree_on_random_convs(
        seed in any::<u64>(),
        groups in 1usize..4,
        depthwise in any::<bool>(),
        cin_g in 1usize..5,
        cout_g in 1usize..5,
        kernel in 1usize..6,
        stride in 1usize..3,
        dilation in 1usize..3,
        pads in proptest::array::uniform4(0usize..3),
        h in 3usize..20,
        w in 3usize..20,
        bits in 2u8..=8,
        act in 0u32..3,
    ) {
        let mut rng = Lcg(seed);
        let (cin_g, cout_g) = if depthwise { (1, 1) } else { (cin_g, cout_g) };
        let span = dilation * (kernel - 1) + 1;
        prop_assume!(h + pads[0] + pads[2] >= span && w + pads[1] + pads[3] >= span);
        let case = RandomConv::new(
            &mut rng, groups, cin_g, cout_g, kernel, stride, dilation, pads, h, w, bits, act,
        );
        let want = case.run(KernelChoice::Scalar);
        // The geometry (padding, stride, dilation, groups) against the reference interpreter: the
        // FP32 simulation differs only where float rounding flips a middle code by one step, which
        // moves an output by at most that step times conv2's largest weight (alpha 0.3).
        let engine = case.engine(KernelChoice::Scalar);
        let sim = fake_quant_simulation(&case.graph, &case.weights, &engine).unwrap();
        let reference = sim.run(case.input.clone()).unwrap();
        let step = case.scales.scales.values().map(|p| p.scale).fold(0f32, f32::max);
        let mut far = 0;
        for (a, b) in want[0].data.iter().zip(&reference[0].data) {
            let d = (a - b).abs();
            prop_assert!(d <= 0.3 * step * (groups * cout_g) as f32 + 1e-3, "{a} vs {b}");
            far += usize::from(d > 1e-3);
        }
        prop_assert!(far * 20 <= want[0].data.len(), "{far} of {} outputs differ", want[0].data.len());
        for k in kernels_under_test() {
            let choice = KernelChoice::parse(k.name()).unwrap();
            let got = case.run(choice);
            for (a, b) in got.iter().zip(&want) {
                let same = a.data.iter().zip(&b.data).all(|(x, y)| x.to_bits() == y.to_bits());
                prop_assert!(same, "kernel {} differs from scalar", k.name());
            }
        }
    }
}

/// A random two-conv graph: a conv with a fused activation and a `u8` output, then a 1x1 conv
/// with an f32 output, so both epilogues are covered.
struct RandomConv {
    graph: Graph,
    weights: BTreeMap<String, QuantizedTensor>,
    scales: ActivationScales,
    input: Tensor,
}

impl RandomConv {
    #[allow(clippy::too_many_arguments)]
    fn new(
        rng: &mut Lcg,
        groups: usize,
        cin_g: usize,
        cout_g: usize,
        kernel: usize,
        stride: usize,
        dilation: usize,
        pads: [usize; 4],
        h: usize,
        w: usize,
        bits: u8,
        act: u32,
    ) -> Self {
        let bits = Bits::new(bits).unwrap();
        let (cin, cout) = (groups * cin_g, groups * cout_g);
        let w1_shape = vec![cout, cin_g, kernel, kernel];
        let n1: usize = w1_shape.iter().product();
        let w2_shape = vec![3, cout, 1, 1];
        let q1 = QuantizedTensor {
            bits,
            shape: w1_shape.clone(),
            alphas: (0..cout).map(|_| 0.05 + rng.unit()).collect(),
            codes: random_codes(rng, n1, bits, 30),
            objective: 0.0,
        };
        let q2 = QuantizedTensor {
            bits,
            shape: w2_shape.clone(),
            alphas: vec![0.3],
            codes: random_codes(rng, 3 * cout, bits, 10),
            objective: 0.0,
        };
        let mut weights_f32 = BTreeMap::new();
        weights_f32.insert("w1".to_string(), q1.to_tensor());
        weights_f32.insert(
            "b1".to_string(),
            Tensor::new(vec![cout], (0..cout).map(|_| rng.unit() - 0.5).collect()).unwrap(),
        );
        weights_f32.insert("w2".to_string(), q2.to_tensor());
        let act_op = match act {
            0 => None,
            1 => Some(Op::Relu),
            _ => Some(Op::LeakyRelu { alpha: 0.1 }),
        };
        let mut nodes = vec![Node {
            name: "conv1".into(),
            op: Op::Conv(Conv {
                weight: "w1".into(),
                bias: Some("b1".into()),
                kernel: [kernel, kernel],
                stride: [stride, stride],
                pads,
                dilation: [dilation, dilation],
                groups,
            }),
            inputs: vec!["x".into()],
            output: "c1".into(),
        }];
        let mid = if let Some(op) = act_op {
            nodes.push(Node {
                name: "act1".into(),
                op,
                inputs: vec!["c1".into()],
                output: "a1".into(),
            });
            "a1"
        } else {
            "c1"
        };
        nodes.push(Node {
            name: "conv2".into(),
            op: Op::Conv(Conv {
                weight: "w2".into(),
                bias: None,
                kernel: [1, 1],
                stride: [1, 1],
                pads: [0; 4],
                dilation: [1, 1],
                groups: 1,
            }),
            inputs: vec![mid.into()],
            output: "y".into(),
        });
        let graph = Graph {
            name: "random".into(),
            input: "x".into(),
            input_shape: vec![1, cin, h, w],
            outputs: vec!["y".into()],
            nodes,
            weights: weights_f32,
        };
        let mut scales = BTreeMap::new();
        scales.insert("x".to_string(), QParams::from_range(-1.0, 2.0));
        let (lo, hi) = if act == 1 { (0.0, 4.0) } else { (-2.0, 4.0) };
        scales.insert(mid.to_string(), QParams::from_range(lo, hi));
        let n_in = cin * h * w;
        let input = Tensor::new(
            vec![1, cin, h, w],
            (0..n_in).map(|_| rng.unit() * 3.0 - 1.0).collect(),
        )
        .unwrap();
        let mut weights = BTreeMap::new();
        weights.insert("w1".to_string(), q1);
        weights.insert("w2".to_string(), q2);
        RandomConv {
            graph,
            weights,
            scales: ActivationScales { scales },
            input,
        }
    }

    /// New codes for conv1 with `zero_pct` percent zeros (its alphas stay).
    fn reweight_conv1(&mut self, rng: &mut Lcg, bits: Bits, zero_pct: u32) {
        let q = self.weights.get_mut("w1").unwrap();
        q.codes = random_codes(rng, q.codes.len(), bits, zero_pct);
        self.graph.weights.insert("w1".to_string(), q.to_tensor());
    }

    fn engine(&self, kernel: KernelChoice) -> ShiftAddEngine {
        ShiftAddEngine::new(
            &self.graph,
            &self.weights,
            &self.scales,
            &EngineOptions { kernel, threads: 1 },
        )
        .unwrap()
    }

    fn run(&self, kernel: KernelChoice) -> Vec<Tensor> {
        self.engine(kernel).run(self.input.clone()).unwrap()
    }
}

#[test]
fn engine_is_close_to_the_fake_quant_simulation_on_a_conv() {
    let mut rng = Lcg(7);
    let case = RandomConv::new(&mut rng, 2, 3, 4, 3, 2, 1, [1, 1, 1, 1], 17, 13, 6, 2);
    let engine = case.engine(KernelChoice::Auto);
    let sim = fake_quant_simulation(&case.graph, &case.weights, &engine).unwrap();
    let want = sim.run(case.input.clone()).unwrap();
    let got = engine.run(case.input.clone()).unwrap();
    // The only differences are float rounding flipping a u8 code at a tie: at most one step of
    // the middle grid times the largest |weight| of conv2, summed over its inputs.
    let step = case.scales.scales["a1"].scale;
    for (a, b) in got[0].data.iter().zip(&want[0].data) {
        assert!((a - b).abs() <= step * 0.3 * 8.0 + 1e-4, "{a} vs {b}");
    }
}

#[test]
fn dispatcher_offers_every_supported_kernel() {
    let names: Vec<&str> = available_kernels().iter().map(|k| k.name()).collect();
    assert_eq!(names.last(), Some(&"scalar"));
    #[cfg(target_arch = "x86_64")]
    {
        assert_eq!(
            names.contains(&"avx2"),
            std::arch::is_x86_feature_detected!("avx2")
        );
        assert_eq!(
            names.contains(&"avx512bw"),
            std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512f")
        );
    }
    // Auto picks the first (best) one; a named one is that one or an error.
    assert_eq!(select_kernel(KernelChoice::Auto).unwrap().name(), names[0]);
    for choice in [
        KernelChoice::Scalar,
        KernelChoice::Avx2,
        KernelChoice::Avx512bw,
    ] {
        match select_kernel(choice) {
            Ok(k) => assert!(names.contains(&k.name())),
            Err(e) => assert!(e.to_string().contains("not supported"), "{e}"),
        }
    }
    assert!(KernelChoice::parse("neon").is_err());
    assert_eq!(
        KernelChoice::parse("AVX512BW").unwrap(),
        KernelChoice::Avx512bw
    );
}
