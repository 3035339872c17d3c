use std::path::PathBuf;

use clap::Args;

use crate::model::lbw_file::LbwFile;
use crate::model::load_builtin;
use crate::quant::{
    Bits, Method, QuantizeOptions, quantize_graph, quantize_tensor, read_npy_file, write_npy_file,
};

/// How conv weights are quantized: shared by `lbw quantize` and `lbw finetune`.
#[derive(Debug, Clone, Args)]
pub struct QuantizerArgs {
    /// Bit-width b (2..=8): weights become alpha * {0, ±2^(1-n) .. ±1}, n = 2^(b-2).
    #[arg(long)]
    pub bits: u8,
    /// ternary (b = 2, exact), lbw (LBW-Net's single-parameter rule) or optimal (exact optimum).
    #[arg(long, default_value = "lbw")]
    pub method: Method,
    /// The free parameter of the lbw rule (default: the rule's per-bit-width default).
    #[arg(long)]
    pub param: Option<f32>,
    /// One alpha per output channel (the default; kept for explicit commands).
    #[arg(long, conflicts_with = "per_tensor")]
    pub per_channel: bool,
    /// One alpha per layer instead of one per output channel (lower accuracy: a layer's channels
    /// differ in scale by up to 100x once BatchNorm is folded).
    #[arg(long)]
    pub per_tensor: bool,
}

impl QuantizerArgs {
    /// Per-channel alphas unless `--per-tensor`: lower weight error after rounding, a lower
    /// distillation loss when retraining (docs/TRAINING.md), and the engine's post-training
    /// default.
    pub fn per_channel(&self) -> bool {
        !self.per_tensor
    }
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Model id (see `lbw models`).
    #[arg(long)]
    pub model: String,
    #[command(flatten)]
    pub quantizer: QuantizerArgs,
    /// Convs to keep at full precision, by node or weight name (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub keep_fp: Vec<String>,
    /// Output `.lbw` file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: QuantizeArgs) -> anyhow::Result<()> {
    let model = load_builtin(&args.model)?;
    let q = &args.quantizer;
    let options = QuantizeOptions {
        bits: Bits::new(q.bits)?,
        method: q.method,
        param: q.param,
        per_channel: q.per_channel(),
        keep_full_precision: args.keep_fp.clone(),
    };
    let quantized = quantize_graph(&model.graph, &options)?;
    let file = LbwFile::from_quantized(
        &quantized,
        &model.manifest.id,
        model.manifest.weights_sha256(),
    )?;
    file.write(&args.output)?;
    let r = &quantized.report;
    if args.json {
        out!("{}", serde_json::to_string_pretty(r)?);
    } else {
        out!(
            "{:<28} {:<12} {:>14} {:>9} {:>8} {:>9}",
            "layer",
            "kind",
            "shape",
            "rel.err",
            "zeros",
            "bytes"
        );
        for l in &r.layers {
            let shape = l
                .shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("x");
            let (err, zeros) = if l.quantized {
                (
                    format!("{:.4}", l.relative_error),
                    format!("{:.3}", l.zero_fraction),
                )
            } else {
                ("fp32".to_string(), "-".to_string())
            };
            out!(
                "{:<28} {:<12} {:>14} {:>9} {:>8} {:>9}",
                l.layer,
                l.kind.to_string(),
                shape,
                err,
                zeros,
                l.packed_bytes
            );
        }
        out!(
            "{} layers quantized, {} kept; conv weights {} B FP32 -> {} B packed ({:.2}x smaller)",
            r.quantized_layers,
            r.kept_layers,
            r.fp32_bytes,
            r.packed_bytes,
            r.compression_ratio
        );
    }
    eprintln!("wrote {}", args.output.display());
    Ok(())
}

#[derive(Debug, Args)]
pub struct QuantizeTensorArgs {
    /// Bit-width b (2..=8).
    #[arg(long)]
    pub bits: u8,
    #[arg(long, default_value = "optimal")]
    pub method: Method,
    #[arg(long)]
    pub param: Option<f32>,
    /// One alpha per slice of the first axis.
    #[arg(long)]
    pub per_channel: bool,
    /// float32 `.npy` input.
    #[arg(long)]
    pub input: PathBuf,
    /// float32 `.npy` output: alpha * Q, same shape.
    #[arg(long)]
    pub output: PathBuf,
    /// Print JSON (alpha, objective, zero_fraction, ...) instead of a summary line.
    #[arg(long)]
    pub json: bool,
}

pub fn run_tensor(args: QuantizeTensorArgs) -> anyhow::Result<()> {
    let t = read_npy_file(&args.input)?;
    let r = quantize_tensor(
        &t.data,
        &t.shape,
        args.bits,
        args.method,
        args.param,
        args.per_channel,
    )?;
    write_npy_file(&args.output, &t.shape, &r.values)?;
    if args.json {
        let alpha = if r.alphas.len() == 1 && !args.per_channel {
            serde_json::json!(r.alphas[0])
        } else {
            serde_json::json!(r.alphas)
        };
        let mut v = serde_json::to_value(&r)?;
        v["alpha"] = alpha;
        out!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        out!(
            "{} weights, {} bits, {}: objective {:.6e}, relative error {:.4}, zeros {:.3}, {} B packed",
            t.data.len(),
            r.bits,
            r.method.name(),
            r.objective,
            r.relative_error,
            r.zero_fraction,
            r.packed_bytes
        );
    }
    Ok(())
}
