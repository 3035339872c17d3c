//! COCO bbox evaluation, done the way pycocotools' `COCOeval` does it (evaluate, accumulate,
//! summarize), so its 12 numbers come out identical.
//!
//! The details that decide the last digits, all as in pycocotools:
//! - IoU thresholds `0.5 + i * 0.05` as `np.linspace` makes them, recall thresholds `i / 100`,
//!   precision interpolated at those 101 recalls.
//! - Per image and category, detections sorted by score (stable) and cut at 100; each, in order,
//!   takes the unmatched ground truth with the highest IoU at or above the threshold, preferring
//!   regular ground truth over ignored (crowd or out-of-area) ground truth. A crowd region can take
//!   any number of detections and its IoU is intersection / detection area.
//! - A ground truth's area range is decided by its `area` field, a detection's by `w * h`;
//!   unmatched detections outside the range are ignored.
//! - Across images, detections are merged by score with ties in image-id order.
//!
//! One deliberate difference: pycocotools records a match as the ground truth's id and treats id 0
//! as "unmatched"; here a match is a flag, so an annotation with id 0 is not lost.

use std::cmp::Ordering;
use std::collections::HashMap;

use super::coco::{CocoAnnotation, CocoDataset, CocoDetection};
use super::report::{CocoClassAp, CocoReport, CocoStats};
use crate::detect::ImageDetections;

/// all, small, medium, large, bounds inclusive as in pycocotools.
const AREA_RANGES: [(f64, f64); 4] = [
    (0.0, 1e10),
    (0.0, 32.0 * 32.0),
    (32.0 * 32.0, 96.0 * 96.0),
    (96.0 * 96.0, 1e10),
];
const MAX_DETS: [usize; 3] = [1, 10, 100];
const T: usize = 10;
const R: usize = 101;
const A: usize = AREA_RANGES.len();
const M: usize = MAX_DETS.len();

/// `np.linspace(.5, .95, 10)`: `start + i * step`, with the last value set to `stop` exactly.
fn iou_thresholds() -> [f64; T] {
    let step = (0.95 - 0.5) / (T - 1) as f64;
    let mut t = [0.0; T];
    for (i, v) in t.iter_mut().enumerate() {
        *v = i as f64 * step + 0.5;
    }
    t[T - 1] = 0.95;
    t
}

/// `np.linspace(0, 1, 101)`.
fn recall_thresholds() -> [f64; R] {
    let step = 1.0 / (R - 1) as f64;
    let mut r = [0.0; R];
    for (i, v) in r.iter_mut().enumerate() {
        *v = i as f64 * step;
    }
    r[R - 1] = 1.0;
    r
}

/// IoU of `[x, y, w, h]` boxes as pycocotools' `bbIou` computes it, operation for operation.
fn bbox_iou(dt: &[f64; 4], gt: &[f64; 4], crowd: bool) -> f64 {
    let w = (dt[2] + dt[0]).min(gt[2] + gt[0]) - dt[0].max(gt[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (dt[3] + dt[1]).min(gt[3] + gt[1]) - dt[1].max(gt[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let inter = w * h;
    let da = dt[2] * dt[3];
    let union = if crowd {
        da
    } else {
        da + gt[2] * gt[3] - inter
    };
    inter / union
}

fn by_score_desc(a: f64, b: f64) -> Ordering {
    b.partial_cmp(&a).unwrap_or(Ordering::Equal)
}

/// Matching of one image and category in one area range (pycocotools' `evaluateImg`).
struct EvalImg {
    /// Scores of the (sorted, at most 100) detections.
    scores: Vec<f64>,
    /// `T x D`, row-major: the detection matched a ground truth at threshold t.
    matched: Vec<bool>,
    /// `T x D`: the detection counts neither way (matched an ignored ground truth, or unmatched and
    /// outside the area range).
    ignored: Vec<bool>,
    /// Per ground truth: crowd or outside the area range.
    gt_ignored: Vec<bool>,
}

fn evaluate_img(
    gt: &[&CocoAnnotation],
    dt: &[&CocoDetection],
    ious: &[f64],
    (lo, hi): (f64, f64),
    thresholds: &[f64; T],
) -> EvalImg {
    let (g_n, d_n) = (gt.len(), dt.len());
    let ignore: Vec<bool> = gt
        .iter()
        .map(|g| g.iscrowd || g.area < lo || g.area > hi)
        .collect();
    // Regular ground truth first (a stable sort, as pycocotools' mergesort), so a detection stops
    // looking once it holds a regular match and only ignored ones remain.
    let mut order: Vec<usize> = (0..g_n).collect();
    order.sort_by_key(|&j| ignore[j]);
    let gt_ignored: Vec<bool> = order.iter().map(|&j| ignore[j]).collect();
    let crowd: Vec<bool> = order.iter().map(|&j| gt[j].iscrowd).collect();

    let mut gt_matched = vec![false; T * g_n];
    let mut matched = vec![false; T * d_n];
    let mut ignored = vec![false; T * d_n];
    for (t, &thr) in thresholds.iter().enumerate() {
        for d in 0..d_n {
            let mut best = thr.min(1.0 - 1e-10);
            let mut m: Option<usize> = None;
            for g in 0..g_n {
                if gt_matched[t * g_n + g] && !crowd[g] {
                    continue;
                }
                if let Some(mm) = m
                    && !gt_ignored[mm]
                    && gt_ignored[g]
                {
                    break;
                }
                let iou = ious[d * g_n + order[g]];
                if iou < best {
                    continue;
                }
                best = iou;
                m = Some(g);
            }
            if let Some(g) = m {
                ignored[t * d_n + d] = gt_ignored[g];
                matched[t * d_n + d] = true;
                gt_matched[t * g_n + g] = true;
            }
        }
    }
    for (d, det) in dt.iter().enumerate() {
        let area = det.bbox[2] * det.bbox[3];
        if area < lo || area > hi {
            for t in 0..T {
                if !matched[t * d_n + d] {
                    ignored[t * d_n + d] = true;
                }
            }
        }
    }
    EvalImg {
        scores: dt.iter().map(|d| d.score).collect(),
        matched,
        ignored,
        gt_ignored,
    }
}

/// Mean of the entries that are not -1 (pycocotools' marker for "undefined"), or -1 if none.
fn mean_defined(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values
        .filter(|v| *v > -1.0)
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { -1.0 } else { sum / n as f64 }
}

/// COCO bbox evaluation of detections given as [`ImageDetections`] (images by file stem, labels
/// by category name through [`voc_to_coco_name`](super::voc_to_coco_name)).
pub fn coco_eval(coco: &CocoDataset, dets: &[ImageDetections]) -> CocoReport {
    coco_eval_results(coco, &coco.results_from_detections(dets))
}

/// COCO bbox evaluation of detections in COCO results form; as pycocotools, every image and
/// category of the dataset takes part. Detections on undeclared images are dropped with a warning
/// (pycocotools refuses them); those of undeclared categories are ignored (as there).
pub fn coco_eval_results(coco: &CocoDataset, dets: &[CocoDetection]) -> CocoReport {
    let mut img_ids: Vec<u64> = coco.images.iter().map(|i| i.id).collect();
    img_ids.sort_unstable();
    img_ids.dedup();
    let mut cat_ids: Vec<u64> = coco.categories.iter().map(|c| c.id).collect();
    cat_ids.sort_unstable();
    cat_ids.dedup();
    let (n_img, n_cat) = (img_ids.len(), cat_ids.len());
    let img_index: HashMap<u64, usize> =
        img_ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let cat_index: HashMap<u64, usize> =
        cat_ids.iter().enumerate().map(|(k, &id)| (id, k)).collect();

    // Per (category, image), in file order.
    let mut gts: Vec<Vec<&CocoAnnotation>> = vec![Vec::new(); n_cat * n_img];
    for a in &coco.annotations {
        if let (Some(&k), Some(&i)) = (cat_index.get(&a.category_id), img_index.get(&a.image_id)) {
            gts[k * n_img + i].push(a);
        }
    }
    let mut dts: Vec<Vec<&CocoDetection>> = vec![Vec::new(); n_cat * n_img];
    let mut unknown_images = 0usize;
    let mut num_dets = 0usize;
    let mut dets_per_cat = vec![0usize; n_cat];
    for d in dets {
        let Some(&i) = img_index.get(&d.image_id) else {
            unknown_images += 1;
            continue;
        };
        if let Some(&k) = cat_index.get(&d.category_id) {
            dts[k * n_img + i].push(d);
            num_dets += 1;
            dets_per_cat[k] += 1;
        }
    }
    if unknown_images > 0 {
        tracing::warn!("{unknown_images} detections name images not in the dataset; ignored");
    }

    let thresholds = iou_thresholds();
    let max_det = MAX_DETS[M - 1];
    // Indexed [(k * A + a) * n_img + i]; None where the image has neither ground truth nor
    // detections of the category.
    let mut evals: Vec<Option<EvalImg>> = (0..n_cat * A * n_img).map(|_| None).collect();
    for k in 0..n_cat {
        for i in 0..n_img {
            let gt = &gts[k * n_img + i];
            let mut dt = dts[k * n_img + i].clone();
            if gt.is_empty() && dt.is_empty() {
                continue;
            }
            dt.sort_by(|a, b| by_score_desc(a.score, b.score));
            dt.truncate(max_det);
            let ious: Vec<f64> = dt
                .iter()
                .flat_map(|d| gt.iter().map(|g| bbox_iou(&d.bbox, &g.bbox, g.iscrowd)))
                .collect();
            for (a, &range) in AREA_RANGES.iter().enumerate() {
                evals[(k * A + a) * n_img + i] =
                    Some(evaluate_img(gt, &dt, &ious, range, &thresholds));
            }
        }
    }

    // accumulate: precision [T][R][K][A][M] and recall [T][K][A][M], -1 where undefined.
    let recall_thr = recall_thresholds();
    let p_idx = |t: usize, r: usize, k: usize, a: usize, m: usize| {
        (((t * R + r) * n_cat + k) * A + a) * M + m
    };
    let r_idx = |t: usize, k: usize, a: usize, m: usize| ((t * n_cat + k) * A + a) * M + m;
    let mut precision = vec![-1.0; T * R * n_cat * A * M];
    let mut recall = vec![-1.0; T * n_cat * A * M];
    for k in 0..n_cat {
        for a in 0..A {
            let es: Vec<&EvalImg> = evals[(k * A + a) * n_img..(k * A + a + 1) * n_img]
                .iter()
                .flatten()
                .collect();
            if es.is_empty() {
                continue;
            }
            let npig = es
                .iter()
                .map(|e| e.gt_ignored.iter().filter(|g| !**g).count())
                .sum::<usize>();
            if npig == 0 {
                continue;
            }
            for (m, &max_det) in MAX_DETS.iter().enumerate() {
                // (score, image entry, detection), merged by score; ties stay in image order.
                let mut merged: Vec<(f64, usize, usize)> = es
                    .iter()
                    .enumerate()
                    .flat_map(|(ei, e)| {
                        e.scores
                            .iter()
                            .take(max_det)
                            .enumerate()
                            .map(move |(d, &s)| (s, ei, d))
                    })
                    .collect();
                merged.sort_by(|x, y| by_score_desc(x.0, y.0));
                for t in 0..T {
                    let (mut tp, mut fp) = (0.0f64, 0.0f64);
                    let mut rc = Vec::with_capacity(merged.len());
                    let mut pr = Vec::with_capacity(merged.len());
                    for &(_, ei, d) in &merged {
                        let e = es[ei];
                        let at = t * e.scores.len() + d;
                        if !e.ignored[at] {
                            if e.matched[at] {
                                tp += 1.0;
                            } else {
                                fp += 1.0;
                            }
                        }
                        rc.push(tp / npig as f64);
                        pr.push(tp / (fp + tp + f64::EPSILON));
                    }
                    recall[r_idx(t, k, a, m)] = rc.last().copied().unwrap_or(0.0);
                    for i in (1..pr.len()).rev() {
                        if pr[i] > pr[i - 1] {
                            pr[i - 1] = pr[i];
                        }
                    }
                    for (r, &thr) in recall_thr.iter().enumerate() {
                        let at = rc.partition_point(|&x| x < thr);
                        precision[p_idx(t, r, k, a, m)] = pr.get(at).copied().unwrap_or(0.0);
                    }
                }
            }
        }
    }

    // summarize
    let ap = |ts: std::ops::Range<usize>, ks: std::ops::Range<usize>, a: usize, m: usize| {
        mean_defined(
            ts.flat_map(|t| {
                let ks = ks.clone();
                (0..R).flat_map(move |r| ks.clone().map(move |k| (t, r, k)))
            })
            .map(|(t, r, k)| precision[p_idx(t, r, k, a, m)]),
        )
    };
    let ar = |a: usize, m: usize| {
        mean_defined(
            (0..T)
                .flat_map(|t| (0..n_cat).map(move |k| (t, k)))
                .map(|(t, k)| recall[r_idx(t, k, a, m)]),
        )
    };
    let all = 0..n_cat;
    let last = M - 1;
    let stats = CocoStats::from_array([
        ap(0..T, all.clone(), 0, last),
        ap(0..1, all.clone(), 0, last),
        ap(5..6, all.clone(), 0, last),
        ap(0..T, all.clone(), 1, last),
        ap(0..T, all.clone(), 2, last),
        ap(0..T, all.clone(), 3, last),
        ar(0, 0),
        ar(0, 1),
        ar(0, 2),
        ar(1, last),
        ar(2, last),
        ar(3, last),
    ]);

    let names: HashMap<u64, &str> = coco
        .categories
        .iter()
        .map(|c| (c.id, c.name.as_str()))
        .collect();
    let defined = |v: f64| (v > -1.0).then_some(v);
    let classes = cat_ids
        .iter()
        .enumerate()
        .map(|(k, &id)| {
            let anns = gts[k * n_img..(k + 1) * n_img].iter().flatten();
            let num_crowd = anns.clone().filter(|a| a.iscrowd).count();
            CocoClassAp {
                category_id: id,
                name: names.get(&id).copied().unwrap_or_default().to_string(),
                ap: defined(ap(0..T, k..k + 1, 0, last)),
                ap50: defined(ap(0..1, k..k + 1, 0, last)),
                num_gt: anns.count() - num_crowd,
                num_crowd,
                num_dets: dets_per_cat[k],
            }
        })
        .collect();
    CocoReport {
        stats,
        classes,
        num_images: n_img,
        num_dets,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_match_numpy_linspace() {
        let t = iou_thresholds();
        assert_eq!(t[5], 0.75);
        assert_eq!(t[8], 0.8999999999999999);
        assert_eq!(recall_thresholds()[100], 1.0);
    }

    #[test]
    fn crowd_iou_divides_by_detection_area() {
        let gt = [0.0, 0.0, 100.0, 100.0];
        let dt = [50.0, 50.0, 100.0, 100.0];
        assert_eq!(bbox_iou(&dt, &gt, true), 0.25);
        assert!((bbox_iou(&dt, &gt, false) - 2500.0 / 17500.0).abs() < 1e-15);
        assert_eq!(bbox_iou(&[200.0, 0.0, 5.0, 5.0], &gt, false), 0.0);
    }
}
