//! FP32 baseline through tract-onnx: the internal graph is exported to ONNX in memory and optimised
//! by tract once at load.

use std::sync::Arc;

use tract_onnx::prelude::*;

use crate::engine::Backend;
use crate::error::{Error, Result};
use crate::model::{Graph, Tensor, onnx};

type Plan = Arc<TypedRunnableModel>;

pub struct TractFp32 {
    plan: Plan,
    input_shape: Vec<usize>,
    weight_bytes: usize,
}

fn tract_err(e: impl std::fmt::Display) -> Error {
    Error::Inference(format!("tract: {e:#}"))
}

impl TractFp32 {
    pub fn new(graph: &Graph) -> Result<Self> {
        let proto = onnx::to_model_proto(graph)?;
        let plan = tract_onnx::onnx()
            .model_for_proto_model(&proto)
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(|e| Error::Model(format!("tract cannot load {}: {e:#}", graph.name)))?;
        Ok(TractFp32 {
            plan,
            input_shape: graph.input_shape.clone(),
            weight_bytes: graph.parameter_count() * 4,
        })
    }
}

impl Backend for TractFp32 {
    fn engine(&self) -> &'static str {
        "tract"
    }

    fn kernel(&self) -> &str {
        "tract-fp32"
    }

    fn run(&self, input: Tensor) -> Result<Vec<Tensor>> {
        if input.shape != self.input_shape {
            return Err(Error::Inference(format!(
                "input shape {:?}, expected {:?}",
                input.shape, self.input_shape
            )));
        }
        let x = tract_onnx::prelude::Tensor::from_shape(&input.shape, &input.data)
            .map_err(tract_err)?;
        let outputs = self.plan.run(tvec!(x.into())).map_err(tract_err)?;
        outputs
            .iter()
            .map(|o| {
                let view = o.to_plain_array_view::<f32>().map_err(tract_err)?;
                Tensor::new(view.shape().to_vec(), view.iter().copied().collect())
            })
            .collect()
    }

    fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }
}
