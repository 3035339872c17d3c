use serde::{Deserialize, Serialize};

/// One detected object, in original image pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    pub class_id: usize,
    pub label: String,
    pub score: f32,
    /// `[x1, y1, x2, y2]` in pixels of the original image.
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
}

/// Detections for one image, as `lbw detect --json` prints them and `lbw eval --detections` reads them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageDetections {
    /// The image file's stem (VOC image id; for COCO the file name without extension).
    pub image: String,
    pub width: u32,
    pub height: u32,
    pub detections: Vec<Detection>,
}

/// Intersection over union of two `[x1, y1, x2, y2]` boxes in continuous coordinates.
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}
