//! Helpers shared by the `lbw finetune` integration tests: a scratch folder per test and process,
//! a short run's settings, and its JSON-lines log.

use std::path::{Path, PathBuf};

use lbw::quant::Bits;
use lbw::train::{FinetuneConfig, StepReport};

/// An empty folder under the system temp dir, unique to this test binary's process.
pub fn scratch(prefix: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{prefix}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A few 6-bit steps of yolo-fastest-voc on batches of 2 at 128x128: seconds, not minutes.
pub fn short_run(images: &Path, output: PathBuf, steps: u64, seed: u64) -> FinetuneConfig {
    let mut cfg = FinetuneConfig::new(
        "yolo-fastest-voc",
        Bits::new(6).unwrap(),
        vec![images.to_path_buf()],
        output,
    );
    cfg.steps = Some(steps);
    cfg.batch = 2;
    cfg.resolution = Some(128);
    cfg.lr = 1e-3;
    cfg.warmup_steps = Some(1);
    cfg.seed = seed;
    cfg.checkpoint_every = steps / 2;
    cfg
}

pub fn log_steps(path: &Path) -> Vec<StepReport> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
