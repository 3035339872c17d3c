//! VOC average precision, computed as the PASCAL VOC devkit does.
//!
//! Per class, detections are sorted by score (descending, ties keep input order) and each is
//! compared with every ground-truth box of its image of that class. The box with the highest IoU
//! decides: if that IoU reaches the threshold (`>=`, as the MATLAB devkit and the reference
//! implementation compare) the detection is a true positive when the box is still unmatched, a false
//! positive when it was already matched (a duplicate), and is ignored altogether when the box is
//! `difficult`. Detections overlapping nothing well enough are false positives. `difficult` boxes
//! are not counted as positives.

use std::collections::{BTreeSet, HashMap};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::report::{VocClassAp, VocReport};
use super::voc::GtImage;
use crate::detect::ImageDetections;
use crate::error::Error;

/// How the precision/recall curve is turned into one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Interpolation {
    /// VOC2007: mean of the interpolated precision at recall 0, 0.1, ..., 1.
    ElevenPoint,
    /// VOC2010 and later: area under the interpolated (monotone) curve at every recall step.
    AllPoint,
}

impl FromStr for Interpolation {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "11" | "11-point" | "11point" | "eleven-point" | "voc2007" | "voc07" => {
                Ok(Interpolation::ElevenPoint)
            }
            "all" | "all-point" | "allpoint" | "every-point" | "voc2010" | "voc2012" | "voc12" => {
                Ok(Interpolation::AllPoint)
            }
            _ => Err(Error::Input(format!(
                "unknown interpolation {s:?} (expected 11-point or all-point)"
            ))),
        }
    }
}

impl std::fmt::Display for Interpolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Interpolation::ElevenPoint => "11-point",
            Interpolation::AllPoint => "all-point",
        })
    }
}

/// Options of [`voc_map`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VocOptions {
    /// IoU a detection needs with a ground-truth box to match it.
    pub iou: f64,
    pub interpolation: Interpolation,
    /// The devkit's pixel convention: widths are `x2 - x1 + 1`, so areas and intersections count
    /// pixels of 1-based inclusive boxes. Off: continuous coordinates.
    pub pixel_plus_one: bool,
}

impl Default for VocOptions {
    /// IoU 0.5, all-point, continuous coordinates.
    fn default() -> Self {
        VocOptions {
            iou: 0.5,
            interpolation: Interpolation::AllPoint,
            pixel_plus_one: false,
        }
    }
}

impl VocOptions {
    /// The VOC2007 devkit: IoU 0.5, 11-point, +1 pixel convention.
    pub fn voc2007() -> Self {
        VocOptions {
            iou: 0.5,
            interpolation: Interpolation::ElevenPoint,
            pixel_plus_one: true,
        }
    }

    /// The VOC2010+ devkit: IoU 0.5, all-point, +1 pixel convention.
    pub fn voc2012() -> Self {
        VocOptions {
            interpolation: Interpolation::AllPoint,
            ..Self::voc2007()
        }
    }
}

/// IoU of two `[x1, y1, x2, y2]` boxes, `None` when they do not overlap. The operation order
/// follows the devkit (detection area + ground-truth area - intersection).
fn overlap(det: &[f64; 4], gt: &[f64; 4], plus_one: bool) -> Option<f64> {
    let k = if plus_one { 1.0 } else { 0.0 };
    let iw = det[2].min(gt[2]) - det[0].max(gt[0]) + k;
    let ih = det[3].min(gt[3]) - det[1].max(gt[1]) + k;
    if iw <= 0.0 || ih <= 0.0 {
        return None;
    }
    let inter = iw * ih;
    let union = (det[2] - det[0] + k) * (det[3] - det[1] + k)
        + (gt[2] - gt[0] + k) * (gt[3] - gt[1] + k)
        - inter;
    (union > 0.0).then(|| inter / union)
}

/// Average precision of a precision/recall curve given point by point (recall non-decreasing).
pub fn average_precision(recall: &[f64], precision: &[f64], interpolation: Interpolation) -> f64 {
    match interpolation {
        Interpolation::ElevenPoint => {
            // Thresholds are `i * 0.1` as the Python devkit's `np.arange(0, 1.1, 0.1)` makes them
            // (0.6000000000000001, not 0.6): a recall of exactly 0.6 does not reach that point.
            let sum: f64 = (0..=10)
                .map(|i| {
                    let t = f64::from(i) * 0.1;
                    recall
                        .iter()
                        .zip(precision)
                        .filter(|(r, _)| **r >= t)
                        .map(|(_, p)| *p)
                        .fold(0.0, f64::max)
                })
                .sum();
            sum / 11.0
        }
        Interpolation::AllPoint => {
            let mut mrec = Vec::with_capacity(recall.len() + 2);
            mrec.push(0.0);
            mrec.extend_from_slice(recall);
            mrec.push(1.0);
            let mut mpre = Vec::with_capacity(precision.len() + 2);
            mpre.push(0.0);
            mpre.extend_from_slice(precision);
            mpre.push(0.0);
            for i in (0..mpre.len() - 1).rev() {
                mpre[i] = mpre[i].max(mpre[i + 1]);
            }
            (1..mrec.len())
                .filter(|&i| mrec[i] != mrec[i - 1])
                .map(|i| (mrec[i] - mrec[i - 1]) * mpre[i])
                .sum()
        }
    }
}

/// A detection reduced to what matching needs.
struct Scored {
    image: usize,
    score: f64,
    bbox: [f64; 4],
}

/// VOC AP per class and their mean. Detections are matched to ground truth by image id (file stem)
/// and label; detections on images absent from `gt` are ignored with a warning. Every class that
/// has ground truth or detections gets a row; a class without non-difficult ground truth has no AP
/// and is left out of the mean.
pub fn voc_map(gt: &[GtImage], dets: &[ImageDetections], opts: &VocOptions) -> VocReport {
    let index: HashMap<&str, usize> = gt
        .iter()
        .enumerate()
        .map(|(i, im)| (im.id.as_str(), i))
        .collect();
    if index.len() != gt.len() {
        tracing::warn!("ground truth lists some image ids twice; the last entry of each is used");
    }

    // Per label, in input order.
    let mut by_class: HashMap<&str, Vec<Scored>> = HashMap::new();
    let mut unknown_images = 0usize;
    for im in dets {
        let Some(&i) = index.get(im.image.as_str()) else {
            unknown_images += 1;
            continue;
        };
        for d in &im.detections {
            by_class.entry(d.label.as_str()).or_default().push(Scored {
                image: i,
                score: f64::from(d.score),
                bbox: d.bbox.map(f64::from),
            });
        }
    }
    if unknown_images > 0 {
        tracing::warn!(
            "{unknown_images} detection entries name images that are not in the ground truth; ignored"
        );
    }

    let mut classes: BTreeSet<&str> = by_class.keys().copied().collect();
    classes.extend(
        gt.iter()
            .flat_map(|im| im.objects.iter().map(|o| o.class.as_str())),
    );

    let rows: Vec<VocClassAp> = classes
        .into_iter()
        .map(|class| class_ap(gt, class, by_class.remove(class).unwrap_or_default(), opts))
        .collect();
    let with_ap: Vec<f64> = rows.iter().filter_map(|r| r.ap).collect();
    let map = (!with_ap.is_empty()).then(|| with_ap.iter().sum::<f64>() / with_ap.len() as f64);
    VocReport {
        options: *opts,
        num_images: gt.len(),
        classes: rows,
        map,
    }
}

fn class_ap(gt: &[GtImage], class: &str, mut dets: Vec<Scored>, opts: &VocOptions) -> VocClassAp {
    // Ground truth of this class per image: (box, difficult, already matched).
    let mut boxes: Vec<Vec<([f64; 4], bool, bool)>> = gt
        .iter()
        .map(|im| {
            im.objects
                .iter()
                .filter(|o| o.class == class)
                .map(|o| (o.bbox, o.difficult, false))
                .collect()
        })
        .collect();
    let num_difficult = boxes.iter().flatten().filter(|b| b.1).count();
    let num_gt = boxes.iter().flatten().count() - num_difficult;
    let num_dets = dets.len();

    // Stable, so equal scores keep their input order like the reference's sort.
    dets.sort_by(|a, b| {
        b.score
            .partial_cmp(&a.score)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut recall = Vec::with_capacity(dets.len());
    let mut precision = Vec::with_capacity(dets.len());
    for det in &dets {
        let mut best: Option<(f64, usize)> = None;
        for (j, (g, _, _)) in boxes[det.image].iter().enumerate() {
            if let Some(o) = overlap(&det.bbox, g, opts.pixel_plus_one)
                && best.is_none_or(|(b, _)| o > b)
            {
                best = Some((o, j));
            }
        }
        match best {
            Some((o, j)) if o >= opts.iou => {
                let g = &mut boxes[det.image][j];
                if g.1 {
                    // Matching a difficult box neither helps nor hurts; the devkit records neither.
                    continue;
                }
                if g.2 {
                    fp += 1;
                } else {
                    g.2 = true;
                    tp += 1;
                }
            }
            _ => fp += 1,
        }
        recall.push(tp as f64 / num_gt as f64);
        precision.push(tp as f64 / (tp + fp) as f64);
    }
    let ap = (num_gt > 0).then(|| average_precision(&recall, &precision, opts.interpolation));
    VocClassAp {
        class: class.to_string(),
        ap,
        num_gt,
        num_difficult,
        num_dets,
        true_positives: tp,
        recall: (num_gt > 0).then(|| tp as f64 / num_gt as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::Detection;
    use crate::eval::voc::GtObject;

    fn gt_image(id: &str, objects: &[(&str, [f64; 4], bool)]) -> GtImage {
        GtImage {
            id: id.into(),
            path: id.into(),
            width: 100,
            height: 100,
            objects: objects
                .iter()
                .map(|(c, b, d)| GtObject {
                    class: (*c).into(),
                    bbox: *b,
                    difficult: *d,
                })
                .collect(),
        }
    }

    fn dets(id: &str, list: &[(&str, f32, [f32; 4])]) -> ImageDetections {
        ImageDetections {
            image: id.into(),
            width: 100,
            height: 100,
            detections: list
                .iter()
                .map(|(l, s, b)| Detection {
                    class_id: 0,
                    label: (*l).into(),
                    score: *s,
                    bbox: *b,
                })
                .collect(),
        }
    }

    #[test]
    fn difficult_boxes_neither_count_nor_penalise() {
        let gt = [gt_image(
            "a",
            &[
                ("cat", [10.0, 10.0, 50.0, 50.0], false),
                ("cat", [60.0, 60.0, 90.0, 90.0], true),
            ],
        )];
        // The highest-scoring detection hits the difficult box: ignored, so AP stays 1.
        let d = [dets(
            "a",
            &[
                ("cat", 0.9, [60.0, 60.0, 90.0, 90.0]),
                ("cat", 0.8, [10.0, 10.0, 50.0, 50.0]),
            ],
        )];
        let r = voc_map(&gt, &d, &VocOptions::default());
        let row = &r.classes[0];
        assert_eq!((row.num_gt, row.num_difficult, row.num_dets), (1, 1, 2));
        assert_eq!(row.ap, Some(1.0));
        // Without the flag the same detection is a false positive ranked first.
        let mut gt2 = gt.clone();
        gt2[0].objects[1].difficult = false;
        let r2 = voc_map(&gt2, &d, &VocOptions::default());
        assert_eq!(r2.classes[0].num_gt, 2);
        assert_eq!(r2.classes[0].ap, Some(1.0));
        let mut d3 = d.clone();
        d3[0].detections[0].bbox = [0.0, 60.0, 20.0, 90.0];
        let r3 = voc_map(&gt, &d3, &VocOptions::default());
        assert_eq!(r3.classes[0].ap, Some(0.5));
    }

    #[test]
    fn duplicates_are_false_positives_and_classes_without_gt_have_no_ap() {
        let gt = [gt_image("a", &[("cat", [10.0, 10.0, 50.0, 50.0], false)])];
        let d = [dets(
            "a",
            &[
                ("cat", 0.9, [10.0, 10.0, 50.0, 50.0]),
                ("cat", 0.8, [11.0, 10.0, 50.0, 50.0]),
                ("dog", 0.8, [11.0, 10.0, 50.0, 50.0]),
            ],
        )];
        let r = voc_map(&gt, &d, &VocOptions::voc2007());
        assert_eq!(r.classes.len(), 2);
        assert_eq!(r.classes[0].true_positives, 1);
        assert_eq!(r.classes[0].ap, Some(1.0));
        assert_eq!(r.classes[1].class, "dog");
        assert_eq!(r.classes[1].ap, None);
        assert_eq!(r.map, Some(1.0));
    }

    #[test]
    fn interpolations_on_a_known_curve() {
        // Recall 0.5 at precision 1, then recall 1 at precision 0.5.
        let (r, p) = ([0.5, 0.5, 1.0], [1.0, 0.5, 2.0 / 3.0]);
        let all = average_precision(&r, &p, Interpolation::AllPoint);
        assert!((all - (0.5 + 0.5 * 2.0 / 3.0)).abs() < 1e-12);
        let eleven = average_precision(&r, &p, Interpolation::ElevenPoint);
        assert!((eleven - (6.0 + 5.0 * 2.0 / 3.0) / 11.0).abs() < 1e-12);
        assert_eq!(
            "11-point".parse::<Interpolation>().unwrap(),
            Interpolation::ElevenPoint
        );
        assert!("bogus".parse::<Interpolation>().is_err());
    }
}
