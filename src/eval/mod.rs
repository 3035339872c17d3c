//! Evaluation: VOC and COCO mean average precision, reproducing the reference implementations
//! (PASCAL VOC devkit, pycocotools `COCOeval`) number for number.
//!
//! # API
//!
//! ```text
//! // Ground truth
//! VocDataset::load(root, split) -> Result<VocDataset>           // VOCdevkit layout; .images: Vec<GtImage>
//! CocoDataset::load(instances_json, images_dir) -> Result<CocoDataset>
//! CocoDataset::restrict_to_classes(&self, names: &[S]) -> CocoDataset   // VOC names are mapped
//! CocoDataset::to_gt_images(&self) -> Vec<GtImage>              // crowd regions become `difficult`
//! load_text_gt(dir) -> Result<Vec<GtImage>>                     // `class x y w h` reference files
//! // Detections (crate::detect::ImageDetections: image = file stem, label, score, [x1, y1, x2, y2])
//! load_text_detections(dir) -> Result<Vec<ImageDetections>>     // `class conf x y w h` files
//! load_coco_results(json) -> Result<Vec<CocoDetection>>         // results list or {annotations: [...]}
//! CocoDataset::results_from_detections(&self, &[ImageDetections]) -> Vec<CocoDetection>
//! // Metrics
//! voc_map(&[GtImage], &[ImageDetections], &VocOptions) -> VocReport
//! voc_map_on_coco(&CocoDataset, &[ImageDetections], labels: &[S], &VocOptions) -> VocReport
//! voc_inputs_on_coco(&CocoDataset, &[ImageDetections], labels: &[S]) -> (Vec<GtImage>, Vec<ImageDetections>)
//! voc_map_bootstrap(&[GtImage], &[ImageDetections], baseline, &VocOptions, resamples, seed) -> BootstrapReport
//! coco_eval(&CocoDataset, &[ImageDetections]) -> CocoReport
//! coco_eval_results(&CocoDataset, &[CocoDetection]) -> CocoReport
//! average_precision(recall, precision, Interpolation) -> f64
//! // Options and reports
//! VocOptions { iou, interpolation: Interpolation::{ElevenPoint, AllPoint}, pixel_plus_one }
//!     ::default() (0.5, all-point, continuous), ::voc2007(), ::voc2012()
//! VocReport { options, num_images, classes: Vec<VocClassAp>, map: Option<f64> }.table() -> String
//! CocoReport { stats: CocoStats (12 numbers), classes: Vec<CocoClassAp>, .. }.table() -> String
//! CocoStats::to_array() -> [f64; 12], ::summary() -> String (pycocotools' wording)
//! // Class names
//! VOC_CLASSES, voc_to_coco_name(&str) -> &str, coco_to_voc_name(&str) -> &str
//! ```
//!
//! # Conventions
//!
//! - Detections are matched to ground truth by image id (the image file's stem) and by label name.
//!   COCO categories are looked up through [`voc_to_coco_name`], so a VOC detector's labels
//!   (`aeroplane`, `tvmonitor`, ...) find `airplane`, `tv`, ...
//! - VOC AP ([`voc_map`]) follows the devkit: greedy in score order, each detection judged against
//!   the ground-truth box it overlaps most (a duplicate on an already matched box is a false
//!   positive), `difficult` boxes neither counted nor penalised. Classes without ground truth get
//!   no AP and stay out of the mean.
//! - COCO ([`coco_eval`]) follows pycocotools for bounding boxes: IoU .50:.05:.95, 101 recall
//!   points, area ranges by the annotation's `area` field, maxDets 1/10/100, crowd handling.
//! - Loaders never panic on bad data: malformed files are [`Error::Data`](crate::Error::Data)
//!   naming the file, and boxes outside the image are clipped and degenerate ones skipped with a
//!   `tracing::warn!` (also listed in [`VocDataset::warnings`]).
//! - Coordinates are `f64` throughout; the detector's `f32` boxes are widened on the way in.

mod ap;
mod bootstrap;
mod classes;
mod coco;
mod cocoeval;
mod report;
mod voc;

pub use ap::{Interpolation, VocOptions, average_precision, voc_map};
pub use bootstrap::{BootstrapReport, PairedDifference, voc_map_bootstrap};
pub use classes::{VOC_CLASSES, coco_to_voc_name, voc_to_coco_name};
pub use coco::{
    CocoAnnotation, CocoCategory, CocoDataset, CocoDetection, CocoImage, load_coco_results,
    voc_inputs_on_coco, voc_map_on_coco,
};
pub use cocoeval::{coco_eval, coco_eval_results};
pub use report::{CocoClassAp, CocoReport, CocoStats, VocClassAp, VocReport};
pub use voc::{GtImage, GtObject, VocDataset, gt_classes, load_text_detections, load_text_gt};
pub(crate) use voc::{clip_box, read_voc_xml};
