//! A held-out distillation loss (`lbw finetune --holdout N`): photos kept out of training, on which
//! the student's distillation loss is measured every few steps.
//!
//! Why: coco128 mAP, the yardstick, has a paired 95 % interval about 13 points wide, so it
//! cannot tell whether a longer run overfits the training photos. The same loss the run minimises,
//! on photos it never saw and without augmentation, shows overfitting as a rising curve and picks
//! the parameters a run should keep (`--select best`). Measured over 25 retrained files, it ranks
//! clearly different runs as coco128 does, but not full-length runs against each other
//! (docs/TRAINING.md), so it is not a stand-in for mAP.

use std::sync::Arc;

use burn::tensor::{Device, Tensor};

use crate::error::{Error, Result};
use crate::model::manifest::{DecoderSpec, InputSpec};

use super::data::{self, Augment, ImageSet};
use super::distill::{LossParts, TermWeights, distill_loss};
use super::labels::PhotoLabels;
use super::net::{ActivationQuant, ForwardWeights, TrainGraph, tensor_from};
use super::rng::SplitMix64;

/// Stream id of the held-out choice; fixed rather than the run's seed, so that runs with other
/// seeds or settings are scored on the same photos and their losses compare.
const PURPOSE_HOLDOUT: u64 = 4;

/// Each photo's labels, aligned with an [`ImageSet`] (empty when no photo has labels).
pub(super) type AlignedLabels = Vec<Option<Arc<PhotoLabels>>>;

/// Splits `n` photos off `images` (with their labels when there are any): the same `n` photos of
/// the same folders whatever the seed. Returns the training photos, their labels and the held-out
/// photos (in path order).
pub(super) fn split(
    images: ImageSet,
    labels: AlignedLabels,
    n: usize,
) -> Result<(ImageSet, AlignedLabels, ImageSet)> {
    let total = images.len();
    if n == 0 {
        return Ok((images, labels, ImageSet { paths: vec![] }));
    }
    if n >= total {
        return Err(Error::Input(format!(
            "--holdout {n} leaves no training photo: the folders hold {total}"
        )));
    }
    let mut held = vec![false; total];
    for i in SplitMix64::derive(0, PURPOSE_HOLDOUT, 0)
        .permutation(total)
        .into_iter()
        .take(n)
    {
        held[i] = true;
    }
    let labelled = !labels.is_empty();
    let mut labels = labels.into_iter();
    let (mut train, mut train_labels, mut out) = (vec![], vec![], vec![]);
    for (p, h) in images.paths.into_iter().zip(held) {
        let l = if labelled {
            labels.next().flatten()
        } else {
            None
        };
        if h {
            out.push(p);
        } else {
            train.push(p);
            if labelled {
                train_labels.push(l);
            }
        }
    }
    Ok((
        ImageSet { paths: train },
        train_labels,
        ImageSet { paths: out },
    ))
}

/// The held-out photos as input batches, with the FP32 teacher's outputs for each computed once.
pub(super) struct HeldOut {
    batches: Vec<HeldOutBatch>,
    photos: usize,
}

struct HeldOutBatch {
    input: Vec<f32>,
    shape: [usize; 4],
    teacher: Vec<Tensor<4>>,
}

/// What the loss needs besides the outputs.
#[derive(Clone, Copy)]
pub(super) struct LossSpec<'a> {
    pub decoder: &'a DecoderSpec,
    pub num_classes: usize,
    pub weights: TermWeights,
}

impl HeldOut {
    /// Reads and letterboxes the photos (no augmentation) and runs the teacher on them. An
    /// unreadable photo is skipped with a warning; none readable is an error.
    pub(super) fn prepare(
        images: &ImageSet,
        spec: &InputSpec,
        batch: usize,
        graph: &TrainGraph,
        teacher: &ForwardWeights,
        device: &Device,
    ) -> Result<HeldOut> {
        let per_image = 3 * spec.height as usize * spec.width as usize;
        let mut samples = Vec::new();
        for path in &images.paths {
            match data::load_image(path) {
                Ok(img) => {
                    let (x, _) = data::augmented_sample(
                        &img,
                        spec,
                        &Augment::none(),
                        &mut SplitMix64::new(0),
                    );
                    samples.push(x);
                }
                Err(e) => tracing::warn!("skipping held-out image: {e}"),
            }
        }
        if samples.is_empty() {
            return Err(Error::Input("no held-out photo could be read".into()));
        }
        let photos = samples.len();
        let batches = samples
            .chunks(batch.max(1))
            .map(|chunk| {
                let input = chunk.concat();
                debug_assert_eq!(input.len(), chunk.len() * per_image);
                let shape = [chunk.len(), 3, spec.height as usize, spec.width as usize];
                let teacher = graph.forward(
                    tensor_from(input.clone(), shape, device),
                    teacher,
                    &mut ActivationQuant::default(),
                )?;
                Ok(HeldOutBatch {
                    input,
                    shape,
                    teacher,
                })
            })
            .collect::<Result<_>>()?;
        Ok(HeldOut { batches, photos })
    }

    pub(super) fn photos(&self) -> usize {
        self.photos
    }

    /// The student's mean distillation loss over the held-out photos, with its activations rounded
    /// to the current grids (not observed: measuring must not move them).
    pub(super) fn loss(
        &self,
        graph: &TrainGraph,
        student: &ForwardWeights,
        act: &ActivationQuant,
        loss: LossSpec<'_>,
        device: &Device,
    ) -> Result<LossParts> {
        let mut act = ActivationQuant {
            enabled: act.enabled,
            observe: false,
            ranges: act.ranges.clone(),
            observed: Default::default(),
        };
        let mut sum = LossParts::default();
        for b in &self.batches {
            let out = graph.forward(
                tensor_from(b.input.clone(), b.shape, device),
                student,
                &mut act,
            )?;
            let parts = distill_loss(
                loss.decoder,
                loss.num_classes,
                loss.weights,
                &out,
                &b.teacher,
            )?
            .parts;
            // Batches weighted by their photo counts (only the last one may be smaller).
            let w = b.shape[0] as f64 / self.photos as f64;
            sum.total += w * parts.total;
            sum.objectness += w * parts.objectness;
            sum.class += w * parts.class;
            sum.bbox += w * parts.bbox;
        }
        Ok(sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn split_keeps_labels_aligned_and_does_not_depend_on_the_seed() {
        let paths: Vec<PathBuf> = (0..10)
            .map(|i| PathBuf::from(format!("p{i}.jpg")))
            .collect();
        let labels: AlignedLabels = (0..10u32)
            .map(|i| {
                i.is_multiple_of(2).then(|| {
                    Arc::new(PhotoLabels {
                        size: Some([i, i]),
                        boxes: vec![],
                    })
                })
            })
            .collect();
        let images = || ImageSet {
            paths: paths.clone(),
        };
        let (train, train_labels, held) = split(images(), labels.clone(), 3).unwrap();
        assert_eq!((train.len(), held.len()), (7, 3));
        assert_eq!(train_labels.len(), 7);
        for (p, l) in train.paths.iter().zip(&train_labels) {
            let i: u32 = p.to_str().unwrap()[1..]
                .trim_end_matches(".jpg")
                .parse()
                .unwrap();
            assert_eq!(
                l.as_ref().and_then(|l| l.size),
                i.is_multiple_of(2).then_some([i, i])
            );
        }
        let mut all: Vec<PathBuf> = train.paths.iter().chain(&held.paths).cloned().collect();
        all.sort();
        let mut want = paths.clone();
        want.sort();
        assert_eq!(all, want);
        // The same photos without labels, and again: the choice is fixed.
        let (_, none, held2) = split(images(), vec![], 3).unwrap();
        assert!(none.is_empty());
        assert_eq!(held.paths, held2.paths);
        let (t0, _, h0) = split(images(), vec![], 0).unwrap();
        assert_eq!((t0.len(), h0.len()), (10, 0));
        assert!(split(images(), vec![], 10).is_err());
    }
}
