use std::path::PathBuf;

use clap::Args;

use crate::detect::{DetectOptions, load_detector};
use crate::model::DEFAULT_MODEL;

/// Thresholds shared by every command that runs a detector.
#[derive(Debug, Clone, Args)]
pub struct ThresholdArgs {
    /// Minimum score of a reported detection (0.005 for mAP runs).
    #[arg(long, default_value_t = 0.25)]
    pub score_threshold: f32,
    /// IoU above which a lower-scored box of the same class is suppressed.
    #[arg(long, default_value_t = 0.45)]
    pub iou_threshold: f32,
    /// Most detections reported per image.
    #[arg(long, default_value_t = 100)]
    pub max_detections: usize,
}

impl ThresholdArgs {
    pub fn options(&self) -> DetectOptions {
        DetectOptions {
            score_threshold: self.score_threshold,
            iou_threshold: self.iou_threshold,
            max_detections: self.max_detections,
        }
    }
}

#[derive(Debug, Args)]
pub struct DetectArgs {
    /// Model: an id (see `lbw models`), `ID@lbwB` (post-training B-bit on the shift-add engine),
    /// a `.lbw` file, `FILE.lbw@sim` (the FP32 fake-quant simulation of the file's engine),
    /// `FILE.lbw@weights` (its weights alone, FP32 activations) or `FILE.lbw@activations` (its
    /// 8-bit activation grids alone, on the source model's FP32 weights).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Image files.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    #[command(flatten)]
    pub thresholds: ThresholdArgs,
    /// Print one JSON object per image instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: DetectArgs) -> anyhow::Result<()> {
    let opts = args.thresholds.options();
    opts.validate()?;
    let detector = load_detector(&args.model)?;
    for path in &args.images {
        let result = detector.detect_file(path, &opts)?;
        if args.json {
            out!("{}", serde_json::to_string(&result)?);
        } else {
            out!(
                "{} ({}x{}): {} detections",
                path.display(),
                result.width,
                result.height,
                result.detections.len()
            );
            for d in &result.detections {
                out!(
                    "  {:<14} {:.3}  [{:.1}, {:.1}, {:.1}, {:.1}]",
                    d.label,
                    d.score,
                    d.bbox[0],
                    d.bbox[1],
                    d.bbox[2],
                    d.bbox[3]
                );
            }
        }
    }
    Ok(())
}
