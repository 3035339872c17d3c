//! Darknet `.cfg` + `.weights` import.
//!
//! The weights file is float32 arrays laid out layer by layer in `.cfg` order after a small header;
//! it has no structure of its own, so the only integrity check available is that the reader consumes
//! it to its last byte. A shorter or longer file means the `.cfg` and `.weights` do not belong
//! together, and is refused.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result, read_file};
use crate::model::graph::{Conv, Graph, Node, Op, Pool, Tensor};

/// Darknet's BatchNorm epsilon (AlexeyAB's `normalize_cpu` adds it inside the square root).
const BN_EPSILON: f32 = 1e-6;

/// Parameters of one darknet `[yolo]` head, as written in the `.cfg`.
#[derive(Debug, Clone, PartialEq)]
pub struct YoloHead {
    /// Graph output holding this head's raw conv output.
    pub output: String,
    pub mask: Vec<usize>,
    /// All anchors of the file as (w, h) pairs in input pixels.
    pub anchors: Vec<(f32, f32)>,
    pub classes: usize,
    pub scale_x_y: f32,
}

#[derive(Debug, Clone)]
pub struct DarknetModel {
    pub graph: Graph,
    pub heads: Vec<YoloHead>,
    /// Size of the weights file header (version and `seen` counter), for reporting.
    pub header_bytes: usize,
    /// Float values read after the header: together with the header, the whole file.
    pub floats_read: usize,
}

#[derive(Debug)]
struct Section {
    kind: String,
    line: usize,
    options: BTreeMap<String, String>,
}

impl Section {
    fn get(&self, key: &str) -> Option<&str> {
        self.options.get(key).map(String::as_str)
    }

    fn int(&self, key: &str, default: i64) -> Result<i64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| self.err(format!("{key}={v} is not an integer"))),
        }
    }

    fn usize(&self, key: &str, default: usize) -> Result<usize> {
        let v = self.int(key, default as i64)?;
        usize::try_from(v).map_err(|_| self.err(format!("{key}={v} must not be negative")))
    }

    fn float(&self, key: &str, default: f32) -> Result<f32> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| self.err(format!("{key}={v} is not a number"))),
        }
    }

    fn list<T: std::str::FromStr>(&self, key: &str) -> Result<Vec<T>> {
        let Some(v) = self.get(key) else {
            return Ok(vec![]);
        };
        v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse()
                    .map_err(|_| self.err(format!("{key}: {s:?} is not a number")))
            })
            .collect()
    }

    fn err(&self, msg: String) -> Error {
        Error::Model(format!(
            "darknet .cfg line {} [{}]: {msg}",
            self.line, self.kind
        ))
    }
}

fn parse_cfg(text: &str) -> Result<Vec<Section>> {
    let mut sections: Vec<Section> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(kind) = line.strip_prefix('[') {
            let kind = kind.strip_suffix(']').ok_or_else(|| {
                Error::Model(format!(
                    "darknet .cfg line {}: unclosed section header",
                    i + 1
                ))
            })?;
            sections.push(Section {
                kind: kind.trim().to_string(),
                line: i + 1,
                options: BTreeMap::new(),
            });
            continue;
        }
        let (k, v) = line.split_once('=').ok_or_else(|| {
            Error::Model(format!(
                "darknet .cfg line {}: expected key=value, got {line:?}",
                i + 1
            ))
        })?;
        let section = sections.last_mut().ok_or_else(|| {
            Error::Model(format!(
                "darknet .cfg line {}: option before any section",
                i + 1
            ))
        })?;
        section
            .options
            .insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(sections)
}

/// Sequential reader over the float32 payload of a `.weights` file.
struct WeightReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl WeightReader<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<Vec<f32>> {
        let need = n
            .checked_mul(4)
            .ok_or_else(|| Error::Model(format!("{what}: size overflow")))?;
        let end = self.pos.checked_add(need).filter(|&e| e <= self.bytes.len()).ok_or_else(|| {
            Error::Model(format!(
                "darknet .weights file is too short: {what} needs {need} bytes at offset {}, file has {}",
                self.pos,
                self.bytes.len()
            ))
        })?;
        let out = self.bytes[self.pos..end]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        self.pos = end;
        Ok(out)
    }
}

/// Reads a darknet model from its two files.
pub fn load(cfg_path: &Path, weights_path: &Path) -> Result<DarknetModel> {
    let cfg = read_file(cfg_path)?;
    let cfg = String::from_utf8(cfg)
        .map_err(|_| Error::Model(format!("{}: not UTF-8 text", cfg_path.display())))?;
    let weights = read_file(weights_path)?;
    let name = cfg_path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("darknet")
        .to_string();
    from_bytes(&name, &cfg, &weights).map_err(|e| match e {
        Error::Model(m) => Error::Model(format!(
            "{} + {}: {m}",
            cfg_path.display(),
            weights_path.display()
        )),
        other => other,
    })
}

/// One darknet layer's output as seen by later layers.
#[derive(Clone)]
struct LayerOut {
    value: String,
    /// (channels, height, width)
    shape: (usize, usize, usize),
}

pub fn from_bytes(name: &str, cfg: &str, weights: &[u8]) -> Result<DarknetModel> {
    let sections = parse_cfg(cfg)?;
    let (net, layers) = sections
        .split_first()
        .filter(|(n, _)| n.kind == "net" || n.kind == "network")
        .ok_or_else(|| Error::Model("darknet .cfg must start with a [net] section".into()))?;
    let (width, height, channels) = (
        net.usize("width", 0)?,
        net.usize("height", 0)?,
        net.usize("channels", 3)?,
    );
    if width == 0 || height == 0 || channels == 0 {
        return Err(net.err("width, height and channels must be positive".into()));
    }

    if weights.len() < 12 {
        return Err(Error::Model(format!(
            "darknet .weights file is too short ({} bytes) for its header",
            weights.len()
        )));
    }
    let word = |i: usize| {
        i32::from_le_bytes([
            weights[4 * i],
            weights[4 * i + 1],
            weights[4 * i + 2],
            weights[4 * i + 3],
        ])
    };
    let (major, minor) = (word(0), word(1));
    // The `seen` counter became 64-bit in format 0.2.
    let header_bytes = if major * 10 + minor >= 2 { 20 } else { 16 };
    if weights.len() < header_bytes {
        return Err(Error::Model(
            "darknet .weights file is too short for its header".into(),
        ));
    }
    let mut reader = WeightReader {
        bytes: weights,
        pos: header_bytes,
    };

    let input = "input".to_string();
    let mut graph = Graph {
        name: name.to_string(),
        input: input.clone(),
        input_shape: vec![1, channels, height, width],
        outputs: vec![],
        nodes: vec![],
        weights: BTreeMap::new(),
    };
    let mut heads = Vec::new();
    let mut outs: Vec<LayerOut> = Vec::new();
    let mut prev = LayerOut {
        value: input,
        shape: (channels, height, width),
    };

    let resolve = |outs: &[LayerOut], s: &Section, idx: i64, here: usize| -> Result<LayerOut> {
        let abs = if idx < 0 { here as i64 + idx } else { idx };
        if abs < 0 || abs as usize >= here {
            return Err(s.err(format!(
                "refers to layer {idx}, which is not before layer {here}"
            )));
        }
        Ok(outs[abs as usize].clone())
    };

    for (i, s) in layers.iter().enumerate() {
        let out = match s.kind.as_str() {
            "convolutional" => {
                let (c_in, h, w) = prev.shape;
                let filters = s.usize("filters", 1)?;
                let size = s.usize("size", 1)?;
                let stride = s.usize("stride", 1)?;
                let groups = s.usize("groups", 1)?;
                let padding = if s.int("pad", 0)? != 0 {
                    size / 2
                } else {
                    s.usize("padding", 0)?
                };
                if filters == 0
                    || size == 0
                    || stride == 0
                    || groups == 0
                    || c_in % groups != 0
                    || filters % groups != 0
                {
                    return Err(s.err(format!("filters={filters} size={size} stride={stride} groups={groups} do not fit {c_in} input channels")));
                }
                if s.int("dilation", 1)? != 1
                    || s.get("stride_x").is_some()
                    || s.get("stride_y").is_some()
                {
                    return Err(s.err("dilation and asymmetric strides are not supported".into()));
                }
                let n_weights = filters * (c_in / groups) * size * size;
                let bn = s.int("batch_normalize", 0)? != 0;
                let what = format!("layer {i} (conv)");
                let mut bias = reader.take(filters, &what)?;
                let bn_params = if bn {
                    Some((
                        reader.take(filters, &what)?,
                        reader.take(filters, &what)?,
                        reader.take(filters, &what)?,
                    ))
                } else {
                    None
                };
                let mut weight = reader.take(n_weights, &what)?;
                if let Some((gamma, mean, var)) = bn_params {
                    let per_out = n_weights / filters;
                    for o in 0..filters {
                        let scale = gamma[o] / (var[o] + BN_EPSILON).sqrt();
                        weight[o * per_out..(o + 1) * per_out]
                            .iter_mut()
                            .for_each(|v| *v *= scale);
                        bias[o] -= mean[o] * scale;
                    }
                }
                let wname = format!("conv{i}.weight");
                let bname = format!("conv{i}.bias");
                graph.weights.insert(
                    wname.clone(),
                    Tensor::new(vec![filters, c_in / groups, size, size], weight)?,
                );
                graph
                    .weights
                    .insert(bname.clone(), Tensor::new(vec![filters], bias)?);
                let conv_out = format!("conv{i}");
                graph.nodes.push(Node {
                    name: conv_out.clone(),
                    op: Op::Conv(Conv {
                        weight: wname,
                        bias: Some(bname),
                        kernel: [size, size],
                        stride: [stride, stride],
                        pads: [padding; 4],
                        dilation: [1, 1],
                        groups,
                    }),
                    inputs: vec![prev.value.clone()],
                    output: conv_out.clone(),
                });
                let oh = (h + 2 * padding).checked_sub(size).map(|v| v / stride + 1);
                let ow = (w + 2 * padding).checked_sub(size).map(|v| v / stride + 1);
                let (Some(oh), Some(ow)) = (oh, ow) else {
                    return Err(s.err(format!("kernel {size} larger than padded input {h}x{w}")));
                };
                let value = push_activation(&mut graph, s, i, conv_out)?;
                LayerOut {
                    value,
                    shape: (filters, oh, ow),
                }
            }
            "shortcut" => {
                let from = resolve(&outs, s, s.int("from", 0)?, i)?;
                if from.shape != prev.shape {
                    return Err(s.err(format!("adds shapes {:?} and {:?}", prev.shape, from.shape)));
                }
                if s.get("weights_type").is_some_and(|v| v != "none") {
                    return Err(s.err("weighted shortcuts are not supported".into()));
                }
                let value = format!("shortcut{i}");
                graph.nodes.push(Node {
                    name: value.clone(),
                    op: Op::Add,
                    inputs: vec![prev.value.clone(), from.value.clone()],
                    output: value.clone(),
                });
                let value = push_activation(&mut graph, s, i, value)?;
                LayerOut {
                    value,
                    shape: prev.shape,
                }
            }
            "route" => {
                if s.int("groups", 1)? != 1 {
                    return Err(s.err("grouped routes are not supported".into()));
                }
                let idx: Vec<i64> = s.list("layers")?;
                if idx.is_empty() {
                    return Err(s.err("route without layers".into()));
                }
                let parts = idx
                    .iter()
                    .map(|&l| resolve(&outs, s, l, i))
                    .collect::<Result<Vec<_>>>()?;
                if parts.len() == 1 {
                    parts[0].clone()
                } else {
                    let (_, h, w) = parts[0].shape;
                    if parts.iter().any(|p| (p.shape.1, p.shape.2) != (h, w)) {
                        return Err(s.err("routed layers differ in spatial size".into()));
                    }
                    let value = format!("route{i}");
                    graph.nodes.push(Node {
                        name: value.clone(),
                        op: Op::Concat { axis: 1 },
                        inputs: parts.iter().map(|p| p.value.clone()).collect(),
                        output: value.clone(),
                    });
                    LayerOut {
                        value,
                        shape: (parts.iter().map(|p| p.shape.0).sum(), h, w),
                    }
                }
            }
            "upsample" => {
                let f = s.usize("stride", 2)?;
                if f == 0 {
                    return Err(s.err("stride must be positive".into()));
                }
                let value = format!("upsample{i}");
                graph.nodes.push(Node {
                    name: value.clone(),
                    op: Op::ResizeNearest { scale: [f, f] },
                    inputs: vec![prev.value.clone()],
                    output: value.clone(),
                });
                let (c, h, w) = prev.shape;
                LayerOut {
                    value,
                    shape: (c, h * f, w * f),
                }
            }
            "maxpool" => {
                let size = s.usize("size", 1)?;
                let stride = s.usize("stride", 1)?;
                // Darknet pads `size - 1` in total by default, starting `padding / 2` before the image.
                let padding = s.usize("padding", size.saturating_sub(1))?;
                if size == 0 || stride == 0 {
                    return Err(s.err("size and stride must be positive".into()));
                }
                let (c, h, w) = prev.shape;
                let (before, after) = (padding / 2, padding - padding / 2);
                let oh = (h + padding).checked_sub(size).map(|v| v / stride + 1);
                let ow = (w + padding).checked_sub(size).map(|v| v / stride + 1);
                let (Some(oh), Some(ow)) = (oh, ow) else {
                    return Err(s.err("pool window larger than input".into()));
                };
                let value = format!("maxpool{i}");
                graph.nodes.push(Node {
                    name: value.clone(),
                    op: Op::MaxPool(Pool {
                        kernel: [size, size],
                        stride: [stride, stride],
                        pads: [before, before, after, after],
                    }),
                    inputs: vec![prev.value.clone()],
                    output: value.clone(),
                });
                LayerOut {
                    value,
                    shape: (c, oh, ow),
                }
            }
            "dropout" => prev.clone(),
            "yolo" => {
                let anchors: Vec<f32> = s.list("anchors")?;
                if !anchors.len().is_multiple_of(2) {
                    return Err(s.err("anchors must come in (w, h) pairs".into()));
                }
                let anchors: Vec<(f32, f32)> = anchors.chunks(2).map(|p| (p[0], p[1])).collect();
                let mask: Vec<usize> = s.list("mask")?;
                if mask.iter().any(|&m| m >= anchors.len()) {
                    return Err(s.err(format!(
                        "mask {mask:?} refers past {} anchors",
                        anchors.len()
                    )));
                }
                let classes = s.usize("classes", 0)?;
                if prev.shape.0 != mask.len() * (classes + 5) {
                    return Err(s.err(format!(
                        "input has {} channels, expected {} anchors x ({classes} classes + 5)",
                        prev.shape.0,
                        mask.len()
                    )));
                }
                graph.outputs.push(prev.value.clone());
                heads.push(YoloHead {
                    output: prev.value.clone(),
                    mask,
                    anchors,
                    classes,
                    scale_x_y: s.float("scale_x_y", 1.0)?,
                });
                prev.clone()
            }
            other => return Err(s.err(format!("unsupported darknet layer type [{other}]"))),
        };
        outs.push(out.clone());
        prev = out;
    }
    if reader.pos != weights.len() {
        return Err(Error::Model(format!(
            "darknet .weights file is too long: the .cfg consumes {} bytes, the file has {} ({} left over)",
            reader.pos,
            weights.len(),
            weights.len() - reader.pos
        )));
    }
    if heads.is_empty() {
        return Err(Error::Model("darknet .cfg has no [yolo] layer".into()));
    }
    graph.infer_shapes()?;
    Ok(DarknetModel {
        graph,
        heads,
        header_bytes,
        floats_read: (reader.pos - header_bytes) / 4,
    })
}

fn push_activation(graph: &mut Graph, s: &Section, i: usize, input: String) -> Result<String> {
    let op = match s.get("activation").unwrap_or("linear") {
        "linear" => return Ok(input),
        "leaky" => Op::LeakyRelu { alpha: 0.1 },
        "relu" => Op::Relu,
        "logistic" => Op::Sigmoid,
        other => return Err(s.err(format!("unsupported activation {other:?}"))),
    };
    let value = format!("{input}.act{i}");
    graph.nodes.push(Node {
        name: value.clone(),
        op,
        inputs: vec![input],
        output: value.clone(),
    });
    Ok(value)
}
