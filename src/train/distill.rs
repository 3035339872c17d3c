//! The distillation loss: the FP32 teacher's raw head outputs are the targets, so no labels are
//! needed and every photo is a training sample.
//!
//! # YOLOv3 heads (`[N, A*(5+C), H, W]`: tx, ty, tw, th, objectness, C class logits per anchor)
//!
//! Every term is a divergence that is exactly zero when the student reproduces the teacher, so the
//! logged loss reads as "distance from FP32":
//! * objectness: the Bernoulli KL divergence `KL(sigmoid(t) || sigmoid(s))` at every anchor and
//!   cell. It covers the background too: a quantized net's typical failure is spurious objectness
//!   on empty cells (false positives), which hurts mAP as much as missed objects.
//! * classes: the same KL per class, summed over the classes (each class logit is a Bernoulli output
//!   like objectness, and a detection's score is `obj * cls` for its own class) and weighted by the
//!   teacher's objectness (class scores only matter where there is an object).
//! * box: squared error of `sigmoid(tx), sigmoid(ty)` (the decoded centre offset within the cell)
//!   and of `tw, th` (log-scale sizes), weighted by the teacher's objectness. Both are in units the
//!   decoder uses linearly (a 0.1 error is a tenth of a cell, or a 10 % size error), so one weight
//!   serves both.
//!
//! The default weights are objectness 1, classes 1, box 5 ([`TermWeights::default`]). An earlier
//! version averaged the class KL over the classes (a twentieth of today's term for the VOC models)
//! with unit weights; objectness then made up 87 % of the loss at the end of a run, and in 300-step
//! retrainings of yolo-fastest-voc at 6 bits (docs/TRAINING.md) raising the class term to the sum
//! and the box term fivefold took coco128 mAP@0.5 from 20.5 to 26.3, while a box weight of 20 or a
//! class term 7.5 times the sum scored lower.
//!
//! The sum is divided by the teacher's total objectness mass plus one per image: a per-object loss
//! whose scale does not depend on how crowded the batch is (the `+ 1` keeps empty images finite).
//! The KL is computed from logits, `softplus(s) - softplus(t) - sigmoid(t) (s - t)`, which is
//! stable for saturated teacher logits where a probability-space BCE would take `log(0)`.
//!
//! # Other heads
//!
//! Mean squared error on the raw outputs, each output normalised by its teacher variance.
//!
//! # Labels
//!
//! With `lbw finetune --labels`, photos that have ground truth also get the YOLOv3 detection loss
//! ([`crate::train::yolo_loss`]), added with a weight by [`DistillLoss::add_labelled`].

use burn::tensor::Tensor;
use burn::tensor::activation::{sigmoid, softplus};

use crate::error::{Error, Result};
use crate::model::manifest::DecoderSpec;
use crate::train::net::to_host;

/// The loss of one batch: the tensor to differentiate and its parts for the log.
pub struct DistillLoss {
    pub total: Tensor<1>,
    pub parts: LossParts,
}

/// Host values of the loss terms (already divided by the normaliser).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossParts {
    /// What the step minimises: the distillation terms plus the weighted labelled loss.
    pub total: f64,
    pub objectness: f64,
    pub class: f64,
    pub bbox: f64,
    /// The labelled detection loss (`--labels`), unweighted; absent when the batch had no
    /// labelled photo, and in logs written before labels existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labelled: Option<LabelledParts>,
}

/// Host values of the labelled detection loss ([`crate::train::yolo_loss`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LabelledParts {
    pub total: f64,
    pub objectness: f64,
    pub class: f64,
    pub bbox: f64,
    /// Labelled photos in the batch, and ground-truth boxes assigned to an anchor.
    pub images: usize,
    pub positives: usize,
}

impl DistillLoss {
    /// Adds the labelled loss, weighted by `weight` (`--label-weight`).
    pub fn add_labelled(&mut self, loss: Tensor<1>, parts: LabelledParts, weight: f64) {
        self.total = self.total.clone() + loss * weight;
        self.parts.total += weight * parts.total;
        self.parts.labelled = Some(parts);
    }
}

/// Relative weights of the YOLOv3 terms (objectness, classes, box; see the module docs), as
/// `lbw finetune --loss-weights` sets them.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TermWeights {
    pub objectness: f64,
    pub class: f64,
    pub bbox: f64,
}

impl Default for TermWeights {
    /// Objectness 1, classes 1, box 5 (see the module docs for how they were chosen).
    fn default() -> Self {
        TermWeights {
            objectness: 1.0,
            class: 1.0,
            bbox: 5.0,
        }
    }
}

impl TermWeights {
    /// The loss of runs from before the weights were settable: unit weights with the class KL
    /// averaged over `num_classes` classes, which is the summed term weighted `1 / num_classes`.
    pub fn legacy(num_classes: usize) -> TermWeights {
        TermWeights {
            objectness: 1.0,
            class: 1.0 / num_classes.max(1) as f64,
            bbox: 1.0,
        }
    }
}

impl std::str::FromStr for TermWeights {
    type Err = Error;

    /// `OBJ,CLS,BOX`, each finite and non-negative.
    fn from_str(s: &str) -> Result<TermWeights> {
        let bad = || {
            Error::Input(format!(
                "loss weights must be three non-negative numbers OBJ,CLS,BOX, got {s:?}"
            ))
        };
        let v: Vec<f64> = s
            .split(',')
            .map(|x| x.trim().parse::<f64>().map_err(|_| bad()))
            .collect::<Result<_>>()?;
        match v.as_slice() {
            &[objectness, class, bbox]
                if v.iter().all(|x| x.is_finite() && *x >= 0.0) && v.iter().any(|x| *x > 0.0) =>
            {
                Ok(TermWeights {
                    objectness,
                    class,
                    bbox,
                })
            }
            _ => Err(bad()),
        }
    }
}

fn bernoulli_kl<const D: usize>(
    student: Tensor<D>,
    teacher: Tensor<D>,
    teacher_p: Tensor<D>,
) -> Tensor<D> {
    softplus(student.clone(), 1.0)
        - softplus(teacher.clone(), 1.0)
        - teacher_p * (student - teacher)
}

/// The loss between student and teacher outputs (same order and shapes).
pub fn distill_loss(
    decoder: &DecoderSpec,
    num_classes: usize,
    weights: TermWeights,
    student: &[Tensor<4>],
    teacher: &[Tensor<4>],
) -> Result<DistillLoss> {
    if student.len() != teacher.len() || student.is_empty() {
        return Err(Error::Model(format!(
            "{} student outputs for {} teacher outputs",
            student.len(),
            teacher.len()
        )));
    }
    match decoder {
        DecoderSpec::Yolov3 { masks, .. } if masks.len() == student.len() => {
            yolov3_loss(masks, num_classes, weights, student, teacher)
        }
        _ => mse_loss(student, teacher),
    }
}

fn yolov3_loss(
    masks: &[Vec<usize>],
    num_classes: usize,
    weights: TermWeights,
    student: &[Tensor<4>],
    teacher: &[Tensor<4>],
) -> Result<DistillLoss> {
    let k = 5 + num_classes;
    let mut obj_sum: Option<Tensor<1>> = None;
    let mut cls_sum: Option<Tensor<1>> = None;
    let mut box_sum: Option<Tensor<1>> = None;
    let mut mass = 0.0f64;
    let mut images = 0usize;
    let add = |acc: &mut Option<Tensor<1>>, t: Tensor<1>| {
        *acc = Some(match acc.take() {
            Some(a) => a + t,
            None => t,
        });
    };
    for ((s, t), mask) in student.iter().zip(teacher).zip(masks) {
        let [n, ch, h, w] = s.dims();
        let a = mask.len();
        if ch != a * k || t.dims() != s.dims() {
            return Err(Error::Model(format!(
                "YOLO head of shape {:?} does not hold {a} anchors of {k} channels",
                s.dims()
            )));
        }
        images = n;
        let s: Tensor<5> = s.clone().reshape([n, a, k, h, w]);
        let t: Tensor<5> = t.clone().detach().reshape([n, a, k, h, w]);
        let t_obj = t.clone().narrow(2, 4, 1);
        let p_obj = sigmoid(t_obj.clone());
        mass += f64::from(
            to_host(p_obj.clone().sum())?
                .first()
                .copied()
                .unwrap_or(0.0),
        );

        let obj = bernoulli_kl(s.clone().narrow(2, 4, 1), t_obj, p_obj.clone());
        add(&mut obj_sum, obj.sum());

        if num_classes > 0 {
            let t_cls = t.clone().narrow(2, 5, num_classes);
            let p_cls = sigmoid(t_cls.clone());
            let cls = bernoulli_kl(s.clone().narrow(2, 5, num_classes), t_cls, p_cls).sum_dim(2);
            add(&mut cls_sum, (cls * p_obj.clone()).sum());
        }

        let dxy = sigmoid(s.clone().narrow(2, 0, 2)) - sigmoid(t.clone().narrow(2, 0, 2));
        let dwh = s.narrow(2, 2, 2) - t.narrow(2, 2, 2);
        let err = dxy.square().sum_dim(2) + dwh.square().sum_dim(2);
        add(&mut box_sum, (err * p_obj).sum());
    }
    let norm = mass + images as f64;
    let scale = |x: Option<Tensor<1>>, wgt: f64| x.map(|x| x * (wgt / norm));
    let parts: Vec<Tensor<1>> = [
        scale(obj_sum, weights.objectness),
        scale(cls_sum, weights.class),
        scale(box_sum, weights.bbox),
    ]
    .into_iter()
    .flatten()
    .collect();
    let host = |t: &Tensor<1>| -> Result<f64> {
        Ok(f64::from(
            to_host(t.clone().detach())?.first().copied().unwrap_or(0.0),
        ))
    };
    let mut values = [0.0f64; 3];
    for (v, p) in values.iter_mut().zip(&parts) {
        *v = host(p)?;
    }
    let total = parts
        .into_iter()
        .reduce(|a, b| a + b)
        .ok_or_else(|| Error::Model("empty loss".into()))?;
    Ok(DistillLoss {
        total,
        parts: LossParts {
            total: values.iter().sum(),
            objectness: values[0],
            class: if num_classes > 0 { values[1] } else { 0.0 },
            bbox: if num_classes > 0 {
                values[2]
            } else {
                values[1]
            },
            labelled: None,
        },
    })
}

fn mse_loss(student: &[Tensor<4>], teacher: &[Tensor<4>]) -> Result<DistillLoss> {
    let mut total: Option<Tensor<1>> = None;
    for (s, t) in student.iter().zip(teacher) {
        let t = t.clone().detach();
        let centred = t.clone() - t.clone().mean().reshape([1, 1, 1, 1]);
        let var = to_host(centred.square().mean())?
            .first()
            .copied()
            .unwrap_or(1.0);
        let diff = (s.clone() - t).square().mean() / f64::from(var.max(1e-6));
        total = Some(match total {
            Some(a) => a + diff,
            None => diff,
        });
    }
    let total = total.ok_or_else(|| Error::Model("no outputs".into()))?;
    let v = f64::from(
        to_host(total.clone().detach())?
            .first()
            .copied()
            .unwrap_or(0.0),
    );
    Ok(DistillLoss {
        total,
        parts: LossParts {
            total: v,
            ..LossParts::default()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn term_weights_parse_three_non_negative_numbers() {
        let w: TermWeights = "1, 20,0.5".parse().unwrap();
        assert_eq!((w.objectness, w.class, w.bbox), (1.0, 20.0, 0.5));
        for bad in ["1,2", "1,2,3,4", "1,-1,1", "a,b,c", "0,0,0", "1,inf,1", ""] {
            assert!(bad.parse::<TermWeights>().is_err(), "{bad:?}");
        }
    }
}
