//! `lbw bench`: latency, throughput and memory of one model variant on one engine.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde::Serialize;

use crate::detect::pipeline::{calibration_inputs, default_calibration_dir};
use crate::engine::Backend;
use crate::engine::kernels::KernelChoice;
use crate::engine::ptq::{build_ptq_engine, default_quantize_options, parse_lbw_variant};
use crate::engine::quant_params::RangeObserver;
use crate::engine::shift_add::{ConvStats, EngineOptions, ShiftAddEngine};
use crate::engine::tract_fp32::TractFp32;
use crate::error::Error;
use crate::model::{DEFAULT_MODEL, Tensor, load_builtin};
use crate::quant::Method;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model id (see `lbw models`), or a `.lbw` file: `--variant fp32` then runs its simulated
    /// weights on tract, `--variant lbwB` (B = the file's bit-width) its own weights on the
    /// shift-add engine.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// `fp32` (tract) or `lbwB`, B in 2..=8: B-bit power-of-two weights quantized in memory
    /// (post-training), activations calibrated on real images, run on the shift-add engine.
    #[arg(long, default_value = "fp32")]
    pub variant: String,
    /// Weight quantizer for lbwB (default: lbw; ternary at 2 bits).
    #[arg(long)]
    pub method: Option<Method>,
    /// Shift-add kernel (default: $LBW_KERNEL, else the best this CPU supports).
    #[arg(long, value_enum)]
    pub kernel: Option<KernelChoice>,
    /// Intra-op threads of the shift-add engine (0: all cores). tract runs single-threaded.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 100)]
    pub iters: usize,
    /// Untimed runs first (caches, thread pool, allocator).
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Images activations are calibrated on (lbwB).
    #[arg(long, default_value_t = 8)]
    pub calib_images: usize,
    /// Folder of images (default: the shared VOC or COCO sample, by the model's classes).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Also time every step and report each kind of layer against the kernel's add throughput
    /// limit (shift-add only).
    #[arg(long)]
    pub layers: bool,
    /// Also time every step and list them one by one (name, shape, time, adds per ns): the
    /// layers to optimise next (shift-add only; implies --layers).
    #[arg(long)]
    pub steps: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One benchmark result.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub variant: String,
    pub engine: String,
    pub kernel: String,
    pub threads: usize,
    pub iters: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    /// Images per second at batch 1, one request at a time (1000 / mean).
    pub throughput_ips: f64,
    pub weight_bytes: usize,
    /// Peak resident set of the whole process (VmHWM), loading included.
    pub peak_rss_bytes: Option<u64>,
    pub cpu: String,
    pub layers: Option<Vec<LayerKindRow>>,
    pub steps: Option<Vec<StepRow>>,
}

/// Time and arithmetic of one kind of step, per image.
#[derive(Debug, Clone, Serialize)]
pub struct LayerKindRow {
    pub kind: String,
    pub steps: usize,
    pub ms: f64,
    /// 16-bit lane additions of weight terms (non-zero terms x output positions).
    pub lane_adds: f64,
    pub lane_adds_per_ns: f64,
    /// `lane_adds_per_ns` over the kernel's limit at the measured clock (see docs/ENGINE.md).
    pub fraction_of_limit: Option<f64>,
}

/// Time and arithmetic of one step, per image.
#[derive(Debug, Clone, Serialize)]
pub struct StepRow {
    /// The value the step stores.
    pub value: String,
    pub kind: String,
    pub conv: Option<ConvStats>,
    pub us: f64,
    pub lane_adds_per_ns: Option<f64>,
}

/// A `.lbw` file's quantized weights, when `--model` names one.
type FileWeights = BTreeMap<String, crate::quant::QuantizedTensor>;

/// The model to measure: a built-in id, or a `.lbw` file (its graph holds the FP32 simulation of
/// its quantized weights, which is what `--variant fp32` then runs on tract).
fn load_bench_model(
    model: &str,
) -> anyhow::Result<(crate::model::LoadedModel, Option<(u8, FileWeights)>)> {
    if !model.ends_with(".lbw") {
        return Ok((load_builtin(model)?, None));
    }
    let file = crate::model::lbw_file::LbwFile::read(std::path::Path::new(model))?;
    let manifest = crate::model::manifest::find(&file.metadata.source_model)?;
    let bits = file.metadata.bits.unwrap_or(0);
    Ok((
        crate::model::LoadedModel {
            manifest,
            graph: file.graph,
        },
        Some((bits, file.quantized)),
    ))
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let (model, file_weights) = load_bench_model(&args.model)?;
    let dir = args
        .images
        .clone()
        .unwrap_or_else(|| default_calibration_dir(&model.manifest));
    let images = calibration_inputs(&model.manifest, &dir, args.calib_images.max(1))?;
    let input = images[0].clone();
    let (backend, engine): (&dyn Backend, Option<&ShiftAddEngine>);
    let (tract, built);
    let threads;
    if args.variant == "fp32" {
        tract = TractFp32::new(&model.graph)?;
        backend = &tract;
        engine = None;
        threads = 1;
    } else {
        let bits = parse_lbw_variant(&args.variant).ok_or_else(|| {
            Error::Input(format!(
                "unknown variant {:?}: expected fp32 or lbw2 .. lbw8",
                args.variant
            ))
        })?;
        let mut quant = default_quantize_options(bits);
        if let Some(m) = args.method {
            quant.method = m;
        }
        let kernel = match args.kernel {
            Some(k) => k,
            None => KernelChoice::from_env()?,
        };
        let options = EngineOptions {
            kernel,
            threads: args.threads,
        };
        built = match &file_weights {
            // A `.lbw` file brings its own (possibly retrained) weights: only activations are
            // calibrated here.
            Some((file_bits, weights)) => {
                if *file_bits != bits.get() {
                    return Err(Error::Input(format!(
                        "{} holds {file_bits}-bit weights, not {}",
                        args.model, args.variant
                    ))
                    .into());
                }
                let scales = crate::engine::quant_params::calibrate(
                    &model.graph,
                    images.iter().cloned(),
                    RangeObserver::MeanMinMax,
                )?;
                ShiftAddEngine::new(&model.graph, weights, &scales, &options)?
            }
            None => {
                build_ptq_engine(
                    &model.graph,
                    &quant,
                    &images,
                    RangeObserver::MeanMinMax,
                    &options,
                )?
                .engine
            }
        };
        threads = built.threads();
        engine = Some(&built);
        backend = &built;
    }
    for _ in 0..args.warmup {
        backend.run(input.clone())?;
    }
    let mut ms = Vec::with_capacity(args.iters);
    for _ in 0..args.iters.max(1) {
        let x = input.clone();
        let t = Instant::now();
        backend.run(x)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (layers, steps) = match (args.layers || args.steps, engine) {
        (true, Some(e)) => {
            let (kinds, steps) = layer_rows(e, &input, backend.kernel())?;
            (Some(kinds), args.steps.then_some(steps))
        }
        _ => (None, None),
    };
    let mut sorted = ms.clone();
    sorted.sort_by(f64::total_cmp);
    let pct = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
    let mean = ms.iter().sum::<f64>() / ms.len() as f64;
    let report = BenchReport {
        model: args.model.clone(),
        variant: args.variant.clone(),
        engine: backend.engine().to_string(),
        kernel: backend.kernel().to_string(),
        threads,
        iters: ms.len(),
        p50_ms: pct(0.5),
        p90_ms: pct(0.9),
        p99_ms: pct(0.99),
        mean_ms: mean,
        throughput_ips: 1e3 / mean,
        weight_bytes: backend.weight_bytes(),
        peak_rss_bytes: peak_rss_bytes(),
        cpu: cpu_name(),
        layers,
        steps,
    };
    if args.json {
        out!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report)?;
    }
    Ok(())
}

/// 16-bit lane additions per cycle the kernel's add instructions can retire: AVX-512 `vpaddw zmm`
/// on two ports x 32 lanes; AVX2 `vpaddw ymm` on three ports x 16; the portable kernel as compiled
/// for baseline x86_64 (SSE2) on three ports x 8.
pub fn lane_add_limit_per_cycle(kernel: &str) -> Option<f64> {
    match kernel {
        "avx512bw" => Some(64.0),
        "avx2" => Some(48.0),
        "scalar" => Some(24.0),
        _ => None,
    }
}

/// Per kind of step and per step, averaged over a number of profiled runs.
fn layer_rows(
    engine: &ShiftAddEngine,
    input: &Tensor,
    kernel: &str,
) -> anyhow::Result<(Vec<LayerKindRow>, Vec<StepRow>)> {
    const RUNS: usize = 20;
    let mut agg: BTreeMap<&'static str, (usize, f64, f64)> = BTreeMap::new();
    let mut steps: Vec<StepRow> = Vec::new();
    for run in 0..RUNS {
        for (i, s) in engine.run_profiled(input.clone())?.into_iter().enumerate() {
            let e = agg.entry(s.kind).or_default();
            let adds = s.conv.as_ref().map(|c| (c.terms * c.positions) as f64);
            if run == 0 {
                e.0 += 1;
                e.2 += adds.unwrap_or(0.0);
                steps.push(StepRow {
                    value: s.value,
                    kind: s.kind.to_string(),
                    conv: s.conv,
                    us: 0.0,
                    lane_adds_per_ns: None,
                });
            }
            e.1 += s.seconds / RUNS as f64;
            if let Some(row) = steps.get_mut(i) {
                row.us += s.seconds * 1e6 / RUNS as f64;
            }
        }
    }
    for row in &mut steps {
        if let Some(c) = &row.conv {
            row.lane_adds_per_ns = Some((c.terms * c.positions) as f64 / (row.us * 1e3));
        }
    }
    let ghz = cpu_mhz().map(|m| m / 1e3);
    let kinds = agg
        .into_iter()
        .map(|(kind, (steps, secs, adds))| {
            let per_ns = adds / (secs * 1e9);
            LayerKindRow {
                kind: kind.to_string(),
                steps,
                ms: secs * 1e3,
                lane_adds: adds,
                lane_adds_per_ns: per_ns,
                fraction_of_limit: match (ghz, lane_add_limit_per_cycle(kernel)) {
                    (Some(g), Some(l)) if adds > 0.0 => Some(per_ns / (g * l)),
                    _ => None,
                },
            }
        })
        .collect();
    Ok((kinds, steps))
}

fn print_report(r: &BenchReport) -> anyhow::Result<()> {
    out!(
        "{} {} on {} ({} kernel, {} thread{}), {} runs",
        r.model,
        r.variant,
        r.engine,
        r.kernel,
        r.threads,
        if r.threads == 1 { "" } else { "s" },
        r.iters
    );
    out!(
        "  latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  mean {:.2}",
        r.p50_ms,
        r.p90_ms,
        r.p99_ms,
        r.mean_ms
    );
    out!("  throughput: {:.1} images/s", r.throughput_ips);
    out!("  weights: {} bytes", r.weight_bytes);
    if let Some(b) = r.peak_rss_bytes {
        out!("  peak RSS: {:.1} MiB", b as f64 / (1 << 20) as f64);
    }
    out!("  cpu: {}", r.cpu);
    if let Some(rows) = &r.layers {
        out!(
            "  {:<16} {:>5} {:>9} {:>14} {:>10} {:>9}",
            "step kind",
            "steps",
            "ms",
            "lane adds",
            "adds/ns",
            "of limit"
        );
        for row in rows {
            out!(
                "  {:<16} {:>5} {:>9.3} {:>14.0} {:>10.2} {:>9}",
                row.kind,
                row.steps,
                row.ms,
                row.lane_adds,
                row.lane_adds_per_ns,
                row.fraction_of_limit
                    .map_or("-".to_string(), |f| format!("{:.0} %", f * 100.0))
            );
        }
    }
    if let Some(rows) = &r.steps {
        out!(
            "  {:<28} {:<15} {:>11} {:>6} {:>8} {:>8} {:>8}",
            "step",
            "kind",
            "cout/groups",
            "taps",
            "terms",
            "us",
            "adds/ns"
        );
        for row in rows {
            let (shape, taps, terms) = match &row.conv {
                Some(c) => (
                    format!("{}/{}", c.cout, c.groups),
                    c.taps_per_group.to_string(),
                    c.terms.to_string(),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            out!(
                "  {:<28} {:<15} {:>11} {:>6} {:>8} {:>8.1} {:>8}",
                row.value,
                row.kind,
                shape,
                taps,
                terms,
                row.us,
                row.lane_adds_per_ns
                    .map_or("-".to_string(), |a| format!("{a:.1}"))
            );
        }
    }
    Ok(())
}

/// VmHWM from /proc/self/status, in bytes (Linux only).
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn cpuinfo_field(name: &str) -> Option<String> {
    let s = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = s.lines().find(|l| l.starts_with(name))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

/// The CPU model name (Linux), or the architecture.
pub fn cpu_name() -> String {
    cpuinfo_field("model name").unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn cpu_mhz() -> Option<f64> {
    cpuinfo_field("cpu MHz")?.parse().ok()
}
