//! Shift-add convolution kernels and the per-layer program they execute.
//!
//! # What a kernel computes
//!
//! A conv is lowered at load into a [`ConvProgram`]: for every group, the source offset of each of
//! its `K = cin/groups * kh * kw` taps, and for every output channel a branch-free schedule of its
//! non-zero power-of-two weights. At run time, for a tile of [`LANES`] consecutive output positions:
//!
//! 1. [`ShiftAddKernel::build_tile`] lays out the tile's activations of every tap (`tile[k]`) and
//!    a row per tap for negative weights (`tile[K + k]`; row `2K` stays zero), once per group and
//!    tile, shared by all the group's output channels: widened to `i16` and negated in the
//!    portable and AVX2 kernels, `u8` and complemented in the AVX-512 one (see `x86_64`);
//! 2. [`ShiftAddKernel::run_channels`] runs each output channel's schedule over the tile using only
//!    16-bit adds, subtracts and left shifts, widens each segment once to 32 bits with one shift,
//!    then requantizes (the one multiply per output value) into `u8` or `f32`.
//!
//! # Direct programs: one output channel per group
//!
//! A conv with one output channel per group (depthwise) has nothing to share between output
//! channels, so building a tile would only copy its activations twice. Such a conv becomes a
//! *direct* program instead: each term names a tap, its sign and the left shift that precedes it,
//! and [`ShiftAddKernel::run_direct`] reads the source with widening `u8 -> i16` loads straight
//! into the Horner accumulation of a whole output plane, with the same segments, overflow bound and
//! requantization as below (so a direct program computes exactly what the tile schedule of the same
//! weights would), and stores the `u8` codes in their NCHW places itself.
//!
//! # The schedule and its overflow bound
//!
//! An output channel's weights are `alpha * s * 2^-e` (`s = ±1`). Terms are grouped by exponent
//! and the groups taken in increasing `e` (decreasing magnitude). A *segment* accumulates groups in
//! 16-bit lanes by Horner's rule: `acc = (acc << (e_next - e)) + (sum of + terms) - (sum of - terms)`,
//! so at its end `acc = sum_i s_i q_i 2^(e_last - e_i)`.
//!
//! The schedule is branch-free: a group is stored as *chunks* of [`CHUNK`] tile rows (a negative
//! weight names the negated row, padding names the zero row), each chunk "shift left by `shl16`,
//! then add `CHUNK` rows", with `shl16` non-zero only on a group's first chunk. The kernels run one
//! loop per segment over identical chunk bodies, so the only data-dependent branch is that loop's
//! exit; separate loops per exponent and sign mispredicted at almost every exit (about 3x slower). With `u8` activations `|acc| <= 255 *
//! sum_i 2^(e_last - e_i)`, and a segment grows only while that bound stays `<= 32767` (so one
//! exponent group holds at most 128 terms per segment). The segment is then sign-extended to 32
//! bits and shifted by `E - e_last` into the channel accumulator, whose unit is `2^-E`. `E` is the
//! largest exponent in the channel unless `255 * sum_i 2^(E - e_i)` would pass `i32`, in which case
//! `E` is lowered until it fits and the segments below it are shifted right (arithmetic, flooring):
//! those terms are below `2^-E` of the largest weight, and this is the only inexact step.
//!
//! The requantization is `t = acc * mult + add` in f32 (two roundings, no FMA, so every kernel
//! rounds identically), then the activation (`max(t, 0)` or `max(t, alpha t)`), then for `u8`
//! outputs `clamp(round_half_even(clamp(t, -1024, 1024)) + zp, 0, 255)`.
//!
//! # Kernel families
//!
//! [`scalar::ScalarKernel`] is the portable specification; the x86_64 kernels must agree with it
//! bit for bit (tests/engine_kernels.rs). A kernel value can only be constructed where its
//! instructions exist (`new() -> Option<Self>`), so calling it after construction is safe.

pub mod scalar;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

use std::fmt;
use std::sync::Arc;

use crate::engine::quant_params::QParams;
use crate::error::{Error, Result};
use crate::quant::Code;

/// Output positions per tile: 64 `i16` lanes are two AVX-512 or four AVX2 registers.
pub const LANES: usize = 64;

/// Largest segment bound `sum_i 2^(e_last - e_i)` with `u8` activations: `255 * 128 <= 32767`.
const SEGMENT_BOUND: u64 = 32767 / 255;

/// The fused activation of a conv.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Linear,
    Relu,
    /// `max(t, alpha t)`, valid for `0 <= alpha <= 1`.
    Leaky(f32),
}

/// What the epilogue writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// `u8` codes with this zero point (the scale is folded into `mult` and `add`).
    U8 { zero_point: u8 },
    /// Real values (graph outputs).
    F32,
}

/// Tile rows added per chunk. Two rather than four: exponent groups of a 6-bit channel are short,
/// and padding them to four rows loaded and added about 10 % more on yolo-fastest-voc's 1x1 convs
/// (a chunk per row measured the same as two).
pub const CHUNK: usize = 2;

/// Shift the segment accumulator left by `shl16`, then add `CHUNK` tile rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub shl16: u16,
    /// Row indices into the tile: `k` (+x), `K + k` (-x) or `2K` (zeros).
    pub rows: [u16; CHUNK],
}

/// One weight term of a direct program: shift the segment accumulator left by `shl`, then add
/// (or, if `neg`, subtract) tap `tap` of the channel's group. `shl` is non-zero only on the first
/// term of an exponent group, as for [`Chunk::shl16`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectTerm {
    pub tap: u16,
    pub shl: u8,
    pub neg: bool,
}

/// A run of chunks (tile programs) or terms (direct programs) accumulated in 16 bits, then
/// widened and shifted by `shift32` (right if negative) into the 32-bit channel accumulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub first: u32,
    pub len: u32,
    /// `E - e_last`, within `±(max exponent + 1)`: an `i16` keeps the segment at 12 bytes.
    pub shift32: i16,
    /// `sum 2^(e_last - e_i)` over the segment's negative terms (Horner's rule applied to each
    /// chunk's count of negated rows, or to each negative direct term), with which a kernel that
    /// reads `!x` rather than `-x` for them corrects the segment (the AVX-512 tiles, and
    /// [`ShiftAddKernel::run_direct_complemented`]). At most [`SEGMENT_BOUND`].
    pub neg_weight: u16,
}

/// A conv lowered for the shift-add kernels. Built only by [`ConvProgram::build`], which checks the
/// invariants the kernels' unchecked loads rely on (every term indexes a tap of its group, every
/// count fits its arrays).
#[derive(Clone, PartialEq)]
pub struct ConvProgram {
    pub(in crate::engine) groups: usize,
    pub(in crate::engine) cout_g: usize,
    /// Taps per group.
    pub(in crate::engine) k: usize,
    /// `[groups][k]` source offsets of each tap.
    pub(in crate::engine) taps: Vec<u32>,
    /// `[cout + 1]` prefix offsets into `segs`.
    pub(in crate::engine) oc_segs: Vec<u32>,
    pub(in crate::engine) segs: Vec<Segment>,
    /// The schedule of a tile program (empty for a direct one).
    pub(in crate::engine) chunks: Vec<Chunk>,
    /// The schedule of a direct program (one output channel per group; empty otherwise).
    pub(in crate::engine) terms: Vec<DirectTerm>,
    pub(in crate::engine) direct: bool,
    /// Non-zero weights (the rest of the chunk rows are padding).
    pub(in crate::engine) n_terms: usize,
    pub(in crate::engine) mult: Vec<f32>,
    pub(in crate::engine) add: Vec<f32>,
    pub(in crate::engine) act: Activation,
    pub(in crate::engine) out: OutputKind,
    /// Set at build when `|acc * mult + add|` (and its activation) provably stays under `2^30` for
    /// every reachable accumulator of every channel: a kernel may then skip `min(t, 1024)` before
    /// the `i32` conversion, since the saturating packs then clamp alike.
    pub(in crate::engine) clamp_free: bool,
    /// Largest tap offset, for the bounds check of [`ShiftAddKernel::build_tile`].
    pub(in crate::engine) max_tap: usize,
}

impl fmt::Debug for ConvProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConvProgram")
            .field("groups", &self.groups)
            .field("cout_g", &self.cout_g)
            .field("k", &self.k)
            .field("terms", &self.n_terms)
            .field("direct", &self.direct)
            .field("chunks", &self.chunks.len())
            .field("segments", &self.segs.len())
            .field("act", &self.act)
            .field("out", &self.out)
            .finish()
    }
}

/// Inputs of [`ConvProgram::build`].
#[derive(Debug, Clone)]
pub struct ConvSpec<'a> {
    pub groups: usize,
    /// `[cout][k]` codes, `k` in tap order (`(icg * kh + ky) * kw + kx`).
    pub codes: &'a [Code],
    /// One alpha, or one per output channel.
    pub alphas: &'a [f32],
    pub bias: Option<&'a [f32]>,
    /// `[groups][k]` source offsets.
    pub taps: Vec<u32>,
    pub input_scale: f32,
    pub input_zero_point: u8,
    pub act: Activation,
    /// `Some` for `u8` outputs, `None` for f32 outputs.
    pub output: Option<(f32, u8)>,
}

impl ConvProgram {
    pub fn build(spec: &ConvSpec<'_>) -> Result<ConvProgram> {
        let groups = spec.groups;
        if groups == 0 || !spec.taps.len().is_multiple_of(groups) {
            return Err(Error::Model(
                "conv program: taps do not split into groups".into(),
            ));
        }
        let k = spec.taps.len() / groups;
        if k == 0 || 2 * k + 1 > usize::from(u16::MAX) || !spec.codes.len().is_multiple_of(k) {
            return Err(Error::Model(format!(
                "conv program: {} codes do not fit {k} taps per output channel",
                spec.codes.len()
            )));
        }
        let cout = spec.codes.len() / k;
        if !cout.is_multiple_of(groups) || !(spec.alphas.len() == 1 || spec.alphas.len() == cout) {
            return Err(Error::Model(format!(
                "conv program: {cout} output channels, {groups} groups, {} alphas",
                spec.alphas.len()
            )));
        }
        if spec.bias.is_some_and(|b| b.len() != cout) {
            return Err(Error::Model("conv program: bias length".into()));
        }
        if let Activation::Leaky(a) = spec.act
            && !(0.0..=1.0).contains(&a)
        {
            return Err(Error::Model(format!(
                "fused LeakyReLU slope {a} outside [0, 1]"
            )));
        }
        let mut prog = ConvProgram {
            groups,
            cout_g: cout / groups,
            k,
            max_tap: spec.taps.iter().copied().max().unwrap_or(0) as usize,
            taps: spec.taps.clone(),
            oc_segs: vec![0],
            segs: vec![],
            chunks: vec![],
            terms: vec![],
            direct: cout == groups,
            n_terms: 0,
            mult: vec![],
            add: vec![],
            act: spec.act,
            out: match spec.output {
                Some((_, zp)) => OutputKind::U8 { zero_point: zp },
                None => OutputKind::F32,
            },
            clamp_free: true,
        };
        let act_gain = match spec.act {
            Activation::Leaky(a) => f64::from(a).abs().max(1.0),
            _ => 1.0,
        };
        let out_scale = spec.output.map_or(1.0, |(s, _)| f64::from(s));
        for oc in 0..cout {
            let codes = &spec.codes[oc * k..][..k];
            let e_ref = prog.push_channel(codes);
            // Real pre-activation / out_scale = mult * acc + add.
            let alpha = f64::from(spec.alphas[if spec.alphas.len() == 1 { 0 } else { oc }]);
            let unit = f64::from(spec.input_scale) * alpha * 2f64.powi(-e_ref) / out_scale;
            let w_sum: f64 = codes
                .iter()
                .filter_map(|c| {
                    c.exponent().map(|e| {
                        let m = 2f64.powi(e_ref - i32::from(e));
                        if c.is_negative() { -m } else { m }
                    })
                })
                .sum();
            let bias = spec.bias.map_or(0.0, |b| f64::from(b[oc]));
            let (mult, add) = (
                unit as f32,
                (bias / out_scale - unit * f64::from(spec.input_zero_point) * w_sum) as f32,
            );
            // |acc| <= 255 * sum 2^(e_ref - e) plus one per term for the flooring right shifts.
            let acc_max: f64 = codes
                .iter()
                .filter_map(|c| c.exponent())
                .map(|e| 255.0 * 2f64.powi(e_ref - i32::from(e)) + 1.0)
                .sum();
            // f32 rounding adds at most a factor (1 + 2^-23) per step; 2^30 leaves ample margin.
            let t_max = (acc_max * f64::from(mult).abs() + f64::from(add).abs()) * act_gain;
            // (A NaN bound compares false and keeps the clamp.)
            prog.clamp_free &= t_max < 2f64.powi(30);
            prog.mult.push(mult);
            prog.add.push(add);
        }
        Ok(prog)
    }

    /// Appends one output channel's schedule; returns the accumulator's exponent `E`.
    fn push_channel(&mut self, codes: &[Code]) -> i32 {
        let mut terms: Vec<(u8, bool, u16)> = codes
            .iter()
            .enumerate()
            .filter_map(|(k, c)| c.exponent().map(|e| (e, c.is_negative(), k as u16)))
            .collect();
        terms.sort_by_key(|&(e, neg, k)| (e, neg, k));
        if terms.is_empty() {
            self.oc_segs.push(self.segs.len() as u32);
            return 0;
        }
        // E: the largest exponent unless the i32 bound (with a margin of one per term for the
        // flooring right shifts) forces it lower.
        let limit = (i32::MAX as f64 - terms.len() as f64) / 255.0;
        let (e_min, e_max) = (i32::from(terms[0].0), i32::from(terms[terms.len() - 1].0));
        let mut e_ref = e_max;
        while e_ref > e_min
            && terms
                .iter()
                .map(|t| 2f64.powi(e_ref - i32::from(t.0)))
                .sum::<f64>()
                > limit
        {
            e_ref -= 1;
        }
        // Greedy segments over the exponent groups.
        self.n_terms += terms.len();
        let k = self.k as u16;
        let zero_row = 2 * k;
        let mut i = 0;
        let mut seg_open = false;
        let mut bound: u64 = 0;
        let mut last_e: u8 = 0;
        while i < terms.len() {
            let e = terms[i].0;
            let group_end = terms[i..]
                .iter()
                .position(|t| t.0 != e)
                .map_or(terms.len(), |p| i + p);
            let mut start = i;
            while start < group_end {
                let shift = if seg_open { u32::from(e - last_e) } else { 0 };
                // How many of this group's terms fit the open segment (up to 128 if it is new).
                let scaled = if seg_open {
                    bound.checked_shl(shift).filter(|b| *b <= SEGMENT_BOUND)
                } else {
                    Some(0)
                };
                let room = scaled.map_or(0, |b| SEGMENT_BOUND - b) as usize;
                if room == 0 {
                    self.close_segment(last_e, e_ref);
                    seg_open = false;
                    continue;
                }
                let n = room.min(group_end - start);
                if !seg_open {
                    self.segs.push(Segment {
                        first: if self.direct {
                            self.terms.len()
                        } else {
                            self.chunks.len()
                        } as u32,
                        len: 0,
                        shift32: 0,
                        neg_weight: 0,
                    });
                    seg_open = true;
                }
                let piece = &terms[start..start + n];
                let added = if self.direct {
                    for (j, &(_, neg, tap)) in piece.iter().enumerate() {
                        self.terms.push(DirectTerm {
                            tap,
                            shl: if j == 0 { shift as u8 } else { 0 },
                            neg,
                        });
                    }
                    n
                } else {
                    let rows: Vec<u16> = piece
                        .iter()
                        .map(|&(_, neg, tap)| if neg { k + tap } else { tap })
                        .collect();
                    for (c, part) in rows.chunks(CHUNK).enumerate() {
                        let mut r = [zero_row; CHUNK];
                        r[..part.len()].copy_from_slice(part);
                        self.chunks.push(Chunk {
                            shl16: if c == 0 { shift as u16 } else { 0 },
                            rows: r,
                        });
                    }
                    n.div_ceil(CHUNK)
                };
                self.segs.last_mut().expect("open segment").len += added as u32;
                bound = scaled.unwrap_or(0) + n as u64;
                last_e = e;
                start += n;
                if start < group_end {
                    // The group overflows this segment: the rest starts a new one.
                    self.close_segment(last_e, e_ref);
                    seg_open = false;
                }
            }
            i = group_end;
        }
        if seg_open {
            self.close_segment(last_e, e_ref);
        }
        self.oc_segs.push(self.segs.len() as u32);
        e_ref
    }

    fn close_segment(&mut self, last_e: u8, e_ref: i32) {
        let k = self.k;
        if let Some(s) = self.segs.last_mut() {
            s.shift32 = (e_ref - i32::from(last_e)) as i16;
            // The segment bound keeps every partial value <= SEGMENT_BOUND: no overflow.
            let weight = if self.direct {
                let terms = &self.terms[s.first as usize..][..s.len as usize];
                terms
                    .iter()
                    .fold(0u64, |c, t| (c << t.shl) + u64::from(t.neg))
            } else {
                let chunks = &self.chunks[s.first as usize..][..s.len as usize];
                chunks.iter().fold(0u64, |c, ch| {
                    let neg = ch
                        .rows
                        .iter()
                        .filter(|&&r| (k..2 * k).contains(&usize::from(r)));
                    (c << ch.shl16) + neg.count() as u64
                })
            };
            s.neg_weight = weight as u16;
        }
    }

    pub fn cout(&self) -> usize {
        self.groups * self.cout_g
    }

    pub fn taps_per_group(&self) -> usize {
        self.k
    }

    pub fn groups(&self) -> usize {
        self.groups
    }

    pub fn output_kind(&self) -> OutputKind {
        self.out
    }

    /// Non-zero weight terms (adds or subtracts per output position).
    pub fn term_count(&self) -> usize {
        self.n_terms
    }

    /// Rows added per output position, padding included (`CHUNK` per chunk; one per term for a
    /// direct program).
    pub fn row_adds(&self) -> usize {
        self.chunks.len() * CHUNK + self.terms.len()
    }

    /// Whether the conv has one output channel per group and runs through
    /// [`ShiftAddKernel::run_direct`] rather than tiles.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Rows of the tile the kernels build: `+x` and `-x` for each tap, then a zero row.
    pub fn tile_rows(&self) -> usize {
        2 * self.k + 1
    }

    /// 16-to-32-bit widenings per output position.
    pub fn segment_count(&self) -> usize {
        self.segs.len()
    }

    /// Bytes of the unpacked schedule (what the engine holds for this layer's weights).
    pub fn bytes(&self) -> usize {
        self.taps.len() * 4
            + self.oc_segs.len() * 4
            + self.segs.len() * std::mem::size_of::<Segment>()
            + self.chunks.len() * std::mem::size_of::<Chunk>()
            + self.terms.len() * std::mem::size_of::<DirectTerm>()
            + self.mult.len() * 8
    }

    /// The taps of group `g`.
    pub fn group_taps(&self, g: usize) -> &[u32] {
        &self.taps[g * self.k..][..self.k]
    }
}

/// A tile's output rows, `[channels][LANES]`.
pub enum TileOut<'a> {
    U8(&'a mut [u8]),
    F32(&'a mut [f32]),
}

impl TileOut<'_> {
    /// Values (codes or floats) it holds.
    pub fn len(&self) -> usize {
        match self {
            TileOut::U8(o) => o.len(),
            TileOut::F32(o) => o.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One output channel's plane, `[oh][ow]`.
pub enum PlaneOut<'a> {
    U8(&'a mut [u8]),
    F32(&'a mut [f32]),
}

impl PlaneOut<'_> {
    /// Values (codes or floats) it holds.
    pub fn len(&self) -> usize {
        match self {
            PlaneOut::U8(o) => o.len(),
            PlaneOut::F32(o) => o.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where the flat positions a kernel computes go: position `f = oy * pitch + ox` (for `f <
/// positions = oh * pitch`) is output `oy * width + ox` when `ox < width`, else dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlatGeometry {
    pub positions: usize,
    pub pitch: usize,
    pub width: usize,
}

impl FlatGeometry {
    pub fn rows(&self) -> usize {
        self.positions / self.pitch
    }

    /// Checks the invariants the kernels' stores rely on.
    pub fn check(&self, out_len: usize) {
        assert!(self.pitch > 0, "flat geometry {self:?}");
        // One division (run for every channel of a depthwise conv).
        let rows = self.rows();
        assert!(
            self.width <= self.pitch && rows * self.pitch == self.positions,
            "flat geometry {self:?}"
        );
        assert!(out_len >= rows * self.width, "output plane too small");
    }
}

/// Copies the lanes of flat positions `f0..f0 + lanes.len()` to their places in `out`, dropping
/// the pitch columns and the positions past `geom.positions`.
pub fn store_flat<T: Copy>(lanes: &[T], f0: usize, geom: FlatGeometry, out: &mut [T]) {
    let end = (f0 + lanes.len()).min(geom.positions);
    if geom.pitch == geom.width {
        // A whole tile as a fixed-size copy: inline moves rather than a `memcpy` call per channel.
        if let (Ok(d), Ok(s)) = (
            <&mut [T; LANES]>::try_from(&mut out[f0..end]),
            <&[T; LANES]>::try_from(&lanes[..end - f0]),
        ) {
            *d = *s;
        } else {
            out[f0..end].copy_from_slice(&lanes[..end - f0]);
        }
        return;
    }
    let mut f = f0;
    while f < end {
        let (oy, ox) = (f / geom.pitch, f % geom.pitch);
        let row_end = (oy * geom.pitch + geom.pitch).min(end);
        if ox < geom.width {
            let n = (geom.width - ox).min(row_end - f);
            out[oy * geom.width + ox..][..n].copy_from_slice(&lanes[f - f0..][..n]);
        }
        f = row_end;
    }
}

/// How a conv's padded source is laid out: one `[h][w]` input channel becomes `sy * sx` phase
/// planes of `hq` rows of `wq` columns (see [`ShiftAddKernel::split_phases`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseSplit {
    pub h: usize,
    pub w: usize,
    /// Top, left, bottom, right.
    pub pads: [usize; 4],
    pub stride: [usize; 2],
    pub wq: usize,
}

/// The largest conv stride the phase split handles (larger strides are refused at load).
pub const MAX_PHASE_STRIDE: usize = 8;

/// The row copies of [`split_phases_with`], so each kernel family can supply its own.
pub(crate) trait RowCopy {
    /// `dst = src` (equal lengths).
    fn copy(&self, src: &[u8], dst: &mut [u8]);
    /// `even[i] = src[2i]`, `odd[i] = src[2i + 1]` (`even` holds `ceil(n / 2)`, `odd` `n / 2`).
    fn deinterleave(&self, src: &[u8], even: &mut [u8], odd: &mut [u8]);
}

/// Portable row copies.
pub(crate) struct PortableRows;

impl RowCopy for PortableRows {
    fn copy(&self, src: &[u8], dst: &mut [u8]) {
        dst.copy_from_slice(src);
    }

    fn deinterleave(&self, src: &[u8], even: &mut [u8], odd: &mut [u8]) {
        assert!(even.len() == src.len().div_ceil(2) && odd.len() == src.len() / 2);
        // Whole pairs keep the loop free of strided indexing, so it vectorises.
        let (pairs, rest) = src.as_chunks::<2>();
        for ((e, o), p) in even.iter_mut().zip(odd.iter_mut()).zip(pairs) {
            *e = p[0];
            *o = p[1];
        }
        if let [last] = rest {
            even[even.len() - 1] = *last;
        }
    }
}

/// Copies one `[h][w]` channel into its `sy * sx` phase planes (`[sy][sx][hq][wq]`, already filled
/// with the zero point), shifted by the top and left padding: phase `(py, px)` holds padded rows
/// `py, py + sy, ..` and columns `px, px + sx, ..`, so padded column `c * sx + px` is input column
/// `c * sx + px - pad_left`.
#[inline]
pub(crate) fn split_phases_with<R: RowCopy + ?Sized>(
    rows: &R,
    input: &[u8],
    geom: PhaseSplit,
    phases: &mut [u8],
) {
    let PhaseSplit {
        h,
        w,
        pads,
        stride: [sy, sx],
        wq,
    } = geom;
    let plane = phases.len() / (sy * sx);
    // Per column phase: (offset of its first written column within a phase row, first input
    // column). Computed once: the row loop below runs for every row of every channel, and the
    // divisions here cost more than a short row's copy.
    let mut cols = [(0usize, 0usize); MAX_PHASE_STRIDE];
    for (px, c) in cols.iter_mut().enumerate().take(sx) {
        let first_c = (pads[1] + sx - 1 - px) / sx;
        *c = (first_c, first_c * sx + px - pads[1]);
    }
    // For sx == 2, one pass over the row feeds both column phases: the phase whose first input
    // column is 0 takes the even columns, the other the odd ones.
    let even = usize::from(sx == 2 && cols[1].1 == 0);
    let (mut py, mut r) = (pads[0] % sy, pads[0] / sy);
    for row in input.chunks_exact(w).take(h) {
        let at = |px: usize| (py * sx + px) * plane + r * wq + cols[px].0;
        if sx == 2 {
            let (ne, no) = (w.div_ceil(2), w / 2);
            let (ae, ao) = (at(even), at(1 - even));
            let (de, dodd) = if ae < ao {
                let (lo, hi) = phases.split_at_mut(ao);
                (&mut lo[ae..ae + ne], &mut hi[..no])
            } else {
                let (lo, hi) = phases.split_at_mut(ae);
                (&mut hi[..ne], &mut lo[ao..ao + no])
            };
            rows.deinterleave(row, de, dodd);
        } else {
            for (px, &(_, x0)) in cols.iter().enumerate().take(sx) {
                if x0 >= w {
                    continue;
                }
                let n = (w - x0).div_ceil(sx);
                let dst = &mut phases[at(px)..][..n];
                if sx == 1 {
                    rows.copy(&row[x0..x0 + n], dst);
                } else {
                    for (d, &v) in dst.iter_mut().zip(row[x0..].iter().step_by(sx)) {
                        *d = v;
                    }
                }
            }
        }
        py += 1;
        if py == sy {
            py = 0;
            r += 1;
        }
    }
}

/// The element-wise op of [`ShiftAddKernel::binary_u8`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Mul,
}

/// A shift-add conv kernel family.
///
/// # Safety
/// Implementations may only be constructible (their `new` returns `Some`) on CPUs that support the
/// instructions they use; callers rely on that to call the safe methods below.
pub unsafe trait ShiftAddKernel: Send + Sync {
    /// Metrics label and bench column (`scalar`, `avx2`, `avx512bw`).
    fn name(&self) -> &'static str;

    /// Builds the tile the kernel's [`Self::run_channels`] reads, in the kernel's own layout:
    /// `K` rows of the activations `src[taps[k] + base + lane]`, `K` rows for negative weights,
    /// and row `2K` of zeros, which is left as it is (the caller zeroes the tile once). The
    /// portable and AVX2 kernels widen to `i16` and negate; the AVX-512 one keeps `u8` rows and
    /// their complement `!x` ([`Self::tile_row_bytes`] tells the row size). Panics unless `src`
    /// holds every position read and `tile` has `(2K + 1) * LANES` lanes.
    fn build_tile(&self, src: &[u8], taps: &[u32], base: usize, tile: &mut [i16]);

    /// Bytes of one tile row in this kernel's layout (what decides whether two tiles fit L1).
    fn tile_row_bytes(&self) -> usize {
        LANES * std::mem::size_of::<i16>()
    }

    /// Runs output channels `first_oc .. first_oc + n` (all in one group) over `tile`, writing
    /// `out[i][lane]` for channel `first_oc + i`. Panics if the range, tile or output is too small,
    /// or the program is direct.
    fn run_channels(
        &self,
        prog: &ConvProgram,
        first_oc: usize,
        n: usize,
        tile: &[i16],
        out: TileOut<'_>,
    );

    /// Runs output channels `first_oc .. first_oc + n` over `tiles.len()` tiles (neighbouring runs
    /// of positions, at most [`MAX_TILES_PER_PASS`]): channel `first_oc + i`'s [`LANES`] outputs
    /// from `tiles[j]` go to `out[i * stride + j * LANES..]`, exactly what [`Self::run_channels`]
    /// on each tile computes. With `stride` the plane size, the outputs land straight in their
    /// planes. A kernel may run the tiles at once (one pass over each channel's schedule, more
    /// independent accumulators). Panics as `run_channels` does, or unless `1 <= tiles.len() <=
    /// MAX_TILES_PER_PASS`, `stride >= tiles.len() * LANES` and `out` holds `(n - 1) * stride +
    /// tiles.len() * LANES` values.
    fn run_channels_multi(
        &self,
        prog: &ConvProgram,
        first_oc: usize,
        n: usize,
        tiles: &[&[i16]],
        mut out: TileOut<'_>,
        stride: usize,
    ) {
        check_multi_out(n, tiles.len(), &out, stride);
        for i in 0..n {
            for (j, tile) in tiles.iter().enumerate() {
                let at = i * stride + j * LANES;
                let row = match &mut out {
                    TileOut::U8(o) => TileOut::U8(&mut o[at..][..LANES]),
                    TileOut::F32(o) => TileOut::F32(&mut o[at..][..LANES]),
                };
                self.run_channels(prog, first_oc + i, 1, tile, row);
            }
        }
    }

    /// Copies one `[h][w]` input channel into its phase planes `phases` (`[sy][sx][hq][wq]`,
    /// already filled with the zero point).
    fn split_phases(&self, input: &[u8], geom: PhaseSplit, phases: &mut [u8]) {
        split_phases_with(&PortableRows, input, geom, phases);
    }

    /// [`Self::split_phases`], also writing `!b` into `complement` for every byte `b` it writes
    /// into `phases`: a depthwise conv's scratch and its complement half in one pass over the rows
    /// (the caller keeps the padding of both, the zero point and its complement). Panics unless
    /// the two have the same length.
    fn split_phases_complemented(
        &self,
        input: &[u8],
        geom: PhaseSplit,
        phases: &mut [u8],
        complement: &mut [u8],
    ) {
        assert_eq!(phases.len(), complement.len(), "operand lengths");
        self.split_phases(input, geom, phases);
        self.complement_u8(phases, complement);
    }

    /// `out[i] = po.quantize(op(pa.dequantize(a[i]), pb.dequantize(b[i])))` for `[pa, pb, po]`:
    /// the FP32 simulation's arithmetic exactly (residual adds, SiLU's multiply). Panics unless
    /// `a`, `b` and `out` have the same length.
    fn binary_u8(&self, a: &[u8], b: &[u8], grids: [QParams; 3], op: BinaryOp, out: &mut [u8]) {
        scalar::binary_u8(a, b, grids, op, out);
    }

    /// `out[i] = table[x[i]]` (a requantization from one grid to another). Panics unless the
    /// lengths are equal.
    fn lookup_u8(&self, table: &[u8; 256], x: &[u8], out: &mut [u8]) {
        scalar::lookup_u8(table, x, out);
    }

    /// `out[i] = p.quantize(x[i])` (the graph input). Panics unless the lengths are equal.
    fn quantize_f32(&self, x: &[f32], p: QParams, out: &mut [u8]) {
        assert_eq!(x.len(), out.len(), "operand lengths");
        for (d, &v) in out.iter_mut().zip(x) {
            *d = p.quantize(v);
        }
    }

    /// Runs output channel `oc` of a direct program over every flat position of `geom`, reading
    /// tap `k` of position `f` at `src[taps[oc][k] + f]`, and writes the plane `out`. Panics
    /// unless the program is direct, `src` holds `max tap + geom.positions` rounded up to
    /// [`LANES`] bytes, and `out` holds the plane.
    fn run_direct(
        &self,
        prog: &ConvProgram,
        oc: usize,
        src: &[u8],
        geom: FlatGeometry,
        out: PlaneOut<'_>,
    );

    /// Whether [`Self::run_direct_complemented`] is faster than [`Self::run_direct`] here, so that
    /// the caller should build the complement half.
    fn direct_reads_complement(&self) -> bool {
        false
    }

    /// [`Self::run_direct`] on `src = [x | !x]`: two halves of `src.len() / 2` bytes, the second
    /// the bitwise complement of the first, tap offsets into the first. A kernel may read a
    /// negative weight's term from the complement, `255 - x`, and subtract `255` times the
    /// segment's [`Segment::neg_weight`] once, instead of negating every term; the result is the
    /// same. The default runs [`Self::run_direct`] on the first half. Panics as `run_direct` does
    /// on the first half.
    fn run_direct_complemented(
        &self,
        prog: &ConvProgram,
        oc: usize,
        src: &[u8],
        geom: FlatGeometry,
        out: PlaneOut<'_>,
    ) {
        self.run_direct(prog, oc, &src[..src.len() / 2], geom, out);
    }

    /// `dst[i] = !src[i]`. Panics unless the lengths are equal.
    fn complement_u8(&self, src: &[u8], dst: &mut [u8]) {
        assert_eq!(src.len(), dst.len(), "operand lengths");
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = !x;
        }
    }
}

/// Most tiles one [`ShiftAddKernel::run_channels_multi`] call takes.
pub const MAX_TILES_PER_PASS: usize = 3;

/// The L1 data cache of the CPU the process runs on (Linux sysfs), or 32 KiB where it cannot be
/// read: what decides how many tiles a conv runs per pass.
pub fn l1_data_bytes() -> usize {
    static L1D: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *L1D.get_or_init(|| read_l1_data_bytes().unwrap_or(32 * 1024))
}

fn read_l1_data_bytes() -> Option<usize> {
    for index in 0..4 {
        let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{index}");
        let level = std::fs::read_to_string(format!("{dir}/level")).ok()?;
        let kind = std::fs::read_to_string(format!("{dir}/type")).ok()?;
        if level.trim() == "1" && kind.trim() == "Data" {
            let size = std::fs::read_to_string(format!("{dir}/size")).ok()?;
            let kib: usize = size.trim().strip_suffix('K')?.parse().ok()?;
            return Some(kib * 1024);
        }
    }
    None
}

/// The tile count and output checks of [`ShiftAddKernel::run_channels_multi`].
pub(crate) fn check_multi_out(n: usize, tiles: usize, out: &TileOut<'_>, stride: usize) {
    let len = out.len();
    assert!(
        (1..=MAX_TILES_PER_PASS).contains(&tiles),
        "{tiles} tiles in one pass"
    );
    assert!(stride >= tiles * LANES, "tile rows overlap");
    assert!(
        n == 0 || len >= (n - 1) * stride + tiles * LANES,
        "output too small"
    );
}

/// The checks every [`ShiftAddKernel::run_direct`] makes before touching memory.
pub(crate) fn check_direct(
    prog: &ConvProgram,
    oc: usize,
    src: &[u8],
    geom: FlatGeometry,
    out_len: usize,
) {
    assert!(prog.direct, "run_direct on a tile program");
    assert!(oc < prog.cout(), "channel out of bounds");
    geom.check(out_len);
    // The largest tap of every group bounds this group's (computed once, at build).
    assert!(
        prog.max_tap + geom.positions.next_multiple_of(LANES) <= src.len(),
        "direct conv reads past the source"
    );
}

/// Which kernel family to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelChoice {
    /// The best the CPU supports.
    Auto,
    Scalar,
    Avx2,
    Avx512bw,
}

impl KernelChoice {
    pub const VAR: &'static str = "LBW_KERNEL";

    pub fn parse(s: &str) -> Result<KernelChoice> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(KernelChoice::Auto),
            "scalar" => Ok(KernelChoice::Scalar),
            "avx2" => Ok(KernelChoice::Avx2),
            "avx512bw" | "avx512" => Ok(KernelChoice::Avx512bw),
            other => Err(Error::Input(format!(
                "unknown kernel {other:?}: expected auto, scalar, avx2 or avx512bw"
            ))),
        }
    }

    /// `LBW_KERNEL` if set, else `Auto`.
    pub fn from_env() -> Result<KernelChoice> {
        match std::env::var(Self::VAR) {
            Ok(v) => Self::parse(&v),
            Err(_) => Ok(KernelChoice::Auto),
        }
    }
}

/// Every kernel this CPU can run, best first.
pub fn available_kernels() -> Vec<Arc<dyn ShiftAddKernel>> {
    let mut v: Vec<Arc<dyn ShiftAddKernel>> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(k) = x86_64::Avx512bwKernel::new() {
            v.push(Arc::new(k));
        }
        if let Some(k) = x86_64::Avx2Kernel::new() {
            v.push(Arc::new(k));
        }
    }
    v.push(Arc::new(scalar::ScalarKernel));
    v
}

/// Picks a kernel once (at model load): the requested family, or the best available for `Auto`.
pub fn select_kernel(choice: KernelChoice) -> Result<Arc<dyn ShiftAddKernel>> {
    let all = available_kernels();
    let want = match choice {
        KernelChoice::Auto => return Ok(all[0].clone()),
        KernelChoice::Scalar => "scalar",
        KernelChoice::Avx2 => "avx2",
        KernelChoice::Avx512bw => "avx512bw",
    };
    all.into_iter().find(|k| k.name() == want).ok_or_else(|| {
        Error::Input(format!(
            "kernel {want} is not supported by this CPU (or this build's architecture)"
        ))
    })
}
