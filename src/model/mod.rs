//! Models: the internal graph, importers (darknet, ONNX), ONNX export and manifests.

pub mod darknet;
pub mod graph;
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

/// Imports a built-in model by id: files located through the manifest and verified by sha256.
pub fn load_builtin(id: &str) -> Result<LoadedModel> {
    let manifest = manifest::find(id)?;
    let graph = match manifest.format {
        manifest::Format::Darknet => {
            darknet::load(
                &manifest.verified_path("cfg")?,
                &manifest.verified_path("weights")?,
            )?
            .graph
        }
        manifest::Format::Onnx => onnx::load(&manifest.verified_path("onnx")?)?,
    };
    Ok(LoadedModel { manifest, graph })
}
