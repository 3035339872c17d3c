//! Head decoders: raw network outputs to scored boxes in network-input pixels.

use crate::detect::nms::Candidate;
use crate::error::{Error, Result};
use crate::model::Tensor;
use crate::model::manifest::DecoderSpec;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Decodes all boxes whose score reaches `score_threshold`.
pub fn decode(
    spec: &DecoderSpec,
    outputs: &[Tensor],
    input_size: (u32, u32),
    num_classes: usize,
    score_threshold: f32,
) -> Result<Vec<Candidate>> {
    match spec {
        DecoderSpec::Yolov3 {
            anchors,
            masks,
            scale_x_y,
        } => {
            if outputs.len() != masks.len() {
                return Err(Error::Inference(format!(
                    "{} outputs for {} YOLO heads",
                    outputs.len(),
                    masks.len()
                )));
            }
            let mut out = Vec::new();
            for ((t, mask), &s) in outputs.iter().zip(masks).zip(scale_x_y) {
                yolov3_head(
                    t,
                    mask,
                    anchors,
                    s,
                    input_size,
                    num_classes,
                    score_threshold,
                    &mut out,
                )?;
            }
            Ok(out)
        }
        DecoderSpec::Fastestdet {
            obj_power,
            cls_power,
        } => {
            let [t] = outputs else {
                return Err(Error::Inference("FastestDet has one output".into()));
            };
            fastestdet(
                t,
                *obj_power,
                *cls_power,
                input_size,
                num_classes,
                score_threshold,
            )
        }
        DecoderSpec::Yolox { strides } => {
            let [t] = outputs else {
                return Err(Error::Inference("YOLOX has one output".into()));
            };
            yolox(t, strides, input_size, num_classes, score_threshold)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn yolov3_head(
    t: &Tensor,
    mask: &[usize],
    anchors: &[[f32; 2]],
    scale_x_y: f32,
    (in_w, in_h): (u32, u32),
    classes: usize,
    threshold: f32,
    out: &mut Vec<Candidate>,
) -> Result<()> {
    let per_anchor = 5 + classes;
    let [1, c, gh, gw] = t.shape[..] else {
        return Err(Error::Inference(format!(
            "YOLO head output shape {:?}",
            t.shape
        )));
    };
    if c != mask.len() * per_anchor {
        return Err(Error::Inference(format!(
            "YOLO head has {c} channels, expected {}",
            mask.len() * per_anchor
        )));
    }
    let plane = gh * gw;
    let at = |a: usize, k: usize, cell: usize| t.data[(a * per_anchor + k) * plane + cell];
    for (a, &anchor) in mask.iter().enumerate() {
        let [aw, ah] = anchors[anchor];
        for cell in 0..plane {
            let obj = sigmoid(at(a, 4, cell));
            if obj < threshold {
                // score = obj * cls <= obj, so nothing in this cell can pass.
                continue;
            }
            let (row, col) = (cell / gw, cell % gw);
            let offset = (scale_x_y - 1.0) / 2.0;
            let cx = (col as f32 + sigmoid(at(a, 0, cell)) * scale_x_y - offset) / gw as f32
                * in_w as f32;
            let cy = (row as f32 + sigmoid(at(a, 1, cell)) * scale_x_y - offset) / gh as f32
                * in_h as f32;
            let w = at(a, 2, cell).exp() * aw;
            let h = at(a, 3, cell).exp() * ah;
            let bbox = [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0];
            for class_id in 0..classes {
                let score = obj * sigmoid(at(a, 5 + class_id, cell));
                if score >= threshold && score.is_finite() {
                    out.push(Candidate {
                        class_id,
                        score,
                        bbox,
                    });
                }
            }
        }
    }
    Ok(())
}

fn fastestdet(
    t: &Tensor,
    obj_power: f32,
    cls_power: f32,
    (in_w, in_h): (u32, u32),
    classes: usize,
    threshold: f32,
) -> Result<Vec<Candidate>> {
    let [1, c, gh, gw] = t.shape[..] else {
        return Err(Error::Inference(format!(
            "FastestDet output shape {:?}",
            t.shape
        )));
    };
    if c != 5 + classes {
        return Err(Error::Inference(format!(
            "FastestDet output has {c} channels for {classes} classes"
        )));
    }
    let plane = gh * gw;
    let at = |k: usize, cell: usize| t.data[k * plane + cell];
    let mut out = Vec::new();
    for cell in 0..plane {
        let (row, col) = (cell / gw, cell % gw);
        let (class_id, cls) = (0..classes)
            .map(|k| (k, at(5 + k, cell)))
            .fold((0, f32::MIN), |best, x| if x.1 > best.1 { x } else { best });
        let score = at(0, cell).max(0.0).powf(obj_power) * cls.max(0.0).powf(cls_power);
        // NaN fails every comparison, so a NaN score is skipped here too.
        if score.is_nan() || score < threshold {
            continue;
        }
        let cx = (col as f32 + at(1, cell).tanh()) / gw as f32 * in_w as f32;
        let cy = (row as f32 + at(2, cell).tanh()) / gh as f32 * in_h as f32;
        let w = sigmoid(at(3, cell)) * in_w as f32;
        let h = sigmoid(at(4, cell)) * in_h as f32;
        out.push(Candidate {
            class_id,
            score,
            bbox: [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0],
        });
    }
    Ok(out)
}

fn yolox(
    t: &Tensor,
    strides: &[u32],
    (in_w, in_h): (u32, u32),
    classes: usize,
    threshold: f32,
) -> Result<Vec<Candidate>> {
    let [1, cells, c] = t.shape[..] else {
        return Err(Error::Inference(format!(
            "YOLOX output shape {:?}",
            t.shape
        )));
    };
    if c != 5 + classes {
        return Err(Error::Inference(format!(
            "YOLOX output has {c} values per cell for {classes} classes"
        )));
    }
    let grids: Vec<(u32, usize, usize)> = strides
        .iter()
        .map(|&s| (s, (in_h / s) as usize, (in_w / s) as usize))
        .collect();
    let expected: usize = grids.iter().map(|(_, h, w)| h * w).sum();
    if expected != cells {
        return Err(Error::Inference(format!(
            "YOLOX output has {cells} cells, the strides give {expected}"
        )));
    }
    let mut out = Vec::new();
    let mut i = 0;
    for (stride, gh, gw) in grids {
        let s = stride as f32;
        for row in 0..gh {
            for col in 0..gw {
                let v = &t.data[i * c..(i + 1) * c];
                i += 1;
                let obj = v[4];
                if obj.is_nan() || obj < threshold {
                    continue;
                }
                let cx = (v[0] + col as f32) * s;
                let cy = (v[1] + row as f32) * s;
                let w = v[2].exp() * s;
                let h = v[3].exp() * s;
                let bbox = [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0];
                for class_id in 0..classes {
                    let score = obj * v[5 + class_id];
                    if score >= threshold && score.is_finite() {
                        out.push(Candidate {
                            class_id,
                            score,
                            bbox,
                        });
                    }
                }
            }
        }
    }
    Ok(out)
}
