//! Per-class non-maximum suppression.

use crate::detect::types::iou;

/// A scored box before suppression, in network-input pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub class_id: usize,
    pub score: f32,
    pub bbox: [f32; 4],
}

/// Greedy NMS within each class, then the best `max_detections` over all classes by score.
pub fn nms_per_class(
    mut cands: Vec<Candidate>,
    iou_threshold: f32,
    max_detections: usize,
) -> Vec<Candidate> {
    // Sorting by class then score keeps each class contiguous, so suppression only compares boxes
    // that can suppress each other.
    cands.sort_by(|a, b| {
        a.class_id
            .cmp(&b.class_id)
            .then(b.score.total_cmp(&a.score))
    });
    let mut kept: Vec<Candidate> = Vec::new();
    let mut start = 0;
    while start < cands.len() {
        let class = cands[start].class_id;
        let end = start
            + cands[start..]
                .iter()
                .take_while(|c| c.class_id == class)
                .count();
        let first_kept = kept.len();
        for c in &cands[start..end] {
            if kept[first_kept..]
                .iter()
                .all(|k| iou(&k.bbox, &c.bbox) <= iou_threshold)
            {
                kept.push(*c);
            }
        }
        start = end;
    }
    kept.sort_by(|a, b| b.score.total_cmp(&a.score));
    kept.truncate(max_detections);
    kept
}
