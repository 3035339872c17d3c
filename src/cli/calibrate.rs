//! `lbw calibrate`: power-of-two weights plus 8-bit activation grids from real images, in one
//! `.lbw` file.

use std::path::PathBuf;

use clap::Args;

use crate::detect::pipeline::{calibration_inputs, default_calibration_dir};
use crate::engine::kernels::KernelChoice;
use crate::engine::ptq::build_ptq_engine;
use crate::engine::quant_params::RangeObserver;
use crate::engine::shift_add::EngineOptions;
use crate::model::lbw_file::LbwFile;
use crate::model::load_builtin;
use crate::quant::{Bits, Method, QuantizeOptions};

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// Model id (see `lbw models`).
    #[arg(long)]
    pub model: String,
    /// Bit-width b (2..=8) of the power-of-two conv weights.
    #[arg(long, default_value_t = 6)]
    pub bits: u8,
    /// Weight quantizer: ternary (b = 2), lbw or optimal.
    #[arg(long, default_value = "lbw")]
    pub method: Method,
    /// One alpha per layer instead of one per output channel.
    #[arg(long)]
    pub per_tensor: bool,
    /// Folder of calibration images (default: the shared VOC or COCO sample).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// How many images (the first, by file name).
    #[arg(long, default_value_t = 16)]
    pub limit: usize,
    /// How each activation's range is taken from the images: the mean over images of the
    /// per-image min and max (robust to one outlier image; the default), or the overall min/max.
    #[arg(long, value_enum, default_value = "mean-min-max")]
    pub observer: RangeObserver,
    /// Output `.lbw` file: weights and every stored activation's grid (scale and zero point).
    #[arg(short, long)]
    pub output: PathBuf,
}

pub fn run(args: CalibrateArgs) -> anyhow::Result<()> {
    let model = load_builtin(&args.model)?;
    let dir = args
        .images
        .clone()
        .unwrap_or_else(|| default_calibration_dir(&model.manifest));
    let images = calibration_inputs(&model.manifest, &dir, args.limit)?;
    let quant = QuantizeOptions {
        bits: Bits::new(args.bits)?,
        method: args.method,
        param: None,
        per_channel: !args.per_tensor,
        keep_full_precision: vec![],
    };
    let options = EngineOptions {
        kernel: KernelChoice::Scalar,
        threads: 1,
    };
    let built = build_ptq_engine(&model.graph, &quant, &images, args.observer, &options)?;
    // Only the values the engine stores need a grid.
    let stored = built.engine.activation_params();
    let mut file = LbwFile::from_quantized(
        &built.quantized,
        &model.manifest.id,
        model.manifest.weights_sha256(),
    )?;
    file.activation_scales = stored.iter().map(|(k, p)| (k.clone(), p.scale)).collect();
    file.activation_zero_points = stored
        .iter()
        .map(|(k, p)| (k.clone(), p.zero_point))
        .collect();
    file.write(&args.output)?;
    eprintln!(
        "calibrated {} activations of {} on {} images from {} ({:?}); wrote {}",
        stored.len(),
        args.model,
        images.len(),
        dir.display(),
        args.observer,
        args.output.display(),
    );
    Ok(())
}
