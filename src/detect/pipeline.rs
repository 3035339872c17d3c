//! The detector: pre-processing, a backend, decoding and NMS, with per-stage timings.

use std::time::Instant;

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::detect::decode::decode;
use crate::detect::nms::nms_per_class;
use crate::detect::preprocess::preprocess;
use crate::detect::types::{Detection, ImageDetections};
use crate::engine::Backend;
use crate::error::{Error, Result};
use crate::model::Manifest;

/// Thresholds a caller can choose per request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DetectOptions {
    pub score_threshold: f32,
    pub iou_threshold: f32,
    pub max_detections: usize,
}

impl Default for DetectOptions {
    fn default() -> Self {
        // 0.25 suits display; mAP runs pass 0.005. 0.45 is darknet's NMS default.
        DetectOptions {
            score_threshold: 0.25,
            iou_threshold: 0.45,
            max_detections: 100,
        }
    }
}

impl DetectOptions {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.score_threshold) {
            return Err(Error::Input(format!(
                "score threshold {} is not in [0, 1]",
                self.score_threshold
            )));
        }
        if !(0.0..=1.0).contains(&self.iou_threshold) {
            return Err(Error::Input(format!(
                "IoU threshold {} is not in [0, 1]",
                self.iou_threshold
            )));
        }
        if self.max_detections == 0 || self.max_detections > 10_000 {
            return Err(Error::Input(format!(
                "max detections {} is not in 1..=10000",
                self.max_detections
            )));
        }
        Ok(())
    }
}

/// Milliseconds spent in each stage of one detection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StageTimings {
    pub decode: f64,
    pub preprocess: f64,
    pub inference: f64,
    pub postprocess: f64,
    pub total: f64,
}

pub struct Detector {
    pub manifest: Manifest,
    /// `fp32`, `lbw6`, ...
    pub variant: String,
    backend: Box<dyn Backend>,
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

impl Detector {
    pub fn new(manifest: Manifest, variant: impl Into<String>, backend: Box<dyn Backend>) -> Self {
        Detector {
            manifest,
            variant: variant.into(),
            backend,
        }
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// Detects objects in a decoded image; `timings.decode` is left for the caller to fill in.
    pub fn detect(
        &self,
        img: &RgbImage,
        opts: &DetectOptions,
    ) -> Result<(Vec<Detection>, StageTimings)> {
        opts.validate()?;
        let t0 = Instant::now();
        let (input, transform) = preprocess(img, &self.manifest.input);
        let preprocess_ms = ms_since(t0);
        let t1 = Instant::now();
        let outputs = self.backend.run(input)?;
        let inference_ms = ms_since(t1);
        let t2 = Instant::now();
        let labels = &self.manifest.labels;
        let size = (self.manifest.input.width, self.manifest.input.height);
        let cands = decode(
            &self.manifest.decoder,
            &outputs,
            size,
            labels.len(),
            opts.score_threshold,
        )?;
        let kept = nms_per_class(cands, opts.iou_threshold, opts.max_detections);
        let detections = kept
            .into_iter()
            .map(|c| Detection {
                class_id: c.class_id,
                label: labels[c.class_id].clone(),
                score: c.score,
                bbox: transform.to_image(c.bbox),
            })
            .filter(|d| d.bbox[2] > d.bbox[0] && d.bbox[3] > d.bbox[1])
            .collect();
        let postprocess_ms = ms_since(t2);
        let timings = StageTimings {
            decode: 0.0,
            preprocess: preprocess_ms,
            inference: inference_ms,
            postprocess: postprocess_ms,
            total: ms_since(t0),
        };
        Ok((detections, timings))
    }

    /// Loads, decodes and detects one image file.
    pub fn detect_file(
        &self,
        path: &std::path::Path,
        opts: &DetectOptions,
    ) -> Result<ImageDetections> {
        let img = crate::detect::image_io::load_rgb(path)?;
        let (detections, _) = self.detect(&img, opts)?;
        Ok(ImageDetections {
            image: path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string(),
            width: img.width(),
            height: img.height(),
            detections,
        })
    }
}

/// Builds a detector from a model reference: a built-in model id (FP32 through tract), `ID@lbwB`
/// (post-training quantized, on the shift-add engine), the path of a `.lbw` file (on the shift-add
/// engine when it carries activation grids, else its weights simulated in FP32 through tract),
/// `FILE.lbw@sim` (the FP32 fake-quant simulation of that engine), `FILE.lbw@weights` (its
/// weights alone, FP32 activations) or `FILE.lbw@activations` (its 8-bit activation grids alone,
/// on the source model's FP32 weights).
pub fn load_detector(model_ref: &str) -> Result<Detector> {
    // `ID@lbwB`: power-of-two weights (post-training) on the shift-add engine, calibrated in memory.
    if let Some((id, variant)) = model_ref.split_once('@') {
        if variant == "sim" {
            return load_lbw_simulation(id);
        }
        if variant == "weights" {
            return load_lbw_weights_only(id);
        }
        if variant == "activations" {
            return load_lbw_activations_only(id);
        }
        if variant != "fp32" {
            return load_ptq_detector(id, variant);
        }
        return load_detector(id);
    }
    let path = std::path::Path::new(model_ref);
    if model_ref.ends_with(".lbw") || path.is_file() {
        let file = crate::model::lbw_file::LbwFile::read(path)?;
        let manifest = crate::model::manifest::find(&file.metadata.source_model).map_err(|e| {
            Error::Model(format!(
                "{}: made from an unknown model: {e}",
                path.display()
            ))
        })?;
        // A file with activation grids (`lbw calibrate`, `lbw finetune`) runs on the shift-add
        // engine. Otherwise (`lbw quantize`) its weights are simulated in FP32 on tract.
        if let Some((bits, engine)) = lbw_file_engine(&file)? {
            return Ok(Detector::new(
                manifest,
                format!("lbw{bits}"),
                Box::new(engine),
            ));
        }
        let backend = crate::engine::tract_fp32::TractFp32::new(&file.graph)?;
        let variant = match file.metadata.bits {
            Some(b) => format!("lbw{b}-sim"),
            None => "fp32".to_string(),
        };
        return Ok(Detector::new(manifest, variant, Box::new(backend)));
    }
    let model = crate::model::load_builtin(model_ref)?;
    let backend = crate::engine::tract_fp32::TractFp32::new(&model.graph)?;
    Ok(Detector::new(model.manifest, "fp32", Box::new(backend)))
}

/// `FILE.lbw@sim`: the FP32 simulation of what the shift-add engine computes for the file, its
/// `alpha * Q` weights with every value the engine stores rounded to the file's 8-bit grid (the
/// reference the engine's detections and mAP are checked against). A file without grids simulates
/// its weights only.
pub fn load_lbw_simulation(path: &str) -> Result<Detector> {
    let file = crate::model::lbw_file::LbwFile::read(std::path::Path::new(path))?;
    let Some((bits, engine)) = lbw_file_engine(&file)? else {
        return load_detector(path);
    };
    let manifest = crate::model::manifest::find(&file.metadata.source_model)?;
    let sim =
        crate::engine::shift_add::fake_quant_simulation(&file.graph, &file.quantized, &engine)?;
    Ok(Detector::new(
        manifest,
        format!("lbw{bits}-sim"),
        Box::new(sim),
    ))
}

/// `FILE.lbw@weights`: only the file's weights, `alpha * Q` in FP32 on tract, with FP32
/// activations. Against `FILE.lbw@sim` it shows what the 8-bit activations cost.
pub fn load_lbw_weights_only(path: &str) -> Result<Detector> {
    let file = crate::model::lbw_file::LbwFile::read(std::path::Path::new(path))?;
    let manifest = crate::model::manifest::find(&file.metadata.source_model)?;
    let backend = crate::engine::tract_fp32::TractFp32::new(&file.graph)?;
    let variant = match file.metadata.bits {
        Some(b) => format!("lbw{b}-weights"),
        None => "fp32".to_string(),
    };
    Ok(Detector::new(manifest, variant, Box::new(backend)))
}

/// `FILE.lbw@activations`: the FP32 weights of the model the file was made from, with every value
/// the engine would store rounded to the file's 8-bit grids (the fake-quant simulation without
/// quantized weights). Against the FP32 model it shows what the 8-bit activations alone cost, as
/// `@weights` shows the weights' share: on coco128 nothing for yolo-fastest-voc, about 3 mAP for
/// yolo-fastest-xl-voc (docs/ACCURACY.md).
pub fn load_lbw_activations_only(path: &str) -> Result<Detector> {
    let file = crate::model::lbw_file::LbwFile::read(std::path::Path::new(path))?;
    let Some((_, engine)) = lbw_file_engine(&file)? else {
        return Err(Error::Input(format!(
            "{path}@activations: the file has no activation grids (files from `lbw calibrate` and \
             `lbw finetune` have them)"
        )));
    };
    let model = crate::model::load_builtin(&file.metadata.source_model)?;
    let sim = crate::engine::shift_add::fake_quant_simulation(
        &model.graph,
        &Default::default(),
        &engine,
    )?;
    Ok(Detector::new(model.manifest, "fp32-act8", Box::new(sim)))
}

/// The shift-add engine for a `.lbw` file that carries activation grids, with its bit-width.
fn lbw_file_engine(
    file: &crate::model::lbw_file::LbwFile,
) -> Result<Option<(u8, crate::engine::shift_add::ShiftAddEngine)>> {
    let (Some(bits), false) = (file.metadata.bits, file.activation_scales.is_empty()) else {
        return Ok(None);
    };
    let scales = crate::engine::quant_params::ActivationScales {
        scales: file
            .activation_scales
            .iter()
            .map(|(k, &scale)| {
                let zero_point = file.activation_zero_points.get(k).copied().unwrap_or(0);
                (
                    k.clone(),
                    crate::engine::quant_params::QParams { scale, zero_point },
                )
            })
            .collect(),
    };
    let engine = crate::engine::shift_add::ShiftAddEngine::new(
        &file.graph,
        &file.quantized,
        &scales,
        &crate::engine::shift_add::EngineOptions::from_env()?,
    )?;
    Ok(Some((bits, engine)))
}

/// How many images `ID@lbwB` references calibrate on.
pub const PTQ_CALIBRATION_IMAGES: usize = 8;

/// `ID@lbwB`: quantizes a built-in model's convs to `B`-bit powers of two, calibrates activations on
/// [`PTQ_CALIBRATION_IMAGES`] shared sample images, and runs it on the shift-add engine (kernel
/// from `LBW_KERNEL`, all cores).
pub fn load_ptq_detector(id: &str, variant: &str) -> Result<Detector> {
    use crate::engine::ptq;
    let bits = ptq::parse_lbw_variant(variant).ok_or_else(|| {
        Error::Input(format!(
            "unknown variant {variant:?}: expected lbw2 .. lbw8"
        ))
    })?;
    let model = crate::model::load_builtin(id)?;
    let dir = default_calibration_dir(&model.manifest);
    let images = calibration_inputs(&model.manifest, &dir, PTQ_CALIBRATION_IMAGES)?;
    let built = ptq::build_ptq_engine(
        &model.graph,
        &ptq::default_quantize_options(bits),
        &images,
        crate::engine::quant_params::RangeObserver::MeanMinMax,
        &crate::engine::shift_add::EngineOptions::from_env()?,
    )?;
    Ok(Detector::new(
        model.manifest,
        variant,
        Box::new(built.engine),
    ))
}

/// Shared sample images in the model's domain: VOC photos for 20-class models, COCO otherwise.
pub fn default_calibration_dir(manifest: &Manifest) -> std::path::PathBuf {
    let data = crate::paths::data_dir();
    if manifest.labels.len() == 20 {
        data.join("voc2007-sample").join("JPEGImages")
    } else {
        data.join("coco128").join("images")
    }
}

/// The preprocessed inputs of the first `limit` images (sorted by file name) in `dir`.
pub fn calibration_inputs(
    manifest: &Manifest,
    dir: &std::path::Path,
    limit: usize,
) -> Result<Vec<crate::model::Tensor>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
        })
        .collect();
    files.sort();
    files.truncate(limit);
    if files.is_empty() {
        return Err(Error::Input(format!(
            "no .jpg or .png images in {}",
            dir.display()
        )));
    }
    files
        .iter()
        .map(|f| Ok(preprocess(&crate::detect::image_io::load_rgb(f)?, &manifest.input).0))
        .collect()
}
