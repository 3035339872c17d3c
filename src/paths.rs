//! Where shared, read-only data lives. The repository never holds weights or images: they are found
//! through environment variables whose defaults point at the `shared/` folder beside the checkout.

use std::path::PathBuf;

/// Environment variable naming the folder that holds one sub-folder per pretrained model.
pub const MODEL_DIR_VAR: &str = "LBW_MODEL_DIR";
/// Environment variable naming the folder that holds the datasets (`voc2007-sample`, `coco128`, ...).
pub const DATA_DIR_VAR: &str = "LBW_DATA_DIR";

fn shared_default(sub: &str) -> PathBuf {
    // Relative to the working directory first (running from the repository root), then relative to
    // the source tree this binary was built from, so tests and `cargo run` work from any directory.
    let cwd = PathBuf::from("..").join("shared").join(sub);
    if cwd.is_dir() {
        return cwd;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("shared")
        .join(sub)
}

pub fn model_dir() -> PathBuf {
    std::env::var_os(MODEL_DIR_VAR)
        .map(PathBuf::from)
        .unwrap_or_else(|| shared_default("models"))
}

pub fn data_dir() -> PathBuf {
    std::env::var_os(DATA_DIR_VAR)
        .map(PathBuf::from)
        .unwrap_or_else(|| shared_default("data"))
}
