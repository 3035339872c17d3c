//! How much of a mAP difference is the test set's luck: bootstrap intervals over images.
//!
//! A VOC-class mAP on coco128 rests on about 300 boxes, 4 to 46 per class, so one more true
//! positive moves a class's AP by up to 0.3 and the mean by a point or more. Before a variant is
//! called "within 1.0 mAP of FP32", the interval says whether the set can tell. Resampling images
//! (not boxes) keeps each image's objects and detections together, as the test set was drawn.
//! The paired version resamples both models' detections on the same images, which cancels most of
//! the per-image difficulty that the two share.

use std::collections::HashMap;

use serde::Serialize;

use super::{GtImage, VocOptions, voc_map};
use crate::detect::ImageDetections;

/// Percentile intervals from image resamples.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BootstrapReport {
    pub resamples: usize,
    /// Central probability of the intervals (0.95).
    pub level: f64,
    pub seed: u64,
    /// mAP interval of the evaluated detections.
    pub map: [f64; 2],
    /// mAP minus the baseline's on the same resamples: mean and interval.
    pub difference: Option<PairedDifference>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairedDifference {
    /// The baseline's mAP on the full set.
    pub baseline_map: f64,
    pub mean: f64,
    pub interval: [f64; 2],
}

/// Bootstraps VOC mAP over the images of `gt`: `resamples` draws of as many images, with
/// replacement, from a fixed seed. Resamples where no class has ground truth are skipped.
pub fn voc_map_bootstrap(
    gt: &[GtImage],
    dets: &[ImageDetections],
    baseline: Option<&[ImageDetections]>,
    opts: &VocOptions,
    resamples: usize,
    seed: u64,
) -> BootstrapReport {
    let by_image = |d: &[ImageDetections]| -> HashMap<String, ImageDetections> {
        d.iter().map(|im| (im.image.clone(), im.clone())).collect()
    };
    let ours = by_image(dets);
    let theirs = baseline.map(by_image);
    let mut rng = Xorshift64Star::new(seed);
    let mut maps = Vec::with_capacity(resamples);
    let mut diffs = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        let picks: Vec<usize> = (0..gt.len()).map(|_| rng.below(gt.len())).collect();
        // Each drawn copy becomes its own image, so a twice-drawn image counts twice.
        let sample_gt: Vec<GtImage> = picks
            .iter()
            .enumerate()
            .map(|(slot, &i)| GtImage {
                id: format!("{}#{slot}", gt[i].id),
                ..gt[i].clone()
            })
            .collect();
        let sample = |by: &HashMap<String, ImageDetections>| -> Vec<ImageDetections> {
            picks
                .iter()
                .enumerate()
                .filter_map(|(slot, &i)| {
                    by.get(&gt[i].id).map(|im| ImageDetections {
                        image: format!("{}#{slot}", gt[i].id),
                        ..im.clone()
                    })
                })
                .collect()
        };
        let Some(m) = voc_map(&sample_gt, &sample(&ours), opts).map else {
            continue;
        };
        maps.push(m);
        if let Some(b) = theirs
            .as_ref()
            .and_then(|t| voc_map(&sample_gt, &sample(t), opts).map)
        {
            diffs.push(m - b);
        }
    }
    let level = 0.95;
    let difference = baseline.map(|b| PairedDifference {
        baseline_map: voc_map(gt, b, opts).map.unwrap_or(0.0),
        mean: diffs.iter().sum::<f64>() / diffs.len().max(1) as f64,
        interval: percentile_interval(&mut diffs, level),
    });
    BootstrapReport {
        resamples: maps.len(),
        level,
        seed,
        map: percentile_interval(&mut maps, level),
        difference,
    }
}

/// The `(1 - level) / 2` and `(1 + level) / 2` quantiles (nearest rank); `[NaN, NaN]` if empty.
fn percentile_interval(values: &mut [f64], level: f64) -> [f64; 2] {
    if values.is_empty() {
        return [f64::NAN, f64::NAN];
    }
    values.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let i = (q * (values.len() - 1) as f64).round() as usize;
        values[i.min(values.len() - 1)]
    };
    [at((1.0 - level) / 2.0), at((1.0 + level) / 2.0)]
}

/// Marsaglia's xorshift64*: enough for choosing images, and a fixed seed gives the same report.
struct Xorshift64Star(u64);

impl Xorshift64Star {
    fn new(seed: u64) -> Self {
        // A zero state would stay zero.
        Xorshift64Star(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        // The high bits are the good ones; the modulo bias at n of a few hundred is ~1e-17.
        ((r >> 11) % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::Detection;
    use crate::eval::GtObject;

    fn image(id: &str, class: &str) -> GtImage {
        GtImage {
            id: id.into(),
            path: Default::default(),
            width: 100,
            height: 100,
            objects: vec![GtObject {
                class: class.into(),
                bbox: [10.0, 10.0, 50.0, 50.0],
                difficult: false,
            }],
        }
    }

    fn found(id: &str, class: &str, hit: bool) -> ImageDetections {
        let bbox = if hit {
            [10.0, 10.0, 50.0, 50.0]
        } else {
            [60.0, 60.0, 90.0, 90.0]
        };
        ImageDetections {
            image: id.into(),
            width: 100,
            height: 100,
            detections: vec![Detection {
                class_id: 0,
                label: class.into(),
                // Misses rank below hits, so the partial detector's AP is its recall, 0.75.
                score: if hit { 0.9 } else { 0.5 },
                bbox,
            }],
        }
    }

    #[test]
    fn a_perfect_detector_has_a_point_interval_and_the_paired_difference_sees_the_gap() {
        let gt: Vec<GtImage> = (0..40).map(|i| image(&format!("im{i}"), "cat")).collect();
        let perfect: Vec<ImageDetections> = (0..40)
            .map(|i| found(&format!("im{i}"), "cat", true))
            .collect();
        // Misses every fourth image.
        let partial: Vec<ImageDetections> = (0..40)
            .map(|i| found(&format!("im{i}"), "cat", i % 4 != 0))
            .collect();
        let opts = VocOptions::default();
        let r = voc_map_bootstrap(&gt, &perfect, Some(&partial), &opts, 200, 1);
        assert_eq!(r.map, [1.0, 1.0]);
        let d = r.difference.clone().unwrap();
        assert!((d.baseline_map - 0.75).abs() < 1e-9, "{d:?}");
        assert!(d.interval[0] > 0.0 && d.interval[1] < 0.5, "{d:?}");
        assert!((d.mean - 0.25).abs() < 0.05, "{d:?}");
        // The same seed gives the same report.
        assert_eq!(
            r,
            voc_map_bootstrap(&gt, &perfect, Some(&partial), &opts, 200, 1)
        );
    }
}
