//! Training checkpoints: everything needed to continue a run exactly where it stopped.
//!
//! Layout: the 8-byte magic `LBWCKPT1`, a little-endian `u64` JSON length, the JSON header
//! ([`CheckpointHeader`]), then for each parameter in header order its values, Adam's first moments
//! and second moments as little-endian `f32`. Files are written to a temporary beside the target and
//! renamed, so an interrupted run leaves either the previous checkpoint or the new one, never half
//! of one.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, read_file};
use crate::train::optim::AdamState;

const MAGIC: &[u8; 8] = b"LBWCKPT1";

/// The run's identity and progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointHeader {
    pub model: String,
    pub bits: u8,
    pub method: String,
    pub param: Option<f32>,
    pub per_channel: bool,
    /// Scales trained as parameters (their slots follow their weights in `params`); absent in
    /// checkpoints from before they existed, which recomputed them every step.
    #[serde(default)]
    pub learned_alphas: bool,
    /// Distillation term weights; `None` in checkpoints from before they were settable, whose runs
    /// averaged the class term over the classes with unit weights
    /// ([`crate::train::TermWeights::legacy`]).
    #[serde(default)]
    pub loss_weights: Option<crate::train::TermWeights>,
    pub keep_full_precision: Vec<String>,
    pub seed: u64,
    pub batch: usize,
    pub lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub resolution: [u32; 2],
    pub augment: bool,
    pub fake_quant_activations: bool,
    /// The `.lbw` the student started from (`--init`), if not the FP32 weights.
    #[serde(default)]
    pub init: Option<String>,
    /// Steps completed; training continues at this 0-based step.
    pub step: u64,
    /// Wall-clock seconds spent in training so far (over all resumed runs).
    pub elapsed_s: f64,
    /// Current activation ranges by value name.
    pub activation_ranges: BTreeMap<String, [f32; 2]>,
    /// Loss of the first step (the post-training-quantized model) and a moving average now.
    pub initial_loss: Option<f64>,
    pub recent_loss: Option<f64>,
    pub params: Vec<ParamEntry>,
    /// Photos held out of training (`--holdout`); 0 in checkpoints from before it existed.
    #[serde(default)]
    pub holdout: usize,
    /// The lowest held-out loss so far, whose parameters are in the run's `.best.lbw`.
    #[serde(default)]
    pub best_holdout: Option<BestHoldout>,
    /// Weights that were zero in the starting file stay zero (`--keep-zeros`).
    #[serde(default)]
    pub keep_zeros: bool,
}

/// A held-out measurement: after `step` steps (0: before the first), the loss `loss`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BestHoldout {
    pub step: u64,
    pub loss: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamEntry {
    pub name: String,
    pub shape: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub header: CheckpointHeader,
    pub values: Vec<Vec<f32>>,
    pub adam: Vec<AdamState>,
}

impl Checkpoint {
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let json = serde_json::to_vec(&self.header)
            .map_err(|e| Error::Model(format!("cannot encode a checkpoint header: {e}")))?;
        let floats: usize = self.values.iter().map(Vec::len).sum::<usize>() * 3;
        let mut out = Vec::with_capacity(16 + json.len() + 4 * floats);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        for (v, s) in self.values.iter().zip(&self.adam) {
            for x in v.iter().chain(&s.m).chain(&s.v) {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        Ok(out)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Checkpoint> {
        let bad = |m: &str| Error::Model(format!("checkpoint: {m}"));
        if bytes.len() < 16 || &bytes[..8] != MAGIC {
            return Err(bad("not an lbw training checkpoint (bad magic bytes)"));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[8..16]);
        let json_len = usize::try_from(u64::from_le_bytes(len))
            .ok()
            .filter(|&l| l <= bytes.len() - 16)
            .ok_or_else(|| bad("header length exceeds the file"))?;
        let header: CheckpointHeader = serde_json::from_slice(&bytes[16..16 + json_len])
            .map_err(|e| bad(&format!("header is not valid: {e}")))?;
        let mut rest = &bytes[16 + json_len..];
        let mut take = |n: usize| -> Result<Vec<f32>> {
            let nbytes = n.checked_mul(4).filter(|&b| b <= rest.len());
            let Some(nbytes) = nbytes else {
                return Err(bad("truncated (fewer values than the header announces)"));
            };
            let (head, tail) = rest.split_at(nbytes);
            rest = tail;
            Ok(head
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        let mut values = Vec::with_capacity(header.params.len());
        let mut adam = Vec::with_capacity(header.params.len());
        for p in &header.params {
            let n = crate::quant::checked_product(&p.shape)
                .ok_or_else(|| bad(&format!("parameter {:?} has an overflowing shape", p.name)))?;
            values.push(take(n)?);
            adam.push(AdamState {
                m: take(n)?,
                v: take(n)?,
            });
        }
        if !rest.is_empty() {
            return Err(bad("trailing bytes after the last parameter"));
        }
        Ok(Checkpoint {
            header,
            values,
            adam,
        })
    }

    pub fn read(path: &Path) -> Result<Checkpoint> {
        Checkpoint::from_bytes(&read_file(path)?)
            .map_err(|e| Error::Model(format!("{}: {e}", path.display())))
    }

    /// Writes through a temporary file and a rename (atomic on one file system).
    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let header = CheckpointHeader {
            model: "m".into(),
            bits: 6,
            method: "lbw".into(),
            param: None,
            per_channel: false,
            learned_alphas: false,
            loss_weights: Some(crate::train::TermWeights::default()),
            keep_full_precision: vec![],
            seed: 1,
            batch: 2,
            lr: 1e-3,
            warmup_steps: 1,
            total_steps: 10,
            resolution: [32, 32],
            augment: true,
            fake_quant_activations: true,
            init: Some("d4.lbw".into()),
            step: 3,
            elapsed_s: 1.5,
            activation_ranges: BTreeMap::from([("x".to_string(), [0.0, 1.0])]),
            initial_loss: Some(1.0),
            recent_loss: Some(0.5),
            params: vec![ParamEntry {
                name: "w".into(),
                shape: vec![2, 1],
            }],
            holdout: 3,
            best_holdout: Some(BestHoldout {
                step: 2,
                loss: 0.25,
            }),
            keep_zeros: true,
        };
        let c = Checkpoint {
            header,
            values: vec![vec![1.0, 2.0]],
            adam: vec![AdamState {
                m: vec![0.1, 0.2],
                v: vec![0.3, 0.4],
            }],
        };
        let bytes = c.to_bytes().unwrap();
        assert_eq!(Checkpoint::from_bytes(&bytes).unwrap(), c);
        for cut in [0, 10, bytes.len() - 1] {
            assert!(Checkpoint::from_bytes(&bytes[..cut]).is_err());
        }
    }
}
