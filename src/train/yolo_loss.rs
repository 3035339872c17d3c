//! The YOLOv3 detection loss on ground-truth boxes, for `lbw finetune --labels`: added to the
//! distillation loss on the photos that have labels.
//!
//! Distillation can only make the student as good as the FP32 teacher, and it copies the
//! teacher's mistakes along with its skill. Where labels exist they say what is really there, so
//! the quantized student also learns from the truth (and from objects the teacher misses).
//!
//! # Terms (darknet YOLOv3)
//!
//! * **Assignment**: each ground-truth box goes to the anchor whose shape (width and height, both
//!   centred) overlaps it best among the anchors of all heads, in the cell of that head that holds
//!   the box centre. Two boxes on one anchor and cell: the later one wins, as in darknet.
//! * **Objectness**: binary cross-entropy from the logit at every anchor and cell, target 1 at the
//!   assigned anchors and 0 elsewhere, except that an anchor whose *predicted* box already overlaps
//!   some ground truth with IoU > 0.5 is not pushed down (it found the object; only one anchor can
//!   be its positive). Difficult boxes (and classes the model lacks) are never positives; their
//!   assigned anchor and the predictions overlapping them are ignored, so they are no negatives
//!   either.
//! * **Classes**: binary cross-entropy per class (one-hot target) at the positives.
//! * **Box**: squared errors of `sigmoid(tx), sigmoid(ty)` (the centre offset in the cell, with the
//!   head's `scale_x_y` undone) and of `tw, th` against `ln(box / anchor)`, at the positives,
//!   weighted by `2 - w h` (`w, h` relative to the input) so that small boxes, whose offsets
//!   matter more per pixel, are not drowned out by large ones.
//!
//! The sum is divided by the number of positives plus the number of images in the batch, the
//! labelled counterpart of the distillation loss's "teacher objectness mass plus one per image":
//! a per-object loss whose scale does not depend on how crowded the batch is, and in which a photo
//! without labels counts as an image that contributes nothing.

use burn::tensor::Tensor;
use burn::tensor::activation::{sigmoid, softplus};

use crate::error::{Error, Result};
use crate::model::manifest::DecoderSpec;
use crate::train::distill::LabelledParts;
use crate::train::labels::TargetBox;
use crate::train::net::{tensor_from, to_host};

/// Weight of the labelled loss against the distillation loss (`--label-weight`). Distillation
/// stays the main signal: it covers every photo and every anchor with soft targets, while labels
/// exist for few photos and their hard 0/1 targets disagree with the (61-65 % mAP) teacher on
/// some objects; pulling both ways at full strength would trade what the student keeps of the
/// teacher for a fit to a few hundred labelled photos. Half weight lets the labels correct the
/// teacher's errors without taking over. A reasoned default, not a tuned one.
pub const DEFAULT_LABEL_WEIGHT: f64 = 0.5;

/// A prediction overlapping some ground truth by more than this is not a negative (darknet's
/// `ignore_thresh`).
pub const IGNORE_IOU: f64 = 0.5;

/// The anchors and heads of a YOLOv3 decoder.
#[derive(Debug, Clone, Copy)]
pub struct YoloHeads<'a> {
    /// All anchors `(w, h)` in input pixels.
    pub anchors: &'a [[f32; 2]],
    /// Anchor indices of each head, in output order.
    pub masks: &'a [Vec<usize>],
    pub scale_x_y: &'a [f32],
}

impl<'a> YoloHeads<'a> {
    /// `None` for decoders that are not YOLOv3 (the labelled loss needs anchors).
    pub fn from_decoder(decoder: &'a DecoderSpec) -> Option<YoloHeads<'a>> {
        match decoder {
            DecoderSpec::Yolov3 {
                anchors,
                masks,
                scale_x_y,
            } => Some(YoloHeads {
                anchors,
                masks,
                scale_x_y,
            }),
            _ => None,
        }
    }
}

/// Where one ground-truth box is a positive, and its box targets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assignment {
    /// Head (graph output) index.
    pub head: usize,
    /// Anchor position within the head's mask.
    pub anchor: usize,
    pub row: usize,
    pub col: usize,
    /// Targets of `sigmoid(tx), sigmoid(ty), tw, th`.
    pub target: [f64; 4],
    /// `2 - w h`, with `w, h` relative to the input.
    pub box_weight: f64,
}

fn iou(a: [f64; 4], b: [f64; 4]) -> f64 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// Assigns a box `[x1, y1, x2, y2]` (input pixels) to its best anchor by shape and the cell of
/// its centre. `grids` are the heads' `[rows, cols]`, `input` the input's `[width, height]`.
pub fn assign(
    heads: &YoloHeads<'_>,
    grids: &[[usize; 2]],
    input: [f64; 2],
    bbox: [f64; 4],
) -> Option<Assignment> {
    let (bw, bh) = (bbox[2] - bbox[0], bbox[3] - bbox[1]);
    if !(bw > 0.0 && bh > 0.0) {
        return None;
    }
    let mut best: Option<(f64, usize, usize, [f32; 2])> = None;
    for (head, mask) in heads.masks.iter().enumerate() {
        for (pos, &idx) in mask.iter().enumerate() {
            let [aw, ah] = *heads.anchors.get(idx)?;
            let (aw, ah) = (f64::from(aw), f64::from(ah));
            let inter = bw.min(aw) * bh.min(ah);
            let shape_iou = inter / (bw * bh + aw * ah - inter);
            if best.is_none_or(|(b, ..)| shape_iou > b) {
                best = Some((shape_iou, head, pos, [aw as f32, ah as f32]));
            }
        }
    }
    let (_, head, anchor, [aw, ah]) = best?;
    let [rows, cols] = *grids.get(head)?;
    let s = f64::from(heads.scale_x_y.get(head).copied().unwrap_or(1.0));
    let cell = |centre: f64, size: f64, n: usize| {
        let g = centre / size * n as f64;
        let i = (g.max(0.0).floor() as usize).min(n - 1);
        // The decoder's centre is `i + sigmoid(t) * s - (s - 1) / 2`.
        let t = ((g - i as f64 + (s - 1.0) / 2.0) / s).clamp(0.0, 1.0);
        (i, t)
    };
    let (col, tx) = cell((bbox[0] + bbox[2]) / 2.0, input[0], cols);
    let (row, ty) = cell((bbox[1] + bbox[3]) / 2.0, input[1], rows);
    Some(Assignment {
        head,
        anchor,
        row,
        col,
        target: [tx, ty, (bw / f64::from(aw)).ln(), (bh / f64::from(ah)).ln()],
        box_weight: 2.0 - (bw / input[0]) * (bh / input[1]),
    })
}

fn sigmoid_f(x: f32) -> f64 {
    1.0 / (1.0 + (-f64::from(x)).exp())
}

/// Host-side targets and weights of one head, laid out `[n, a, channels, h, w]`.
struct HeadTargets {
    obj_target: Vec<f32>,
    obj_weight: Vec<f32>,
    positive: Vec<f32>,
    box_weight: Vec<f32>,
    box_target: Vec<f32>,
    class_target: Vec<f32>,
}

/// The labelled loss of a batch: `student` are the graph outputs `[N, A*(5+C), H, W]`, `targets`
/// the label boxes of each sample in input pixels (`None`: no label file, distillation only),
/// `input` the input's `[width, height]`. `None` when no sample of the batch has labels.
pub fn labelled_loss(
    heads: &YoloHeads<'_>,
    num_classes: usize,
    input: [u32; 2],
    student: &[Tensor<4>],
    targets: &[Option<Vec<TargetBox>>],
) -> Result<Option<(Tensor<1>, LabelledParts)>> {
    let labelled = targets.iter().filter(|t| t.is_some()).count();
    if labelled == 0 {
        return Ok(None);
    }
    if student.len() != heads.masks.len() {
        return Err(Error::Model(format!(
            "{} outputs for {} YOLO heads",
            student.len(),
            heads.masks.len()
        )));
    }
    let k = 5 + num_classes;
    let input_f = [f64::from(input[0]), f64::from(input[1])];
    let mut grids = Vec::with_capacity(student.len());
    let mut host = Vec::with_capacity(student.len());
    for (s, mask) in student.iter().zip(heads.masks) {
        let [n, ch, h, w] = s.dims();
        if ch != mask.len() * k || n != targets.len() {
            return Err(Error::Model(format!(
                "YOLO head of shape {:?} does not hold {} anchors of {k} channels for {} images",
                s.dims(),
                mask.len(),
                targets.len()
            )));
        }
        grids.push([h, w]);
        host.push(to_host(s.clone().detach())?);
    }
    let mut built: Vec<HeadTargets> = student
        .iter()
        .map(|s| {
            let [n, ch, h, w] = s.dims();
            let cells = n * (ch / k) * h * w;
            HeadTargets {
                obj_target: vec![0.0; cells],
                obj_weight: vec![0.0; cells],
                positive: vec![0.0; cells],
                box_weight: vec![0.0; cells],
                box_target: vec![0.0; cells * 4],
                class_target: vec![0.0; cells * num_classes],
            }
        })
        .collect();

    for (b, boxes) in targets.iter().enumerate() {
        let Some(boxes) = boxes else { continue };
        // Negatives everywhere except where the prediction already covers some ground truth.
        for (hi, mask) in heads.masks.iter().enumerate() {
            let [gh, gw] = grids[hi];
            let a_n = mask.len();
            let plane = gh * gw;
            let s = f64::from(heads.scale_x_y.get(hi).copied().unwrap_or(1.0));
            let out = &host[hi];
            for (a, &idx) in mask.iter().enumerate() {
                let [aw, ah] = heads.anchors[idx];
                for cell in 0..plane {
                    let at = |kk: usize| out[((b * a_n + a) * k + kk) * plane + cell];
                    let flat = (b * a_n + a) * plane + cell;
                    let (row, col) = (cell / gw, cell % gw);
                    let ignored = !boxes.is_empty() && {
                        let cx = (col as f64 + sigmoid_f(at(0)) * s - (s - 1.0) / 2.0) / gw as f64
                            * input_f[0];
                        let cy = (row as f64 + sigmoid_f(at(1)) * s - (s - 1.0) / 2.0) / gh as f64
                            * input_f[1];
                        let pw = f64::from(at(2)).exp() * f64::from(aw);
                        let ph = f64::from(at(3)).exp() * f64::from(ah);
                        let p = [cx - pw / 2.0, cy - ph / 2.0, cx + pw / 2.0, cy + ph / 2.0];
                        boxes.iter().any(|t| iou(p, t.bbox) > IGNORE_IOU)
                    };
                    built[hi].obj_weight[flat] = if ignored { 0.0 } else { 1.0 };
                }
            }
        }
        // Ignore regions first, so that a real object sharing their anchor still wins it.
        let mut order: Vec<&TargetBox> = boxes.iter().filter(|t| t.ignore).collect();
        order.extend(boxes.iter().filter(|t| !t.ignore));
        for t in order {
            let Some(asg) = assign(heads, &grids, input_f, t.bbox) else {
                continue;
            };
            let [gh, gw] = grids[asg.head];
            let a_n = heads.masks[asg.head].len();
            let plane = gh * gw;
            let flat = (b * a_n + asg.anchor) * plane + asg.row * gw + asg.col;
            let ht = &mut built[asg.head];
            if t.ignore {
                ht.obj_weight[flat] = 0.0;
                continue;
            }
            ht.obj_target[flat] = 1.0;
            ht.obj_weight[flat] = 1.0;
            ht.positive[flat] = 1.0;
            ht.box_weight[flat] = asg.box_weight as f32;
            let base = (b * a_n + asg.anchor) * plane;
            for (c, v) in asg.target.iter().enumerate() {
                ht.box_target[(base * 4) + c * plane + asg.row * gw + asg.col] = *v as f32;
            }
            for c in 0..num_classes {
                ht.class_target[base * num_classes + c * plane + asg.row * gw + asg.col] =
                    if c == t.class { 1.0 } else { 0.0 };
            }
        }
    }

    let positives: usize = built
        .iter()
        .map(|t| t.positive.iter().filter(|&&p| p > 0.0).count())
        .sum();
    let norm = (positives + targets.len()) as f64;
    let mut obj_sum: Option<Tensor<1>> = None;
    let mut cls_sum: Option<Tensor<1>> = None;
    let mut box_sum: Option<Tensor<1>> = None;
    let add = |acc: &mut Option<Tensor<1>>, t: Tensor<1>| {
        *acc = Some(match acc.take() {
            Some(a) => a + t,
            None => t,
        });
    };
    for ((s, t), mask) in student.iter().zip(built).zip(heads.masks) {
        let [n, _, h, w] = s.dims();
        let a = mask.len();
        let device = s.device();
        let one = [n, a, 1, h, w];
        let s: Tensor<5> = s.clone().reshape([n, a, k, h, w]);
        let obj_t = tensor_from(t.obj_target, one, &device);
        let obj_w = tensor_from(t.obj_weight, one, &device);
        let pos = tensor_from(t.positive, one, &device);
        let box_w = tensor_from(t.box_weight, one, &device);
        let box_t = tensor_from(t.box_target, [n, a, 4, h, w], &device);

        let s_obj = s.clone().narrow(2, 4, 1);
        add(
            &mut obj_sum,
            (obj_w * (softplus(s_obj.clone(), 1.0) - obj_t * s_obj)).sum(),
        );
        if num_classes > 0 {
            let cls_t = tensor_from(t.class_target, [n, a, num_classes, h, w], &device);
            let s_cls = s.clone().narrow(2, 5, num_classes);
            let bce = softplus(s_cls.clone(), 1.0) - cls_t * s_cls;
            add(&mut cls_sum, (bce.sum_dim(2) * pos).sum());
        }
        let dxy = sigmoid(s.clone().narrow(2, 0, 2)) - box_t.clone().narrow(2, 0, 2);
        let dwh = s.narrow(2, 2, 2) - box_t.narrow(2, 2, 2);
        let err = dxy.square().sum_dim(2) + dwh.square().sum_dim(2);
        add(&mut box_sum, (err * box_w).sum());
    }
    let host_value = |t: &Tensor<1>| -> Result<f64> {
        Ok(f64::from(
            to_host(t.clone().detach())?.first().copied().unwrap_or(0.0),
        ))
    };
    let mut values = [0.0f64; 3];
    let mut total: Option<Tensor<1>> = None;
    for (v, part) in values.iter_mut().zip([obj_sum, cls_sum, box_sum]) {
        if let Some(p) = part {
            let p = p / norm;
            *v = host_value(&p)?;
            add(&mut total, p);
        }
    }
    let total = total.ok_or_else(|| Error::Model("empty labelled loss".into()))?;
    Ok(Some((
        total,
        LabelledParts {
            total: values.iter().sum(),
            objectness: values[0],
            class: values[1],
            bbox: values[2],
            images: labelled,
            positives,
        },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    const ANCHORS: [[f32; 2]; 6] = [
        [26.0, 48.0],
        [67.0, 84.0],
        [72.0, 175.0],
        [189.0, 126.0],
        [137.0, 236.0],
        [265.0, 259.0],
    ];

    fn heads(masks: &[Vec<usize>]) -> YoloHeads<'_> {
        YoloHeads {
            anchors: &ANCHORS,
            masks,
            scale_x_y: &[1.0, 1.0],
        }
    }

    #[test]
    fn assignment_picks_the_best_shape_anchor_and_the_centre_cell() {
        let masks = vec![vec![3, 4, 5], vec![0, 1, 2]];
        let h = heads(&masks);
        let grids = [[10, 10], [20, 20]];
        // 70x80 centred at (100, 40): closest in shape to anchor 1 (67x84), the stride-16 head.
        let a = assign(&h, &grids, [320.0, 320.0], [65.0, 0.0, 135.0, 80.0]).unwrap();
        assert_eq!((a.head, a.anchor, a.row, a.col), (1, 1, 2, 6));
        let want = [0.25, 0.5, (70.0f64 / 67.0).ln(), (80.0f64 / 84.0).ln()];
        for (g, w) in a.target.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{:?} vs {want:?}", a.target);
        }
        assert!((a.box_weight - (2.0 - 70.0 * 80.0 / 320.0 / 320.0)).abs() < 1e-12);
        // A large box goes to the coarse head, centre cell (7, 4) of 10.
        let a = assign(&h, &grids, [320.0, 320.0], [20.0, 100.0, 280.0, 360.0]).unwrap();
        assert_eq!((a.head, a.anchor, a.row, a.col), (0, 2, 7, 4));
        // scale_x_y is undone: the decoder's `sigmoid * 1.1 - 0.05` must give back the offset.
        let s = YoloHeads {
            scale_x_y: &[1.1, 1.1],
            ..h
        };
        let a = assign(&s, &grids, [320.0, 320.0], [65.0, 0.0, 135.0, 80.0]).unwrap();
        assert!((a.target[0] * 1.1 - 0.05 - 0.25).abs() < 1e-6);
    }

    fn logit(p: f64) -> f32 {
        (p / (1.0 - p)).ln() as f32
    }

    /// Raw outputs of two heads (one image) that predict `boxes` exactly, confident background
    /// everywhere else, plus an optional extra confident prediction `(head, anchor, cell, box)`.
    fn outputs(
        h: &YoloHeads<'_>,
        grids: &[[usize; 2]],
        classes: usize,
        boxes: &[TargetBox],
        extra: Option<(usize, usize, usize, [f32; 4])>,
    ) -> Vec<Tensor<4>> {
        let k = 5 + classes;
        let mut data: Vec<Vec<f32>> = grids
            .iter()
            .zip(h.masks)
            .map(|([gh, gw], m)| {
                let mut v = vec![0.0; m.len() * k * gh * gw];
                for a in 0..m.len() {
                    for c in 0..gh * gw {
                        v[(a * k + 4) * gh * gw + c] = -20.0;
                        for cl in 0..classes {
                            v[(a * k + 5 + cl) * gh * gw + c] = -20.0;
                        }
                    }
                }
                v
            })
            .collect();
        for t in boxes {
            let a = assign(h, grids, [320.0, 320.0], t.bbox).unwrap();
            let [gh, gw] = grids[a.head];
            let cell = a.row * gw + a.col;
            let d = &mut data[a.head];
            let at = |kk: usize| (a.anchor * k + kk) * gh * gw + cell;
            d[at(0)] = logit(a.target[0]);
            d[at(1)] = logit(a.target[1]);
            d[at(2)] = a.target[2] as f32;
            d[at(3)] = a.target[3] as f32;
            d[at(4)] = 20.0;
            d[at(5 + t.class)] = 20.0;
        }
        if let Some((head, a, cell, v)) = extra {
            let [gh, gw] = grids[head];
            for (kk, x) in v.iter().enumerate() {
                data[head][(a * k + kk) * gh * gw + cell] = *x;
            }
            data[head][(a * k + 4) * gh * gw + cell] = 20.0;
        }
        let device = Device::flex();
        data.into_iter()
            .zip(grids)
            .map(|(v, [gh, gw])| tensor_from(v, [1, 3 * k, *gh, *gw], &device))
            .collect()
    }

    #[test]
    fn a_perfect_prediction_has_near_zero_loss_and_overlaps_are_ignored() {
        let masks = vec![vec![3, 4, 5], vec![0, 1, 2]];
        let h = heads(&masks);
        let grids = [[10, 10], [20, 20]];
        let classes = 3;
        let boxes = vec![
            TargetBox {
                class: 2,
                bbox: [65.0, 0.0, 135.0, 80.0],
                ignore: false,
            },
            TargetBox {
                class: 0,
                bbox: [20.0, 100.0, 280.0, 300.0],
                ignore: false,
            },
        ];
        let loss = |out: &[Tensor<4>], boxes: &[TargetBox]| {
            let (_, p) = labelled_loss(&h, classes, [320, 320], out, &[Some(boxes.to_vec())])
                .unwrap()
                .unwrap();
            p
        };
        let p = loss(&outputs(&h, &grids, classes, &boxes, None), &boxes);
        assert_eq!((p.images, p.positives), (1, 2));
        assert!(p.total < 1e-4, "{p:?}");

        // A second confident prediction of the first box (anchor 0 of the fine head, its centre
        // cell): IoU > 0.5 with the ground truth, so it is not a false positive.
        let cell = 2 * 20 + 6;
        let near = [
            logit(0.25),
            logit(0.5),
            (70.0f32 / 26.0).ln(),
            (80.0f32 / 48.0).ln(),
        ];
        let p = loss(
            &outputs(&h, &grids, classes, &boxes, Some((1, 0, cell, near))),
            &boxes,
        );
        assert!(p.total < 1e-4, "{p:?}");
        // The same confident prediction far from every box is one.
        let p = loss(
            &outputs(
                &h,
                &grids,
                classes,
                &boxes,
                Some((1, 0, 19 * 20 + 19, near)),
            ),
            &boxes,
        );
        assert!(p.objectness > 5.0, "{p:?}");

        // Missing the objects costs; a difficult box is no positive and its anchor no negative.
        let p = loss(&outputs(&h, &grids, classes, &[], None), &boxes);
        assert!(p.objectness > 5.0 && p.class > 0.0 && p.bbox > 0.0, "{p:?}");
        let mut difficult = boxes.clone();
        difficult[0].ignore = true;
        let p = loss(&outputs(&h, &grids, classes, &boxes, None), &difficult);
        assert_eq!(p.positives, 1);
        assert!(p.total < 1e-4, "{p:?}");

        // No labels in the batch: no labelled loss.
        let out = outputs(&h, &grids, classes, &boxes, None);
        assert!(
            labelled_loss(&h, classes, [320, 320], &out, &[None])
                .unwrap()
                .is_none()
        );
    }
}
