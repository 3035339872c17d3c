use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::detect::ThresholdArgs;
use crate::detect::{Detector, ImageDetections, load_detector};
use crate::eval::{
    BootstrapReport, CocoDataset, GtImage, Interpolation, VocDataset, VocOptions, coco_eval,
    voc_inputs_on_coco, voc_map, voc_map_bootstrap, voc_map_on_coco,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DataFormat {
    /// VOCdevkit folder: Annotations/, ImageSets/Main/<split>.txt, JPEGImages/.
    Voc,
    /// COCO folder: annotations/instances.json and images/ (or --annotations / --images).
    Coco,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InterpolationArg {
    /// Every-point interpolation (VOC2010 and later).
    All,
    /// 11-point interpolation (VOC2007).
    Eleven,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model: an id (see `lbw models`), `ID@lbwB` (post-training B-bit on the shift-add engine),
    /// a `.lbw` file, `FILE.lbw@sim` (the FP32 fake-quant simulation of the file's engine),
    /// `FILE.lbw@weights` (its weights alone, FP32 activations) or `FILE.lbw@activations` (its
    /// 8-bit activation grids alone, on the source model's FP32 weights). Leave out with
    /// --detections.
    #[arg(long, required_unless_present = "detections")]
    pub model: Option<String>,
    /// A saved detections file (JSON lines as `lbw detect --json` prints) instead of a model run.
    #[arg(long, conflicts_with = "model")]
    pub detections: Option<PathBuf>,
    /// Dataset folder.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, value_enum)]
    pub format: DataFormat,
    /// VOC image set (ImageSets/Main/<split>.txt).
    #[arg(long, default_value = "trainval")]
    pub split: String,
    /// COCO instances JSON (default: DATA/annotations/instances.json).
    #[arg(long)]
    pub annotations: Option<PathBuf>,
    /// COCO images folder (default: DATA/images).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// IoU threshold of VOC-style AP.
    #[arg(long, default_value_t = 0.5)]
    pub iou: f64,
    /// Precision interpolation of VOC-style AP.
    #[arg(long, value_enum, default_value = "all")]
    pub interpolation: InterpolationArg,
    /// Use the VOC devkit's +1 pixel convention for areas and intersections.
    #[arg(long)]
    pub pixel_plus_one: bool,
    /// Evaluate only the first N images.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Also write the detections (JSON lines) to this file.
    #[arg(long)]
    pub save_detections: Option<PathBuf>,
    #[command(flatten)]
    pub thresholds: ThresholdArgs,
    /// Also report a 95 % bootstrap interval of the VOC mAP from this many image resamples
    /// (1000 is plenty): how much of a difference the test set can resolve.
    #[arg(long, default_value_t = 0)]
    pub bootstrap: usize,
    /// With --bootstrap: saved detections of a reference model (`--save-detections` of its run);
    /// adds the interval of the paired mAP difference, this model minus the reference.
    #[arg(long, requires = "bootstrap")]
    pub baseline_detections: Option<PathBuf>,
    /// Seed of the bootstrap resamples.
    #[arg(long, default_value_t = 0)]
    pub bootstrap_seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn run_model(
    detector: &Detector,
    images: &[(String, PathBuf)],
    args: &EvalArgs,
) -> anyhow::Result<Vec<ImageDetections>> {
    let opts = args.thresholds.options();
    let bar = ProgressBar::new(images.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} detecting [{bar:30}] {pos}/{len} images, {per_sec}, eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut out = Vec::with_capacity(images.len());
    for (_, path) in images {
        out.push(detector.detect_file(path, &opts)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(out)
}

fn read_detections(path: &Path) -> anyhow::Result<Vec<ImageDetections>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).with_context(|| {
            format!("{} line {}: not a detections object", path.display(), i + 1)
        })?);
    }
    Ok(out)
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    if args.thresholds.score_threshold > 0.05 && args.model.is_some() {
        tracing::warn!(
            "score threshold {} cuts the precision-recall curve short; mAP runs use --score-threshold 0.005",
            args.thresholds.score_threshold
        );
    }
    let options = VocOptions {
        iou: args.iou,
        interpolation: match args.interpolation {
            InterpolationArg::All => Interpolation::AllPoint,
            InterpolationArg::Eleven => Interpolation::ElevenPoint,
        },
        pixel_plus_one: args.pixel_plus_one,
    };
    let detector = args.model.as_deref().map(load_detector).transpose()?;
    let take = |n: usize| args.limit.unwrap_or(n).min(n);

    let detections_for = |images: Vec<(String, PathBuf)>| -> anyhow::Result<Vec<ImageDetections>> {
        let dets = match (&detector, &args.detections) {
            (Some(d), _) => run_model(d, &images, &args)?,
            (None, Some(p)) => read_detections(p)?,
            (None, None) => bail!("give --model or --detections"),
        };
        if let Some(p) = &args.save_detections {
            let mut f = std::io::BufWriter::new(
                std::fs::File::create(p)
                    .with_context(|| format!("cannot create {}", p.display()))?,
            );
            for d in &dets {
                writeln!(f, "{}", serde_json::to_string(d)?)?;
            }
        }
        Ok(dets)
    };

    match args.format {
        DataFormat::Voc => {
            let mut data = VocDataset::load(&args.data, &args.split)?;
            data.images.truncate(take(data.images.len()));
            let images = data
                .images
                .iter()
                .map(|i| (i.id.clone(), i.path.clone()))
                .collect();
            let dets = detections_for(images)?;
            let report = voc_map(&data.images, &dets, &options);
            let boot = bootstrap(&args, &data.images, &dets, &options, Ok)?;
            if args.json {
                let mut v = serde_json::to_value(&report)?;
                if let Some(b) = &boot {
                    v["bootstrap"] = serde_json::to_value(b)?;
                }
                out!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                out_raw!("{}", report.table());
                print_bootstrap(boot.as_ref())?;
            }
        }
        DataFormat::Coco => {
            let json = args
                .annotations
                .clone()
                .unwrap_or_else(|| args.data.join("annotations").join("instances.json"));
            let images_dir = args
                .images
                .clone()
                .unwrap_or_else(|| args.data.join("images"));
            let mut data = CocoDataset::load(&json, &images_dir)?;
            data.images.truncate(take(data.images.len()));
            let keep: std::collections::HashSet<u64> = data.images.iter().map(|i| i.id).collect();
            data.annotations.retain(|a| keep.contains(&a.image_id));
            let images = data
                .images
                .iter()
                .map(|i| (i.stem(), i.path.clone()))
                .collect();
            let dets = detections_for(images)?;
            // Score only the classes the detector knows: a VOC model is not penalised for COCO's
            // other 60 classes.
            let labels: Vec<String> = match &detector {
                Some(d) => d.manifest.labels.clone(),
                None => {
                    let mut l: Vec<String> = dets
                        .iter()
                        .flat_map(|d| d.detections.iter().map(|x| x.label.clone()))
                        .collect();
                    l.sort();
                    l.dedup();
                    l
                }
            };
            let restricted = data.restrict_to_classes(&labels);
            let coco = coco_eval(&restricted, &dets);
            let voc = voc_map_on_coco(&data, &dets, &labels, &options);
            let (gt, mapped) = voc_inputs_on_coco(&data, &dets, &labels);
            let boot = bootstrap(&args, &gt, &mapped, &options, |b| {
                Ok(voc_inputs_on_coco(&data, &b, &labels).1)
            })?;
            if args.json {
                let mut v = serde_json::json!({ "coco": coco, "voc_style": voc });
                if let Some(b) = &boot {
                    v["voc_style"]["bootstrap"] = serde_json::to_value(b)?;
                }
                out!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                out_raw!("{}", voc.table());
                print_bootstrap(boot.as_ref())?;
                out!();
                out_raw!("{}", coco.table());
            }
        }
    }
    Ok(())
}

/// `--bootstrap`: the interval of VOC mAP over image resamples, and of the paired difference to
/// `--baseline-detections` (mapped like the evaluated detections by `map_baseline`).
fn bootstrap(
    args: &EvalArgs,
    gt: &[GtImage],
    dets: &[ImageDetections],
    options: &VocOptions,
    map_baseline: impl Fn(Vec<ImageDetections>) -> anyhow::Result<Vec<ImageDetections>>,
) -> anyhow::Result<Option<BootstrapReport>> {
    if args.bootstrap == 0 {
        return Ok(None);
    }
    let baseline = match &args.baseline_detections {
        Some(p) => Some(map_baseline(read_detections(p)?)?),
        None => None,
    };
    Ok(Some(voc_map_bootstrap(
        gt,
        dets,
        baseline.as_deref(),
        options,
        args.bootstrap,
        args.bootstrap_seed,
    )))
}

fn print_bootstrap(boot: Option<&BootstrapReport>) -> anyhow::Result<()> {
    let Some(b) = boot else { return Ok(()) };
    let pct = |x: f64| 100.0 * x;
    out!(
        "bootstrap ({} image resamples, seed {}): mAP {:.0} % interval [{:.2}, {:.2}]",
        b.resamples,
        b.seed,
        pct(b.level),
        pct(b.map[0]),
        pct(b.map[1])
    );
    if let Some(d) = &b.difference {
        out!(
            "paired difference to the baseline ({:.2} mAP): mean {:+.2}, {:.0} % interval [{:+.2}, {:+.2}]",
            pct(d.baseline_map),
            pct(d.mean),
            pct(b.level),
            pct(d.interval[0]),
            pct(d.interval[1])
        );
    }
    Ok(())
}
