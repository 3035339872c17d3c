//! A differentiable interpreter of the internal graph on burn tensors.
//!
//! The same [`TrainGraph`] runs the FP32 teacher (constant weights, no autodiff) and the LBW
//! student (autodiff leaves for the full-precision shadow weights, quantized in the forward pass
//! with a straight-through gradient, and 8-bit fake-quantized activations).
//!
//! # Activation fake quantization
//!
//! It simulates what [`crate::engine::shift_add`] stores: every value is a `u8` on a per-tensor
//! affine grid `scale * (q - zero_point)` made by [`QParams::from_range`] from a mean-of-per-image
//! min/max range ([`crate::engine::quant_params::RangeObserver::MeanMinMax`]). As in the engine:
//! * the graph input and every node output are on a grid, except graph outputs (f32) and a conv's
//!   output read only by a ReLU / LeakyReLU (the engine fuses the activation, so the
//!   pre-activation is never stored);
//! * data-movement ops (max-pool, nearest resize, pad, slice) keep their input's grid, so they
//!   need no rounding of their own.
//!
//! The rounding uses the straight-through estimator inside the grid's range and a zero gradient
//! outside it (the clamp), the usual choice for quantization-aware training.

use std::collections::{BTreeMap, HashMap, HashSet};

use burn::tensor::activation;
use burn::tensor::module::{avg_pool2d, conv2d, max_pool2d};
use burn::tensor::ops::{AvgPoolOptions, ConvOptions, MaxPoolOptions, PadMode};
use burn::tensor::{Device, Tensor, TensorData};

use crate::engine::quant_params::QParams;
use crate::error::{Error, Result};
use crate::model::{Conv, Graph, Op};

/// Builds a rank-`D` tensor from host data.
pub fn tensor_from<const D: usize>(
    data: Vec<f32>,
    shape: [usize; D],
    device: &Device,
) -> Tensor<D> {
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// Reads a tensor back to the host.
pub fn to_host<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    t.into_data()
        .try_into_vec::<f32>()
        .map_err(|e| Error::Inference(format!("reading a training tensor back: {e:?}")))
}

/// Conv weights `[out, in/groups, kh, kw]` and biases `[out]` by tensor name, as one forward pass
/// uses them (constants for the teacher, straight-through quantized leaves for the student).
#[derive(Default)]
pub struct ForwardWeights {
    pub weights: HashMap<String, Tensor<4>>,
    pub biases: HashMap<String, Tensor<1>>,
}

/// Per-value activation ranges and what to do with them during one forward pass.
#[derive(Debug, Clone, Default)]
pub struct ActivationQuant {
    /// Round stored values to their grids (false during calibration and for the teacher).
    pub enabled: bool,
    /// Record each stored value's mean per-image `(min, max)` for this batch into `observed`.
    pub observe: bool,
    /// Current ranges by value name.
    pub ranges: BTreeMap<String, [f32; 2]>,
    pub observed: BTreeMap<String, [f32; 2]>,
}

impl ActivationQuant {
    /// Moves each range towards this batch's observation by `1 - momentum` (an exponential moving
    /// average, so ranges follow the weights as they train); a value seen for the first time takes
    /// the observation as is.
    pub fn absorb_observed(&mut self, momentum: f32) {
        for (name, [lo, hi]) in std::mem::take(&mut self.observed) {
            let r = self.ranges.entry(name).or_insert([lo, hi]);
            r[0] = momentum * r[0] + (1.0 - momentum) * lo;
            r[1] = momentum * r[1] + (1.0 - momentum) * hi;
        }
    }

    /// The engine's grid for a range.
    pub fn params(range: [f32; 2]) -> QParams {
        QParams::from_range(range[0], range[1])
    }
}

/// The graph prepared for training: which values are stored as `u8`, and the op checks done once.
#[derive(Debug, Clone)]
pub struct TrainGraph {
    graph: Graph,
    /// Names of the values the engine stores on an 8-bit grid, in execution order (input first).
    stored: Vec<String>,
}

impl TrainGraph {
    /// Checks every op can be trained and decides which values are fake-quantized.
    pub fn new(graph: &Graph) -> Result<TrainGraph> {
        Self::with_float_convs(graph, &HashSet::new())
    }

    /// As [`TrainGraph::new`], for a student whose convs with these weights stay at full
    /// precision: the engine runs such a conv as a float step that stores its output on an 8-bit
    /// grid before the activation, instead of fusing the activation into its epilogue, so that
    /// pre-activation value is fake-quantized here too.
    pub fn with_float_convs(graph: &Graph, float_convs: &HashSet<String>) -> Result<TrainGraph> {
        let shapes = graph.infer_shapes()?;
        let mut readers: HashMap<&str, Vec<&Op>> = HashMap::new();
        for node in &graph.nodes {
            for i in &node.inputs {
                readers.entry(i.as_str()).or_default().push(&node.op);
            }
        }
        let mut stored = vec![graph.input.clone()];
        for node in &graph.nodes {
            let rank4 =
                shapes[&node.output].len() == 4 && node.inputs.iter().all(|i| shapes[i].len() == 4);
            let trainable = match &node.op {
                Op::Conv(_) => true,
                Op::Relu
                | Op::LeakyRelu { .. }
                | Op::Sigmoid
                | Op::Mul
                | Op::Add
                | Op::Concat { .. }
                | Op::ResizeNearest { .. }
                | Op::MaxPool(_)
                | Op::AvgPool { .. }
                | Op::Pad { .. }
                | Op::Softmax { .. } => true,
                Op::Slice { steps, .. } => steps.iter().all(|&s| s == 1),
                Op::Reshape { .. } | Op::Transpose { .. } | Op::Gather { .. } => false,
            };
            if !(trainable && rank4) {
                return Err(Error::Model(format!(
                    "{}: node {} ({}) cannot be retrained yet: the training interpreter runs \
                     rank-4 conv, activation, add, mul, concat, resize, pool, pad, slice and \
                     softmax ops",
                    graph.name,
                    node.name,
                    node.op.onnx_name()
                )));
            }
            let keeps_grid = matches!(
                node.op,
                Op::ResizeNearest { .. }
                    | Op::MaxPool(_)
                    | Op::Pad { value: 0.0, .. }
                    | Op::Slice { .. }
            );
            let fused_pre_activation = matches!(&node.op, Op::Conv(c) if !float_convs.contains(&c.weight))
                && readers.get(node.output.as_str()).is_some_and(|r| {
                    r.len() == 1 && matches!(r[0], Op::Relu | Op::LeakyRelu { .. })
                });
            if !(graph.outputs.contains(&node.output) || keeps_grid || fused_pre_activation) {
                stored.push(node.output.clone());
            }
        }
        Ok(TrainGraph {
            graph: graph.clone(),
            stored,
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The values fake-quantized in the student.
    pub fn stored_values(&self) -> &[String] {
        &self.stored
    }

    /// Runs a batch `[N, C, H, W]` (any `H`, `W` the graph's strides divide) and returns the graph
    /// outputs in order.
    pub fn forward(
        &self,
        input: Tensor<4>,
        w: &ForwardWeights,
        act: &mut ActivationQuant,
    ) -> Result<Vec<Tensor<4>>> {
        let stored: std::collections::HashSet<&str> =
            self.stored.iter().map(String::as_str).collect();
        let mut last_use: HashMap<&str, usize> = HashMap::new();
        for (i, n) in self.graph.nodes.iter().enumerate() {
            for v in &n.inputs {
                last_use.insert(v.as_str(), i);
            }
        }
        let mut values: HashMap<&str, Tensor<4>> = HashMap::new();
        let x = fake_quant_value(&self.graph.input, input, act)?;
        values.insert(self.graph.input.as_str(), x);
        for (i, node) in self.graph.nodes.iter().enumerate() {
            let ins: Vec<Tensor<4>> = node
                .inputs
                .iter()
                .map(|n| {
                    values.get(n.as_str()).cloned().ok_or_else(|| {
                        Error::Model(format!(
                            "node {} reads {n:?} before it is computed",
                            node.name
                        ))
                    })
                })
                .collect::<Result<_>>()?;
            let mut out = eval_op(&node.op, ins, w).map_err(|e| {
                Error::Inference(format!(
                    "training node {} ({}): {e}",
                    node.name,
                    node.op.onnx_name()
                ))
            })?;
            if stored.contains(node.output.as_str()) {
                out = fake_quant_value(&node.output, out, act)?;
            }
            values.insert(node.output.as_str(), out);
            for v in &node.inputs {
                if last_use.get(v.as_str()) == Some(&i) && !self.graph.outputs.contains(v) {
                    values.remove(v.as_str());
                }
            }
        }
        self.graph
            .outputs
            .iter()
            .map(|o| {
                values
                    .get(o.as_str())
                    .cloned()
                    .ok_or_else(|| Error::Model(format!("graph output {o:?} is never computed")))
            })
            .collect()
    }
}

/// Observes and/or rounds one stored value.
fn fake_quant_value(name: &str, x: Tensor<4>, act: &mut ActivationQuant) -> Result<Tensor<4>> {
    if act.observe {
        let [n, ..] = x.dims();
        let flat: Tensor<2> = x.clone().detach().reshape([n as i64, -1]);
        let lo = to_host(flat.clone().min_dim(1))?;
        let hi = to_host(flat.max_dim(1))?;
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len().max(1) as f32;
        act.observed
            .insert(name.to_string(), [mean(&lo), mean(&hi)]);
    }
    if !act.enabled {
        return Ok(x);
    }
    let Some(&range) = act.ranges.get(name) else {
        return Ok(x);
    };
    let p = ActivationQuant::params(range);
    let (lo, hi) = p.range();
    let clamped = x.clamp(lo, hi);
    // round(x / s + zp) - zp == round(x / s) for an integer zero point (ties aside), so the zero
    // point only enters through the clamp bounds.
    let rounded = (clamped.clone().detach() / p.scale).round() * p.scale;
    Ok(clamped.clone() + (rounded - clamped.detach()))
}

fn eval_op(
    op: &Op,
    mut ins: Vec<Tensor<4>>,
    w: &ForwardWeights,
) -> std::result::Result<Tensor<4>, String> {
    let first = || -> std::result::Result<Tensor<4>, String> { Err("missing input".to_string()) };
    Ok(match op {
        Op::Conv(c) => {
            let x = ins.pop().map_or_else(first, Ok)?;
            conv(x, c, w)?
        }
        Op::Relu => activation::relu(ins.pop().map_or_else(first, Ok)?),
        Op::LeakyRelu { alpha } => {
            let x = ins.pop().map_or_else(first, Ok)?;
            // max(x, alpha x) for 0 <= alpha <= 1; one elementwise op and a cheap gradient.
            if (0.0..=1.0).contains(alpha) {
                let a = f64::from(*alpha);
                activation::relu(x.clone()) * (1.0 - a) + x * a
            } else {
                activation::leaky_relu(x, f64::from(*alpha))
            }
        }
        Op::Sigmoid => activation::sigmoid(ins.pop().map_or_else(first, Ok)?),
        Op::Mul | Op::Add => {
            let (Some(b), Some(a)) = (ins.pop(), ins.pop()) else {
                return Err("needs two inputs".into());
            };
            if matches!(op, Op::Add) { a + b } else { a * b }
        }
        Op::Concat { axis } => Tensor::cat(ins, *axis),
        Op::ResizeNearest { scale } => {
            let x = ins.pop().map_or_else(first, Ok)?;
            let [n, c, h, wd] = x.dims();
            let [sy, sx] = *scale;
            // Nearest upsampling by integer factors is a broadcast: its gradient sums each block.
            let x6: Tensor<6> = x.reshape([n, c, h, 1, wd, 1]);
            x6.expand([n, c, h, sy, wd, sx])
                .reshape([n, c, h * sy, wd * sx])
        }
        Op::MaxPool(p) => {
            let x = ins.pop().map_or_else(first, Ok)?;
            let mut o = MaxPoolOptions::new(p.kernel);
            o.stride = p.stride;
            o.padding = [(p.pads[0], p.pads[2]), (p.pads[1], p.pads[3])];
            max_pool2d(x, o)
        }
        Op::AvgPool {
            pool,
            count_include_pad,
        } => {
            let x = ins.pop().map_or_else(first, Ok)?;
            let mut o = AvgPoolOptions::new(pool.kernel);
            o.stride = pool.stride;
            o.padding = [(pool.pads[0], pool.pads[2]), (pool.pads[1], pool.pads[3])];
            o.count_include_pad = *count_include_pad;
            avg_pool2d(x, o)
        }
        Op::Pad { pads, value } => {
            let x = ins.pop().map_or_else(first, Ok)?;
            x.pad(
                [(pads[0], pads[2]), (pads[1], pads[3])],
                PadMode::Constant(*value),
            )
        }
        Op::Slice {
            axes, starts, ends, ..
        } => {
            let mut x = ins.pop().map_or_else(first, Ok)?;
            for ((&a, &s), &e) in axes.iter().zip(starts).zip(ends) {
                x = x.narrow(a, s as usize, (e - s) as usize);
            }
            x
        }
        Op::Softmax { axis } => activation::softmax(ins.pop().map_or_else(first, Ok)?, *axis),
        Op::Reshape { .. } | Op::Transpose { .. } | Op::Gather { .. } => {
            return Err("rank-changing ops are not supported in training".into());
        }
    })
}

fn conv(x: Tensor<4>, c: &Conv, w: &ForwardWeights) -> std::result::Result<Tensor<4>, String> {
    let weight = w
        .weights
        .get(&c.weight)
        .cloned()
        .ok_or_else(|| format!("no weight {:?}", c.weight))?;
    let bias = match &c.bias {
        Some(b) => Some(
            w.biases
                .get(b)
                .cloned()
                .ok_or_else(|| format!("no bias {b:?}"))?,
        ),
        None => None,
    };
    let [o, ci, _, _] = weight.dims();
    let plain_1x1 = c.kernel == [1, 1] && c.stride == [1, 1] && c.pads == [0; 4] && c.groups == 1;
    if plain_1x1 {
        // A 1x1 conv is a matrix product over channels; the batched matmul is several times faster
        // than the generic conv kernels on CPU, forward and backward.
        let [n, _, h, wd] = x.dims();
        let x3: Tensor<3> = x.reshape([n, ci, h * wd]);
        let w3: Tensor<3> = weight.reshape([1, o, ci]).expand([n, o, ci]);
        let mut y: Tensor<4> = w3.matmul(x3).reshape([n, o, h, wd]);
        if let Some(b) = bias {
            y = y + b.reshape([1, o, 1, 1]);
        }
        return Ok(y);
    }
    let options = ConvOptions::new_with_padding(
        c.stride,
        [(c.pads[0], c.pads[2]), (c.pads[1], c.pads[3])],
        c.dilation,
        c.groups,
    );
    Ok(conv2d(x, weight, bias, options))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Node, Tensor as HostTensor};

    /// One-conv graph: `y = conv(x)`, for checking gradients against finite differences.
    fn conv_graph(cin: usize, cout: usize, k: usize, stride: usize, groups: usize) -> Graph {
        let conv = Conv {
            weight: "w".into(),
            bias: Some("b".into()),
            kernel: [k, k],
            stride: [stride, stride],
            pads: [k / 2; 4],
            dilation: [1, 1],
            groups,
        };
        let mut weights = BTreeMap::new();
        let wn = cout * (cin / groups) * k * k;
        weights.insert(
            "w".to_string(),
            HostTensor::new(
                vec![cout, cin / groups, k, k],
                (0..wn)
                    .map(|i| ((i * 7 % 11) as f32 - 5.0) / 10.0)
                    .collect(),
            )
            .unwrap(),
        );
        weights.insert(
            "b".to_string(),
            HostTensor::new(vec![cout], vec![0.1; cout]).unwrap(),
        );
        Graph {
            name: "t".into(),
            input: "x".into(),
            input_shape: vec![1, cin, 6, 6],
            outputs: vec!["y".into()],
            nodes: vec![Node {
                name: "c".into(),
                op: Op::Conv(conv),
                inputs: vec!["x".into()],
                output: "y".into(),
            }],
            weights,
        }
    }

    fn loss_and_grad(g: &Graph, w: &[f32], x: &[f32], with_grad: bool) -> (f32, Vec<f32>) {
        let device = Device::flex().autodiff();
        let ws = &g.weights["w"].shape;
        let mut leaf = tensor_from(w.to_vec(), [ws[0], ws[1], ws[2], ws[3]], &device);
        if with_grad {
            leaf = leaf.require_grad();
        }
        let mut fw = ForwardWeights::default();
        fw.weights.insert("w".into(), leaf.clone());
        let b = &g.weights["b"];
        fw.biases
            .insert("b".into(), tensor_from(b.data.clone(), [b.len()], &device));
        let s = &g.input_shape;
        let input = tensor_from(x.to_vec(), [s[0], s[1], s[2], s[3]], &device);
        let net = TrainGraph::new(g).unwrap();
        let y = net
            .forward(input, &fw, &mut ActivationQuant::default())
            .unwrap();
        let y = y.into_iter().next().unwrap();
        // A non-trivial weighting so that every output position matters differently.
        let n: usize = y.dims().iter().product();
        let r = tensor_from(
            (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) / 3.0).collect(),
            y.dims(),
            &device,
        );
        let loss = (y * r).sum();
        let value = to_host(loss.clone().detach()).unwrap()[0];
        if !with_grad {
            return (value, vec![]);
        }
        let grads = loss.backward();
        (value, to_host(leaf.grad(&grads).unwrap()).unwrap())
    }

    #[test]
    fn conv_gradients_match_finite_differences() {
        for (cin, cout, k, stride, groups) in [
            (4, 4, 3, 1, 4),
            (4, 4, 3, 2, 4),
            (4, 6, 1, 1, 1),
            (4, 4, 3, 1, 2),
            (3, 5, 3, 2, 1),
        ] {
            let g = conv_graph(cin, cout, k, stride, groups);
            let w = g.weights["w"].data.clone();
            let x: Vec<f32> = (0..cin * 36)
                .map(|i| ((i * 5 % 9) as f32 - 4.0) / 4.0)
                .collect();
            let (_, grad) = loss_and_grad(&g, &w, &x, true);
            for i in (0..w.len()).step_by(3) {
                let h = 1e-2;
                let mut wp = w.clone();
                wp[i] += h;
                let mut wm = w.clone();
                wm[i] -= h;
                let fd = (loss_and_grad(&g, &wp, &x, false).0
                    - loss_and_grad(&g, &wm, &x, false).0)
                    / (2.0 * h);
                assert!(
                    (fd - grad[i]).abs() < 2e-2 * (1.0 + fd.abs()),
                    "{cin}->{cout} k{k} s{stride} g{groups} w[{i}]: fd {fd} vs {}",
                    grad[i]
                );
            }
        }
    }
}
