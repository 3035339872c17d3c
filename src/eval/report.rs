//! Evaluation results: serialisable reports and their human-readable tables.

use std::fmt::Write as _;

use serde::Serialize;

use super::ap::VocOptions;

/// One class of a VOC evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VocClassAp {
    pub class: String,
    /// `None` when the class has no non-difficult ground truth (it is then left out of the mean).
    pub ap: Option<f64>,
    /// Non-difficult ground-truth boxes (the positives).
    pub num_gt: usize,
    pub num_difficult: usize,
    /// Detections of the class on images of the dataset.
    pub num_dets: usize,
    pub true_positives: usize,
    /// Recall with every detection kept; `None` when there are no positives.
    pub recall: Option<f64>,
}

/// Result of [`voc_map`](super::voc_map).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VocReport {
    pub options: VocOptions,
    pub num_images: usize,
    /// One row per class with ground truth or detections, sorted by name.
    pub classes: Vec<VocClassAp>,
    /// Mean of the classes' AP over the classes that have one; `None` if none has.
    pub map: Option<f64>,
}

/// The 12 numbers pycocotools' `COCOeval.summarize()` prints, in its order. As there, `-1` means
/// "undefined" (no ground truth in that area range, for instance).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CocoStats {
    /// AP @ IoU 0.50:0.95, all areas, 100 detections.
    #[serde(rename = "AP")]
    pub ap: f64,
    #[serde(rename = "AP50")]
    pub ap50: f64,
    #[serde(rename = "AP75")]
    pub ap75: f64,
    #[serde(rename = "APs")]
    pub ap_small: f64,
    #[serde(rename = "APm")]
    pub ap_medium: f64,
    #[serde(rename = "APl")]
    pub ap_large: f64,
    #[serde(rename = "AR1")]
    pub ar1: f64,
    #[serde(rename = "AR10")]
    pub ar10: f64,
    #[serde(rename = "AR100")]
    pub ar100: f64,
    #[serde(rename = "ARs")]
    pub ar_small: f64,
    #[serde(rename = "ARm")]
    pub ar_medium: f64,
    #[serde(rename = "ARl")]
    pub ar_large: f64,
}

const SUMMARY_LINES: [(&str, &str, &str, u32); 12] = [
    ("Average Precision", "0.50:0.95", "all", 100),
    ("Average Precision", "0.50", "all", 100),
    ("Average Precision", "0.75", "all", 100),
    ("Average Precision", "0.50:0.95", "small", 100),
    ("Average Precision", "0.50:0.95", "medium", 100),
    ("Average Precision", "0.50:0.95", "large", 100),
    ("Average Recall", "0.50:0.95", "all", 1),
    ("Average Recall", "0.50:0.95", "all", 10),
    ("Average Recall", "0.50:0.95", "all", 100),
    ("Average Recall", "0.50:0.95", "small", 100),
    ("Average Recall", "0.50:0.95", "medium", 100),
    ("Average Recall", "0.50:0.95", "large", 100),
];

impl CocoStats {
    pub fn to_array(&self) -> [f64; 12] {
        [
            self.ap,
            self.ap50,
            self.ap75,
            self.ap_small,
            self.ap_medium,
            self.ap_large,
            self.ar1,
            self.ar10,
            self.ar100,
            self.ar_small,
            self.ar_medium,
            self.ar_large,
        ]
    }

    pub(crate) fn from_array(s: [f64; 12]) -> Self {
        CocoStats {
            ap: s[0],
            ap50: s[1],
            ap75: s[2],
            ap_small: s[3],
            ap_medium: s[4],
            ap_large: s[5],
            ar1: s[6],
            ar10: s[7],
            ar100: s[8],
            ar_small: s[9],
            ar_medium: s[10],
            ar_large: s[11],
        }
    }

    /// The 12 lines in pycocotools' wording, so results can be compared with its output by eye.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for ((kind, iou, area, max_dets), value) in SUMMARY_LINES.iter().zip(self.to_array()) {
            let short = if kind.contains("Precision") {
                "AP"
            } else {
                "AR"
            };
            let _ = writeln!(
                out,
                " {kind:<18} ({short}) @[ IoU={iou:<9} | area={area:>6} | maxDets={max_dets:>3} ] = {value:.3}"
            );
        }
        out
    }
}

/// One category of a COCO evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CocoClassAp {
    pub category_id: u64,
    pub name: String,
    /// AP @ IoU 0.50:0.95 (all areas, 100 detections); `None` without non-crowd ground truth.
    pub ap: Option<f64>,
    /// AP @ IoU 0.50 (101-point, all areas, 100 detections).
    pub ap50: Option<f64>,
    /// Non-crowd ground-truth boxes.
    pub num_gt: usize,
    pub num_crowd: usize,
    pub num_dets: usize,
}

/// Result of [`coco_eval`](super::coco_eval).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CocoReport {
    pub stats: CocoStats,
    /// One row per category of the dataset, in category id order.
    pub classes: Vec<CocoClassAp>,
    pub num_images: usize,
    /// Detections that took part (on known images and categories).
    pub num_dets: usize,
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"))
}

impl VocReport {
    /// A per-class table followed by the mean, one class per line.
    pub fn table(&self) -> String {
        let width = self
            .classes
            .iter()
            .map(|c| c.class.len())
            .max()
            .unwrap_or(0)
            .max(5);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "VOC AP@{} ({}, {} coordinates) on {} images",
            self.options.iou,
            self.options.interpolation,
            if self.options.pixel_plus_one {
                "+1 pixel"
            } else {
                "continuous"
            },
            self.num_images
        );
        let _ = writeln!(
            out,
            "{:<width$}  {:>6}  {:>5}  {:>6}  {:>6}  {:>6}  {:>6}",
            "class", "gt", "diff", "dets", "tp", "recall", "AP"
        );
        for c in &self.classes {
            let _ = writeln!(
                out,
                "{:<width$}  {:>6}  {:>5}  {:>6}  {:>6}  {:>6}  {:>6}",
                c.class,
                c.num_gt,
                c.num_difficult,
                c.num_dets,
                c.true_positives,
                opt(c.recall),
                opt(c.ap)
            );
        }
        let counted = self.classes.iter().filter(|c| c.ap.is_some()).count();
        let _ = writeln!(
            out,
            "{:<width$}  mAP over {counted} classes = {}",
            "mean",
            opt(self.map)
        );
        out
    }
}

impl CocoReport {
    /// A per-category table (categories without ground truth or detections are left out) followed
    /// by the pycocotools summary.
    pub fn table(&self) -> String {
        let rows: Vec<&CocoClassAp> = self
            .classes
            .iter()
            .filter(|c| c.num_gt + c.num_crowd + c.num_dets > 0)
            .collect();
        let width = rows.iter().map(|c| c.name.len()).max().unwrap_or(0).max(8);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "COCO bbox evaluation on {} images, {} detections",
            self.num_images, self.num_dets
        );
        let _ = writeln!(
            out,
            "{:<width$}  {:>6}  {:>5}  {:>6}  {:>6}  {:>6}",
            "category", "gt", "crowd", "dets", "AP", "AP50"
        );
        for c in rows {
            let _ = writeln!(
                out,
                "{:<width$}  {:>6}  {:>5}  {:>6}  {:>6}  {:>6}",
                c.name,
                c.num_gt,
                c.num_crowd,
                c.num_dets,
                opt(c.ap),
                opt(c.ap50)
            );
        }
        out.push_str(&self.stats.summary());
        out
    }
}
