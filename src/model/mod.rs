//! Models: the internal graph, importers (darknet, ONNX), ONNX export and manifests.

pub mod darknet;
pub mod graph;
pub mod lbw_file;
pub mod manifest;
pub mod onnx;

pub use graph::{Conv, Graph, Node, Op, Pool, Tensor};
pub use manifest::{DEFAULT_MODEL, Manifest};

use crate::error::Result;

/// A pretrained detector imported into the internal graph.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub manifest: Manifest,
    pub graph: Graph,
}

/// Imports a built-in model by id from [`crate::paths::model_dir`], files verified by sha256.
pub fn load_builtin(id: &str) -> Result<LoadedModel> {
    load_builtin_from(id, &crate::paths::model_dir())
}

/// Imports a built-in model by id from `models_root/<id>/`, files verified by sha256.
pub fn load_builtin_from(id: &str, models_root: &std::path::Path) -> Result<LoadedModel> {
    let manifest = manifest::find(id)?;
    let path = |role| manifest.verified_path_in(models_root, role);
    let graph = match manifest.format {
        manifest::Format::Darknet => darknet::load(&path("cfg")?, &path("weights")?)?.graph,
        manifest::Format::Onnx => onnx::load(&path("onnx")?)?,
    };
    Ok(LoadedModel { manifest, graph })
}
