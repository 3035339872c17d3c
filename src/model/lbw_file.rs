//! `.lbw` files: a quantized detector in one self-checking file. The byte layout is specified in
//! `docs/LBW_FORMAT.md`; this module is its only reader and writer.
//!
//! Layout: a 64-byte fixed header (magic, version, section lengths, sha256), a JSON manifest (graph
//! structure, metadata, activation scales, and a directory of the binary data), then a binary blob
//! (FP32 tensors, alphas, and codes packed at `b` bits per weight).
//!
//! The loader treats the file as hostile: every length and offset is checked against the bytes
//! actually present before anything is sliced or allocated, regions may not overlap (so no file
//! makes the loader allocate more than a fixed multiple of its own size), every code must be in the
//! set, and the decoded graph must pass [`Graph::infer_shapes`]. All failures are [`Error::Model`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result, read_file};
use crate::model::graph::{Conv, Graph, Node, Op, Pool, Tensor};
use crate::quant::{Bits, QuantizedModel, QuantizedTensor, pack_codes, packed_len, unpack_codes};

/// First 8 bytes of every `.lbw` file. Like PNG's: a non-ASCII first byte, then a CR LF and a ^Z
/// that text-mode transfers would mangle, so damaged copies are caught at the first read.
pub const MAGIC: [u8; 8] = *b"\x89LBW\r\n\x1a\n";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Size of the fixed header before the manifest.
pub const HEADER_LEN: usize = 64;
/// Alignment of the blob and of each region in it, so readers may map the file and use the data in
/// place.
const ALIGN: usize = 64;

/// Provenance and settings, stored as JSON in the manifest.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LbwMetadata {
    /// The model id the weights came from (e.g. `yolo-fastest-voc`).
    pub source_model: String,
    /// sha256 (hex) of the source model's weights file.
    pub source_sha256: String,
    /// Quantization method (`ternary`, `lbw`, `optimal`), empty if not quantized.
    pub method: String,
    /// Bit-width used for the quantized convs.
    pub bits: Option<u8>,
    /// The method's free parameter, if it has one.
    pub param: Option<f64>,
    pub per_channel: bool,
    /// Free-form training summary (epochs, losses, mAP, ...), `null` for post-training quantization.
    #[serde(default)]
    pub training: serde_json::Value,
}

/// The contents of a `.lbw` file.
#[derive(Debug, Clone, PartialEq)]
pub struct LbwFile {
    /// The complete, executable graph. Quantized weights hold `alpha * Q` (their FP32 simulation):
    /// the writer stores their codes instead of these floats, and the reader recomputes them.
    pub graph: Graph,
    /// Quantized conv weights by tensor name.
    pub quantized: BTreeMap<String, QuantizedTensor>,
    /// Per-tensor activation scales for the shift-add engine: graph value name -> scale.
    pub activation_scales: BTreeMap<String, f32>,
    /// Zero points of the 8-bit activation grids (`x = scale * (q - zero_point)`), for the values
    /// in `activation_scales` whose grid is not symmetric around 0. Files written before this
    /// field existed read as an empty map.
    pub activation_zero_points: BTreeMap<String, u8>,
    pub metadata: LbwMetadata,
}

impl LbwFile {
    /// Packages a quantized model. `source_sha256` is the hex digest of the source weights file.
    pub fn from_quantized(
        model: &QuantizedModel,
        source_model: &str,
        source_sha256: &str,
    ) -> Result<LbwFile> {
        Ok(LbwFile {
            graph: model.simulated_graph()?,
            quantized: model.tensors.clone(),
            activation_scales: BTreeMap::new(),
            activation_zero_points: BTreeMap::new(),
            metadata: LbwMetadata {
                source_model: source_model.to_string(),
                source_sha256: source_sha256.to_string(),
                method: model.options.method.name().to_string(),
                bits: Some(model.options.bits.get()),
                param: model.options.param.map(f64::from),
                per_channel: model.options.per_channel,
                training: serde_json::Value::Null,
            },
        })
    }

    /// Bytes the quantized weights take in the file: packed codes plus alphas.
    pub fn packed_weight_bytes(&self) -> usize {
        self.quantized
            .values()
            .map(QuantizedTensor::packed_bytes)
            .sum()
    }

    /// Bytes the quantized weights would take as FP32.
    pub fn fp32_weight_bytes(&self) -> usize {
        self.quantized.values().map(|q| 4 * q.len()).sum()
    }

    pub fn read(path: &Path) -> Result<LbwFile> {
        let bytes = read_file(path)?;
        LbwFile::from_bytes(&bytes).map_err(|e| Error::Model(format!("{}: {e}", path.display())))
    }

    /// Writes the file through a temporary beside it and a rename, so a reader (a server reloading
    /// the model) never sees half a file.
    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    /// Serialises. Refuses (rather than writes a file it could not read back) a graph that fails
    /// shape inference, quantized tensors that do not replace a conv weight of the same shape,
    /// invalid codes or alphas, and activation scales that are not finite and positive or name no
    /// value of the graph.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        validate(self)?;
        let mut blob = Vec::new();
        let mut tensors = Vec::new();
        for (name, t) in &self.graph.weights {
            if self.quantized.contains_key(name) {
                continue;
            }
            let offset = push_aligned(&mut blob, t.data.iter().flat_map(|v| v.to_le_bytes()));
            tensors.push(TensorEntry {
                name: name.clone(),
                shape: t.shape.clone(),
                offset,
            });
        }
        let mut quantized = Vec::new();
        for (name, q) in &self.quantized {
            let alphas = push_aligned(&mut blob, q.alphas.iter().flat_map(|v| v.to_le_bytes()));
            let codes = push_aligned(&mut blob, pack_codes(&q.codes, q.bits));
            quantized.push(QuantizedEntry {
                name: name.clone(),
                shape: q.shape.clone(),
                bits: q.bits.get(),
                alpha_count: q.alphas.len(),
                alphas,
                codes,
                objective: q.objective,
            });
        }
        let manifest = Manifest {
            format: "lbw".into(),
            metadata: self.metadata.clone(),
            graph: GraphJson::from_graph(&self.graph),
            tensors,
            quantized,
            activation_scales: self
                .activation_scales
                .iter()
                .map(|(k, &v)| (k.clone(), f64::from(v)))
                .collect(),
            activation_zero_points: self.activation_zero_points.clone(),
        };
        let mut json = serde_json::to_vec(&manifest)
            .map_err(|e| Error::Model(format!("cannot encode the .lbw manifest: {e}")))?;
        // JSON allows trailing whitespace: pad so the blob starts aligned.
        while !(HEADER_LEN + json.len()).is_multiple_of(ALIGN) {
            json.push(b' ');
        }
        let mut out = Vec::with_capacity(HEADER_LEN + json.len() + blob.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes()); // flags, reserved
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&(blob.len() as u64).to_le_bytes());
        let digest = checksum(&out[..32], &json, &blob);
        out.extend_from_slice(&digest);
        out.extend_from_slice(&json);
        out.extend_from_slice(&blob);
        Ok(out)
    }

    /// Parses and validates a `.lbw` file. Any defect is an [`Error::Model`]; nothing panics.
    pub fn from_bytes(bytes: &[u8]) -> Result<LbwFile> {
        let (json, blob) = split_checked(bytes)?;
        let manifest: Manifest =
            serde_json::from_slice(json).map_err(|e| bad(format!("manifest is not valid: {e}")))?;
        if manifest.format != "lbw" {
            return Err(bad(format!("manifest format is {:?}", manifest.format)));
        }
        let mut regions = Regions::default();
        let mut weights = BTreeMap::new();
        for t in &manifest.tensors {
            let count = element_count(&t.shape, &t.name)?;
            let len = count
                .checked_mul(4)
                .ok_or_else(|| bad(format!("tensor {:?} is too large", t.name)))?;
            let data = regions.take(blob, t.offset, len, &t.name)?;
            let values = data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let tensor = Tensor::new(t.shape.clone(), values)?;
            if weights.insert(t.name.clone(), tensor).is_some() {
                return Err(bad(format!("tensor {:?} is stored twice", t.name)));
            }
        }
        let mut quantized = BTreeMap::new();
        for q in &manifest.quantized {
            let bits = Bits::new(q.bits)
                .map_err(|_| bad(format!("tensor {:?} has bit-width {}", q.name, q.bits)))?;
            let count = element_count(&q.shape, &q.name)?;
            let alpha_len = q
                .alpha_count
                .checked_mul(4)
                .ok_or_else(|| bad(format!("tensor {:?}: too many alphas", q.name)))?;
            let alpha_bytes = regions.take(blob, q.alphas, alpha_len, &q.name)?;
            let alphas: Vec<f32> = alpha_bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let code_bytes = regions.take(blob, q.codes, packed_len(count, bits), &q.name)?;
            let codes = unpack_codes(code_bytes, count, bits)
                .map_err(|e| bad(format!("tensor {:?}: {e}", q.name)))?;
            let qt = QuantizedTensor {
                bits,
                shape: q.shape.clone(),
                alphas,
                codes,
                objective: q.objective,
            };
            qt.validate()
                .map_err(|e| bad(format!("tensor {:?}: {e}", q.name)))?;
            if weights.insert(q.name.clone(), qt.to_tensor()).is_some()
                || quantized.insert(q.name.clone(), qt).is_some()
            {
                return Err(bad(format!("tensor {:?} is stored twice", q.name)));
            }
        }
        let graph = manifest.graph.into_graph(weights)?;
        let activation_scales = manifest
            .activation_scales
            .into_iter()
            .map(|(k, v)| (k, v as f32))
            .collect();
        let file = LbwFile {
            graph,
            quantized,
            activation_scales,
            activation_zero_points: manifest.activation_zero_points,
            metadata: manifest.metadata,
        };
        validate(&file).map_err(|e| match e {
            Error::Model(m) => bad(m),
            other => other,
        })?;
        Ok(file)
    }
}

fn bad(msg: String) -> Error {
    Error::Model(format!(".lbw file: {msg}"))
}

/// sha256 over the first 32 header bytes, the manifest and the blob (everything but the digest).
fn checksum(header: &[u8], json: &[u8], blob: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(header);
    h.update(json);
    h.update(blob);
    h.finalize().into()
}

/// Checks the fixed header and the digest; returns the manifest and blob slices.
fn split_checked(bytes: &[u8]) -> Result<(&[u8], &[u8])> {
    if bytes.len() < HEADER_LEN {
        return Err(bad(format!(
            "{} bytes is shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    if bytes[..8] != MAGIC {
        return Err(bad("not an .lbw file (bad magic bytes)".into()));
    }
    let u32_at =
        |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let version = u32_at(8);
    if version != VERSION {
        return Err(bad(format!(
            "format version {version}; this build reads version {VERSION}"
        )));
    }
    if u32_at(12) != 0 {
        return Err(bad(format!("unknown flags {:#x}", u32_at(12))));
    }
    let (json_len, blob_len) = (u64_at(16), u64_at(24));
    let body = (bytes.len() - HEADER_LEN) as u64;
    if json_len.checked_add(blob_len) != Some(body) {
        return Err(bad(format!(
            "header announces {json_len} + {blob_len} bytes after it, the file has {body} \
             (truncated or padded)"
        )));
    }
    // Both fit in the file, so they fit in usize.
    let split = HEADER_LEN + json_len as usize;
    let (json, blob) = (&bytes[HEADER_LEN..split], &bytes[split..]);
    if checksum(&bytes[..32], json, blob)[..] != bytes[32..64] {
        return Err(bad("checksum mismatch (the file is corrupted)".into()));
    }
    Ok((json, blob))
}

/// Appends zero padding to the next aligned offset, then `data`; returns the data's offset.
fn push_aligned(blob: &mut Vec<u8>, data: impl IntoIterator<Item = u8>) -> u64 {
    blob.resize(blob.len().next_multiple_of(ALIGN), 0);
    let offset = blob.len() as u64;
    blob.extend(data);
    offset
}

fn element_count(shape: &[usize], name: &str) -> Result<usize> {
    crate::quant::checked_product(shape).ok_or_else(|| {
        bad(format!(
            "tensor {name:?} has an overflowing shape {shape:?}"
        ))
    })
}

/// The blob regions handed out so far. Each byte of the blob may belong to one region only: with
/// overlaps a small file could name the same megabyte a thousand times and make the loader
/// allocate a gigabyte.
#[derive(Default)]
struct Regions {
    taken: BTreeMap<usize, usize>, // start -> end
}

impl Regions {
    fn take<'a>(
        &mut self,
        blob: &'a [u8],
        offset: u64,
        len: usize,
        name: &str,
    ) -> Result<&'a [u8]> {
        let start = usize::try_from(offset).ok();
        let end = start.and_then(|s| s.checked_add(len));
        let (Some(start), Some(end)) = (start, end) else {
            return Err(bad(format!(
                "tensor {name:?}: offset {offset} is out of range"
            )));
        };
        if end > blob.len() {
            return Err(bad(format!(
                "tensor {name:?} needs bytes {start}..{end} of a {}-byte data section",
                blob.len()
            )));
        }
        if len > 0 {
            let before = self.taken.range(..end).next_back();
            if before.is_some_and(|(_, &e)| e > start) {
                return Err(bad(format!(
                    "tensor {name:?} overlaps another tensor's data"
                )));
            }
            self.taken.insert(start, end);
        }
        Ok(&blob[start..end])
    }
}

/// Everything the reader checks beyond the byte layout, and the writer checks before writing.
fn validate(file: &LbwFile) -> Result<()> {
    let shapes = file.graph.infer_shapes()?;
    let conv_weights: BTreeSet<&str> = file.graph.convs().map(|(_, c)| c.weight.as_str()).collect();
    for (name, q) in &file.quantized {
        q.validate()
            .map_err(|e| Error::Model(format!("quantized tensor {name:?}: {e}")))?;
        if !conv_weights.contains(name.as_str()) {
            return Err(Error::Model(format!(
                "quantized tensor {name:?} is not the weight of any conv"
            )));
        }
        let t = file.graph.weight(name)?;
        if t.shape != q.shape {
            return Err(Error::Model(format!(
                "quantized tensor {name:?} has shape {:?}, the graph's has {:?}",
                q.shape, t.shape
            )));
        }
        if !q.objective.is_finite() {
            return Err(Error::Model(format!(
                "quantized tensor {name:?} has objective {}",
                q.objective
            )));
        }
    }
    for (value, &s) in &file.activation_scales {
        if !shapes.contains_key(value) {
            return Err(Error::Model(format!(
                "activation scale for {value:?}, which is not a value of the graph"
            )));
        }
        if !(s.is_finite() && s > 0.0) {
            return Err(Error::Model(format!(
                "activation scale {s} for {value:?} is not finite and positive"
            )));
        }
    }
    if let Some(value) = file
        .activation_zero_points
        .keys()
        .find(|v| !file.activation_scales.contains_key(*v))
    {
        return Err(Error::Model(format!(
            "activation zero point for {value:?}, which has no activation scale"
        )));
    }
    if let Some(p) = file.metadata.param
        && !p.is_finite()
    {
        return Err(Error::Model(format!(
            "metadata parameter {p} is not finite"
        )));
    }
    Ok(())
}

// ---- The manifest: serde mirrors of the graph, so graph.rs stays free of serialisation concerns.

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: String,
    metadata: LbwMetadata,
    graph: GraphJson,
    tensors: Vec<TensorEntry>,
    quantized: Vec<QuantizedEntry>,
    activation_scales: BTreeMap<String, f64>,
    #[serde(default)]
    activation_zero_points: BTreeMap<String, u8>,
}

/// An FP32 tensor: `4 * product(shape)` little-endian bytes at `offset` in the blob.
#[derive(Serialize, Deserialize)]
struct TensorEntry {
    name: String,
    shape: Vec<usize>,
    offset: u64,
}

/// A quantized conv weight: `alpha_count` f32 alphas at `alphas`, and `product(shape)` codes packed
/// at `bits` bits per weight at `codes`.
#[derive(Serialize, Deserialize)]
struct QuantizedEntry {
    name: String,
    shape: Vec<usize>,
    bits: u8,
    alpha_count: usize,
    alphas: u64,
    codes: u64,
    objective: f64,
}

#[derive(Serialize, Deserialize)]
struct GraphJson {
    name: String,
    input: String,
    input_shape: Vec<usize>,
    outputs: Vec<String>,
    nodes: Vec<NodeJson>,
}

#[derive(Serialize, Deserialize)]
struct NodeJson {
    name: String,
    op: OpJson,
    inputs: Vec<String>,
    output: String,
}

#[derive(Serialize, Deserialize)]
struct PoolJson {
    kernel: [usize; 2],
    stride: [usize; 2],
    pads: [usize; 4],
}

/// One op with its attributes; `type` names the variant in snake case.
#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OpJson {
    Conv {
        weight: String,
        bias: Option<String>,
        kernel: [usize; 2],
        stride: [usize; 2],
        pads: [usize; 4],
        dilation: [usize; 2],
        groups: usize,
    },
    Relu,
    LeakyRelu {
        alpha: JsonF32,
    },
    Sigmoid,
    Mul,
    Add,
    Concat {
        axis: usize,
    },
    ResizeNearest {
        scale: [usize; 2],
    },
    MaxPool {
        pool: PoolJson,
    },
    AvgPool {
        pool: PoolJson,
        count_include_pad: bool,
    },
    Pad {
        pads: [usize; 4],
        value: JsonF32,
    },
    Reshape {
        shape: Vec<i64>,
    },
    Transpose {
        perm: Vec<usize>,
    },
    Gather {
        axis: usize,
        indices: Vec<i64>,
        scalar: bool,
    },
    Slice {
        axes: Vec<usize>,
        starts: Vec<i64>,
        ends: Vec<i64>,
        steps: Vec<i64>,
    },
    Softmax {
        axis: usize,
    },
}

/// An `f32` attribute in JSON: a number when finite (written as the exact `f64`, so it reads back
/// bit for bit), else the string `"inf"`, `"-inf"` or `"nan"` (JSON has no such numbers, and a pad
/// value of `-inf` is legitimate).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
enum JsonF32 {
    Number(f64),
    Special(SpecialF32),
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
enum SpecialF32 {
    #[serde(rename = "inf")]
    Inf,
    #[serde(rename = "-inf")]
    NegInf,
    #[serde(rename = "nan")]
    NaN,
}

impl From<f32> for JsonF32 {
    fn from(v: f32) -> JsonF32 {
        if v.is_finite() {
            JsonF32::Number(f64::from(v))
        } else if v.is_nan() {
            JsonF32::Special(SpecialF32::NaN)
        } else if v > 0.0 {
            JsonF32::Special(SpecialF32::Inf)
        } else {
            JsonF32::Special(SpecialF32::NegInf)
        }
    }
}

impl From<JsonF32> for f32 {
    fn from(v: JsonF32) -> f32 {
        match v {
            JsonF32::Number(x) => x as f32,
            JsonF32::Special(SpecialF32::Inf) => f32::INFINITY,
            JsonF32::Special(SpecialF32::NegInf) => f32::NEG_INFINITY,
            JsonF32::Special(SpecialF32::NaN) => f32::NAN,
        }
    }
}

impl PoolJson {
    fn from_pool(p: &Pool) -> PoolJson {
        PoolJson {
            kernel: p.kernel,
            stride: p.stride,
            pads: p.pads,
        }
    }

    fn into_pool(self) -> Pool {
        Pool {
            kernel: self.kernel,
            stride: self.stride,
            pads: self.pads,
        }
    }
}

impl OpJson {
    fn from_op(op: &Op) -> OpJson {
        match op.clone() {
            Op::Conv(c) => OpJson::Conv {
                weight: c.weight,
                bias: c.bias,
                kernel: c.kernel,
                stride: c.stride,
                pads: c.pads,
                dilation: c.dilation,
                groups: c.groups,
            },
            Op::Relu => OpJson::Relu,
            Op::LeakyRelu { alpha } => OpJson::LeakyRelu {
                alpha: alpha.into(),
            },
            Op::Sigmoid => OpJson::Sigmoid,
            Op::Mul => OpJson::Mul,
            Op::Add => OpJson::Add,
            Op::Concat { axis } => OpJson::Concat { axis },
            Op::ResizeNearest { scale } => OpJson::ResizeNearest { scale },
            Op::MaxPool(p) => OpJson::MaxPool {
                pool: PoolJson::from_pool(&p),
            },
            Op::AvgPool {
                pool,
                count_include_pad,
            } => OpJson::AvgPool {
                pool: PoolJson::from_pool(&pool),
                count_include_pad,
            },
            Op::Pad { pads, value } => OpJson::Pad {
                pads,
                value: value.into(),
            },
            Op::Reshape { shape } => OpJson::Reshape { shape },
            Op::Transpose { perm } => OpJson::Transpose { perm },
            Op::Gather {
                axis,
                indices,
                scalar,
            } => OpJson::Gather {
                axis,
                indices,
                scalar,
            },
            Op::Slice {
                axes,
                starts,
                ends,
                steps,
            } => OpJson::Slice {
                axes,
                starts,
                ends,
                steps,
            },
            Op::Softmax { axis } => OpJson::Softmax { axis },
        }
    }

    fn into_op(self) -> Op {
        match self {
            OpJson::Conv {
                weight,
                bias,
                kernel,
                stride,
                pads,
                dilation,
                groups,
            } => Op::Conv(Conv {
                weight,
                bias,
                kernel,
                stride,
                pads,
                dilation,
                groups,
            }),
            OpJson::Relu => Op::Relu,
            OpJson::LeakyRelu { alpha } => Op::LeakyRelu {
                alpha: alpha.into(),
            },
            OpJson::Sigmoid => Op::Sigmoid,
            OpJson::Mul => Op::Mul,
            OpJson::Add => Op::Add,
            OpJson::Concat { axis } => Op::Concat { axis },
            OpJson::ResizeNearest { scale } => Op::ResizeNearest { scale },
            OpJson::MaxPool { pool } => Op::MaxPool(pool.into_pool()),
            OpJson::AvgPool {
                pool,
                count_include_pad,
            } => Op::AvgPool {
                pool: pool.into_pool(),
                count_include_pad,
            },
            OpJson::Pad { pads, value } => Op::Pad {
                pads,
                value: value.into(),
            },
            OpJson::Reshape { shape } => Op::Reshape { shape },
            OpJson::Transpose { perm } => Op::Transpose { perm },
            OpJson::Gather {
                axis,
                indices,
                scalar,
            } => Op::Gather {
                axis,
                indices,
                scalar,
            },
            OpJson::Slice {
                axes,
                starts,
                ends,
                steps,
            } => Op::Slice {
                axes,
                starts,
                ends,
                steps,
            },
            OpJson::Softmax { axis } => Op::Softmax { axis },
        }
    }
}

impl GraphJson {
    fn from_graph(g: &Graph) -> GraphJson {
        GraphJson {
            name: g.name.clone(),
            input: g.input.clone(),
            input_shape: g.input_shape.clone(),
            outputs: g.outputs.clone(),
            nodes: g
                .nodes
                .iter()
                .map(|n| NodeJson {
                    name: n.name.clone(),
                    op: OpJson::from_op(&n.op),
                    inputs: n.inputs.clone(),
                    output: n.output.clone(),
                })
                .collect(),
        }
    }

    fn into_graph(self, weights: BTreeMap<String, Tensor>) -> Result<Graph> {
        Ok(Graph {
            name: self.name,
            input: self.input,
            input_shape: self.input_shape,
            outputs: self.outputs,
            nodes: self
                .nodes
                .into_iter()
                .map(|n| Node {
                    name: n.name,
                    op: n.op.into_op(),
                    inputs: n.inputs,
                    output: n.output,
                })
                .collect(),
            weights,
        })
    }
}
