//! The shift-add engine: power-of-two conv weights and 8-bit activations, no weight multiplies.
//!
//! # Plan (built once at load)
//!
//! * Every stored activation is a `u8` tensor in NCHW order with per-tensor [`QParams`] (see
//!   [`crate::engine::quant_params`] for why one unsigned type with a zero point); graph outputs
//!   are f32. Buffers carry [`SLACK`] spare bytes so a tile may read past a plane's end.
//! * A conv whose weights are quantized becomes a [`ConvProgram`]; a following ReLU or LeakyReLU
//!   (slope in `[0, 1]`) that is the conv output's only reader is fused into its epilogue, so the
//!   pre-activation is never stored. The conv reads its taps from a *source*: the input tensor
//!   itself for unpadded stride-1 1x1 convs, otherwise a zero-point-padded copy split into
//!   `stride_y * stride_x` phase planes. In such a source every tap of output position
//!   `f = oy * pitch + ox` is at `tap_offset + f`, so a tile of [`LANES`] consecutive positions is
//!   one contiguous load per tap whatever the kernel size, stride or padding (the `pitch - ow`
//!   extra columns per row are computed and dropped). A conv with one output channel per group
//!   (depthwise) is a *direct* program: each channel runs over its whole plane without tiles
//!   (see [`crate::engine::kernels`]).
//! * Other ops run in a simple form that is bit-identical to the FP32 simulation: unary
//!   element-wise ops through a 256-entry table, data-movement ops (reshape, transpose, gather,
//!   slice, resize, max-pool, pad) on the codes themselves with the input's grid, add/mul/concat by
//!   dequantize-op-requantize per element, and the rest (average pool, softmax, convs kept at full
//!   precision) through the reference interpreter on dequantized values.
//!
//! # Threads
//!
//! A conv's output channels are split into one contiguous block per thread (whole groups for
//! grouped convs), so each thread owns a disjoint slice of the output and builds its own tiles
//! (direct programs need none).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use crate::engine::Backend;
use crate::engine::kernels::{
    self, Activation, BinaryOp, ConvProgram, ConvSpec, FlatGeometry, KernelChoice, LANES,
    MAX_PHASE_STRIDE, PhaseSplit, PlaneOut, ShiftAddKernel, TileOut, store_flat,
};
use crate::engine::quant_params::{ActivationScales, QParams};
use crate::engine::reference::{ReferenceInterpreter, eval_node};
use crate::error::{Error, Result};
use crate::model::{Conv, Graph, Node, Op, Tensor};
use crate::quant::{QuantizedTensor, simulate_graph};

/// Element-wise steps at least this large are split between the threads (smaller ones cost less
/// than handing work to another thread).
const PARALLEL_BINARY_BYTES: usize = 32 * 1024;

/// How many tiles of `bytes` each a conv runs per pass over its schedules: three while they leave
/// 8 KiB of the L1 data cache free (on Zen 5's 48 KiB, up to K = 106 taps: the 1x1 convs of
/// yolo-fastest-voc ran 1.16-1.34 -> 1.09-1.29 ms, one pass feeding three tiles' accumulators;
/// docs/ENGINE.md), else two, even where two do not fit L1: a single tile's two accumulator
/// chains left the widest convs waiting on add latency (K = 128-232: 0.26 -> 0.21 ms on
/// yolo-fastest-voc, where one tile was the rule beyond 32 KiB for two).
fn tiles_per_pass(bytes: usize) -> usize {
    if 3 * bytes + 8 * 1024 <= kernels::l1_data_bytes() {
        3
    } else {
        2
    }
}

/// Spare bytes after every `u8` buffer: a tile of [`LANES`] may start at the last position.
pub const SLACK: usize = LANES;

/// Load-time choices.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineOptions {
    pub kernel: KernelChoice,
    /// Intra-op threads; 0 means the available cores.
    pub threads: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            kernel: KernelChoice::Auto,
            threads: 0,
        }
    }
}

impl EngineOptions {
    /// The kernel from `LBW_KERNEL` (auto when unset), all cores.
    pub fn from_env() -> Result<Self> {
        Ok(EngineOptions {
            kernel: KernelChoice::from_env()?,
            threads: 0,
        })
    }
}

/// How a value is stored.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Storage {
    U8(QParams),
    F32,
}

/// Where a conv reads its taps from.
#[derive(Debug, Clone)]
enum Source {
    /// The input tensor itself (1x1, stride 1, no padding).
    Direct,
    /// A padded, phase-split copy.
    Padded {
        c: usize,
        h: usize,
        w: usize,
        pads: [usize; 4],
        stride: [usize; 2],
        /// Rows and columns of each phase plane.
        hq: usize,
        wq: usize,
        len: usize,
    },
    /// Depthwise: output channel `c` reads input channel `c` only, so each channel's padded,
    /// phase-split copy is made into a per-thread scratch of `len` bytes just before the channel
    /// runs, and the kernel reads it from L1 (a whole padded copy of the input would be written
    /// and then read back from L2). The program's taps are relative to the channel's planes.
    PerChannel {
        split: PhaseSplit,
        planes: usize,
        len: usize,
    },
}

#[derive(Debug)]
struct ConvStep {
    name: String,
    input: usize,
    in_channels: usize,
    source: Source,
    prog: ConvProgram,
    in_zero_point: u8,
    oh: usize,
    ow: usize,
    /// Row pitch of the flat output positions the kernel computes.
    pitch: usize,
    tiles: usize,
}

#[derive(Debug)]
enum StepKind {
    Conv(Box<ConvStep>),
    /// `out = table[in]`.
    Table {
        input: usize,
        table: Box<[u8; 256]>,
    },
    /// A data-movement op run on the codes; the output has the input's grid.
    Codes {
        node: Node,
    },
    /// Dequantize both, add or multiply in f32, requantize.
    Binary {
        a: usize,
        b: usize,
        mul: bool,
    },
    Concat {
        axis: usize,
    },
    /// Dequantize, reference op in f32, requantize (or keep f32).
    Float {
        node: Node,
    },
}

#[derive(Debug)]
struct PlanStep {
    kind: StepKind,
    inputs: Vec<usize>,
    output: usize,
}

/// A pooled `u8` buffer whose contents start on a 64-byte boundary: the kernels read and write
/// whole 64-byte rows at multiples of 64 from a plane's start, and each such access that
/// straddles two cache lines costs two (the allocator returns large blocks 16 bytes past a page).
struct CodeBuf {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl CodeBuf {
    /// `len` zeroed bytes.
    fn new(len: usize) -> CodeBuf {
        let bytes = vec![0u8; len + 64];
        let start = bytes.as_ptr().align_offset(64).min(64);
        CodeBuf { bytes, start, len }
    }

    /// The most bytes it can hold without reallocating (which would move its start).
    fn room(&self) -> usize {
        self.bytes.len() - self.start
    }
}

impl std::ops::Deref for CodeBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes[self.start..][..self.len]
    }
}

impl std::ops::DerefMut for CodeBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..][..self.len]
    }
}

/// A stored value during a run.
enum Value {
    U8 { data: CodeBuf, shape: Vec<usize> },
    F32(Tensor),
}

/// The shift-add engine; see the module docs.
pub struct ShiftAddEngine {
    graph: Graph,
    kernel: Arc<dyn ShiftAddKernel>,
    pool: Option<rayon::ThreadPool>,
    threads: usize,
    steps: Vec<PlanStep>,
    storage: Vec<Storage>,
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    /// After step `i`, the values whose last reader it was.
    frees: Vec<Vec<usize>>,
    input_slot: usize,
    output_slots: Vec<usize>,
    weight_bytes: usize,
    buffers: Mutex<Vec<CodeBuf>>,
}

impl std::fmt::Debug for ShiftAddEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShiftAddEngine")
            .field("graph", &self.graph.name)
            .field("kernel", &self.kernel.name())
            .field("threads", &self.threads)
            .field("steps", &self.steps.len())
            .finish()
    }
}

fn is_code_op(op: &Op) -> bool {
    matches!(
        op,
        Op::Reshape { .. }
            | Op::Transpose { .. }
            | Op::Gather { .. }
            | Op::Slice { .. }
            | Op::ResizeNearest { .. }
            | Op::MaxPool(_)
            | Op::Pad { .. }
    )
}

fn fusable(op: &Op) -> Option<Activation> {
    match op {
        Op::Relu => Some(Activation::Relu),
        Op::LeakyRelu { alpha } if (0.0..=1.0).contains(alpha) => Some(Activation::Leaky(*alpha)),
        _ => None,
    }
}

/// Slots, storage and shapes of the values being planned.
struct Planner<'g> {
    graph: &'g Graph,
    scales: &'g ActivationScales,
    shapes_by_name: HashMap<String, Vec<usize>>,
    readers: HashMap<String, Vec<usize>>,
    slot_of: HashMap<String, usize>,
    names: Vec<String>,
    storage: Vec<Storage>,
    shapes: Vec<Vec<usize>>,
}

impl Planner<'_> {
    fn add(&mut self, name: &str, st: Storage) -> usize {
        let id = self.names.len();
        self.names.push(name.to_string());
        self.storage.push(st);
        self.shapes.push(self.shapes_by_name[name].clone());
        self.slot_of.insert(name.to_string(), id);
        id
    }

    fn slot(&self, name: &str) -> Result<usize> {
        self.slot_of
            .get(name)
            .copied()
            .ok_or_else(|| Error::Model(format!("value {name:?} is read before it is stored")))
    }

    fn grid(&self, name: &str) -> Result<QParams> {
        self.scales.get(name).ok_or_else(|| {
            Error::Model(format!(
                "no activation scale for {name:?}: calibrate the model first"
            ))
        })
    }

    /// Graph outputs nobody else reads stay f32; everything else is `u8` on its grid (`forced`
    /// for ops that keep their input's grid, else the calibrated one).
    fn output_storage(&self, name: &str, forced: Option<QParams>) -> Result<Storage> {
        let is_output = self.graph.outputs.iter().any(|o| o == name);
        if is_output && !self.readers.contains_key(name) {
            return Ok(Storage::F32);
        }
        Ok(Storage::U8(match forced {
            Some(p) => p,
            None => self.grid(name)?,
        }))
    }

    fn params(&self, slot: usize) -> Result<QParams> {
        match self.storage[slot] {
            Storage::U8(p) => Ok(p),
            Storage::F32 => Err(Error::Model(format!(
                "value {:?} is an f32 graph output and cannot be read by another node",
                self.names[slot]
            ))),
        }
    }
}

impl ShiftAddEngine {
    /// Plans `graph` with the quantized conv weights in `weights` (convs without an entry run in
    /// f32) and activation grids from `scales` (every stored value needs one).
    pub fn new(
        graph: &Graph,
        weights: &BTreeMap<String, QuantizedTensor>,
        scales: &ActivationScales,
        options: &EngineOptions,
    ) -> Result<Self> {
        let shapes_by_name = graph.infer_shapes()?;
        if graph.input_shape[0] != 1 {
            return Err(Error::Model("the shift-add engine runs batch 1".into()));
        }
        let kernel = kernels::select_kernel(options.kernel)?;
        let threads = if options.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            options.threads
        };
        let pool = if threads > 1 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("lbw-shift-add-{i}"))
                    .build()
                    .map_err(|e| Error::Model(format!("thread pool: {e}")))?,
            )
        } else {
            None
        };
        let mut readers: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, n) in graph.nodes.iter().enumerate() {
            for v in &n.inputs {
                readers.entry(v.clone()).or_default().push(i);
            }
        }
        let mut p = Planner {
            graph,
            scales,
            shapes_by_name,
            readers,
            slot_of: HashMap::new(),
            names: vec![],
            storage: vec![],
            shapes: vec![],
        };
        let input_grid = p.grid(&graph.input)?;
        let input_slot = p.add(&graph.input, Storage::U8(input_grid));
        let mut steps = Vec::new();
        let mut fused_away = vec![false; graph.nodes.len()];
        let mut weight_bytes = 0usize;
        for (i, node) in graph.nodes.iter().enumerate() {
            if fused_away[i] {
                continue;
            }
            let inputs: Vec<usize> = node
                .inputs
                .iter()
                .map(|v| p.slot(v))
                .collect::<Result<_>>()?;
            let in_params: Vec<QParams> =
                inputs.iter().map(|&s| p.params(s)).collect::<Result<_>>()?;
            let float_step = |p: &mut Planner<'_>| -> Result<PlanStep> {
                let st = p.output_storage(&node.output, None)?;
                let output = p.add(&node.output, st);
                Ok(PlanStep {
                    kind: StepKind::Float { node: node.clone() },
                    inputs: inputs.clone(),
                    output,
                })
            };
            let step = match &node.op {
                Op::Conv(conv) if weights.contains_key(&conv.weight) => {
                    // Fuse an activation that is the conv output's only reader.
                    let rd = p.readers.get(&node.output).cloned().unwrap_or_default();
                    let fused = match rd.as_slice() {
                        [j] if !graph.outputs.contains(&node.output) => {
                            fusable(&graph.nodes[*j].op).map(|a| (*j, a))
                        }
                        _ => None,
                    };
                    let (out_name, act) = match fused {
                        Some((j, a)) => {
                            fused_away[j] = true;
                            (graph.nodes[j].output.as_str(), a)
                        }
                        None => (node.output.as_str(), Activation::Linear),
                    };
                    let st = p.output_storage(out_name, None)?;
                    let output = p.add(out_name, st);
                    let q = &weights[&conv.weight];
                    let cs = plan_conv(
                        graph,
                        node,
                        conv,
                        q,
                        &p.shapes[inputs[0]],
                        &p.shapes[output],
                        in_params[0],
                        act,
                        st,
                    )?;
                    weight_bytes += cs.prog.bytes();
                    PlanStep {
                        kind: StepKind::Conv(Box::new(ConvStep {
                            input: inputs[0],
                            ..cs
                        })),
                        inputs,
                        output,
                    }
                }
                Op::Conv(conv) => {
                    weight_bytes += 4 * graph.weight(&conv.weight)?.len();
                    float_step(&mut p)?
                }
                Op::Relu | Op::LeakyRelu { .. } | Op::Sigmoid => {
                    let st = p.output_storage(&node.output, None)?;
                    match st {
                        Storage::U8(out) => {
                            let table = unary_table(graph, node, in_params[0], out)?;
                            let output = p.add(&node.output, st);
                            PlanStep {
                                kind: StepKind::Table {
                                    input: inputs[0],
                                    table,
                                },
                                inputs,
                                output,
                            }
                        }
                        Storage::F32 => float_step(&mut p)?,
                    }
                }
                op if is_code_op(op) => {
                    let st = p.output_storage(&node.output, Some(in_params[0]))?;
                    match st {
                        Storage::U8(_) => {
                            let output = p.add(&node.output, st);
                            PlanStep {
                                kind: StepKind::Codes { node: node.clone() },
                                inputs,
                                output,
                            }
                        }
                        Storage::F32 => float_step(&mut p)?,
                    }
                }
                Op::Add | Op::Mul => {
                    let st = p.output_storage(&node.output, None)?;
                    let output = p.add(&node.output, st);
                    PlanStep {
                        kind: StepKind::Binary {
                            a: inputs[0],
                            b: inputs[1],
                            mul: matches!(node.op, Op::Mul),
                        },
                        inputs,
                        output,
                    }
                }
                Op::Concat { axis } => {
                    let st = p.output_storage(&node.output, None)?;
                    match st {
                        Storage::U8(_) => {
                            let output = p.add(&node.output, st);
                            PlanStep {
                                kind: StepKind::Concat { axis: *axis },
                                inputs,
                                output,
                            }
                        }
                        Storage::F32 => float_step(&mut p)?,
                    }
                }
                Op::AvgPool { .. } | Op::Softmax { .. } => float_step(&mut p)?,
                other => {
                    return Err(Error::Model(format!(
                        "the shift-add engine cannot run node {} ({})",
                        node.name,
                        other.onnx_name()
                    )));
                }
            };
            steps.push(step);
        }
        let output_slots = graph
            .outputs
            .iter()
            .map(|o| p.slot(o))
            .collect::<Result<Vec<_>>>()?;
        let mut last_reader = vec![None; p.names.len()];
        for (i, s) in steps.iter().enumerate() {
            for &v in &s.inputs {
                last_reader[v] = Some(i);
            }
        }
        let mut frees = vec![Vec::new(); steps.len()];
        for (v, r) in last_reader.iter().enumerate() {
            if let Some(i) = r
                && !output_slots.contains(&v)
            {
                frees[*i].push(v);
            }
        }
        Ok(ShiftAddEngine {
            graph: graph.clone(),
            kernel,
            pool,
            threads,
            steps,
            storage: p.storage,
            names: p.names,
            shapes: p.shapes,
            frees,
            input_slot,
            output_slots,
            weight_bytes,
            buffers: Mutex::new(Vec::new()),
        })
    }

    /// The grid of every value the engine stores as `u8`, the graph input included: what the FP32
    /// simulation must fake-quantize to compute the same thing.
    pub fn activation_params(&self) -> HashMap<String, QParams> {
        self.names
            .iter()
            .zip(&self.storage)
            .filter_map(|(n, s)| match s {
                Storage::U8(p) => Some((n.clone(), *p)),
                Storage::F32 => None,
            })
            .collect()
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Per conv layer: name, taps per group, output channels, non-zero terms, segments, output
    /// positions computed (for the arithmetic-limit accounting in the benchmarks).
    pub fn conv_stats(&self) -> Vec<ConvStats> {
        self.steps
            .iter()
            .filter_map(|s| match &s.kind {
                StepKind::Conv(c) => Some(c.stats()),
                _ => None,
            })
            .collect()
    }

    fn take_buffer(&self, n: usize) -> CodeBuf {
        let mut pool = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        // Best fit among the free buffers, so large ones stay for large tensors.
        let pick = pool
            .iter()
            .enumerate()
            .filter(|(_, b)| b.room() >= n)
            .min_by_key(|(_, b)| b.room())
            .map(|(i, _)| i);
        let b = pick.map(|i| pool.swap_remove(i));
        drop(pool);
        // Contents are stale: every writer overwrites all positions it owns.
        match b {
            Some(mut b) => {
                b.len = n;
                b
            }
            None => CodeBuf::new(n),
        }
    }

    fn give_back(&self, b: CodeBuf) {
        let mut pool = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < 64 {
            pool.push(b);
        }
    }

    fn run_conv(&self, c: &ConvStep, input: &[u8], out: &mut Value) {
        let mut src_buf: Option<CodeBuf> = None;
        let src: &[u8] = match &c.source {
            Source::Direct | Source::PerChannel { .. } => input,
            Source::Padded {
                c: ch,
                h,
                w,
                pads,
                stride,
                hq,
                wq,
                len,
            } => {
                let mut buf = self.take_buffer(*len);
                let per = stride[0] * stride[1] * hq * wq;
                let split = PhaseSplit {
                    h: *h,
                    w: *w,
                    pads: *pads,
                    stride: *stride,
                    wq: *wq,
                };
                let (planes, tail) = buf.split_at_mut(ch * per);
                tail.fill(c.in_zero_point);
                // One input channel per task: the stem's split (3 channels of 320x320) was the
                // serial part of its conv at two threads.
                let mut slices: Vec<&mut [u8]> = planes.chunks_mut(per).collect();
                let bounds: Vec<usize> = (0..=*ch).collect();
                let kernel = self.kernel.as_ref();
                self.parallel(&mut slices, &bounds, |ic, _, dst| {
                    dst.fill(c.in_zero_point);
                    kernel.split_phases(&input[ic * h * w..][..h * w], split, dst);
                });
                &*src_buf.insert(buf)
            }
        };
        let prog = &c.prog;
        let cout = prog.cout();
        let plane = c.oh * c.ow;
        // One block of whole groups (or of channels, for one group) per thread.
        let parts = self.threads.min(if prog.groups() > 1 {
            prog.groups()
        } else {
            cout
        });
        let unit = if prog.groups() > 1 { prog.cout_g } else { 1 };
        let units = cout / unit;
        let bounds: Vec<usize> = (0..=parts).map(|i| i * units / parts * unit).collect();
        let kernel = self.kernel.as_ref();
        let work = |lo: usize, hi: usize, out: OutSlice<'_>| {
            conv_block(kernel, c, src, lo, hi, plane, out);
        };
        match out {
            Value::U8 { data, .. } => {
                let mut slices = split_blocks(&mut data[..cout * plane], &bounds, plane);
                self.parallel(&mut slices, &bounds, |lo, hi, s| {
                    work(lo, hi, OutSlice::U8(s))
                });
            }
            Value::F32(t) => {
                let mut slices = split_blocks(&mut t.data[..], &bounds, plane);
                self.parallel(&mut slices, &bounds, |lo, hi, s| {
                    work(lo, hi, OutSlice::F32(s))
                });
            }
        }
        if let Some(b) = src_buf {
            self.give_back(b);
        }
    }

    /// Runs `f(lo, hi, slice)` for every block, on the pool when there is one.
    fn parallel<T: Send>(
        &self,
        slices: &mut [&mut [T]],
        bounds: &[usize],
        f: impl Fn(usize, usize, &mut [T]) + Sync,
    ) {
        match &self.pool {
            // Inside the pool (see `run_keeping`): this thread runs the first block itself.
            Some(pool) if slices.len() > 1 && pool.current_thread_index().is_some() => {
                rayon::scope(|s| {
                    let (first, rest) = slices.split_first_mut().expect("two or more blocks");
                    for (i, sl) in rest.iter_mut().enumerate() {
                        let f = &f;
                        let (lo, hi) = (bounds[i + 1], bounds[i + 2]);
                        s.spawn(move |_| f(lo, hi, sl));
                    }
                    f(bounds[0], bounds[1], first);
                })
            }
            Some(pool) if slices.len() > 1 => pool.scope(|s| {
                for (i, sl) in slices.iter_mut().enumerate() {
                    let f = &f;
                    let (lo, hi) = (bounds[i], bounds[i + 1]);
                    s.spawn(move |_| f(lo, hi, sl));
                }
            }),
            _ => {
                for (i, sl) in slices.iter_mut().enumerate() {
                    f(bounds[i], bounds[i + 1], sl);
                }
            }
        }
    }
}

/// One step of a profiled run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepTime {
    /// The value the step stores.
    pub value: String,
    /// `conv-1x1`, `conv-depthwise`, `conv-kxk`, `table`, `codes`, `binary`, `concat`, `float`.
    pub kind: &'static str,
    pub conv: Option<ConvStats>,
    pub seconds: f64,
}

impl StepKind {
    fn label(&self) -> &'static str {
        match self {
            StepKind::Conv(c) => {
                if c.prog.groups() > 1 && c.prog.groups() == c.prog.cout() {
                    "conv-depthwise"
                } else if c.prog.taps_per_group() * c.prog.groups() == c.in_channels {
                    "conv-1x1"
                } else {
                    "conv-kxk"
                }
            }
            StepKind::Table { .. } => "table",
            StepKind::Codes { .. } => "codes",
            StepKind::Binary { .. } => "binary",
            StepKind::Concat { .. } => "concat",
            StepKind::Float { .. } => "float",
        }
    }
}

impl ConvStep {
    fn stats(&self) -> ConvStats {
        ConvStats {
            name: self.name.clone(),
            groups: self.prog.groups(),
            taps_per_group: self.prog.taps_per_group(),
            cout: self.prog.cout(),
            terms: self.prog.term_count(),
            segments: self.prog.segment_count(),
            positions: self.tiles * LANES,
        }
    }
}

/// Per-layer numbers for the benchmark report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConvStats {
    pub name: String,
    pub groups: usize,
    pub taps_per_group: usize,
    pub cout: usize,
    /// Non-zero weight terms: 16-bit adds or subtracts per output position.
    pub terms: usize,
    pub segments: usize,
    /// Output positions computed (including the dropped pitch columns and tile padding).
    pub positions: usize,
}

enum OutSlice<'a> {
    U8(&'a mut [u8]),
    F32(&'a mut [f32]),
}

/// Splits the first `bounds.last() * plane` elements into the blocks `bounds[i]..bounds[i+1]`.
fn split_blocks<'a, T>(mut data: &'a mut [T], bounds: &[usize], plane: usize) -> Vec<&'a mut [T]> {
    let mut v = Vec::with_capacity(bounds.len() - 1);
    for w in bounds.windows(2) {
        let (a, b) = std::mem::take(&mut data).split_at_mut((w[1] - w[0]) * plane);
        v.push(a);
        data = b;
    }
    v
}

/// Computes output channels `lo..hi` of a conv into `out` (their planes, contiguous).
fn conv_block(
    kernel: &dyn ShiftAddKernel,
    c: &ConvStep,
    src: &[u8],
    lo: usize,
    hi: usize,
    plane: usize,
    mut out: OutSlice<'_>,
) {
    let prog = &c.prog;
    let geom = FlatGeometry {
        positions: c.oh * c.pitch,
        pitch: c.pitch,
        width: c.ow,
    };
    if prog.is_direct() {
        // The scratch's padding keeps the zero point (and its complement, for a kernel that reads
        // one): every channel writes the same positions.
        let complement = kernel.direct_reads_complement();
        let mut scratch = match &c.source {
            Source::PerChannel { split, planes, len } => {
                let mut buf = vec![c.in_zero_point; *len];
                if complement {
                    buf.resize(2 * len, !c.in_zero_point);
                }
                Some((buf, *split, *planes, *len))
            }
            _ => None,
        };
        for oc in lo..hi {
            let (src, complemented): (&[u8], bool) = match &mut scratch {
                Some((buf, split, planes, len)) => {
                    let n = split.h * split.w;
                    let input = &src[oc * n..][..n];
                    if complement {
                        let (x, not_x) = buf.split_at_mut(*len);
                        let (x, not_x) = (&mut x[..*planes], &mut not_x[..*planes]);
                        kernel.split_phases_complemented(input, *split, x, not_x);
                    } else {
                        kernel.split_phases(input, *split, &mut buf[..*planes]);
                    }
                    (buf, complement)
                }
                None => (src, false),
            };
            let at = (oc - lo) * plane;
            let out = match &mut out {
                OutSlice::U8(o) => PlaneOut::U8(&mut o[at..][..plane]),
                OutSlice::F32(o) => PlaneOut::F32(&mut o[at..][..plane]),
            };
            if complemented {
                kernel.run_direct_complemented(prog, oc, src, geom, out);
            } else {
                kernel.run_direct(prog, oc, src, geom, out);
            }
        }
        return;
    }
    TILE_SCRATCH.with_borrow_mut(|(tiles, stage_u8)| {
        conv_tiles(kernel, c, src, [lo, hi], plane, geom, out, tiles, stage_u8)
    });
}

/// The first `n` elements of `buf` from a 64-byte boundary on, growing it as needed (contents
/// stale). The tiles and the staging are read and written in 64-byte rows: a row that straddles
/// two cache lines costs two, and where the allocator put the buffers varied from process to
/// process (yolo-fastest-voc's 1x1 convs took 1.08-1.13 or 1.25-1.37 ms, by run).
fn cache_aligned<T: Copy + Default>(buf: &mut Vec<T>, n: usize) -> &mut [T] {
    let spare = 64 / std::mem::size_of::<T>();
    if buf.len() < n + spare {
        buf.resize(n + spare, T::default());
    }
    let first = buf.as_ptr().align_offset(64).min(spare);
    &mut buf[first..][..n]
}

thread_local! {
    /// Each thread's tiles and staging, reused from conv to conv: allocating and zeroing them for
    /// every conv (up to 115 KB of tiles) was about 2 % of an inference.
    static TILE_SCRATCH: RefCell<(Vec<i16>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The tile part of [`conv_block`]: output channels `lo..hi` of a tile program.
#[allow(clippy::too_many_arguments)]
fn conv_tiles(
    kernel: &dyn ShiftAddKernel,
    c: &ConvStep,
    src: &[u8],
    [lo, hi]: [usize; 2],
    plane: usize,
    geom: FlatGeometry,
    mut out: OutSlice<'_>,
    tiles: &mut Vec<i16>,
    stage_u8: &mut Vec<u8>,
) {
    let prog = &c.prog;
    let cout_g = prog.cout_g;
    let tile_len = prog.tile_rows() * LANES;
    let per_pass = tiles_per_pass(prog.tile_rows() * kernel.tile_row_bytes());
    let used = per_pass * tile_len;
    let tiles = cache_aligned(tiles, used);
    // The kernels write rows 0..2K of a tile and leave row 2K, the zero row the schedule pads
    // with, as it is: zeroed here, since the buffer held another conv's tiles.
    let row = kernel.tile_row_bytes() / std::mem::size_of::<i16>();
    let zero_row = (prog.tile_rows() - 1) * row;
    for t in tiles.chunks_exact_mut(tile_len) {
        t[zero_row..zero_row + row].fill(0);
    }
    let rows = (hi - lo).min(cout_g);
    // Staging for the tiles that do not go straight to their rows (f32 outputs are graph outputs
    // only: their stage is allocated when needed).
    let stage_len = per_pass * rows * LANES;
    let mut stage_f32 = Vec::new();
    let stage_u8: &mut [u8] = match out {
        OutSlice::U8(_) => cache_aligned(stage_u8, stage_len),
        OutSlice::F32(_) => {
            stage_f32 = vec![0f32; stage_len];
            &mut []
        }
    };
    let (g_lo, g_hi) = (lo / cout_g, (hi - 1) / cout_g + 1);
    for g in g_lo..g_hi {
        let a = lo.max(g * cout_g);
        let b = hi.min((g + 1) * cout_g);
        let taps = prog.group_taps(g);
        let mut t = 0;
        while t < c.tiles {
            let base = t * LANES;
            // Several neighbouring tiles per pass over the schedules while they fit the L1 cache.
            let k = per_pass.min(c.tiles - t);
            let mut built: [&[i16]; kernels::MAX_TILES_PER_PASS] =
                [&[]; kernels::MAX_TILES_PER_PASS];
            for (j, (tile, slot)) in tiles
                .chunks_exact_mut(tile_len)
                .zip(&mut built)
                .take(k)
                .enumerate()
            {
                kernel.build_tile(src, taps, base + j * LANES, tile);
                *slot = tile;
            }
            let built = &built[..k];
            let n = b - a;
            // Whole runs of an unpadded plane go straight to their rows; the rest is staged.
            let straight = k > 1 && geom.pitch == geom.width && base + k * LANES <= geom.positions;
            match &mut out {
                OutSlice::U8(o) if straight => {
                    let dst = &mut o[(a - lo) * plane + base..];
                    kernel.run_channels_multi(prog, a, n, built, TileOut::U8(dst), plane);
                }
                OutSlice::U8(o) => {
                    let stage = TileOut::U8(&mut stage_u8[..]);
                    if let [one] = built {
                        kernel.run_channels(prog, a, n, one, stage);
                    } else {
                        kernel.run_channels_multi(prog, a, n, built, stage, k * LANES);
                    }
                    for i in 0..n {
                        let dst = &mut o[(a + i - lo) * plane..][..plane];
                        let lanes = &stage_u8[i * k * LANES..][..k * LANES];
                        store_flat(lanes, base, geom, dst);
                    }
                }
                OutSlice::F32(o) => {
                    let stage = TileOut::F32(&mut stage_f32[..]);
                    if let [one] = built {
                        kernel.run_channels(prog, a, n, one, stage);
                    } else {
                        kernel.run_channels_multi(prog, a, n, built, stage, k * LANES);
                    }
                    for i in 0..n {
                        let dst = &mut o[(a + i - lo) * plane..][..plane];
                        let lanes = &stage_f32[i * k * LANES..][..k * LANES];
                        store_flat(lanes, base, geom, dst);
                    }
                }
            }
            t += k;
        }
    }
}

/// Lowers one quantized conv.
#[allow(clippy::too_many_arguments)]
fn plan_conv(
    graph: &Graph,
    node: &Node,
    conv: &Conv,
    q: &QuantizedTensor,
    in_shape: &[usize],
    out_shape: &[usize],
    in_params: QParams,
    act: Activation,
    out_storage: Storage,
) -> Result<ConvStep> {
    let w = graph.weight(&conv.weight)?;
    if q.shape != w.shape {
        return Err(Error::Model(format!(
            "quantized weight of {} has shape {:?}, the conv's is {:?}",
            node.name, q.shape, w.shape
        )));
    }
    q.validate()?;
    let (c, h, wd) = (in_shape[1], in_shape[2], in_shape[3]);
    let (oh, ow) = (out_shape[2], out_shape[3]);
    let groups = conv.groups;
    let cin_g = c / groups;
    let [kh, kw] = conv.kernel;
    let [sy, sx] = conv.stride;
    let [dy, dx] = conv.dilation;
    if sy.max(sx) > MAX_PHASE_STRIDE {
        return Err(Error::Model(format!(
            "{}: stride {:?} is larger than the shift-add engine supports ({MAX_PHASE_STRIDE})",
            node.name, conv.stride
        )));
    }
    let direct = conv.kernel == [1, 1] && conv.stride == [1, 1] && conv.pads == [0; 4];
    let mut taps = Vec::with_capacity(groups * cin_g * kh * kw);
    let (source, pitch) = if direct {
        for g in 0..groups {
            for icg in 0..cin_g {
                taps.push(((g * cin_g + icg) * h * wd) as u32);
            }
        }
        (Source::Direct, wd)
    } else {
        let hp = h + conv.pads[0] + conv.pads[2];
        let wp = wd + conv.pads[1] + conv.pads[3];
        let (hq, wq) = (hp.div_ceil(sy), wp.div_ceil(sx));
        let plane = hq * wq;
        // One input channel per output channel: each reads its own channel's planes.
        let per_channel = cin_g == 1 && out_shape[1] == groups;
        for g in 0..groups {
            for icg in 0..cin_g {
                let ic = if per_channel { 0 } else { g * cin_g + icg };
                for ky in 0..kh {
                    for kx in 0..kw {
                        let (ry, rx) = (ky * dy, kx * dx);
                        let base = ((ic * sy + ry % sy) * sx + rx % sx) * plane;
                        taps.push((base + (ry / sy) * wq + rx / sx) as u32);
                    }
                }
            }
        }
        let tiles = (oh * wq).div_ceil(LANES);
        let max_tap = taps.iter().copied().max().unwrap_or(0) as usize;
        let planes = sy * sx * plane;
        let source = if per_channel {
            Source::PerChannel {
                split: PhaseSplit {
                    h,
                    w: wd,
                    pads: conv.pads,
                    stride: conv.stride,
                    wq,
                },
                planes,
                len: planes.max(max_tap + tiles * LANES) + SLACK,
            }
        } else {
            Source::Padded {
                c,
                h,
                w: wd,
                pads: conv.pads,
                stride: conv.stride,
                hq,
                wq,
                len: (c * planes).max(max_tap + tiles * LANES) + SLACK,
            }
        };
        (source, wq)
    };
    if taps.iter().any(|&t| t as usize >= u32::MAX as usize / 2) {
        return Err(Error::Model(format!("{}: input too large", node.name)));
    }
    let bias = match &conv.bias {
        Some(b) => Some(graph.weight(b)?.data.as_slice()),
        None => None,
    };
    let prog = ConvProgram::build(&ConvSpec {
        groups,
        codes: &q.codes,
        alphas: &q.alphas,
        bias,
        taps,
        input_scale: in_params.scale,
        input_zero_point: in_params.zero_point,
        act,
        output: match out_storage {
            Storage::U8(p) => Some((p.scale, p.zero_point)),
            Storage::F32 => None,
        },
    })
    .map_err(|e| Error::Model(format!("{}: {e}", node.name)))?;
    Ok(ConvStep {
        name: node.name.clone(),
        input: 0,
        in_channels: c,
        source,
        prog,
        in_zero_point: in_params.zero_point,
        oh,
        ow,
        pitch,
        tiles: (oh * pitch).div_ceil(LANES),
    })
}

/// `table[q] = out.quantize(op(in.dequantize(q)))`, computed by the reference op itself so the
/// result is identical to the FP32 simulation.
fn unary_table(graph: &Graph, node: &Node, input: QParams, out: QParams) -> Result<Box<[u8; 256]>> {
    let x = Tensor {
        shape: vec![256],
        data: (0..=255u8).map(|q| input.dequantize(q)).collect(),
    };
    let y = eval_node(graph, node, &[&x])
        .map_err(|e| Error::Model(format!("node {}: {e}", node.name)))?;
    let mut t = Box::new([0u8; 256]);
    for (d, &v) in t.iter_mut().zip(&y.data) {
        *d = out.quantize(v);
    }
    Ok(t)
}

/// Nearest-neighbour upsampling by integer factors on the codes (the reference op's indexing,
/// without the round trip through f32 tensors).
fn resize_nearest_u8(
    x: &[u8],
    in_shape: &[usize],
    scale: [usize; 2],
    out_shape: &[usize],
    out: &mut [u8],
) {
    let (h, w) = (in_shape[2], in_shape[3]);
    let (oh, ow) = (out_shape[2], out_shape[3]);
    let planes = out_shape[0] * out_shape[1];
    let [sy, sx] = scale;
    for p in 0..planes {
        let src = &x[p * h * w..][..h * w];
        let dst = &mut out[p * oh * ow..][..oh * ow];
        // Each source row is widened once and then copied to its other sy - 1 output rows: no
        // per-element division (which made this step cost as much as a conv).
        for (row, block) in src.chunks_exact(w).zip(dst.chunks_mut(sy * ow)) {
            let (first, rest) = block.split_at_mut(ow.min(block.len()));
            if sx == 2 {
                // Pairs of whole elements: a loop the compiler vectorises (the x2 upsamples of
                // YOLO necks).
                for (&v, d) in row.iter().zip(first.as_chunks_mut::<2>().0) {
                    *d = [v, v];
                }
            } else {
                for (&v, d) in row.iter().zip(first.chunks_mut(sx)) {
                    d.fill(v);
                }
            }
            for r in rest.chunks_mut(ow) {
                r.copy_from_slice(&first[..r.len()]);
            }
        }
    }
}

/// `out = po.quantize(pi.dequantize(x))` through a 256-entry table.
fn requantize_u8(kernel: &dyn ShiftAddKernel, x: &[u8], pi: QParams, po: QParams, out: &mut [u8]) {
    let mut table = [0u8; 256];
    for (q, t) in table.iter_mut().enumerate() {
        *t = po.quantize(pi.dequantize(q as u8));
    }
    kernel.lookup_u8(&table, x, out);
}

fn dequantize(data: &[u8], shape: &[usize], p: QParams) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor {
        shape: shape.to_vec(),
        data: data[..n].iter().map(|&q| p.dequantize(q)).collect(),
    }
}

impl Backend for ShiftAddEngine {
    fn engine(&self) -> &'static str {
        "shift-add"
    }

    fn kernel(&self) -> &str {
        self.kernel.name()
    }

    fn run(&self, input: Tensor) -> Result<Vec<Tensor>> {
        Ok(self.run_keeping(input, false, None)?.0)
    }

    fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }
}

impl ShiftAddEngine {
    /// Runs one input and also returns every stored value, dequantized, by name (for comparing
    /// the engine with its FP32 simulation layer by layer).
    pub fn run_recording(&self, input: Tensor) -> Result<(Vec<Tensor>, HashMap<String, Tensor>)> {
        self.run_keeping(input, true, None)
    }

    /// Runs one input and returns the time of every step (for the per-layer benchmark report).
    pub fn run_profiled(&self, input: Tensor) -> Result<Vec<StepTime>> {
        let mut times = Vec::with_capacity(self.steps.len());
        self.run_keeping(input, false, Some(&mut times))?;
        Ok(times)
    }

    fn run_keeping(
        &self,
        input: Tensor,
        keep: bool,
        profile: Option<&mut Vec<StepTime>>,
    ) -> Result<(Vec<Tensor>, HashMap<String, Tensor>)> {
        // The whole run on one of the pool's threads: each conv then runs its first block on that
        // thread and the others are stolen by workers still spinning from the previous conv,
        // instead of handing every conv from an outside thread to a pool that has gone to sleep.
        match &self.pool {
            Some(pool) => pool.install(|| self.run_steps(input, keep, profile)),
            None => self.run_steps(input, keep, profile),
        }
    }

    fn run_steps(
        &self,
        input: Tensor,
        keep: bool,
        mut profile: Option<&mut Vec<StepTime>>,
    ) -> Result<(Vec<Tensor>, HashMap<String, Tensor>)> {
        if input.shape != self.graph.input_shape {
            return Err(Error::Inference(format!(
                "input shape {:?}, expected {:?}",
                input.shape, self.graph.input_shape
            )));
        }
        let mut values: Vec<Option<Value>> = (0..self.names.len()).map(|_| None).collect();
        let Storage::U8(ip) = self.storage[self.input_slot] else {
            unreachable!("the input is always u8")
        };
        let mut buf = self.take_buffer(input.len() + SLACK);
        self.kernel
            .quantize_f32(&input.data, ip, &mut buf[..input.data.len()]);
        values[self.input_slot] = Some(Value::U8 {
            data: buf,
            shape: input.shape,
        });
        for (i, step) in self.steps.iter().enumerate() {
            let t0 = std::time::Instant::now();
            let out = self.run_step(step, &values)?;
            if let Some(p) = profile.as_deref_mut() {
                p.push(StepTime {
                    value: self.names[step.output].clone(),
                    kind: step.kind.label(),
                    conv: match &step.kind {
                        StepKind::Conv(c) => Some(c.stats()),
                        _ => None,
                    },
                    seconds: t0.elapsed().as_secs_f64(),
                });
            }
            values[step.output] = Some(out);
            if keep {
                continue;
            }
            for &v in &self.frees[i] {
                if let Some(Value::U8 { data, .. }) = values[v].take() {
                    self.give_back(data);
                }
            }
        }
        let outputs = self
            .output_slots
            .iter()
            .map(|&s| match (&values[s], self.storage[s]) {
                (Some(Value::F32(t)), _) => t.clone(),
                (Some(Value::U8 { data, shape }), Storage::U8(p)) => dequantize(data, shape, p),
                _ => unreachable!("outputs are computed"),
            })
            .collect();
        let mut recorded = HashMap::new();
        for (slot, v) in values.into_iter().enumerate() {
            match v {
                Some(Value::U8 { data, shape }) => {
                    if keep && let Storage::U8(p) = self.storage[slot] {
                        recorded.insert(self.names[slot].clone(), dequantize(&data, &shape, p));
                    }
                    self.give_back(data);
                }
                Some(Value::F32(t)) if keep => {
                    recorded.insert(self.names[slot].clone(), t);
                }
                _ => {}
            }
        }
        Ok((outputs, recorded))
    }
}

impl ShiftAddEngine {
    fn new_value(&self, slot: usize) -> Value {
        let shape = self.shapes[slot].clone();
        let n: usize = shape.iter().product();
        match self.storage[slot] {
            Storage::U8(_) => Value::U8 {
                data: self.take_buffer(n + SLACK),
                shape,
            },
            Storage::F32 => Value::F32(Tensor {
                data: vec![0.0; n],
                shape,
            }),
        }
    }

    fn u8_input<'v>(&self, values: &'v [Option<Value>], slot: usize) -> (&'v [u8], QParams) {
        match (&values[slot], self.storage[slot]) {
            (Some(Value::U8 { data, .. }), Storage::U8(p)) => (data, p),
            _ => unreachable!("planned inputs are stored u8 values"),
        }
    }

    fn run_step(&self, step: &PlanStep, values: &[Option<Value>]) -> Result<Value> {
        let out_slot = step.output;
        let n_out: usize = self.shapes[out_slot].iter().product();
        let mut out = self.new_value(out_slot);
        match &step.kind {
            StepKind::Conv(c) => {
                let (x, _) = self.u8_input(values, c.input);
                self.run_conv(c, x, &mut out);
            }
            StepKind::Table { input, table } => {
                let (x, _) = self.u8_input(values, *input);
                let Value::U8 { data, .. } = &mut out else {
                    unreachable!()
                };
                for (d, &q) in data[..n_out].iter_mut().zip(&x[..n_out]) {
                    *d = table[usize::from(q)];
                }
            }
            StepKind::Binary { a, b, mul } => {
                let (xa, pa) = self.u8_input(values, *a);
                let (xb, pb) = self.u8_input(values, *b);
                let (xa, xb) = (&xa[..n_out], &xb[..n_out]);
                match (&mut out, self.storage[out_slot]) {
                    (Value::U8 { data, .. }, Storage::U8(po)) => {
                        let op = if *mul { BinaryOp::Mul } else { BinaryOp::Add };
                        // Large ones (the early shortcut adds, YOLOX's SiLU products) in one run
                        // of whole 64-lane blocks per thread.
                        let parts = if n_out >= PARALLEL_BINARY_BYTES {
                            self.threads
                        } else {
                            1
                        };
                        let mut bounds: Vec<usize> = (0..=parts)
                            .map(|i| i * n_out / parts / LANES * LANES)
                            .collect();
                        bounds[parts] = n_out;
                        let mut slices = split_blocks(&mut data[..n_out], &bounds, 1);
                        let kernel = self.kernel.as_ref();
                        self.parallel(&mut slices, &bounds, |lo, hi, d| {
                            kernel.binary_u8(&xa[lo..hi], &xb[lo..hi], [pa, pb, po], op, d)
                        });
                    }
                    (Value::F32(t), _) => {
                        for ((d, &qa), &qb) in t.data.iter_mut().zip(xa).zip(xb) {
                            let (u, v) = (pa.dequantize(qa), pb.dequantize(qb));
                            *d = if *mul { u * v } else { u + v };
                        }
                    }
                    _ => unreachable!(),
                }
            }
            StepKind::Concat { axis } => {
                let (Value::U8 { data, shape }, Storage::U8(po)) =
                    (&mut out, self.storage[out_slot])
                else {
                    unreachable!()
                };
                let inner: usize = shape[axis + 1..].iter().product();
                let outer: usize = shape[..*axis].iter().product();
                let mut at = 0;
                for o in 0..outer {
                    for &s in &step.inputs {
                        let (x, pi) = self.u8_input(values, s);
                        let chunk = self.shapes[s][*axis] * inner;
                        let src = &x[o * chunk..][..chunk];
                        let dst = &mut data[at..at + chunk];
                        if pi == po {
                            dst.copy_from_slice(src);
                        } else {
                            requantize_u8(&*self.kernel, src, pi, po, dst);
                        }
                        at += chunk;
                    }
                }
            }
            StepKind::Codes { node } if matches!(node.op, Op::ResizeNearest { .. }) => {
                let Op::ResizeNearest { scale } = node.op else {
                    unreachable!()
                };
                let (x, _) = self.u8_input(values, step.inputs[0]);
                let Value::U8 { data, shape } = &mut out else {
                    unreachable!()
                };
                resize_nearest_u8(x, &self.shapes[step.inputs[0]], scale, shape, data);
            }
            StepKind::Codes { node } => {
                let ins: Vec<Tensor> = step
                    .inputs
                    .iter()
                    .map(|&s| {
                        let (x, p) = self.u8_input(values, s);
                        let n: usize = self.shapes[s].iter().product();
                        let _ = p;
                        Tensor {
                            shape: self.shapes[s].clone(),
                            data: x[..n].iter().map(|&q| f32::from(q)).collect(),
                        }
                    })
                    .collect();
                let mut node = node.clone();
                if let Op::Pad { value, .. } = &mut node.op {
                    let (_, p) = self.u8_input(values, step.inputs[0]);
                    *value = f32::from(p.quantize(*value));
                }
                let refs: Vec<&Tensor> = ins.iter().collect();
                let y = eval_node(&self.graph, &node, &refs)
                    .map_err(|e| Error::Inference(format!("node {}: {e}", node.name)))?;
                let Value::U8 { data, .. } = &mut out else {
                    unreachable!()
                };
                for (d, &v) in data[..n_out].iter_mut().zip(&y.data) {
                    *d = v as u8;
                }
            }
            StepKind::Float { node } => {
                let ins: Vec<Tensor> = step
                    .inputs
                    .iter()
                    .map(|&s| {
                        let (x, p) = self.u8_input(values, s);
                        dequantize(x, &self.shapes[s], p)
                    })
                    .collect();
                let refs: Vec<&Tensor> = ins.iter().collect();
                let y = eval_node(&self.graph, node, &refs)
                    .map_err(|e| Error::Inference(format!("node {}: {e}", node.name)))?;
                match (&mut out, self.storage[out_slot]) {
                    (Value::U8 { data, .. }, Storage::U8(po)) => {
                        for (d, &v) in data[..n_out].iter_mut().zip(&y.data) {
                            *d = po.quantize(v);
                        }
                    }
                    (Value::F32(t), _) => *t = y,
                    _ => unreachable!(),
                }
            }
        }
        Ok(out)
    }
}

/// The FP32 simulation of an engine: the graph with `alpha * Q` weights, run by the reference
/// interpreter with every value the engine stores as `u8` rounded to the same grid.
pub fn fake_quant_simulation(
    graph: &Graph,
    weights: &BTreeMap<String, QuantizedTensor>,
    engine: &ShiftAddEngine,
) -> Result<ReferenceInterpreter> {
    let sim = simulate_graph(graph, weights)?;
    ReferenceInterpreter::new(&sim)?.with_fake_quant(engine.activation_params())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_resize_on_codes_matches_the_reference_op() {
        let in_shape = [1, 3, 5, 7];
        let codes: Vec<u8> = (0..3 * 5 * 7).map(|i| (i * 37 % 256) as u8).collect();
        for scale in [[2, 2], [1, 3], [3, 1]] {
            let node = Node {
                name: "up".into(),
                op: Op::ResizeNearest { scale },
                inputs: vec!["x".into()],
                output: "y".into(),
            };
            let graph = Graph {
                name: "resize".into(),
                input: "x".into(),
                input_shape: in_shape.to_vec(),
                outputs: vec!["y".into()],
                nodes: vec![node.clone()],
                weights: BTreeMap::new(),
            };
            let x = Tensor::new(
                in_shape.to_vec(),
                codes.iter().map(|&q| f32::from(q)).collect(),
            )
            .unwrap();
            let want = eval_node(&graph, &node, &[&x]).unwrap();
            let mut got = vec![0u8; want.data.len()];
            resize_nearest_u8(&codes, &in_shape, scale, &want.shape, &mut got);
            let want: Vec<u8> = want.data.iter().map(|&v| v as u8).collect();
            assert_eq!(got, want, "scale {scale:?}");
        }
    }
}
