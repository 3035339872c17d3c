//! AVX2 and AVX-512BW shift-add kernels.
//!
//! Both compute exactly what [`super::scalar`] specifies, including the f32 epilogue (multiply,
//! then add, no FMA; conversion rounds half to even); the loop over a segment's chunks is the only
//! data-dependent branch.
//!
//! The AVX2 kernel vectorises over the [`LANES`] positions of a tile in four registers of 16 `i16`
//! lanes: a weight term is one load-and-add per register, a negative weight adds the tile's negated
//! row. The AVX-512BW kernel's tile keeps the activations as `u8` rows (and their complement `!x`
//! for negative weights), and one 64-byte load covers all 64 positions of a row: summed as 16-bit
//! words it gives `even + 256 * odd` per lane, and shifted right by 8 the odd bytes alone; the even
//! positions' sums are recovered once per segment as `raw - (odd << 8)` (exact mod 2^16, and the
//! segment bound keeps the true sums inside `i16`), and `!x` is corrected by the segment's
//! [`Segment::neg_weight`]. That halves the 64-byte loads per weight term, which bound the `i16`
//! row form on this hardware (docs/ENGINE.md), at the price of one shift and one add per row.
//!
//! Direct programs (one output channel per group) skip the tile: each term is a widening load of
//! the source at its tap, negated by `vpsignw` (AVX2) or, on AVX-512, read from the complement
//! `!x` of the source that the caller keeps beside it (`run_direct_complemented`; corrected by
//! the segment's `neg_weight` as the tiles are) or negated under a mask register where there is
//! no complement: never a branch, so the body of the term loop is the same for every weight.
//!
//! The `u8` epilogues clamp only from above in f32: below, the saturating packs do it, because
//! `clamp(round(clamp(t, -1024, 1024)) + zp, 0, 255)` equals `sat_u8(sat_i16(round(min(t, 1024))) +
//! zp)` for every `t` (a value under -1024 ends negative either way, and the conversion of one under
//! `-2^31` gives `i32::MIN`).

use std::arch::x86_64::*;

use crate::engine::quant_params::QParams;

use super::{
    Activation, BinaryOp, ConvProgram, FlatGeometry, LANES, OutputKind, PhaseSplit, PlaneOut,
    RowCopy, Segment, ShiftAddKernel, TileOut, check_direct, check_multi_out, split_phases_with,
    store_flat,
};

/// Bytes between `i16` tile rows (the AVX2 layout).
const ROW_BYTES: usize = LANES * 2;

/// Checks a program's channel range and the tile before the unchecked loads below.
fn check_run(prog: &ConvProgram, first_oc: usize, n: usize, tile: &[i16], out_len: usize) {
    assert!(!prog.direct, "run_channels on a direct program");
    assert!(first_oc + n <= prog.cout(), "channel range out of bounds");
    assert!(n == 0 || first_oc / prog.cout_g == (first_oc + n - 1) / prog.cout_g);
    assert!(tile.len() >= prog.tile_rows() * LANES, "tile too small");
    assert!(out_len >= n * LANES, "output too small");
}

/// Checks that every tap's [`LANES`] bytes at `base` are inside `src` and the tile fits them.
fn check_tile(src: &[u8], taps: &[u32], base: usize, tile: &[i16]) {
    let max = taps.iter().copied().max().unwrap_or(0) as usize;
    assert!(
        max + base + LANES <= src.len(),
        "tile reads past the source"
    );
    assert!(tile.len() >= (2 * taps.len() + 1) * LANES, "tile too small");
}

fn channel_segments(prog: &ConvProgram, oc: usize) -> &[Segment] {
    &prog.segs[prog.oc_segs[oc] as usize..prog.oc_segs[oc + 1] as usize]
}

// ---------------------------------------------------------------------------------------------
// AVX-512BW
// ---------------------------------------------------------------------------------------------

/// Tiles of `u8` rows read 64 positions per load (see the module documentation); direct programs
/// in blocks of two to eight registers of 32 `i16` lanes. Needs AVX-512F and AVX-512BW.
/// Where AVX-512 VBMI exists too (Ice Lake and later, Zen 4 and later; not Skylake-SP or
/// Cascade Lake), byte permutes run the requantization lookups (a concat of two grids: 21 -> 3 us
/// on yolo-fastest-voc); the conv kernels do not use it. (A VBMI stride-2 phase split measured no
/// faster: those steps wait on reading the input, not on the shuffles.)
#[derive(Debug, Clone, Copy)]
pub struct Avx512bwKernel {
    vbmi: bool,
}

impl Avx512bwKernel {
    pub fn new() -> Option<Self> {
        (is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")).then(|| {
            Avx512bwKernel {
                vbmi: is_x86_feature_detected!("avx512vbmi"),
            }
        })
    }

    /// The same kernel without its VBMI paths (so tests cover both on a VBMI machine).
    pub fn without_vbmi(self) -> Self {
        Avx512bwKernel { vbmi: false }
    }

    /// Whether the VBMI paths are in use.
    pub fn uses_vbmi(&self) -> bool {
        self.vbmi
    }
}

// SAFETY: `new` only succeeds where AVX-512F and AVX-512BW exist.
unsafe impl ShiftAddKernel for Avx512bwKernel {
    fn name(&self) -> &'static str {
        "avx512bw"
    }

    fn build_tile(&self, src: &[u8], taps: &[u32], base: usize, tile: &mut [i16]) {
        check_tile(src, taps, base, tile);
        // SAFETY: the features exist (constructor) and `check_tile` bounds every access.
        unsafe { build_tile_avx512(src, taps, base, tile) }
    }

    fn tile_row_bytes(&self) -> usize {
        LANES
    }

    fn run_channels(
        &self,
        prog: &ConvProgram,
        first_oc: usize,
        n: usize,
        tile: &[i16],
        out: TileOut<'_>,
    ) {
        let out_len = out.len();
        check_run(prog, first_oc, n, tile, out_len);
        // SAFETY: the features exist (constructor); `check_run` bounds the channels, tile and
        // output; `ConvProgram::build` guarantees every term indexes a tap below `k`.
        unsafe { run_channels_avx512(prog, first_oc, n, [tile], out, LANES) }
    }

    fn run_channels_multi(
        &self,
        prog: &ConvProgram,
        first_oc: usize,
        n: usize,
        tiles: &[&[i16]],
        out: TileOut<'_>,
        stride: usize,
    ) {
        check_multi_out(n, tiles.len(), &out, stride);
        for t in tiles {
            // The output is checked above; this checks the program, channels and tile.
            check_run(prog, first_oc, n, t, n * LANES);
        }
        // SAFETY (all three): the features exist (constructor); `check_run` bounds the channels
        // and every tile, `check_multi_out` the output rows `i * stride + j * LANES .. + LANES`;
        // `ConvProgram::build` guarantees every term indexes a tap below `k`.
        match *tiles {
            [t0] => unsafe { run_channels_avx512(prog, first_oc, n, [t0], out, stride) },
            [t0, t1] => unsafe { run_channels_avx512(prog, first_oc, n, [t0, t1], out, stride) },
            [t0, t1, t2] => unsafe {
                run_channels_avx512(prog, first_oc, n, [t0, t1, t2], out, stride)
            },
            _ => unreachable!("checked by check_multi_out"),
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
        let out_len = out.len();
        check_direct(prog, oc, src, geom, out_len);
        // SAFETY: the features exist (constructor); `check_direct` bounds every source read (the
        // largest tap plus the positions rounded up to LANES) and the output plane.
        unsafe { run_direct_avx512::<false>(prog, oc, src, geom, out) }
    }

    fn direct_reads_complement(&self) -> bool {
        true
    }

    fn run_direct_complemented(
        &self,
        prog: &ConvProgram,
        oc: usize,
        src: &[u8],
        geom: FlatGeometry,
        out: PlaneOut<'_>,
    ) {
        let out_len = out.len();
        let half = src.len() / 2;
        check_direct(prog, oc, &src[..half], geom, out_len);
        // SAFETY: the features exist (constructor); `check_direct` bounds every read of the first
        // half (the largest tap plus the positions rounded up to LANES); a complement read is the
        // same offset plus `half`, inside the second half of `src` (2 * half <= src.len()).
        unsafe { run_direct_avx512::<true>(prog, oc, src, geom, out) }
    }

    fn complement_u8(&self, src: &[u8], dst: &mut [u8]) {
        assert_eq!(src.len(), dst.len(), "operand lengths");
        // SAFETY: the features exist (constructor); the lengths are equal (asserted).
        unsafe { complement_avx512(src, dst) }
    }

    fn split_phases(&self, input: &[u8], geom: PhaseSplit, phases: &mut [u8]) {
        if geom.stride == [1, 1] {
            check_stride1_split(input, geom, phases.len());
            // SAFETY: the features exist (constructor); `check_stride1_split` bounds every row.
            unsafe {
                split_stride1_avx512::<false>(
                    input,
                    geom,
                    phases.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            };
            return;
        }
        // SAFETY: the features exist (constructor); the callee only does safe slicing.
        unsafe { split_phases_avx512(self, input, geom, phases) }
    }

    fn split_phases_complemented(
        &self,
        input: &[u8],
        geom: PhaseSplit,
        phases: &mut [u8],
        complement: &mut [u8],
    ) {
        assert_eq!(phases.len(), complement.len(), "operand lengths");
        if geom.stride != [1, 1] {
            self.split_phases(input, geom, phases);
            return self.complement_u8(phases, complement);
        }
        check_stride1_split(input, geom, phases.len());
        // SAFETY: the features exist (constructor); `check_stride1_split` bounds every row of
        // `phases`, and `complement` has its length.
        unsafe {
            split_stride1_avx512::<true>(input, geom, phases.as_mut_ptr(), complement.as_mut_ptr())
        };
    }

    fn lookup_u8(&self, table: &[u8; 256], x: &[u8], out: &mut [u8]) {
        if !self.vbmi {
            return super::scalar::lookup_u8(table, x, out);
        }
        assert_eq!(x.len(), out.len(), "operand lengths");
        // SAFETY: the features exist (constructor, VBMI included); the lengths are equal.
        unsafe { lookup_u8_vbmi(table, x, out) }
    }

    fn quantize_f32(&self, x: &[f32], p: QParams, out: &mut [u8]) {
        assert_eq!(x.len(), out.len(), "operand lengths");
        let main = out.len() - out.len() % 64;
        // SAFETY: the features exist (constructor); both slices hold `main` values.
        unsafe { quantize_f32_avx512(&x[..main], p, &mut out[..main]) };
        for (d, &v) in out[main..].iter_mut().zip(&x[main..]) {
            *d = p.quantize(v);
        }
    }

    fn binary_u8(&self, a: &[u8], b: &[u8], grids: [QParams; 3], op: BinaryOp, out: &mut [u8]) {
        assert!(
            a.len() == out.len() && b.len() == out.len(),
            "operand lengths"
        );
        let main = out.len() - out.len() % 64;
        // SAFETY: the features exist (constructor); all three slices hold `main` bytes.
        unsafe { binary_u8_avx512(&a[..main], &b[..main], grids, op, &mut out[..main]) };
        super::scalar::binary_u8(&a[main..], &b[main..], grids, op, &mut out[main..]);
    }
}

/// Masked 64-byte moves instead of `memcpy` calls: a conv's rows are short (10 to 160 bytes).
impl RowCopy for Avx512bwKernel {
    #[inline]
    fn copy(&self, src: &[u8], dst: &mut [u8]) {
        assert_eq!(src.len(), dst.len());
        // SAFETY: the features exist (constructor); the lengths are equal.
        unsafe { copy_row_avx512(src, dst) }
    }

    #[inline]
    fn deinterleave(&self, src: &[u8], even: &mut [u8], odd: &mut [u8]) {
        assert!(even.len() == src.len().div_ceil(2) && odd.len() == src.len() / 2);
        // SAFETY: the features exist (constructor); the lengths are as the callee needs.
        unsafe { deinterleave_row_avx512(src, even, odd) }
    }
}

/// The portable row loop compiled with the row copies inlined into it (a target_feature function
/// inlines only into callers with the same features).
/// `dst[i] = !src[i]`; the caller guarantees equal lengths.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn complement_avx512(src: &[u8], dst: &mut [u8]) {
    let ones = _mm512_set1_epi8(-1);
    let mut d = dst.chunks_exact_mut(64);
    let mut s = src.chunks_exact(64);
    for (d, s) in (&mut d).zip(&mut s) {
        // SAFETY: both chunks hold 64 bytes.
        unsafe {
            let x = _mm512_loadu_si512(s.as_ptr().cast());
            _mm512_storeu_si512(d.as_mut_ptr().cast(), _mm512_xor_si512(x, ones));
        }
    }
    let (d, s) = (d.into_remainder(), s.remainder());
    if !s.is_empty() {
        let m = lanes_mask(s.len());
        // SAFETY: the masks cover the remainders' `s.len() < 64` bytes only; masked-off lanes are
        // not accessed.
        unsafe {
            let x = _mm512_maskz_loadu_epi8(m, s.as_ptr().cast());
            _mm512_mask_storeu_epi8(d.as_mut_ptr().cast(), m, _mm512_xor_si512(x, ones));
        }
    }
}

/// The bounds [`split_stride1_avx512`] relies on: each of the rows it copies (the first `h`
/// whole rows of `input`, as the portable split) lands inside its padded row of a `phases_len`
/// plane.
fn check_stride1_split(input: &[u8], geom: PhaseSplit, phases_len: usize) {
    let PhaseSplit { h, w, pads, wq, .. } = geom;
    let rows = input.len().checked_div(w).map_or(0, |n| h.min(n));
    assert!(
        rows == 0 || (pads[1] + w <= wq && (pads[0] + rows) * wq <= phases_len),
        "phase split {geom:?} does not fit {phases_len} bytes"
    );
}

/// The stride-1 split: row `r` of `input` to row `pads[0] + r`, column `pads[1]`, of the one
/// plane, with the tail mask computed once rather than the general row loop's per-row phase
/// bookkeeping (a probe skipping the depthwise splits saved 0.19 of yolo-fastest-voc's 0.70 ms
/// of depthwise convs; this form, with the complement fused, measured 0.70-0.78 -> 0.65-0.71 ms).
/// With `COMPLEMENT` every row is also stored complemented at the same offset of `comp`, which
/// is otherwise unused. The caller has run [`check_stride1_split`] for `dst` (and `comp`, of the
/// same length, when `COMPLEMENT`).
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn split_stride1_avx512<const COMPLEMENT: bool>(
    input: &[u8],
    geom: PhaseSplit,
    dst: *mut u8,
    comp: *mut u8,
) {
    let PhaseSplit { h, w, pads, wq, .. } = geom;
    if w == 0 {
        return;
    }
    let rows = h.min(input.len() / w);
    let (full, tail) = (w / 64, lanes_mask(w % 64));
    let ones = _mm512_set1_epi8(-1);
    let s = input.as_ptr();
    for r in 0..rows {
        let (from, to) = (r * w, (pads[0] + r) * wq + pads[1]);
        // SAFETY: bytes from .. from + w lie in the first `rows` rows of `input`, and to .. to + w
        // in padded row pads[0] + r < pads[0] + rows, whose last byte is below (pads[0] + rows) *
        // wq <= the plane's length (`check_stride1_split`, with pads[1] + w <= wq); the tail's
        // mask admits only its `w % 64` lanes, and masked-off lanes are not accessed.
        unsafe {
            for i in 0..full {
                let v = _mm512_loadu_si512(s.add(from + 64 * i).cast());
                _mm512_storeu_si512(dst.add(to + 64 * i).cast(), v);
                if COMPLEMENT {
                    _mm512_storeu_si512(comp.add(to + 64 * i).cast(), _mm512_xor_si512(v, ones));
                }
            }
            if tail != 0 {
                let at = 64 * full;
                let v = _mm512_maskz_loadu_epi8(tail, s.add(from + at).cast());
                _mm512_mask_storeu_epi8(dst.add(to + at).cast(), tail, v);
                if COMPLEMENT {
                    let c = _mm512_xor_si512(v, ones);
                    _mm512_mask_storeu_epi8(comp.add(to + at).cast(), tail, c);
                }
            }
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn split_phases_avx512(
    k: &Avx512bwKernel,
    input: &[u8],
    geom: PhaseSplit,
    phases: &mut [u8],
) {
    split_phases_with(k, input, geom, phases);
}

/// `out[i] = table[x[i]]`: two 128-entry permutes per 64 bytes, picked by each index's top bit.
/// The caller guarantees equal lengths.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn lookup_u8_vbmi(table: &[u8; 256], x: &[u8], out: &mut [u8]) {
    let t = table.as_ptr();
    // SAFETY: the table holds 256 bytes: four 64-byte loads.
    let [t0, t1, t2, t3] =
        [0, 64, 128, 192].map(|o| unsafe { _mm512_loadu_si512(t.add(o).cast()) });
    let n = x.len();
    for i in (0..n).step_by(64) {
        let m = lanes_mask(n - i);
        // SAFETY: i < n = out.len(); the masks admit only lanes i .. min(i + 64, n) of both
        // slices; masked-off lanes are not accessed.
        unsafe {
            let q = _mm512_maskz_loadu_epi8(m, x.as_ptr().add(i).cast());
            let lo = _mm512_permutex2var_epi8(t0, q, t1);
            let hi = _mm512_permutex2var_epi8(t2, q, t3);
            let v = _mm512_mask_blend_epi8(_mm512_movepi8_mask(q), lo, hi);
            _mm512_mask_storeu_epi8(out.as_mut_ptr().add(i).cast(), m, v);
        }
    }
}

/// The mask of the first `n.min(64)` byte lanes.
fn lanes_mask(n: usize) -> u64 {
    if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }
}

/// `dst = src`; the caller guarantees equal lengths.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn copy_row_avx512(src: &[u8], dst: &mut [u8]) {
    let n = src.len();
    for i in (0..n).step_by(64) {
        let m = lanes_mask(n - i);
        // SAFETY: i < n, and the masks admit only lanes i .. min(i + 64, n) of both slices;
        // masked-off lanes are not accessed.
        unsafe {
            let v = _mm512_maskz_loadu_epi8(m, src.as_ptr().add(i).cast());
            _mm512_mask_storeu_epi8(dst.as_mut_ptr().add(i).cast(), m, v);
        }
    }
}

/// `even[i] = src[2i]`, `odd[i] = src[2i + 1]`; the caller guarantees `even.len() == ceil(n / 2)`
/// and `odd.len() == n / 2`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn deinterleave_row_avx512(src: &[u8], even: &mut [u8], odd: &mut [u8]) {
    let n = src.len();
    let low = _mm512_set1_epi16(0xff);
    // packus interleaves per 128-bit lane: qword 2L holds lane L of the first source, 2L + 1 of
    // the second.
    let order = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
    for i in (0..n).step_by(128) {
        let (ma, mb) = (lanes_mask(n - i), lanes_mask((n - i).saturating_sub(64)));
        let h = i / 2;
        // SAFETY: the loads touch only src lanes i .. min(i + 128, n) (the second pointer is
        // formed with wrapping arithmetic and its mask is empty when it would pass the end); the
        // stores only even lanes h .. min(h + 64, even.len()) and odd lanes h .. min(h + 64,
        // odd.len()), where h <= odd.len() <= even.len() because i < n.
        unsafe {
            let p = src.as_ptr().add(i);
            let a = _mm512_maskz_loadu_epi8(ma, p.cast());
            let b = _mm512_maskz_loadu_epi8(mb, p.wrapping_add(64).cast());
            let ev = _mm512_packus_epi16(_mm512_and_si512(a, low), _mm512_and_si512(b, low));
            let od = _mm512_packus_epi16(_mm512_srli_epi16::<8>(a), _mm512_srli_epi16::<8>(b));
            let me = lanes_mask(even.len() - h);
            let mo = lanes_mask(odd.len() - h);
            _mm512_mask_storeu_epi8(
                even.as_mut_ptr().add(h).cast(),
                me,
                _mm512_permutexvar_epi64(order, ev),
            );
            _mm512_mask_storeu_epi8(
                odd.as_mut_ptr().add(h).cast(),
                mo,
                _mm512_permutexvar_epi64(order, od),
            );
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn build_tile_avx512(src: &[u8], taps: &[u32], base: usize, tile: &mut [i16]) {
    let s = src.as_ptr();
    let d = tile.as_mut_ptr().cast::<u8>();
    let n = taps.len();
    let ones = _mm512_set1_epi8(-1);
    for (k, &off) in taps.iter().enumerate() {
        // SAFETY: caller checked `off + base + LANES <= src.len()` and that `tile` holds
        // `(2 * taps.len() + 1) * LANES` i16, twice the bytes the rows below take.
        unsafe {
            let x = _mm512_loadu_si512(s.add(off as usize + base).cast());
            _mm512_storeu_si512(d.add(k * LANES).cast(), x);
            _mm512_storeu_si512(d.add((n + k) * LANES).cast(), _mm512_xor_si512(x, ones));
        }
    }
}

/// Runs output channel `oc`'s schedule over `N` byte tiles at once (see [`Avx512bwKernel`]) and
/// returns each tile's 32-bit accumulators as four vectors of 16 lanes: the even positions of the
/// tile's first and second halves, then the odd ones ([`pair_lanes_avx512`] and
/// [`interleave_positions_avx512`] put them in the orders the stores want). A macro
/// rather than a function: a `target_feature` function cannot be forced inline, and returned by
/// value the accumulators went through the stack. The caller guarantees that every tile holds
/// the program's `2k + 1` byte rows and runs it inside an AVX-512BW `target_feature` function.
macro_rules! channel_acc_avx512 {
    ($prog:expr, $oc:expr, $tiles:expr) => {{
        let (prog, oc, tiles): (&ConvProgram, usize, [*const u8; N]) = ($prog, $oc, $tiles);
        let zero = _mm512_setzero_si512();
        // Per tile: even positions' lanes 0..16 and 16..32, then the odd positions'.
        let mut acc = [[zero; 4]; N];
        for (si, seg) in channel_segments(prog, oc).iter().enumerate() {
            // `raw` sums whole words (even byte + 256 x odd byte), `odd` the odd bytes alone.
            let mut raw = [zero; N];
            let mut odd = [zero; N];
            for chunk in &prog.chunks[seg.first as usize..][..seg.len as usize] {
                let sh = _mm_cvtsi32_si128(i32::from(chunk.shl16));
                // The chunk's rows are summed off the accumulators' dependency chains (wrapping
                // adds are associative), leaving one shift and one add per chunk on each chain.
                let mut rs = [zero; N];
                let mut os = [zero; N];
                for &r in &chunk.rows {
                    let off = usize::from(r) * LANES;
                    for j in 0..N {
                        // SAFETY: r < 2k + 1 (program invariant) and each tile holds 2k + 1 rows.
                        let v = unsafe { _mm512_loadu_si512(tiles[j].add(off).cast()) };
                        rs[j] = _mm512_add_epi16(rs[j], v);
                        os[j] = _mm512_add_epi16(os[j], _mm512_srli_epi16::<8>(v));
                    }
                }
                for j in 0..N {
                    raw[j] = _mm512_add_epi16(_mm512_sll_epi16(raw[j], sh), rs[j]);
                    odd[j] = _mm512_add_epi16(_mm512_sll_epi16(odd[j], sh), os[j]);
                }
            }
            // A negated row holds `!x`: its word is `-1 - w` and its odd byte `255 - x_odd`.
            let c = seg.neg_weight as i16;
            let (c_raw, c_odd) = (_mm512_set1_epi16(c), _mm512_set1_epi16(255 * c));
            let cnt = _mm_cvtsi32_si128(i32::from(seg.shift32).abs());
            for j in 0..N {
                let o = _mm512_sub_epi16(odd[j], c_odd);
                let e =
                    _mm512_sub_epi16(_mm512_add_epi16(raw[j], c_raw), _mm512_slli_epi16::<8>(o));
                let wide = [
                    _mm512_cvtepi16_epi32(_mm512_castsi512_si256(e)),
                    _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64::<1>(e)),
                    _mm512_cvtepi16_epi32(_mm512_castsi512_si256(o)),
                    _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64::<1>(o)),
                ];
                for (a, w) in acc[j].iter_mut().zip(wide) {
                    // Single-segment channels have shift32 = 0: skip the identity shift.
                    let s = if seg.shift32 == 0 {
                        w
                    } else if seg.shift32 > 0 {
                        _mm512_sll_epi32(w, cnt)
                    } else {
                        _mm512_sra_epi32(w, cnt)
                    };
                    // The first segment sets the accumulators (most channels have one).
                    *a = if si == 0 { s } else { _mm512_add_epi32(*a, s) };
                }
            }
        }
        acc
    }};
}

/// The even/odd quarters of [`channel_acc_avx512`] in position order: quarter `q` holds positions
/// `16q .. 16q + 16` (for the f32 outputs).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn interleave_positions_avx512([e0, e1, o0, o1]: [__m512i; 4]) -> [__m512i; 4] {
    // Position p of a half is even lane p / 2 (index p / 2) or odd lane p / 2 (index 16 + p / 2).
    let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    [
        _mm512_permutex2var_epi32(e0, lo, o0),
        _mm512_permutex2var_epi32(e0, hi, o0),
        _mm512_permutex2var_epi32(e1, lo, o1),
        _mm512_permutex2var_epi32(e1, hi, o1),
    ]
}

/// The even/odd quarters of [`channel_acc_avx512`] paired per 128-bit lane, the order
/// [`round_pack_avx512`] with [`PackOrder::LanePairs`] undoes: in-lane unpacks instead of the
/// cross-lane permutes of [`interleave_positions_avx512`] (cheaper on every AVX-512 core).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn pair_lanes_avx512([e0, e1, o0, o1]: [__m512i; 4]) -> [__m512i; 4] {
    [
        _mm512_unpacklo_epi32(e0, o0),
        _mm512_unpackhi_epi32(e0, o0),
        _mm512_unpacklo_epi32(e1, o1),
        _mm512_unpackhi_epi32(e1, o1),
    ]
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn epilogue_avx512(acc: __m512i, mult: __m512, add: __m512, act: Activation) -> __m512 {
    let t = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), mult), add);
    match act {
        Activation::Linear => t,
        Activation::Relu => _mm512_max_ps(t, _mm512_setzero_ps()),
        Activation::Leaky(a) => _mm512_max_ps(t, _mm512_mul_ps(t, _mm512_set1_ps(a))),
    }
}

/// Runs channels `first_oc .. first_oc + n` over `N` tiles, writing channel `first_oc + i`'s
/// outputs from `tiles[j]` to `out[i * stride + j * LANES..]`. The caller has checked the channel
/// range, every tile and that those rows are inside `out` (see `run_channels`).
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn run_channels_avx512<const N: usize>(
    prog: &ConvProgram,
    first_oc: usize,
    n: usize,
    tiles: [&[i16]; N],
    out: TileOut<'_>,
    stride: usize,
) {
    let tp = tiles.map(|t| t.as_ptr().cast::<u8>());
    match out {
        TileOut::U8(out) => {
            let OutputKind::U8 { zero_point } = prog.out else {
                panic!("u8 output for an f32 conv")
            };
            let zp16 = _mm512_set1_epi16(i16::from(zero_point));
            let clamp = !prog.clamp_free;
            let d = out.as_mut_ptr();
            for i in 0..n {
                let oc = first_oc + i;
                // The tiles hold 2k + 1 rows: checked by the caller (see `run_channels`).
                let acc = channel_acc_avx512!(prog, oc, tp);
                let (m, a) = (_mm512_set1_ps(prog.mult[oc]), _mm512_set1_ps(prog.add[oc]));
                for (j, acc) in acc.into_iter().enumerate() {
                    let v = pair_lanes_avx512(acc);
                    let bytes = codes_avx512(&v, m, a, prog.act, zp16, clamp, PackOrder::LanePairs);
                    // SAFETY: row i * stride + j * LANES .. + LANES is inside `out` (checked).
                    unsafe { _mm512_storeu_si512(d.add(i * stride + j * LANES).cast(), bytes) };
                }
            }
        }
        TileOut::F32(out) => {
            let d = out.as_mut_ptr();
            for i in 0..n {
                let oc = first_oc + i;
                // The tiles hold 2k + 1 rows: checked by the caller.
                let acc = channel_acc_avx512!(prog, oc, tp);
                let (m, a) = (_mm512_set1_ps(prog.mult[oc]), _mm512_set1_ps(prog.add[oc]));
                for (j, acc) in acc.into_iter().enumerate() {
                    for (q, &v) in interleave_positions_avx512(acc).iter().enumerate() {
                        // SAFETY: features enabled; the row is inside `out` (checked).
                        unsafe {
                            let t = epilogue_avx512(v, m, a, prog.act);
                            _mm512_storeu_ps(d.add(i * stride + j * LANES + q * 16), t);
                        }
                    }
                }
            }
        }
    }
}

/// Requantizes 64 lanes (four vectors of 16 `i32`) to `u8` codes in lane order; `clamp: false`
/// only where [`ConvProgram::clamp_free`] holds (see [`round_pack_avx512`]).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn codes_avx512(
    acc: &[__m512i],
    m: __m512,
    a: __m512,
    act: Activation,
    zp16: __m512i,
    clamp: bool,
    order: PackOrder,
) -> __m512i {
    let t: [__m512; 4] = std::array::from_fn(|j| {
        // SAFETY: features enabled by the enclosing target_feature.
        unsafe { epilogue_avx512(acc[j], m, a, act) }
    });
    round_pack_avx512(t, zp16, clamp, order)
}

/// Which 64 positions the four vectors of [`round_pack_avx512`] hold.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PackOrder {
    /// Vector `q` holds positions `16q .. 16q + 16`.
    Positions,
    /// What [`pair_lanes_avx512`] makes: 128-bit lane `L` of vectors 0, 1, 2, 3 holds positions
    /// `8L .. 8L + 4`, `8L + 4 .. 8L + 8`, `32 + 8L .. 32 + 8L + 4` and `32 + 8L + 4 .. 32 + 8L + 8`.
    LanePairs,
}

/// `clamp(round_half_even(clamp(t, -1024, 1024)) + zp, 0, 255)` of 64 lanes, in lane order.
/// `clamp: false` skips `min(t, 1024)`, which is exact only where every `|t| < 2^31` (then the
/// rounded value saturates in the packs exactly as 1024 would).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn round_pack_avx512(t: [__m512; 4], zp16: __m512i, clamp: bool, order: PackOrder) -> __m512i {
    let hi = _mm512_set1_ps(1024.0);
    let r = t.map(|t| {
        let t = if clamp { _mm512_min_ps(t, hi) } else { t };
        _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t)
    });
    let p01 = _mm512_adds_epi16(_mm512_packs_epi32(r[0], r[1]), zp16);
    let p23 = _mm512_adds_epi16(_mm512_packs_epi32(r[2], r[3]), zp16);
    let bytes = _mm512_packus_epi16(p01, p23);
    match order {
        // The packs work per 128-bit lane: dword `4 * lane + j` holds positions `16 * j + 4 *
        // lane..`.
        PackOrder::Positions => {
            let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
            _mm512_permutexvar_epi32(idx, bytes)
        }
        // Lane L of the packs holds positions 8L .. 8L + 8 (qword 2L) and 32 + 8L .. 32 + 8L + 8
        // (qword 2L + 1).
        PackOrder::LanePairs => {
            _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), bytes)
        }
    }
}

/// [`ShiftAddKernel::binary_u8`] on whole blocks of 64; the caller guarantees that all three
/// slices have the same length, a multiple of 64.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn binary_u8_avx512(a: &[u8], b: &[u8], grids: [QParams; 3], op: BinaryOp, out: &mut [u8]) {
    let [pa, pb, po] = grids;
    // The same f32 operations in the same order as `QParams::dequantize` and `quantize` (the
    // reciprocal included), so every lane rounds as the portable code does.
    let dequant = |p: QParams| {
        (
            _mm512_set1_ps(f32::from(p.zero_point)),
            _mm512_set1_ps(p.scale),
        )
    };
    let ((za, sa), (zb, sb)) = (dequant(pa), dequant(pb));
    let inv = _mm512_set1_ps(1.0 / po.scale);
    let zp16 = _mm512_set1_epi16(i16::from(po.zero_point));
    for ((o, a), b) in out
        .chunks_exact_mut(64)
        .zip(a.chunks_exact(64))
        .zip(b.chunks_exact(64))
    {
        // SAFETY: each chunk holds 64 bytes.
        let (va, vb) = unsafe {
            (
                _mm512_loadu_si512(a.as_ptr().cast()),
                _mm512_loadu_si512(b.as_ptr().cast()),
            )
        };
        let quarter = |v: __m512i, j: usize| {
            let q = match j {
                0 => _mm512_extracti32x4_epi32::<0>(v),
                1 => _mm512_extracti32x4_epi32::<1>(v),
                2 => _mm512_extracti32x4_epi32::<2>(v),
                _ => _mm512_extracti32x4_epi32::<3>(v),
            };
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q))
        };
        let t: [__m512; 4] = std::array::from_fn(|j| {
            let u = _mm512_mul_ps(_mm512_sub_ps(quarter(va, j), za), sa);
            let v = _mm512_mul_ps(_mm512_sub_ps(quarter(vb, j), zb), sb);
            let x = match op {
                BinaryOp::Add => _mm512_add_ps(u, v),
                BinaryOp::Mul => _mm512_mul_ps(u, v),
            };
            _mm512_mul_ps(x, inv)
        });
        let codes = round_pack_avx512(t, zp16, true, PackOrder::Positions);
        // SAFETY: the chunk holds 64 bytes.
        unsafe { _mm512_storeu_si512(o.as_mut_ptr().cast(), codes) };
    }
}

/// [`ShiftAddKernel::quantize_f32`] on whole blocks of 64; the caller guarantees equal lengths, a
/// multiple of 64.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_f32_avx512(x: &[f32], p: QParams, out: &mut [u8]) {
    let inv = _mm512_set1_ps(1.0 / p.scale);
    let zp16 = _mm512_set1_epi16(i16::from(p.zero_point));
    for (o, x) in out.chunks_exact_mut(64).zip(x.chunks_exact(64)) {
        let t: [__m512; 4] = std::array::from_fn(|j| {
            // SAFETY: the chunk holds 64 floats; 16 * j + 16 <= 64.
            let v = unsafe { _mm512_loadu_ps(x.as_ptr().add(16 * j)) };
            let t = _mm512_mul_ps(v, inv);
            // NaN becomes code `zp` in `QParams::quantize` (`NaN as i32` is 0): zero it here.
            _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(t, t), t)
        });
        let codes = round_pack_avx512(t, zp16, true, PackOrder::Positions);
        // SAFETY: the chunk holds 64 bytes.
        unsafe { _mm512_storeu_si512(o.as_mut_ptr().cast(), codes) };
    }
}

/// The output row the next flat position falls in.
struct RowCursor {
    oy: usize,
    start: usize,
}

/// Stores the 64 codes of flat positions `g0..g0 + 64` into their rows of `out` with one masked
/// store per row piece. The caller guarantees that `out` holds `geom.rows() * geom.width` bytes,
/// that `geom` passed [`FlatGeometry::check`], and that groups come in increasing order with
/// `rows` at the row of `g0`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn store_rows_avx512(
    v: __m512i,
    g0: usize,
    geom: FlatGeometry,
    out: *mut u8,
    rows: &mut RowCursor,
) {
    let end = (g0 + 64).min(geom.positions);
    while rows.start < end {
        let lo = rows.start.max(g0);
        let hi = (rows.start + geom.width).min(end);
        if hi > lo {
            let mask = (u64::MAX >> (64 - (hi - lo))) << (lo - g0);
            // Lane l belongs at out[oy * width + g0 + l - start]; the base may point before `out`
            // (wrapping arithmetic, never dereferenced there).
            let dst = out
                .wrapping_add(rows.oy * geom.width + g0)
                .wrapping_sub(rows.start);
            // SAFETY: the masked store touches only lanes lo - g0 .. hi - g0, whose flat positions
            // f in lo..hi lie in row oy's first `width` columns, so they land at
            // out[oy * width + f - start] < rows() * width (oy < rows() because start < end <=
            // positions): inside `out` (caller's contract). Masked-off lanes are not accessed.
            unsafe { _mm512_mask_storeu_epi8(dst.cast(), mask, v) };
        }
        if rows.start + geom.pitch > g0 + 64 {
            break;
        }
        rows.start += geom.pitch;
        rows.oy += 1;
    }
}

/// Runs a direct program's channel over the `32 * N` flat positions at `p` (the source plus the
/// block's first position): the 32-bit accumulators of each 16-lane quarter, in position order.
/// The caller guarantees that every tap of the channel's group plus `32 * N` bytes is readable
/// from `p`.
///
/// With `COMPLEMENT`, `p + half` starts the complement `!x` of the source, and a negative term
/// reads it there: `255 - x` is added, and `255 * neg_weight` subtracted once per segment, instead
/// of negating every term under a mask (one instruction fewer per term and 32 positions; the
/// caller guarantees those reads as well).
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn direct_block_avx512<const N: usize, const COMPLEMENT: bool>(
    prog: &ConvProgram,
    taps: &[u32],
    segs: &[Segment],
    p: *const u8,
    half: usize,
) -> [[__m512i; 2]; N] {
    let zero = _mm512_setzero_si512();
    let mut acc = [[zero; 2]; N];
    for (si, seg) in segs.iter().enumerate() {
        let mut a = [zero; N];
        for t in &prog.terms[seg.first as usize..][..seg.len as usize] {
            let sh = _mm_cvtsi32_si128(i32::from(t.shl));
            let tap = taps[usize::from(t.tap)] as usize;
            if COMPLEMENT {
                let tp = p.wrapping_add(tap + usize::from(t.neg) * half);
                for (i, v) in a.iter_mut().enumerate() {
                    // SAFETY: tp + 32 * i + 32 <= tp + 32 * N is readable (caller's contract).
                    let x =
                        unsafe { _mm512_cvtepu8_epi16(_mm256_loadu_si256(tp.add(32 * i).cast())) };
                    *v = _mm512_add_epi16(_mm512_sll_epi16(*v, sh), x);
                }
            } else {
                let tp = p.wrapping_add(tap);
                let neg: __mmask32 = 0u32.wrapping_sub(u32::from(t.neg));
                for (i, v) in a.iter_mut().enumerate() {
                    // SAFETY: tp + 32 * i + 32 <= tp + 32 * N is readable (caller's contract).
                    let x =
                        unsafe { _mm512_cvtepu8_epi16(_mm256_loadu_si256(tp.add(32 * i).cast())) };
                    let x = _mm512_mask_sub_epi16(x, neg, zero, x);
                    *v = _mm512_add_epi16(_mm512_sll_epi16(*v, sh), x);
                }
            }
        }
        if COMPLEMENT && seg.neg_weight != 0 {
            // The segment bound keeps the sums of `255 - x` and the correction inside `i16`.
            let c = _mm512_set1_epi16((255 * u32::from(seg.neg_weight)) as i16);
            for v in a.iter_mut() {
                *v = _mm512_sub_epi16(*v, c);
            }
        }
        let cnt = _mm_cvtsi32_si128(i32::from(seg.shift32).abs());
        for (w, v) in acc.iter_mut().zip(a) {
            let wide = [
                _mm512_cvtepi16_epi32(_mm512_castsi512_si256(v)),
                _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64::<1>(v)),
            ];
            for (d, x) in w.iter_mut().zip(wide) {
                // Single-segment channels (most depthwise ones: nine terms) have shift32 = 0.
                let s = if seg.shift32 == 0 {
                    x
                } else if seg.shift32 > 0 {
                    _mm512_sll_epi32(x, cnt)
                } else {
                    _mm512_sra_epi32(x, cnt)
                };
                // The first segment sets the accumulators (most channels have one).
                *d = if si == 0 { s } else { _mm512_add_epi32(*d, s) };
            }
        }
    }
    acc
}

/// [`ShiftAddKernel::run_direct`], or with `COMPLEMENT` `run_direct_complemented` (`src` then
/// holds both halves; the taps index the first).
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn run_direct_avx512<const COMPLEMENT: bool>(
    prog: &ConvProgram,
    oc: usize,
    src: &[u8],
    geom: FlatGeometry,
    out: PlaneOut<'_>,
) {
    let half = if COMPLEMENT { src.len() / 2 } else { 0 };
    let taps = prog.group_taps(oc);
    let segs = channel_segments(prog, oc);
    let s = src.as_ptr();
    let (m, a) = (_mm512_set1_ps(prog.mult[oc]), _mm512_set1_ps(prog.add[oc]));
    let act = prog.act;
    let clamp = !prog.clamp_free;
    match out {
        PlaneOut::U8(out) => {
            let OutputKind::U8 { zero_point } = prog.out else {
                panic!("u8 output for an f32 conv")
            };
            let zp16 = _mm512_set1_epi16(i16::from(zero_point));
            let o = out.as_mut_ptr();
            let mut rows = RowCursor { oy: 0, start: 0 };
            let mut f0 = 0;
            // Runs the `$n / 2` blocks of 64 positions from `f0` and stores their codes.
            macro_rules! u8_blocks {
                ($n:literal) => {
                    // SAFETY: the caller below checked f0 + 32 * $n <= positions rounded up to
                    // LANES (f0 is a multiple of 64), which `check_direct` bounds for every tap;
                    // `out` is checked by `check_direct` and `rows` follows the groups in order.
                    unsafe {
                        let acc = direct_block_avx512::<$n, COMPLEMENT>(
                            prog,
                            taps,
                            segs,
                            s.add(f0),
                            half,
                        );
                        for (h, q) in acc.chunks_exact(2).enumerate() {
                            let v = [q[0][0], q[0][1], q[1][0], q[1][1]];
                            let bytes =
                                codes_avx512(&v, m, a, act, zp16, clamp, PackOrder::Positions);
                            store_rows_avx512(bytes, f0 + 64 * h, geom, o, &mut rows);
                        }
                    }
                    f0 += $n / 2 * LANES;
                };
            }
            // Blocks of 256 while more than 192 positions remain, then of 128 while more than
            // 64 do, so no read passes the last position rounded up to LANES. (Blocks of 256 keep
            // eight independent add chains per term: depthwise 0.81-0.85 -> 0.77-0.79 ms on
            // yolo-fastest-voc against blocks of 128.)
            while f0 < geom.positions {
                let left = geom.positions - f0;
                if left > 3 * LANES {
                    u8_blocks!(8);
                } else if left > LANES {
                    u8_blocks!(4);
                } else {
                    u8_blocks!(2);
                }
            }
        }
        PlaneOut::F32(out) => {
            // Graph outputs only: a staged block and the portable scatter are fast enough.
            let mut lanes = [0f32; LANES];
            for f0 in (0..geom.positions).step_by(LANES) {
                // SAFETY: f0 + 64 <= positions rounded up to LANES, bounded by `check_direct`.
                let acc = unsafe {
                    direct_block_avx512::<2, COMPLEMENT>(prog, taps, segs, s.add(f0), half)
                };
                for (j, v) in acc.iter().flatten().enumerate() {
                    // SAFETY: features enabled; 16 * j + 16 <= LANES.
                    unsafe {
                        let t = epilogue_avx512(*v, m, a, act);
                        _mm512_storeu_ps(lanes.as_mut_ptr().add(16 * j), t);
                    }
                }
                store_flat(&lanes, f0, geom, out);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// AVX2
// ---------------------------------------------------------------------------------------------

/// 64 lanes as four 16 x i16 registers; needs AVX2.
#[derive(Debug, Clone, Copy)]
pub struct Avx2Kernel {
    _private: (),
}

impl Avx2Kernel {
    pub fn new() -> Option<Self> {
        is_x86_feature_detected!("avx2").then_some(Avx2Kernel { _private: () })
    }
}

// SAFETY: `new` only succeeds where AVX2 exists.
unsafe impl ShiftAddKernel for Avx2Kernel {
    fn name(&self) -> &'static str {
        "avx2"
    }

    fn build_tile(&self, src: &[u8], taps: &[u32], base: usize, tile: &mut [i16]) {
        check_tile(src, taps, base, tile);
        // SAFETY: AVX2 exists (constructor) and `check_tile` bounds every access.
        unsafe { build_tile_avx2(src, taps, base, tile) }
    }

    fn run_channels(
        &self,
        prog: &ConvProgram,
        first_oc: usize,
        n: usize,
        tile: &[i16],
        out: TileOut<'_>,
    ) {
        let out_len = out.len();
        check_run(prog, first_oc, n, tile, out_len);
        // SAFETY: AVX2 exists; bounds as for the AVX-512 kernel.
        unsafe { run_channels_avx2(prog, first_oc, n, tile, out) }
    }

    fn run_direct(
        &self,
        prog: &ConvProgram,
        oc: usize,
        src: &[u8],
        geom: FlatGeometry,
        out: PlaneOut<'_>,
    ) {
        let out_len = out.len();
        check_direct(prog, oc, src, geom, out_len);
        // SAFETY: AVX2 exists; `check_direct` bounds every source read; the output is written
        // through the bounds-checked `store_flat`.
        unsafe { run_direct_avx2(prog, oc, src, geom, out) }
    }
}

#[target_feature(enable = "avx2")]
unsafe fn build_tile_avx2(src: &[u8], taps: &[u32], base: usize, tile: &mut [i16]) {
    let s = src.as_ptr();
    let d = tile.as_mut_ptr();
    let n = taps.len();
    let zero = _mm256_setzero_si256();
    for (k, &off) in taps.iter().enumerate() {
        for h in 0..4 {
            // SAFETY: caller checked `off + base + LANES <= src.len()` and that `tile` holds
            // `2 * taps.len() + 1` rows of LANES; 16 * h + 16 <= LANES.
            unsafe {
                let p = s.add(off as usize + base + 16 * h);
                let v = _mm256_cvtepu8_epi16(_mm_loadu_si128(p.cast()));
                _mm256_storeu_si256(d.add(k * LANES + 16 * h).cast(), v);
                let neg = _mm256_sub_epi16(zero, v);
                _mm256_storeu_si256(d.add((n + k) * LANES + 16 * h).cast(), neg);
            }
        }
    }
}

#[target_feature(enable = "avx2")]
unsafe fn channel_acc_avx2(prog: &ConvProgram, oc: usize, tile: *const i16) -> [__m256i; 8] {
    let zero = _mm256_setzero_si256();
    let mut acc = [zero; 8];
    for seg in channel_segments(prog, oc) {
        let mut a = [zero; 4];
        let tb = tile.cast::<u8>();
        for chunk in &prog.chunks[seg.first as usize..][..seg.len as usize] {
            let sh = _mm_cvtsi32_si128(i32::from(chunk.shl16));
            // The rows are summed off the accumulators' dependency chains (as for AVX-512).
            let mut s = [zero; 4];
            for &r in &chunk.rows {
                // SAFETY: r < 2k + 1 (program invariant) and the tile holds 2k + 1 rows.
                unsafe {
                    let p = tb.add(usize::from(r) * ROW_BYTES);
                    s[0] = _mm256_add_epi16(s[0], _mm256_loadu_si256(p.cast()));
                    s[1] = _mm256_add_epi16(s[1], _mm256_loadu_si256(p.add(32).cast()));
                    s[2] = _mm256_add_epi16(s[2], _mm256_loadu_si256(p.add(64).cast()));
                    s[3] = _mm256_add_epi16(s[3], _mm256_loadu_si256(p.add(96).cast()));
                }
            }
            for (v, s) in a.iter_mut().zip(s) {
                *v = _mm256_add_epi16(_mm256_sll_epi16(*v, sh), s);
            }
        }
        let cnt = _mm_cvtsi32_si128(i32::from(seg.shift32).abs());
        for (h, v) in a.iter().enumerate() {
            let wide = [
                _mm256_cvtepi16_epi32(_mm256_castsi256_si128(*v)),
                _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(*v)),
            ];
            for (j, w) in wide.into_iter().enumerate() {
                let s = if seg.shift32 >= 0 {
                    _mm256_sll_epi32(w, cnt)
                } else {
                    _mm256_sra_epi32(w, cnt)
                };
                acc[2 * h + j] = _mm256_add_epi32(acc[2 * h + j], s);
            }
        }
    }
    acc
}

#[target_feature(enable = "avx2")]
unsafe fn epilogue_avx2(acc: __m256i, mult: __m256, add: __m256, act: Activation) -> __m256 {
    let t = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc), mult), add);
    match act {
        Activation::Linear => t,
        Activation::Relu => _mm256_max_ps(t, _mm256_setzero_ps()),
        Activation::Leaky(a) => _mm256_max_ps(t, _mm256_mul_ps(t, _mm256_set1_ps(a))),
    }
}

#[target_feature(enable = "avx2")]
unsafe fn run_channels_avx2(
    prog: &ConvProgram,
    first_oc: usize,
    n: usize,
    tile: &[i16],
    out: TileOut<'_>,
) {
    let tp = tile.as_ptr();
    match out {
        TileOut::U8(out) => {
            let OutputKind::U8 { zero_point } = prog.out else {
                panic!("u8 output for an f32 conv")
            };
            for i in 0..n {
                let oc = first_oc + i;
                // SAFETY: bounds checked by the caller (see `run_channels`).
                let acc = unsafe { channel_acc_avx2(prog, oc, tp) };
                let (m, a) = (_mm256_set1_ps(prog.mult[oc]), _mm256_set1_ps(prog.add[oc]));
                // SAFETY: AVX2 enabled by the enclosing target_feature.
                let codes = unsafe { codes_avx2(&acc, m, a, prog.act, zero_point) };
                for (q, b) in codes.into_iter().enumerate() {
                    // SAFETY: out holds n rows of LANES (checked); 32 * q + 32 <= LANES.
                    unsafe {
                        _mm256_storeu_si256(out.as_mut_ptr().add(i * LANES + 32 * q).cast(), b)
                    };
                }
            }
        }
        TileOut::F32(out) => {
            for i in 0..n {
                let oc = first_oc + i;
                // SAFETY: bounds checked by the caller.
                let acc = unsafe { channel_acc_avx2(prog, oc, tp) };
                let (m, a) = (_mm256_set1_ps(prog.mult[oc]), _mm256_set1_ps(prog.add[oc]));
                for (j, &v) in acc.iter().enumerate() {
                    // SAFETY: AVX2 enabled; out holds n rows of LANES (checked).
                    unsafe {
                        let t = epilogue_avx2(v, m, a, prog.act);
                        _mm256_storeu_ps(out.as_mut_ptr().add(i * LANES + j * 8), t);
                    }
                }
            }
        }
    }
}

/// Requantizes 64 lanes (eight vectors of 8 `i32`) to `u8` codes in lane order.
#[target_feature(enable = "avx2")]
unsafe fn codes_avx2(
    acc: &[__m256i; 8],
    m: __m256,
    a: __m256,
    act: Activation,
    zero_point: u8,
) -> [__m256i; 2] {
    let zp = _mm256_set1_epi32(i32::from(zero_point));
    let (lo, hi) = (_mm256_set1_ps(-1024.0), _mm256_set1_ps(1024.0));
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let mut codes = [_mm256_setzero_si256(); 8];
    for (c, &v) in codes.iter_mut().zip(acc) {
        // SAFETY: AVX2 enabled by the enclosing target_feature.
        let t = unsafe { epilogue_avx2(v, m, a, act) };
        let t = _mm256_min_ps(_mm256_max_ps(t, lo), hi);
        // Rounds half to even under the default MXCSR, which Rust never changes.
        *c = _mm256_add_epi32(_mm256_cvtps_epi32(t), zp);
    }
    // Saturating packs clamp to 0..=255; the permute undoes their lane interleave.
    std::array::from_fn(|q| {
        let c = &codes[4 * q..4 * q + 4];
        let p01 = _mm256_packus_epi32(c[0], c[1]);
        let p23 = _mm256_packus_epi32(c[2], c[3]);
        _mm256_permutevar8x32_epi32(_mm256_packus_epi16(p01, p23), order)
    })
}

/// Runs a direct program's channel over the 64 flat positions at `p` (the source plus the block's
/// first position): the 32-bit accumulators of each 8-lane eighth, in position order. The caller
/// guarantees that every tap of the channel's group plus 64 bytes is readable from `p`.
#[target_feature(enable = "avx2")]
unsafe fn direct_block_avx2(
    prog: &ConvProgram,
    taps: &[u32],
    segs: &[Segment],
    p: *const u8,
) -> [__m256i; 8] {
    let zero = _mm256_setzero_si256();
    let mut acc = [zero; 8];
    for seg in segs {
        let mut a = [zero; 4];
        for t in &prog.terms[seg.first as usize..][..seg.len as usize] {
            let tp = p.wrapping_add(taps[usize::from(t.tap)] as usize);
            let sh = _mm_cvtsi32_si128(i32::from(t.shl));
            // vpsignw by +1 or -1: the term's sign without a branch.
            let sign = _mm256_set1_epi16(1 - 2 * i16::from(t.neg));
            for (i, v) in a.iter_mut().enumerate() {
                // SAFETY: tp + 16 * i + 16 <= tp + 64 is readable (caller's contract).
                let x = unsafe { _mm256_cvtepu8_epi16(_mm_loadu_si128(tp.add(16 * i).cast())) };
                *v = _mm256_add_epi16(_mm256_sll_epi16(*v, sh), _mm256_sign_epi16(x, sign));
            }
        }
        let cnt = _mm_cvtsi32_si128(i32::from(seg.shift32).abs());
        for (h, v) in a.iter().enumerate() {
            let wide = [
                _mm256_cvtepi16_epi32(_mm256_castsi256_si128(*v)),
                _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(*v)),
            ];
            for (j, w) in wide.into_iter().enumerate() {
                let s = if seg.shift32 >= 0 {
                    _mm256_sll_epi32(w, cnt)
                } else {
                    _mm256_sra_epi32(w, cnt)
                };
                acc[2 * h + j] = _mm256_add_epi32(acc[2 * h + j], s);
            }
        }
    }
    acc
}

#[target_feature(enable = "avx2")]
unsafe fn run_direct_avx2(
    prog: &ConvProgram,
    oc: usize,
    src: &[u8],
    geom: FlatGeometry,
    out: PlaneOut<'_>,
) {
    let taps = prog.group_taps(oc);
    let segs = channel_segments(prog, oc);
    let s = src.as_ptr();
    let (m, a) = (_mm256_set1_ps(prog.mult[oc]), _mm256_set1_ps(prog.add[oc]));
    match out {
        PlaneOut::U8(out) => {
            let OutputKind::U8 { zero_point } = prog.out else {
                panic!("u8 output for an f32 conv")
            };
            let mut lanes = [0u8; LANES];
            for f0 in (0..geom.positions).step_by(LANES) {
                // SAFETY: f0 + 64 <= positions rounded up to LANES, which `check_direct` bounds
                // for every tap; the stores stay in `lanes` (2 x 32 bytes).
                unsafe {
                    let acc = direct_block_avx2(prog, taps, segs, s.add(f0));
                    let codes = codes_avx2(&acc, m, a, prog.act, zero_point);
                    for (q, b) in codes.into_iter().enumerate() {
                        _mm256_storeu_si256(lanes.as_mut_ptr().add(32 * q).cast(), b);
                    }
                }
                store_flat(&lanes, f0, geom, out);
            }
        }
        PlaneOut::F32(out) => {
            let mut lanes = [0f32; LANES];
            for f0 in (0..geom.positions).step_by(LANES) {
                // SAFETY: as above; the stores stay in `lanes` (8 x 8 floats).
                unsafe {
                    let acc = direct_block_avx2(prog, taps, segs, s.add(f0));
                    for (j, &v) in acc.iter().enumerate() {
                        let t = epilogue_avx2(v, m, a, prog.act);
                        _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * j), t);
                    }
                }
                store_flat(&lanes, f0, geom, out);
            }
        }
    }
}
