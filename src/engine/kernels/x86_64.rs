//! AVX2 and AVX-512BW shift-add kernels.
//!
//! Both vectorise over the [`LANES`] output positions of a tile in 16-bit lanes (AVX-512BW: two
//! registers of 32, AVX2: four of 16), so one weight term is one load-and-add per register (a
//! negative weight adds the tile's negated row); the loop over a segment's chunks is the only
//! data-dependent branch. They
//! compute exactly what [`super::scalar`] specifies, including the f32 epilogue (multiply, then
//! add, no FMA; conversion rounds half to even).

use std::arch::x86_64::*;

use super::{Activation, ConvProgram, LANES, OutputKind, Segment, ShiftAddKernel, TileOut};

/// Bytes between tile rows.
const ROW_BYTES: usize = LANES * 2;

/// Checks a program's channel range and the tile before the unchecked loads below.
fn check_run(prog: &ConvProgram, first_oc: usize, n: usize, tile: &[i16], out_len: usize) {
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

/// 64 lanes as two 32 x i16 registers; needs AVX-512F and AVX-512BW.
#[derive(Debug, Clone, Copy)]
pub struct Avx512bwKernel {
    _private: (),
}

impl Avx512bwKernel {
    pub fn new() -> Option<Self> {
        (is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw"))
            .then_some(Avx512bwKernel { _private: () })
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

    fn run_channels(
        &self,
        prog: &ConvProgram,
        first_oc: usize,
        n: usize,
        tile: &[i16],
        out: TileOut<'_>,
    ) {
        let out_len = match &out {
            TileOut::U8(o) => o.len(),
            TileOut::F32(o) => o.len(),
        };
        check_run(prog, first_oc, n, tile, out_len);
        // SAFETY: the features exist (constructor); `check_run` bounds the channels, tile and
        // output; `ConvProgram::build` guarantees every term indexes a tap below `k`.
        unsafe { run_channels_avx512(prog, first_oc, n, tile, out) }
    }
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn build_tile_avx512(src: &[u8], taps: &[u32], base: usize, tile: &mut [i16]) {
    let s = src.as_ptr();
    let d = tile.as_mut_ptr();
    let n = taps.len();
    let zero = _mm512_setzero_si512();
    for (k, &off) in taps.iter().enumerate() {
        // SAFETY: caller checked `off + base + LANES <= src.len()` and that `tile` holds
        // `2 * taps.len() + 1` rows of LANES.
        unsafe {
            let p = s.add(off as usize + base);
            let lo = _mm512_cvtepu8_epi16(_mm256_loadu_si256(p.cast()));
            let hi = _mm512_cvtepu8_epi16(_mm256_loadu_si256(p.add(32).cast()));
            let q = d.add(k * LANES);
            _mm512_storeu_si512(q.cast(), lo);
            _mm512_storeu_si512(q.add(32).cast(), hi);
            let r = d.add((n + k) * LANES);
            _mm512_storeu_si512(r.cast(), _mm512_sub_epi16(zero, lo));
            _mm512_storeu_si512(r.add(32).cast(), _mm512_sub_epi16(zero, hi));
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn channel_acc_avx512(prog: &ConvProgram, oc: usize, tile: *const i16) -> [__m512i; 4] {
    let zero = _mm512_setzero_si512();
    let mut acc = [zero; 4];
    for seg in channel_segments(prog, oc) {
        let (mut a0, mut a1) = (zero, zero);
        let tb = tile.cast::<u8>();
        for chunk in &prog.chunks[seg.first_chunk as usize..][..seg.n_chunks as usize] {
            let sh = _mm_cvtsi32_si128(i32::from(chunk.shl16));
            a0 = _mm512_sll_epi16(a0, sh);
            a1 = _mm512_sll_epi16(a1, sh);
            for &r in &chunk.rows {
                // SAFETY: r < 2k + 1 (program invariant) and the tile holds 2k + 1 rows.
                unsafe {
                    let p = tb.add(usize::from(r) * ROW_BYTES);
                    a0 = _mm512_add_epi16(a0, _mm512_loadu_si512(p.cast()));
                    a1 = _mm512_add_epi16(a1, _mm512_loadu_si512(p.add(64).cast()));
                }
            }
        }
        let wide = [
            _mm512_cvtepi16_epi32(_mm512_castsi512_si256(a0)),
            _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64::<1>(a0)),
            _mm512_cvtepi16_epi32(_mm512_castsi512_si256(a1)),
            _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64::<1>(a1)),
        ];
        let cnt = _mm_cvtsi32_si128(seg.shift32.abs());
        for (a, w) in acc.iter_mut().zip(wide) {
            let s = if seg.shift32 >= 0 {
                _mm512_sll_epi32(w, cnt)
            } else {
                _mm512_sra_epi32(w, cnt)
            };
            *a = _mm512_add_epi32(*a, s);
        }
    }
    acc
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn epilogue_avx512(acc: __m512i, mult: __m512, add: __m512, act: Activation) -> __m512 {
    let t = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), mult), add);
    match act {
        Activation::Linear => t,
        Activation::Relu => _mm512_max_ps(t, _mm512_setzero_ps()),
        Activation::Leaky(a) => _mm512_max_ps(t, _mm512_mul_ps(t, _mm512_set1_ps(a))),
    }
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn run_channels_avx512(
    prog: &ConvProgram,
    first_oc: usize,
    n: usize,
    tile: &[i16],
    out: TileOut<'_>,
) {
    let tp = tile.as_ptr();
    let lo = _mm512_set1_ps(-1024.0);
    let hi = _mm512_set1_ps(1024.0);
    match out {
        TileOut::U8(out) => {
            let OutputKind::U8 { zero_point } = prog.out else {
                panic!("u8 output for an f32 conv")
            };
            let zp = _mm512_set1_epi32(i32::from(zero_point));
            let zero = _mm512_setzero_si512();
            for i in 0..n {
                let oc = first_oc + i;
                // SAFETY: bounds checked by the caller (see `run_channels`).
                let acc = unsafe { channel_acc_avx512(prog, oc, tp) };
                let (m, a) = (_mm512_set1_ps(prog.mult[oc]), _mm512_set1_ps(prog.add[oc]));
                for (j, &v) in acc.iter().enumerate() {
                    // SAFETY: features enabled by the enclosing target_feature.
                    let t = unsafe { epilogue_avx512(v, m, a, prog.act) };
                    let t = _mm512_min_ps(_mm512_max_ps(t, lo), hi);
                    let r = _mm512_cvt_roundps_epi32::<
                        { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                    >(t);
                    let r = _mm512_max_epi32(_mm512_add_epi32(r, zp), zero);
                    let bytes = _mm512_cvtusepi32_epi8(r);
                    // SAFETY: out holds n rows of LANES (checked); j * 16 + 16 <= LANES.
                    unsafe {
                        _mm_storeu_si128(out.as_mut_ptr().add(i * LANES + j * 16).cast(), bytes)
                    };
                }
            }
        }
        TileOut::F32(out) => {
            for i in 0..n {
                let oc = first_oc + i;
                // SAFETY: bounds checked by the caller.
                let acc = unsafe { channel_acc_avx512(prog, oc, tp) };
                let (m, a) = (_mm512_set1_ps(prog.mult[oc]), _mm512_set1_ps(prog.add[oc]));
                for (j, &v) in acc.iter().enumerate() {
                    // SAFETY: features enabled; out holds n rows of LANES (checked).
                    unsafe {
                        let t = epilogue_avx512(v, m, a, prog.act);
                        _mm512_storeu_ps(out.as_mut_ptr().add(i * LANES + j * 16), t);
                    }
                }
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
        let out_len = match &out {
            TileOut::U8(o) => o.len(),
            TileOut::F32(o) => o.len(),
        };
        check_run(prog, first_oc, n, tile, out_len);
        // SAFETY: AVX2 exists; bounds as for the AVX-512 kernel.
        unsafe { run_channels_avx2(prog, first_oc, n, tile, out) }
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
        for chunk in &prog.chunks[seg.first_chunk as usize..][..seg.n_chunks as usize] {
            let sh = _mm_cvtsi32_si128(i32::from(chunk.shl16));
            for v in &mut a {
                *v = _mm256_sll_epi16(*v, sh);
            }
            for &r in &chunk.rows {
                // SAFETY: r < 2k + 1 (program invariant) and the tile holds 2k + 1 rows.
                unsafe {
                    let p = tb.add(usize::from(r) * ROW_BYTES);
                    a[0] = _mm256_add_epi16(a[0], _mm256_loadu_si256(p.cast()));
                    a[1] = _mm256_add_epi16(a[1], _mm256_loadu_si256(p.add(32).cast()));
                    a[2] = _mm256_add_epi16(a[2], _mm256_loadu_si256(p.add(64).cast()));
                    a[3] = _mm256_add_epi16(a[3], _mm256_loadu_si256(p.add(96).cast()));
                }
            }
        }
        let cnt = _mm_cvtsi32_si128(seg.shift32.abs());
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
            let zp = _mm256_set1_epi32(i32::from(zero_point));
            let (lo, hi) = (_mm256_set1_ps(-1024.0), _mm256_set1_ps(1024.0));
            let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            for i in 0..n {
                let oc = first_oc + i;
                // SAFETY: bounds checked by the caller (see `run_channels`).
                let acc = unsafe { channel_acc_avx2(prog, oc, tp) };
                let (m, a) = (_mm256_set1_ps(prog.mult[oc]), _mm256_set1_ps(prog.add[oc]));
                let mut codes = [_mm256_setzero_si256(); 8];
                for (c, &v) in codes.iter_mut().zip(&acc) {
                    // SAFETY: AVX2 enabled by the enclosing target_feature.
                    let t = unsafe { epilogue_avx2(v, m, a, prog.act) };
                    let t = _mm256_min_ps(_mm256_max_ps(t, lo), hi);
                    // Rounds half to even under the default MXCSR, which Rust never changes.
                    *c = _mm256_add_epi32(_mm256_cvtps_epi32(t), zp);
                }
                // Saturating packs clamp to 0..=255; the permute undoes their lane interleave.
                for q in 0..2 {
                    let c = &codes[4 * q..4 * q + 4];
                    let p01 = _mm256_packus_epi32(c[0], c[1]);
                    let p23 = _mm256_packus_epi32(c[2], c[3]);
                    let b = _mm256_packus_epi16(p01, p23);
                    let b = _mm256_permutevar8x32_epi32(b, order);
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
