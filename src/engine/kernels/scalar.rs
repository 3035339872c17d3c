//! The portable kernel: the specification every SIMD kernel must match bit for bit.
//!
//! Plain loops over the [`LANES`] of a tile (the compiler may vectorise them with baseline SSE2;
//! nothing here depends on it). 16-bit arithmetic wraps like the SIMD instructions, although the
//! schedule's bound means it never actually overflows.

use crate::engine::quant_params::{QParams, round_half_even_small};

use super::{
    Activation, BinaryOp, ConvProgram, FlatGeometry, LANES, OutputKind, PlaneOut, ShiftAddKernel,
    TileOut, check_direct, store_flat,
};

#[derive(Debug, Clone, Copy, Default)]
pub struct ScalarKernel;

/// The epilogue of one lane: requantize, activate, and round to a `u8` code.
#[inline]
pub(crate) fn requant_f32(acc: i32, mult: f32, add: f32, act: Activation) -> f32 {
    let t = acc as f32 * mult + add;
    match act {
        Activation::Linear => t,
        Activation::Relu => t.max(0.0),
        Activation::Leaky(a) => t.max(t * a),
    }
}

#[inline]
pub(crate) fn to_code(t: f32, zero_point: u8) -> u8 {
    let r = round_half_even_small(t.clamp(-1024.0, 1024.0)) as i32;
    (r + i32::from(zero_point)).clamp(0, 255) as u8
}

/// Runs one output channel's schedule over a tile: the 32-bit accumulators of its lanes.
pub(crate) fn channel_acc(prog: &ConvProgram, oc: usize, tile: &[i16]) -> [i32; LANES] {
    let mut acc = [0i32; LANES];
    let segs = &prog.segs[prog.oc_segs[oc] as usize..prog.oc_segs[oc + 1] as usize];
    for seg in segs {
        let mut a16 = [0i16; LANES];
        for chunk in &prog.chunks[seg.first as usize..][..seg.len as usize] {
            for v in &mut a16 {
                *v = v.wrapping_shl(u32::from(chunk.shl16));
            }
            for &r in &chunk.rows {
                let row = &tile[usize::from(r) * LANES..][..LANES];
                for (v, &x) in a16.iter_mut().zip(row) {
                    *v = v.wrapping_add(x);
                }
            }
        }
        add_segment(&mut acc, &a16, i32::from(seg.shift32));
    }
    acc
}

/// Sign-extends a finished 16-bit segment and adds it into the channel's 32-bit accumulator,
/// shifted by `shift32` (left when positive; right, flooring, when negative).
fn add_segment(acc: &mut [i32; LANES], a16: &[i16; LANES], shift32: i32) {
    for (a, &v) in acc.iter_mut().zip(a16) {
        let w = i32::from(v);
        let shifted = if shift32 >= 0 {
            w.wrapping_shl(shift32 as u32)
        } else {
            w >> (-shift32).min(31)
        };
        *a = a.wrapping_add(shifted);
    }
}

/// Runs output channel `oc` of a direct program over the [`LANES`] flat positions from `base`:
/// the same Horner steps, segments and shifts as [`channel_acc`] on a tile of the same taps.
pub(crate) fn direct_acc(prog: &ConvProgram, oc: usize, src: &[u8], base: usize) -> [i32; LANES] {
    let mut acc = [0i32; LANES];
    let taps = prog.group_taps(oc);
    let segs = &prog.segs[prog.oc_segs[oc] as usize..prog.oc_segs[oc + 1] as usize];
    for seg in segs {
        let mut a16 = [0i16; LANES];
        for t in &prog.terms[seg.first as usize..][..seg.len as usize] {
            let x = &src[taps[usize::from(t.tap)] as usize + base..][..LANES];
            for (v, &q) in a16.iter_mut().zip(x) {
                let q = i16::from(q);
                let shifted = v.wrapping_shl(u32::from(t.shl));
                *v = if t.neg {
                    shifted.wrapping_sub(q)
                } else {
                    shifted.wrapping_add(q)
                };
            }
        }
        add_segment(&mut acc, &a16, i32::from(seg.shift32));
    }
    acc
}

/// `out[i] = table[x[i]]`, one byte at a time (the portable lookup, and the AVX-512 kernel's
/// without VBMI). Panics unless the lengths are equal.
pub(crate) fn lookup_u8(table: &[u8; 256], x: &[u8], out: &mut [u8]) {
    assert_eq!(x.len(), out.len(), "operand lengths");
    for (d, &q) in out.iter_mut().zip(x) {
        *d = table[usize::from(q)];
    }
}

/// The portable [`ShiftAddKernel::binary_u8`], in a shape the compiler vectorises (branch-free,
/// fixed-size chunks).
pub(crate) fn binary_u8(a: &[u8], b: &[u8], grids: [QParams; 3], op: BinaryOp, out: &mut [u8]) {
    const C: usize = 32;
    assert!(
        a.len() == out.len() && b.len() == out.len(),
        "operand lengths"
    );
    let [pa, pb, po] = grids;
    let n = out.len();
    let main = n - n % C;
    let op = |u: f32, v: f32| match op {
        BinaryOp::Add => u + v,
        BinaryOp::Mul => u * v,
    };
    for ((o, a), b) in out[..main]
        .chunks_exact_mut(C)
        .zip(a[..main].chunks_exact(C))
        .zip(b[..main].chunks_exact(C))
    {
        for i in 0..C {
            o[i] = po.quantize(op(pa.dequantize(a[i]), pb.dequantize(b[i])));
        }
    }
    for i in main..n {
        out[i] = po.quantize(op(pa.dequantize(a[i]), pb.dequantize(b[i])));
    }
}

// SAFETY: plain Rust, runs everywhere.
unsafe impl ShiftAddKernel for ScalarKernel {
    fn name(&self) -> &'static str {
        "scalar"
    }

    fn build_tile(&self, src: &[u8], taps: &[u32], base: usize, tile: &mut [i16]) {
        let k = taps.len();
        assert!(tile.len() >= (2 * k + 1) * LANES, "tile too small");
        let (pos, neg) = tile.split_at_mut(k * LANES);
        for ((p, n), &off) in pos
            .chunks_exact_mut(LANES)
            .zip(neg.chunks_exact_mut(LANES))
            .zip(taps)
        {
            let s = &src[off as usize + base..][..LANES];
            for ((dp, dn), &x) in p.iter_mut().zip(n.iter_mut()).zip(s) {
                *dp = i16::from(x);
                *dn = -i16::from(x);
            }
        }
    }

    fn run_channels(
        &self,
        prog: &ConvProgram,
        first_oc: usize,
        n: usize,
        tile: &[i16],
        out: TileOut<'_>,
    ) {
        assert!(!prog.direct, "run_channels on a direct program");
        assert!(tile.len() >= prog.tile_rows() * LANES);
        match out {
            TileOut::U8(out) => {
                let OutputKind::U8 { zero_point } = prog.out else {
                    panic!("u8 output for an f32 conv")
                };
                for i in 0..n {
                    let oc = first_oc + i;
                    let acc = channel_acc(prog, oc, tile);
                    let row = &mut out[i * LANES..][..LANES];
                    for (o, &a) in row.iter_mut().zip(&acc) {
                        let t = requant_f32(a, prog.mult[oc], prog.add[oc], prog.act);
                        *o = to_code(t, zero_point);
                    }
                }
            }
            TileOut::F32(out) => {
                for i in 0..n {
                    let oc = first_oc + i;
                    let acc = channel_acc(prog, oc, tile);
                    let row = &mut out[i * LANES..][..LANES];
                    for (o, &a) in row.iter_mut().zip(&acc) {
                        *o = requant_f32(a, prog.mult[oc], prog.add[oc], prog.act);
                    }
                }
            }
        }
    }

    fn run_direct(
        &self,
        prog: &ConvProgram,
        oc: usize,
        src: &[u8],
        geom: FlatGeometry,
        out: PlaneOut<'_>,
    ) {
        let (mult, add, act) = (prog.mult[oc], prog.add[oc], prog.act);
        match out {
            PlaneOut::U8(out) => {
                check_direct(prog, oc, src, geom, out.len());
                let OutputKind::U8 { zero_point } = prog.out else {
                    panic!("u8 output for an f32 conv")
                };
                let mut lanes = [0u8; LANES];
                for base in (0..geom.positions).step_by(LANES) {
                    let acc = direct_acc(prog, oc, src, base);
                    for (o, &a) in lanes.iter_mut().zip(&acc) {
                        *o = to_code(requant_f32(a, mult, add, act), zero_point);
                    }
                    store_flat(&lanes, base, geom, out);
                }
            }
            PlaneOut::F32(out) => {
                check_direct(prog, oc, src, geom, out.len());
                let mut lanes = [0f32; LANES];
                for base in (0..geom.positions).step_by(LANES) {
                    let acc = direct_acc(prog, oc, src, base);
                    for (o, &a) in lanes.iter_mut().zip(&acc) {
                        *o = requant_f32(a, mult, add, act);
                    }
                    store_flat(&lanes, base, geom, out);
                }
            }
        }
    }
}
