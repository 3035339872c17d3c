//! Retraining with the quantizer in the loop (LBW-Net): distillation from the FP32 detector into
//! its power-of-two version.
//!
//! Rounding a trained detector's weights to `alpha * {0, ±2^-e}` after training loses most of its
//! detections: powers of two have no mantissa, so every layer is 10-19 % off in relative L2 and the
//! errors compound. Retraining lets the network adapt to the rounding. Each step:
//!
//! 1. a batch of augmented photos ([`data`]) runs through the FP32 teacher (the imported graph);
//! 2. the student runs the same batch with its conv weights quantized by [`crate::quant`] (the same
//!    quantizer, bit-width and grouping that the final `.lbw` uses) and its activations rounded to
//!    the 8-bit grids of the shift-add engine ([`net`]);
//! 3. the loss ([`distill`]) measures how far the student's raw head outputs are from the teacher's;
//! 4. its gradient reaches the full-precision shadow weights through the straight-through estimator
//!    `w_q = w + (Q(w) - w).detach()`, and Adam ([`optim`]) updates them.
//!
//! At the end the shadow weights are quantized once more and written as a `.lbw` file.

pub mod checkpoint;
pub mod data;
pub mod distill;
mod holdout;
pub mod labels;
pub mod net;
pub mod optim;
mod rng;
pub mod yolo_loss;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::tensor::{Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::engine::kernels::KernelChoice;
use crate::engine::quant_params::{ActivationScales, QParams};
use crate::engine::shift_add::{EngineOptions, ShiftAddEngine};
use crate::error::{Error, Result};
use crate::model::lbw_file::{LbwFile, LbwMetadata};
use crate::model::manifest::InputSpec;
use crate::model::{Graph, LoadedModel};
use crate::quant::{
    Bits, Method, QuantizedTensor, Quantizer, quantize_with_alphas, simulate_graph,
};
use checkpoint::{BestHoldout, Checkpoint, CheckpointHeader, ParamEntry};
use data::{Augment, ImageSet};
pub use distill::TermWeights;
use distill::{LossParts, distill_loss};
use holdout::HeldOut;
use labels::{LabelSet, PhotoLabels, TargetBox};
use net::{ActivationQuant, ForwardWeights, TrainGraph, tensor_from, to_host};
use optim::{AdamConfig, AdamState, Schedule, adam_step};
use rng::SplitMix64;

/// Steps of the default schedule: 3,000 steps of 8 images (24,000 image-iterations, 15 passes over
/// the 1,564 shared photos) at 256x256. yolo-fastest-voc trains at 12-17 images/s on a 2-core
/// machine, so the default run takes 25-35 minutes there, inside the one-hour budget with room for
/// a busy machine (docs/TRAINING.md).
pub const DEFAULT_STEPS: u64 = 3000;
pub const DEFAULT_BATCH: usize = 8;
/// Peak learning rate, relative to each tensor's RMS (see the update in [`finetune`]).
pub const DEFAULT_LR: f64 = 2e-3;
/// Default training side length: the graphs are fully convolutional, and 256 instead of 320 costs
/// 1.56x less per image while the teacher still sees objects at their usual scales (the random
/// crops zoom in and out anyway).
pub const DEFAULT_RESOLUTION: u32 = 256;
/// Batches used to set the initial activation ranges before the first step.
const CALIBRATION_BATCHES: u64 = 2;
/// Per-step momentum of the activation-range moving average.
const RANGE_MOMENTUM: f32 = 0.95;
/// Floor for learned scales.
const MIN_LEARNED_ALPHA: f32 = 1e-12;

/// Where the compute runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TrainDevice {
    /// burn's Flex backend on the CPU cores (rayon threads).
    #[default]
    Cpu,
    /// burn's CUDA backend, device 0 (needs the `cuda` Cargo feature).
    Cuda,
}

impl TrainDevice {
    fn device(self) -> Result<Device> {
        match self {
            TrainDevice::Cpu => Ok(Device::flex()),
            #[cfg(feature = "cuda")]
            TrainDevice::Cuda => Ok(Device::cuda(0)),
            #[cfg(not(feature = "cuda"))]
            TrainDevice::Cuda => Err(Error::Input(
                "this build has no CUDA support: rebuild with `--features cuda`".into(),
            )),
        }
    }
}

/// The bit-width a staged run goes through by default, for 5 bits and more: the whole schedule at
/// 4 bits, then a tenth of it at the target starting from that result
/// ([`FinetuneConfig::first_stage`], [`FinetuneConfig::final_stage`]; `lbw finetune --via-bits`).
///
/// Why: on yolo-fastest-voc, 6-bit students trained directly from the FP32 weights ended 5-6 mAP
/// below FP32 on coco128 (two seeds), 4-bit students 1-3 below, and 6-bit students started from
/// the retrained 4-bit files (exactly those files at their first step: 4-bit levels are 6-bit
/// levels) ended 1.4 below to 2.7 above FP32 after 300 steps (docs/TRAINING.md). The low
/// bit-width's zeros and coarse levels seem to steer training to a solution the finer grid then
/// refines; the finer grid alone does not find it.
pub const DEFAULT_VIA_BITS: u8 = 4;

/// The final stage's default length: a tenth of the first stage's schedule.
pub fn default_final_steps(first_stage_steps: u64) -> u64 {
    (first_stage_steps / 10).max(1)
}

/// Everything `lbw finetune` takes.
#[derive(Debug, Clone)]
pub struct FinetuneConfig {
    /// Built-in model id (the FP32 teacher and the student's starting point).
    pub model: String,
    /// Models folder (`None`: [`crate::paths::model_dir`]).
    pub models_root: Option<PathBuf>,
    pub bits: Bits,
    pub method: Method,
    pub param: Option<f32>,
    pub per_channel: bool,
    /// Train each quantized weight's scales (one per output channel, or per tensor) by gradient
    /// descent, starting from the method's own; otherwise the method recomputes them from the
    /// shadow weights at every step.
    pub learned_alphas: bool,
    /// Convs left at full precision (node or weight names).
    pub keep_full_precision: Vec<String>,
    pub image_dirs: Vec<PathBuf>,
    /// VOC folders (`Annotations/*.xml` beside `JPEGImages/`): their photos join the training set
    /// and get the YOLOv3 detection loss on top of distillation ([`yolo_loss`]).
    pub label_dirs: Vec<PathBuf>,
    /// Weight of that loss against distillation ([`yolo_loss::DEFAULT_LABEL_WEIGHT`]).
    pub label_weight: f64,
    /// Weights of the distillation terms of YOLOv3 heads.
    pub loss_weights: TermWeights,
    /// Total optimiser steps; `None` with `epochs` unset means [`DEFAULT_STEPS`].
    pub steps: Option<u64>,
    /// Passes over the images (converted to steps); exclusive with `steps`.
    pub epochs: Option<f64>,
    pub batch: usize,
    pub lr: f64,
    /// Warm-up steps (`None`: 5 % of the run, at least 1).
    pub warmup_steps: Option<u64>,
    pub seed: u64,
    /// Training input side length (`None`: [`DEFAULT_RESOLUTION`], capped at the model's own).
    pub resolution: Option<u32>,
    pub augment: bool,
    /// Round activations to 8-bit grids as the shift-add engine does.
    pub fake_quant_activations: bool,
    pub resume: Option<PathBuf>,
    /// Start the student from this `.lbw` of the same model instead of the FP32 weights (the
    /// teacher stays FP32): for example a bit-width from a retrained lower one.
    pub init: Option<PathBuf>,
    pub output: PathBuf,
    /// Checkpoint path (`None`: `<output>.ckpt`).
    pub checkpoint: Option<PathBuf>,
    pub checkpoint_every: u64,
    /// JSON-lines log (`None`: `<output>.log.jsonl`).
    pub log: Option<PathBuf>,
    /// Stop after this many steps in this invocation (the schedule is unchanged; resume later).
    pub stop_after: Option<u64>,
    pub device: TrainDevice,
    /// Photos kept out of training to measure the held-out distillation loss on (0: none); the
    /// same photos of the same folders whatever the seed.
    pub holdout: usize,
    /// Steps between held-out measurements (`None`: a tenth of the run); also measured before the
    /// first step and after the last.
    pub validate_every: Option<u64>,
    /// Write the parameters with the lowest held-out loss as the output instead of the last ones
    /// (needs `holdout`). Either way they are also written as `<output>.best.lbw`.
    pub select_best: bool,
    /// Keep every weight that is zero in the `init` file at zero (the final stage of a staged run
    /// starts from its first stage's file): the shift-add engine skips zero weights, so the
    /// finer grid does not undo the sparsity the lower bit-width found.
    pub keep_zeros: bool,
}

impl FinetuneConfig {
    pub fn new(model: &str, bits: Bits, image_dirs: Vec<PathBuf>, output: PathBuf) -> Self {
        FinetuneConfig {
            model: model.to_string(),
            models_root: None,
            bits,
            method: Method::Lbw,
            param: None,
            per_channel: true,
            learned_alphas: true,
            keep_full_precision: vec![],
            image_dirs,
            label_dirs: vec![],
            label_weight: yolo_loss::DEFAULT_LABEL_WEIGHT,
            loss_weights: TermWeights::default(),
            steps: None,
            epochs: None,
            batch: DEFAULT_BATCH,
            lr: DEFAULT_LR,
            warmup_steps: None,
            seed: 0,
            resolution: None,
            augment: true,
            fake_quant_activations: true,
            resume: None,
            init: None,
            output,
            checkpoint: None,
            checkpoint_every: 50,
            log: None,
            stop_after: None,
            device: TrainDevice::Cpu,
            holdout: 0,
            validate_every: None,
            select_best: false,
            keep_zeros: false,
        }
    }

    /// The first stage of a staged run (see [`DEFAULT_VIA_BITS`]): this run at `via` bits, written
    /// beside the output as `OUTPUT.via{via}.lbw` (with its own checkpoint and log).
    pub fn first_stage(&self, via: Bits) -> FinetuneConfig {
        let tag = format!(".via{via}");
        FinetuneConfig {
            bits: via,
            // From the FP32 weights there are no zeros to keep.
            keep_zeros: false,
            output: with_suffix(&self.output, &format!("{tag}.lbw")),
            checkpoint: self.checkpoint.as_ref().map(|p| with_suffix(p, &tag)),
            log: self.log.as_ref().map(|p| with_suffix(p, &tag)),
            ..self.clone()
        }
    }

    /// The final stage of a staged run: `steps` at this run's bit-width, starting from `init`
    /// (the first stage's file), with a warm-up and cosine decay of its own.
    pub fn final_stage(&self, init: PathBuf, steps: u64) -> FinetuneConfig {
        FinetuneConfig {
            init: Some(init),
            steps: Some(steps),
            epochs: None,
            warmup_steps: None,
            resume: None,
            ..self.clone()
        }
    }

    pub fn checkpoint_path(&self) -> PathBuf {
        self.checkpoint
            .clone()
            .unwrap_or_else(|| with_suffix(&self.output, ".ckpt"))
    }

    /// Where the parameters with the lowest held-out loss are written.
    pub fn best_path(&self) -> PathBuf {
        with_suffix(&self.output, ".best.lbw")
    }

    pub fn log_path(&self) -> PathBuf {
        self.log
            .clone()
            .unwrap_or_else(|| with_suffix(&self.output, ".log.jsonl"))
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// One line of the training log (and what the progress callback sees).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// 1-based step just completed.
    pub step: u64,
    pub total_steps: u64,
    pub loss: LossParts,
    pub lr: f64,
    /// Training throughput of this step (teacher and student forward, backward, update).
    pub images_per_s: f64,
    pub elapsed_s: f64,
    /// The held-out distillation loss after this step, on the steps where it was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holdout_loss: Option<f64>,
}

/// What a finished (or stopped) invocation did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneSummary {
    pub model: String,
    pub bits: u8,
    pub method: Method,
    pub per_channel: bool,
    pub start_step: u64,
    pub end_step: u64,
    pub total_steps: u64,
    pub batch: usize,
    pub resolution: [u32; 2],
    pub images_available: usize,
    pub initial_loss: Option<f64>,
    pub final_loss: Option<f64>,
    /// Wall-clock seconds of this invocation's training steps.
    pub wall_s: f64,
    pub images_per_s: f64,
    /// The `.lbw` file, when the schedule completed.
    pub output: Option<PathBuf>,
    pub checkpoint: PathBuf,
    pub log: PathBuf,
    /// Held-out photos (0: none measured).
    #[serde(default)]
    pub holdout_photos: usize,
    /// The held-out loss before the first step (of a run that starts at step 0), of the last
    /// measurement, and the lowest one so far with its step.
    #[serde(default)]
    pub initial_holdout_loss: Option<f64>,
    #[serde(default)]
    pub holdout_loss: Option<f64>,
    #[serde(default)]
    pub best_holdout: Option<checkpoint::BestHoldout>,
}

/// A trainable tensor: a conv weight (quantized in the forward pass unless kept), a bias, or the
/// learned scales of a quantized weight.
#[derive(Debug, Clone)]
struct ParamSlot {
    name: String,
    shape: Vec<usize>,
    kind: ParamKind,
    /// For a quantized weight with learned scales: the slot holding them.
    alpha_slot: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ParamKind {
    Weight {
        quantized: bool,
    },
    Bias,
    /// One scale per output channel (or one per tensor) of the weight slot `weight`.
    Alpha {
        weight: usize,
    },
}

/// The name under which a weight's learned scales appear in checkpoints.
fn alpha_slot_name(weight: &str) -> String {
    format!("{weight}#alpha")
}

fn param_slots(
    graph: &Graph,
    keep: &[String],
    learned_alphas: bool,
    per_channel: bool,
) -> Result<Vec<ParamSlot>> {
    let keep: BTreeSet<&str> = keep.iter().map(String::as_str).collect();
    for name in &keep {
        if !graph
            .convs()
            .any(|(n, c)| n.name == *name || c.weight == *name)
        {
            return Err(Error::Input(format!(
                "--keep {name:?} names no conv layer or conv weight of {}",
                graph.name
            )));
        }
    }
    let mut seen = BTreeSet::new();
    let mut slots = Vec::new();
    for (node, conv) in graph.convs() {
        if seen.insert(conv.weight.clone()) {
            let w = graph.weight(&conv.weight)?;
            if w.shape.len() != 4 {
                return Err(Error::Model(format!(
                    "conv {} has a weight of shape {:?}",
                    node.name, w.shape
                )));
            }
            let kept = keep.contains(node.name.as_str()) || keep.contains(conv.weight.as_str());
            let weight = slots.len();
            let learned = learned_alphas && !kept;
            slots.push(ParamSlot {
                name: conv.weight.clone(),
                shape: w.shape.clone(),
                kind: ParamKind::Weight { quantized: !kept },
                alpha_slot: learned.then_some(weight + 1),
            });
            if learned {
                slots.push(ParamSlot {
                    name: alpha_slot_name(&conv.weight),
                    shape: vec![if per_channel { w.shape[0] } else { 1 }],
                    kind: ParamKind::Alpha { weight },
                    alpha_slot: None,
                });
            }
        }
        if let Some(b) = &conv.bias
            && seen.insert(b.clone())
        {
            let t = graph.weight(b)?;
            slots.push(ParamSlot {
                name: b.clone(),
                shape: vec![t.len()],
                kind: ParamKind::Bias,
                alpha_slot: None,
            });
        }
    }
    Ok(slots)
}

fn shape4(shape: &[usize]) -> Result<[usize; 4]> {
    shape
        .try_into()
        .map_err(|_| Error::Model(format!("expected a rank-4 shape, got {shape:?}")))
}

/// The run's fixed settings, resolved from the config or a checkpoint.
struct RunPlan {
    header: CheckpointHeader,
    values: Vec<Vec<f32>>,
    adam: Vec<AdamState>,
}

/// Each slot's starting value: the FP32 model's tensor, or for learned scales the scales the method
/// itself picks for the FP32 weights (so step 0 is exactly post-training quantization).
fn initial_values(
    graph: &Graph,
    slots: &[ParamSlot],
    quantizer: &dyn Quantizer,
    bits: Bits,
    per_channel: bool,
) -> Result<Vec<Vec<f32>>> {
    slots
        .iter()
        .map(|s| match s.kind {
            ParamKind::Alpha { weight } => {
                let w = &slots[weight];
                let q = quantizer.quantize_tensor(
                    &graph.weight(&w.name)?.data,
                    &w.shape,
                    bits,
                    per_channel,
                )?;
                Ok(q.alphas)
            }
            _ => Ok(graph.weight(&s.name)?.data.clone()),
        })
        .collect()
}

/// The starting point of `--init`: the model's graph holding the file's weights (`alpha * Q` for
/// its quantized convs), and the file's alphas by weight name. Taking over the alphas too means a
/// file whose levels are a subset of this run's (a lower bit-width) is reproduced exactly at step 0.
fn start_from_file(
    path: &Path,
    graph: &Graph,
    slots: &[ParamSlot],
) -> Result<(Graph, BTreeMap<String, Vec<f32>>)> {
    let file =
        LbwFile::read(path).map_err(|e| Error::Input(format!("--init {}: {e}", path.display())))?;
    let mut start = graph.clone();
    for s in slots
        .iter()
        .filter(|s| !matches!(s.kind, ParamKind::Alpha { .. }))
    {
        let t = file.graph.weights.get(&s.name).ok_or_else(|| {
            Error::Input(format!(
                "--init {}: it has no tensor {} (is it a file of another model?)",
                path.display(),
                s.name
            ))
        })?;
        if t.shape != s.shape {
            return Err(Error::Input(format!(
                "--init {}: tensor {} has shape {:?}, the model's has {:?}",
                path.display(),
                s.name,
                t.shape,
                s.shape
            )));
        }
        start.weights.insert(s.name.clone(), t.clone());
    }
    let alphas = file
        .quantized
        .into_iter()
        .map(|(name, q)| (name, q.alphas))
        .collect();
    Ok((start, alphas))
}

fn plan_run(
    cfg: &FinetuneConfig,
    model: &LoadedModel,
    slots: &[ParamSlot],
    initial: &[Vec<f32>],
    images: usize,
) -> Result<RunPlan> {
    if let Some(path) = &cfg.resume {
        let ck = Checkpoint::read(path)?;
        let h = &ck.header;
        let mismatch = |what: &str, ck: String, now: String| {
            Error::Input(format!(
                "--resume {}: the checkpoint was made with {what} {ck}, this run asks for {now}",
                path.display()
            ))
        };
        if h.model != cfg.model {
            return Err(mismatch("model", h.model.clone(), cfg.model.clone()));
        }
        if h.bits != cfg.bits.get() {
            return Err(mismatch("bits", h.bits.to_string(), cfg.bits.to_string()));
        }
        if h.method != cfg.method.name() || h.per_channel != cfg.per_channel {
            return Err(mismatch(
                "method",
                format!("{} (per-channel {})", h.method, h.per_channel),
                format!("{} (per-channel {})", cfg.method, cfg.per_channel),
            ));
        }
        if h.learned_alphas != cfg.learned_alphas {
            let name = |learned: bool| if learned { "learned" } else { "rule" }.to_string();
            return Err(mismatch(
                "--alphas",
                name(h.learned_alphas),
                name(cfg.learned_alphas),
            ));
        }
        let expected: Vec<ParamEntry> = slots
            .iter()
            .map(|s| ParamEntry {
                name: s.name.clone(),
                shape: s.shape.clone(),
            })
            .collect();
        if h.params != expected {
            return Err(Error::Input(format!(
                "--resume {}: the checkpoint's parameters do not match {}",
                path.display(),
                cfg.model
            )));
        }
        return Ok(RunPlan {
            header: ck.header,
            values: ck.values,
            adam: ck.adam,
        });
    }
    if cfg.keep_zeros && cfg.init.is_none() {
        return Err(Error::Input(
            "--keep-zeros keeps the zero weights of an --init file (or of a staged run's first \
             stage); this run starts from the FP32 weights"
                .into(),
        ));
    }
    if cfg.batch == 0 || cfg.batch > 1024 {
        return Err(Error::Input(format!(
            "--batch must be in 1..=1024, got {}",
            cfg.batch
        )));
    }
    if !(cfg.lr.is_finite() && cfg.lr > 0.0 && cfg.lr < 1.0) {
        return Err(Error::Input(format!(
            "--lr must be in (0, 1), got {}",
            cfg.lr
        )));
    }
    let total_steps = match (cfg.steps, cfg.epochs) {
        (Some(_), Some(_)) => {
            return Err(Error::Input("give --steps or --epochs, not both".into()));
        }
        (Some(s), None) => s,
        (None, Some(e)) if e.is_finite() && e > 0.0 => {
            ((e * images as f64) / cfg.batch as f64).ceil() as u64
        }
        (None, Some(e)) => {
            return Err(Error::Input(format!("--epochs must be positive, got {e}")));
        }
        (None, None) => DEFAULT_STEPS,
    };
    if total_steps == 0 {
        return Err(Error::Input("the run needs at least one step".into()));
    }
    let native = [model.manifest.input.width, model.manifest.input.height];
    let resolution = match cfg.resolution {
        Some(r) if r < 32 || r % 32 != 0 => {
            return Err(Error::Input(format!(
                "--resolution must be a positive multiple of 32, got {r}"
            )));
        }
        Some(r) => [r, r],
        None => native.map(|n| n.min(DEFAULT_RESOLUTION)),
    };
    let values = initial.to_vec();
    let adam = values.iter().map(|v| AdamState::zeros(v.len())).collect();
    Ok(RunPlan {
        header: CheckpointHeader {
            model: cfg.model.clone(),
            bits: cfg.bits.get(),
            method: cfg.method.name().to_string(),
            param: cfg.param,
            per_channel: cfg.per_channel,
            learned_alphas: cfg.learned_alphas,
            loss_weights: Some(cfg.loss_weights),
            keep_full_precision: cfg.keep_full_precision.clone(),
            seed: cfg.seed,
            batch: cfg.batch,
            lr: cfg.lr,
            warmup_steps: cfg
                .warmup_steps
                .unwrap_or((total_steps / 20).max(1))
                .min(total_steps),
            total_steps,
            resolution,
            augment: cfg.augment,
            fake_quant_activations: cfg.fake_quant_activations,
            init: cfg.init.as_ref().map(|p| p.display().to_string()),
            step: 0,
            elapsed_s: 0.0,
            activation_ranges: BTreeMap::new(),
            initial_loss: None,
            recent_loss: None,
            holdout: cfg.holdout,
            best_holdout: None,
            keep_zeros: cfg.keep_zeros,
            params: slots
                .iter()
                .map(|s| ParamEntry {
                    name: s.name.clone(),
                    shape: s.shape.clone(),
                })
                .collect(),
        },
        values,
        adam,
    })
}

/// Deterministic batches: sample `p` (counted over the whole run) is image `perm_e[p % n]` of
/// epoch `e = p / n`, augmented with a generator derived from `p`.
struct BatchSource<'a> {
    images: &'a ImageSet,
    /// Each image's label file, aligned with `images` (empty: no labels at all).
    labels: &'a [Option<Arc<PhotoLabels>>],
    spec: InputSpec,
    augment: Augment,
    seed: u64,
}

const PURPOSE_ORDER: u64 = 1;
const PURPOSE_AUGMENT: u64 = 2;
const PURPOSE_CALIBRATION: u64 = 3;

/// One batch: the input `[N, 3, H, W]` and each sample's label boxes in input pixels.
struct Batch {
    input: Vec<f32>,
    targets: Vec<Option<Vec<TargetBox>>>,
}

impl BatchSource<'_> {
    /// Samples `first .. first + n` of the stream `purpose`.
    fn batch(&self, purpose: u64, first: u64, n: usize) -> Result<Batch> {
        let count = self.images.len() as u64;
        let mut perms: HashMap<u64, Vec<usize>> = HashMap::new();
        let picks: Vec<(u64, usize)> = (first..first + n as u64)
            .map(|p| {
                let epoch = p / count;
                let perm = perms.entry(epoch).or_insert_with(|| {
                    SplitMix64::derive(self.seed, purpose * 1000 + PURPOSE_ORDER, epoch)
                        .permutation(count as usize)
                });
                (p, perm[(p % count) as usize])
            })
            .collect();
        let samples: Vec<(Vec<f32>, Option<Vec<TargetBox>>)> = picks
            .par_iter()
            .map(|&(p, idx)| self.sample(purpose, p, idx))
            .collect::<Result<_>>()?;
        let (inputs, targets): (Vec<_>, Vec<_>) = samples.into_iter().unzip();
        Ok(Batch {
            input: inputs.concat(),
            targets,
        })
    }

    fn sample(
        &self,
        purpose: u64,
        p: u64,
        idx: usize,
    ) -> Result<(Vec<f32>, Option<Vec<TargetBox>>)> {
        let n = self.images.len();
        let mut last_err = None;
        // An unreadable photo is skipped (with a warning) in favour of the next one, so one bad
        // file does not end an hour-long run; eight in a row is a real problem.
        for k in 0..8.min(n) {
            let i = (idx + k) % n;
            let path = &self.images.paths[i];
            match data::load_image(path) {
                Ok(img) => {
                    let mut rng =
                        SplitMix64::derive(self.seed, purpose * 1000 + PURPOSE_AUGMENT, p);
                    let (x, geometry) =
                        data::augmented_sample(&img, &self.spec, &self.augment, &mut rng);
                    // The labels of the photo actually used (after a skip, not `idx`'s).
                    let targets = self
                        .labels
                        .get(i)
                        .and_then(Option::as_ref)
                        .map(|l| l.targets([img.width(), img.height()], &geometry));
                    return Ok((x, targets));
                }
                Err(e) => {
                    tracing::warn!("skipping training image: {e}");
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| Error::Input("no readable training image".into())))
    }
}

/// A quantized weight slot's codes and scales: for its learned scales when it has them, else the
/// method's own scales for the current shadow weights.
fn quantize_slot(
    slots: &[ParamSlot],
    values: &[Vec<f32>],
    i: usize,
    quantizer: &dyn Quantizer,
    bits: Bits,
    per_channel: bool,
) -> Result<QuantizedTensor> {
    let s = &slots[i];
    match s.alpha_slot {
        Some(a) => quantize_with_alphas(&values[i], &s.shape, bits, &values[a]),
        None => quantizer.quantize_tensor(&values[i], &s.shape, bits, per_channel),
    }
    .map_err(|e| Error::Model(format!("quantizing {}: {e}", s.name)))
}

/// The student's conv weights as the forward pass sees them: `alpha * Q(w)` for quantized weights,
/// with the gradient passed straight through to the shadow weights. Also returns each quantized
/// slot's codes, which the gradients of learned scales need.
fn student_weights(
    slots: &[ParamSlot],
    values: &[Vec<f32>],
    quantizer: &dyn Quantizer,
    bits: Bits,
    per_channel: bool,
    device: &Device,
    track: bool,
) -> Result<StudentWeights> {
    let quantized: Vec<Option<QuantizedTensor>> = (0..slots.len())
        .into_par_iter()
        .map(|i| match slots[i].kind {
            ParamKind::Weight { quantized: true } => {
                quantize_slot(slots, values, i, quantizer, bits, per_channel).map(Some)
            }
            _ => Ok(None),
        })
        .collect::<Result<_>>()?;
    let mut fw = ForwardWeights::default();
    let mut leaves = Vec::with_capacity(slots.len());
    for ((s, v), q) in slots.iter().zip(values).zip(&quantized) {
        match s.kind {
            ParamKind::Weight { .. } => {
                let shape = shape4(&s.shape)?;
                let mut leaf = tensor_from(v.clone(), shape, device);
                if track {
                    leaf = leaf.require_grad();
                }
                let eff = match q {
                    // Straight-through: the value is Q(w), the gradient is the identity to w.
                    Some(q) => {
                        leaf.clone() - leaf.clone().detach()
                            + tensor_from(q.dequantize(), shape, device)
                    }
                    None => leaf.clone(),
                };
                fw.weights.insert(s.name.clone(), eff);
                leaves.push(track.then_some(LeafParam::W4(leaf)));
            }
            ParamKind::Bias => {
                let mut leaf = tensor_from(v.clone(), [v.len()], device);
                if track {
                    leaf = leaf.require_grad();
                }
                fw.biases.insert(s.name.clone(), leaf.clone());
                leaves.push(track.then_some(LeafParam::B1(leaf)));
            }
            // Enters through its weight's codes; its gradient is computed on the host
            // (`learned_alpha_gradients`).
            ParamKind::Alpha { .. } => leaves.push(None),
        }
    }
    Ok(StudentWeights {
        forward: fw,
        leaves,
        quantized,
    })
}

struct StudentWeights {
    forward: ForwardWeights,
    leaves: Vec<Option<LeafParam>>,
    quantized: Vec<Option<QuantizedTensor>>,
}

/// Gradients of learned scales, as LSQ (Esser et al., "Learned Step Size Quantization") defines
/// them for `alpha * Q(w / alpha)` with a straight-through rounding: for a weight inside the
/// levels' range (`|w| <= alpha`) the rounded value moves with alpha by `Q - w / alpha`; a weight
/// beyond the top level is clipped to `±alpha`, moves with alpha by `±1` and gets no gradient
/// itself. `grads[i]` arrives as the loss gradient with respect to weight `i`'s quantized value (the
/// straight-through identity) and leaves masked to the unclipped weights.
///
/// Why learn them: a power-of-two grid has no mantissa, so what can still fit a channel's weights
/// is its one scale. The rule `alpha = c max|W|` ties it to a single weight and ignores the loss;
/// learned, it also absorbs the gain the rounding of the whole channel loses.
fn learned_alpha_gradients(
    slots: &[ParamSlot],
    values: &[Vec<f32>],
    quantized: &[Option<QuantizedTensor>],
    grads: &mut [Option<Vec<f32>>],
) {
    for (i, s) in slots.iter().enumerate() {
        let (Some(a), Some(q)) = (s.alpha_slot, &quantized[i]) else {
            continue;
        };
        let Some(g) = grads[i].as_mut() else {
            continue;
        };
        let w = &values[i];
        let group = w.len() / q.alphas.len().max(1);
        let mut ga = vec![0.0f32; q.alphas.len()];
        if group > 0 {
            for (c, &alpha) in q.alphas.iter().enumerate() {
                let inv = 1.0 / alpha;
                let range = c * group..(c + 1) * group;
                let mut sum = 0.0f64;
                for ((gj, &wj), code) in g[range.clone()]
                    .iter_mut()
                    .zip(&w[range.clone()])
                    .zip(&q.codes[range])
                {
                    let v = wj * inv;
                    let qv = code.value();
                    if v.abs() <= 1.0 {
                        sum += f64::from(*gj) * f64::from(qv - v);
                    } else {
                        sum += f64::from(*gj) * f64::from(qv);
                        *gj = 0.0;
                    }
                }
                ga[c] = sum as f32;
            }
        }
        grads[a] = Some(ga);
    }
}

enum LeafParam {
    W4(Tensor<4>),
    B1(Tensor<1>),
}

fn constant_weights(graph: &Graph, slots: &[ParamSlot], device: &Device) -> Result<ForwardWeights> {
    let mut fw = ForwardWeights::default();
    for s in slots {
        match s.kind {
            ParamKind::Weight { .. } => {
                let t = graph.weight(&s.name)?;
                fw.weights.insert(
                    s.name.clone(),
                    tensor_from(t.data.clone(), shape4(&s.shape)?, device),
                );
            }
            ParamKind::Bias => {
                let t = graph.weight(&s.name)?;
                fw.biases.insert(
                    s.name.clone(),
                    tensor_from(t.data.clone(), [t.len()], device),
                );
            }
            // Learned scales are not graph tensors; the teacher has none.
            ParamKind::Alpha { .. } => {}
        }
    }
    Ok(fw)
}

/// Runs (or resumes) a retraining and writes the `.lbw` file when the schedule completes.
/// `on_step` sees every completed step (the CLI draws its progress bar from it).
pub fn finetune(
    cfg: &FinetuneConfig,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<FinetuneSummary> {
    let model = match &cfg.models_root {
        Some(root) => crate::model::load_builtin_from(&cfg.model, root)?,
        None => crate::model::load_builtin(&cfg.model)?,
    };
    let label_set = LabelSet::scan(&cfg.label_dirs, &model.manifest.labels)?;
    let (all_images, all_labels) = labels::labelled_images(&cfg.image_dirs, &label_set)?;
    let yolo_heads = if cfg.label_dirs.is_empty() {
        None
    } else {
        if !(cfg.label_weight.is_finite() && cfg.label_weight >= 0.0) {
            return Err(Error::Input(format!(
                "--label-weight must be a non-negative number, got {}",
                cfg.label_weight
            )));
        }
        Some(
            yolo_loss::YoloHeads::from_decoder(&model.manifest.decoder).ok_or_else(|| {
                Error::Input(format!(
                    "--labels: {} has no YOLOv3 head; the labelled loss needs anchors",
                    cfg.model
                ))
            })?,
        )
    };
    let quantizer = cfg.method.quantizer(cfg.param)?;
    let slots = param_slots(
        &model.graph,
        &cfg.keep_full_precision,
        cfg.learned_alphas,
        cfg.per_channel,
    )?;
    let float_convs: HashSet<String> = slots
        .iter()
        .filter(|s| s.kind == (ParamKind::Weight { quantized: false }))
        .map(|s| s.name.clone())
        .collect();
    let train_graph = TrainGraph::with_float_convs(&model.graph, &float_convs)?;
    // A resumed run takes its values from the checkpoint, so its starting file is not read again.
    let (start, start_alphas) = match cfg.init.as_ref().filter(|_| cfg.resume.is_none()) {
        Some(path) => start_from_file(path, &model.graph, &slots)?,
        None => (model.graph.clone(), BTreeMap::new()),
    };
    let mut initial = initial_values(
        &start,
        &slots,
        quantizer.as_ref(),
        cfg.bits,
        cfg.per_channel,
    )?;
    for (v, s) in initial.iter_mut().zip(&slots) {
        if let ParamKind::Alpha { weight } = s.kind
            && let Some(a) = start_alphas.get(&slots[weight].name)
            && a.len() == v.len()
        {
            v.clone_from(a);
        }
    }
    let RunPlan {
        mut header,
        mut values,
        mut adam,
    } = plan_run(
        cfg,
        &model,
        &slots,
        &initial,
        all_images.len().saturating_sub(cfg.holdout),
    )?;
    // Weights held at zero: those of the starting file, or (resumed) those the run kept there.
    let zero_masks: Vec<Option<Vec<bool>>> = slots
        .iter()
        .zip(&values)
        .map(|(s, v)| {
            (header.keep_zeros && s.kind == (ParamKind::Weight { quantized: true }))
                .then(|| v.iter().map(|&x| x == 0.0).collect())
        })
        .collect();
    // A resumed run holds out what its checkpoint says it did.
    let (images, photo_labels, held_out_images) =
        holdout::split(all_images, all_labels, header.holdout)?;
    let bits = Bits::new(header.bits)?;
    let [rw, rh] = header.resolution;
    let spec = InputSpec {
        width: rw,
        height: rh,
        ..model.manifest.input.clone()
    };
    let source = BatchSource {
        images: &images,
        labels: &photo_labels,
        spec,
        augment: if header.augment {
            Augment::default()
        } else {
            Augment::none()
        },
        seed: header.seed,
    };
    let schedule = Schedule {
        lr: header.lr,
        warmup_steps: header.warmup_steps,
        total_steps: header.total_steps,
        final_fraction: 0.02,
    };
    let device = cfg.device.device()?;
    let ad_device = device.clone().autodiff();
    let teacher = constant_weights(&model.graph, &slots, &device)?;
    let held_out = if held_out_images.is_empty() {
        None
    } else {
        Some(HeldOut::prepare(
            &held_out_images,
            &source.spec,
            header.batch,
            &train_graph,
            &teacher,
            &device,
        )?)
    };
    let num_classes = model.manifest.labels.len();
    let batch = header.batch;
    let in_shape = [batch, 3, rh as usize, rw as usize];
    let per_channel = header.per_channel;
    let loss_weights = header
        .loss_weights
        .unwrap_or_else(|| TermWeights::legacy(num_classes));

    let mut act = ActivationQuant {
        ranges: header.activation_ranges.clone(),
        ..ActivationQuant::default()
    };
    if header.fake_quant_activations && act.ranges.is_empty() {
        // Initial grids from the PTQ student (quantized weights change activation ranges), averaged
        // over a few batches of a separate stream so the training order is unaffected.
        let StudentWeights {
            forward: fw,
            quantized,
            ..
        } = student_weights(
            &slots,
            &values,
            quantizer.as_ref(),
            bits,
            per_channel,
            &device,
            false,
        )?;
        let mut sums: BTreeMap<String, ([f32; 2], f32)> = BTreeMap::new();
        for b in 0..CALIBRATION_BATCHES {
            let x = source
                .batch(PURPOSE_CALIBRATION, b * batch as u64, batch)?
                .input;
            let mut observe = ActivationQuant {
                observe: true,
                ..ActivationQuant::default()
            };
            train_graph.forward(tensor_from(x, in_shape, &device), &fw, &mut observe)?;
            for (k, [lo, hi]) in observe.observed {
                let e = sums.entry(k).or_insert(([0.0, 0.0], 0.0));
                e.0[0] += lo;
                e.0[1] += hi;
                e.1 += 1.0;
            }
        }
        act.ranges = sums
            .into_iter()
            .map(|(k, ([lo, hi], n))| (k, [lo / n, hi / n]))
            .collect();
        // The file must run on the engine at the end: a grid the engine needs and training would
        // not round is found now, before any work is spent.
        let quantized: BTreeMap<String, QuantizedTensor> = slots
            .iter()
            .zip(quantized)
            .filter_map(|(s, q)| Some((s.name.clone(), q?)))
            .collect();
        engine_grids(&model.graph, &quantized, &act.ranges)?;
    }
    act.enabled = header.fake_quant_activations;
    act.observe = header.fake_quant_activations;
    // The header holds the grids a file is exported with, before the first step too.
    header.activation_ranges.clone_from(&act.ranges);

    let checkpoint_path = cfg.checkpoint_path();
    let log_path = cfg.log_path();
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(cfg.resume.is_some())
        .truncate(cfg.resume.is_none())
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, e))?;

    let start_step = header.step;
    let end_step = match cfg.stop_after {
        Some(n) => (start_step + n).min(header.total_steps),
        None => header.total_steps,
    };
    let adam_cfg = AdamConfig::default();
    // Adam's step is about `lr` per parameter whatever the gradient's size, but BatchNorm folding
    // leaves these tensors with RMS values from 0.03 to 10: one absolute rate would scramble the
    // small tensors or freeze the large ones. The rate is therefore relative to each tensor's RMS
    // in the FP32 model (so `--lr 2e-3` moves every tensor by about 0.2 % of its scale per step).
    // Learned scales follow the same rule, relative to their post-training values.
    let lr_scale: Vec<f64> = initial
        .iter()
        .map(|t| {
            let ms =
                t.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>() / t.len().max(1) as f64;
            ms.sqrt().max(1e-3)
        })
        .collect();
    let run_start = Instant::now();
    let elapsed_before = header.elapsed_s;
    let mut last_loss = None;
    let validate_every = match cfg.validate_every {
        Some(0) => return Err(Error::Input("--validate-every must be at least 1".into())),
        Some(n) => n,
        None => (header.total_steps / 10).max(1),
    };
    if cfg.select_best && held_out.is_none() {
        return Err(Error::Input(
            "--select best needs held-out photos: pass --holdout N".into(),
        ));
    }
    let loss_spec = holdout::LossSpec {
        decoder: &model.manifest.decoder,
        num_classes,
        weights: loss_weights,
    };
    let training_images = images.len();
    let best_path = cfg.best_path();
    let note_labels = |file: &mut LbwFile| {
        if let (Some(_), Some(t)) = (&yolo_heads, file.metadata.training.as_object_mut()) {
            t.insert(
                "kind".into(),
                "distillation from the FP32 model plus the YOLOv3 detection loss on VOC labels \
                 (lbw finetune --labels)"
                    .into(),
            );
            t.insert("label_weight".into(), cfg.label_weight.into());
            t.insert("labelled_images".into(), label_set.photos.len().into());
        }
    };
    // Measures the held-out loss of `values`; when it is the lowest so far, records it in the
    // header and writes those parameters to `best_path`.
    let validate = |header: &mut CheckpointHeader,
                    values: &[Vec<f32>],
                    act: &ActivationQuant|
     -> Result<Option<f64>> {
        let Some(h) = &held_out else {
            return Ok(None);
        };
        let fw = student_weights(
            &slots,
            values,
            quantizer.as_ref(),
            bits,
            per_channel,
            &device,
            false,
        )?
        .forward;
        let loss = h.loss(&train_graph, &fw, act, loss_spec, &device)?.total;
        if header.best_holdout.is_none_or(|b| loss < b.loss) {
            header.best_holdout = Some(BestHoldout {
                step: header.step,
                loss,
            });
            let mut file = export_lbw(
                &model,
                &slots,
                values,
                quantizer.as_ref(),
                bits,
                header,
                training_images,
            )?;
            note_labels(&mut file);
            file.write(&best_path)?;
        }
        Ok(Some(loss))
    };
    let initial_holdout_loss = if start_step == 0 {
        validate(&mut header, &values, &act)?
    } else {
        None
    };
    let mut holdout_loss = initial_holdout_loss;
    let save = |header: &CheckpointHeader, values: &[Vec<f32>], adam: &[AdamState]| {
        Checkpoint {
            header: header.clone(),
            values: values.to_vec(),
            adam: adam.to_vec(),
        }
        .write(&checkpoint_path)
    };
    for step in start_step..end_step {
        let t0 = Instant::now();
        let Batch { input: x, targets } = source.batch(0, step * batch as u64, batch)?;
        let mut teacher_act = ActivationQuant::default();
        let t_out = train_graph.forward(
            tensor_from(x.clone(), in_shape, &device),
            &teacher,
            &mut teacher_act,
        )?;
        let t_out: Vec<Tensor<4>> = t_out.into_iter().map(|t| t.autodiff()).collect();
        let StudentWeights {
            forward: fw,
            leaves,
            quantized,
        } = student_weights(
            &slots,
            &values,
            quantizer.as_ref(),
            bits,
            per_channel,
            &ad_device,
            true,
        )?;
        let s_out = train_graph.forward(tensor_from(x, in_shape, &ad_device), &fw, &mut act)?;
        let mut loss = distill_loss(
            &model.manifest.decoder,
            num_classes,
            loss_weights,
            &s_out,
            &t_out,
        )?;
        if let Some(heads) = &yolo_heads
            && let Some((labelled, parts)) =
                yolo_loss::labelled_loss(heads, num_classes, [rw, rh], &s_out, &targets)?
        {
            loss.add_labelled(labelled, parts, cfg.label_weight);
        }
        if !loss.parts.total.is_finite() {
            return Err(Error::Inference(format!(
                "the training loss is {} at step {}: lower --lr",
                loss.parts.total,
                step + 1
            )));
        }
        let grads = loss.total.backward();
        let lr = schedule.lr_at(step);
        let mut grad_values: Vec<Option<Vec<f32>>> = leaves
            .iter()
            .map(|leaf| match leaf {
                Some(LeafParam::W4(t)) => t.grad(&grads).map(to_host).transpose(),
                Some(LeafParam::B1(t)) => t.grad(&grads).map(to_host).transpose(),
                None => Ok(None),
            })
            .collect::<Result<_>>()?;
        learned_alpha_gradients(&slots, &values, &quantized, &mut grad_values);
        for (((((v, g), st), scale), s), zeros) in values
            .iter_mut()
            .zip(&grad_values)
            .zip(adam.iter_mut())
            .zip(&lr_scale)
            .zip(&slots)
            .zip(&zero_masks)
        {
            if let Some(g) = g {
                adam_step(&adam_cfg, lr * scale, step + 1, v, g, st);
                if let Some(mask) = zeros {
                    // Exactly 0.0 quantizes to the zero level whatever the alpha.
                    for (x, _) in v.iter_mut().zip(mask).filter(|(_, z)| **z) {
                        *x = 0.0;
                    }
                }
                if let ParamKind::Alpha { .. } = s.kind {
                    // A scale must stay positive; this floor is far below any level that matters.
                    for a in v.iter_mut() {
                        *a = a.max(MIN_LEARNED_ALPHA);
                    }
                }
            }
        }
        act.absorb_observed(RANGE_MOMENTUM);
        let secs = t0.elapsed().as_secs_f64();
        header.step = step + 1;
        header.elapsed_s = elapsed_before + run_start.elapsed().as_secs_f64();
        header.activation_ranges = act.ranges.clone();
        header.initial_loss.get_or_insert(loss.parts.total);
        header.recent_loss = Some(match header.recent_loss {
            Some(r) if step > start_step => 0.9 * r + 0.1 * loss.parts.total,
            _ => loss.parts.total,
        });
        last_loss = Some(loss.parts.total);
        let measured = if (step + 1) % validate_every == 0 || step + 1 == header.total_steps {
            validate(&mut header, &values, &act)?
        } else {
            None
        };
        holdout_loss = measured.or(holdout_loss);
        let report = StepReport {
            step: step + 1,
            total_steps: header.total_steps,
            loss: loss.parts,
            lr,
            images_per_s: batch as f64 / secs.max(1e-9),
            elapsed_s: header.elapsed_s,
            holdout_loss: measured,
        };
        let line = serde_json::to_string(&report)
            .map_err(|e| Error::Model(format!("cannot encode a log line: {e}")))?;
        writeln!(log, "{line}").map_err(|e| Error::io(&log_path, e))?;
        on_step(&report);
        let due = cfg.checkpoint_every > 0 && (step + 1) % cfg.checkpoint_every == 0;
        if due || step + 1 == end_step {
            save(&header, &values, &adam)?;
        }
    }
    let steps_run = end_step.saturating_sub(start_step);
    if steps_run == 0 {
        // `--stop-after 0` (a held-out measurement alone): still leave the checkpoint to resume.
        save(&header, &values, &adam)?;
    }
    let wall_s = run_start.elapsed().as_secs_f64();
    let mut summary = FinetuneSummary {
        model: cfg.model.clone(),
        bits: bits.get(),
        method: cfg.method,
        per_channel,
        start_step,
        end_step,
        total_steps: header.total_steps,
        batch,
        resolution: header.resolution,
        images_available: images.len(),
        initial_loss: header.initial_loss,
        final_loss: last_loss.or(header.recent_loss),
        wall_s,
        images_per_s: (steps_run as f64 * batch as f64) / wall_s.max(1e-9),
        output: None,
        checkpoint: checkpoint_path.clone(),
        log: log_path,
        holdout_photos: held_out.as_ref().map_or(0, HeldOut::photos),
        initial_holdout_loss,
        holdout_loss,
        best_holdout: header.best_holdout,
    };
    if end_step == header.total_steps && cfg.select_best {
        // `validate` wrote the best parameters, the last step's included, when they were measured.
        std::fs::copy(&best_path, &cfg.output).map_err(|e| Error::io(&best_path, e))?;
        summary.output = Some(cfg.output.clone());
    } else if end_step == header.total_steps {
        let mut file = export_lbw(
            &model,
            &slots,
            &values,
            quantizer.as_ref(),
            bits,
            &header,
            training_images,
        )?;
        note_labels(&mut file);
        file.write(&cfg.output)?;
        summary.output = Some(cfg.output.clone());
    }
    Ok(summary)
}

/// Quantizes the trained shadow weights and packages the result with the training summary.
fn export_lbw(
    model: &LoadedModel,
    slots: &[ParamSlot],
    values: &[Vec<f32>],
    quantizer: &dyn Quantizer,
    bits: Bits,
    header: &CheckpointHeader,
    training_images: usize,
) -> Result<LbwFile> {
    let mut trained = model.graph.clone();
    let mut quantized: BTreeMap<String, QuantizedTensor> = BTreeMap::new();
    for (i, (s, v)) in slots.iter().zip(values).enumerate() {
        if let Some(t) = trained.weights.get_mut(&s.name) {
            t.data.clone_from(v);
        }
        if s.kind == (ParamKind::Weight { quantized: true }) {
            let q = quantize_slot(slots, values, i, quantizer, bits, header.per_channel)?;
            quantized.insert(s.name.clone(), q);
        }
    }
    let graph = simulate_graph(&trained, &quantized)?;
    let source_sha256 = model.manifest.weights_sha256().to_string();
    let training = serde_json::json!({
        "kind": "distillation from the FP32 model (lbw finetune)",
        "steps": header.total_steps,
        "batch": header.batch,
        "lr": header.lr,
        "warmup_steps": header.warmup_steps,
        "schedule": "linear warm-up, cosine decay to 2 %",
        "optimizer": "adam",
        "seed": header.seed,
        "resolution": header.resolution,
        "augment": header.augment,
        "images": training_images,
        "step": header.step,
        "holdout_photos": header.holdout,
        "keep_zeros": header.keep_zeros,
        "best_holdout": header.best_holdout,
        "activations": if header.fake_quant_activations {
            "8-bit fake quantization (u8 affine per tensor, as the shift-add engine)"
        } else {
            "fp32"
        },
        "alphas": if header.learned_alphas {
            "learned (initialised by the method, trained with the weights)"
        } else {
            "the method's, recomputed from the weights"
        },
        "loss_weights": header.loss_weights,
        "class_term": if header.loss_weights.is_some() {
            "summed over classes"
        } else {
            "averaged over classes"
        },
        "keep_full_precision": header.keep_full_precision,
        "init": header.init,
        "initial_loss": header.initial_loss,
        "final_loss": header.recent_loss,
        "train_seconds": header.elapsed_s,
    });
    let grids = if header.fake_quant_activations {
        engine_grids(&trained, &quantized, &header.activation_ranges)?
    } else {
        BTreeMap::new()
    };
    Ok(LbwFile {
        graph,
        quantized,
        activation_scales: grids.iter().map(|(k, p)| (k.clone(), p.scale)).collect(),
        activation_zero_points: grids
            .iter()
            .map(|(k, p)| (k.clone(), p.zero_point))
            .collect(),
        metadata: LbwMetadata {
            source_model: model.manifest.id.clone(),
            source_sha256,
            method: header.method.clone(),
            bits: Some(bits.get()),
            param: header.param.map(f64::from),
            per_channel: header.per_channel,
            training,
        },
    })
}

/// The 8-bit grids the student trained with, in the form the shift-add engine loads: the file then
/// runs on the engine exactly as it was trained (what is trained is what is served).
///
/// The engine is planned once here so that a value it stores but training never rounded is an
/// error now, not a file that silently falls back to simulation; only the grids the engine keeps
/// are written.
fn engine_grids(
    trained: &Graph,
    quantized: &BTreeMap<String, QuantizedTensor>,
    ranges: &BTreeMap<String, [f32; 2]>,
) -> Result<BTreeMap<String, QParams>> {
    let scales = ActivationScales {
        scales: ranges
            .iter()
            .map(|(k, &[lo, hi])| (k.clone(), QParams::from_range(lo, hi)))
            .collect(),
    };
    let options = EngineOptions {
        kernel: KernelChoice::Scalar,
        threads: 1,
    };
    let engine = ShiftAddEngine::new(trained, quantized, &scales, &options).map_err(|e| {
        Error::Model(format!(
            "the trained activation grids do not cover the shift-add engine's values: {e}"
        ))
    })?;
    Ok(engine.activation_params().into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learned_alpha_gradient_is_lsq_and_clipped_weights_stop() {
        // One weight slot of two channels (3 weights each) with its learned scales.
        let slots = vec![
            ParamSlot {
                name: "w".into(),
                shape: vec![2, 3, 1, 1],
                kind: ParamKind::Weight { quantized: true },
                alpha_slot: Some(1),
            },
            ParamSlot {
                name: alpha_slot_name("w"),
                shape: vec![2],
                kind: ParamKind::Alpha { weight: 0 },
                alpha_slot: None,
            },
        ];
        let values = vec![vec![0.9, -0.3, 1.5, 0.2, 0.0, -0.7], vec![1.0, 0.5]];
        let bits = Bits::new(4).unwrap();
        let q = quantize_with_alphas(&values[0], &slots[0].shape, bits, &values[1]).unwrap();
        // Channel 0 (alpha 1): 0.9 -> 1, -0.3 -> -0.25, 1.5 clipped -> 1.
        // Channel 1 (alpha 0.5): 0.4 -> 0.5, 0 -> 0, -1.4 clipped -> -1.
        let levels: Vec<f32> = q.codes.iter().map(|c| c.value()).collect();
        assert_eq!(levels, vec![1.0, -0.25, 1.0, 0.5, 0.0, -1.0]);
        let mut grads = vec![Some(vec![1.0, 2.0, 3.0, -1.0, 5.0, 2.0]), None];
        learned_alpha_gradients(&slots, &values, &[Some(q), None], &mut grads);
        let ga = grads[1].as_ref().unwrap();
        // sum g (Q - w/alpha) inside the range, sum g Q for clipped weights.
        let want0 = 1.0 * (1.0 - 0.9) + 2.0 * (-0.25 + 0.3) + 3.0 * 1.0;
        let want1 = -(0.5 - 0.4) + 5.0 * 0.0 - 2.0;
        assert!((ga[0] - want0).abs() < 1e-5, "{ga:?}");
        assert!((ga[1] - want1).abs() < 1e-5, "{ga:?}");
        assert_eq!(
            grads[0].as_ref().unwrap(),
            &vec![1.0, 2.0, 0.0, -1.0, 5.0, 0.0]
        );
    }
}
