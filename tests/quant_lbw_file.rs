//! `.lbw` files: round trips, and a loader that refuses damaged or hostile files without panicking.

use std::collections::BTreeMap;

use lbw::Error;
use lbw::model::lbw_file::{HEADER_LEN, LbwFile, LbwMetadata, MAGIC, VERSION};
use lbw::model::{Conv, Graph, Node, Op, Pool, Tensor};
use lbw::quant::{Bits, Method, QuantizeOptions, quantize_graph};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

fn conv(
    name: &str,
    input: &str,
    cin: usize,
    cout: usize,
    k: usize,
    groups: usize,
    weights: &mut BTreeMap<String, Tensor>,
) -> Node {
    let shape = vec![cout, cin / groups, k, k];
    let n: usize = shape.iter().product();
    // Deterministic, varied values with a few exact zeros.
    let data = (0..n)
        .map(|i| {
            let x = ((i * 7919 + name.len() * 104_729) % 2003) as f32 / 1001.0 - 1.0;
            if i % 17 == 0 { 0.0 } else { x * x * x }
        })
        .collect();
    weights.insert(format!("{name}.w"), Tensor::new(shape, data).unwrap());
    weights.insert(
        format!("{name}.b"),
        Tensor::new(vec![cout], (0..cout).map(|i| i as f32 * 0.01).collect()).unwrap(),
    );
    Node {
        name: name.into(),
        op: Op::Conv(Conv {
            weight: format!("{name}.w"),
            bias: Some(format!("{name}.b")),
            kernel: [k, k],
            stride: [1, 1],
            pads: [k / 2; 4],
            dilation: [1, 1],
            groups,
        }),
        inputs: vec![input.into()],
        output: name.into(),
    }
}

fn node(name: &str, op: Op, inputs: &[&str]) -> Node {
    Node {
        name: name.into(),
        op,
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        output: name.into(),
    }
}

/// A small detector-shaped graph using every op kind.
fn synthetic_graph() -> Graph {
    let mut w = BTreeMap::new();
    let nodes = vec![
        conv("c1", "image", 3, 8, 3, 1, &mut w),
        node("a1", Op::LeakyRelu { alpha: 0.1 }, &["c1"]),
        conv("dw", "a1", 8, 8, 3, 8, &mut w),
        conv("pw", "dw", 8, 16, 1, 1, &mut w),
        conv("gr", "pw", 16, 16, 3, 4, &mut w),
        node("r", Op::Relu, &["gr"]),
        node("s", Op::Sigmoid, &["r"]),
        node("m", Op::Mul, &["r", "s"]),
        node("add", Op::Add, &["m", "pw"]),
        node(
            "pool",
            Op::MaxPool(Pool {
                kernel: [2, 2],
                stride: [2, 2],
                pads: [0; 4],
            }),
            &["add"],
        ),
        node(
            "avg",
            Op::AvgPool {
                pool: Pool {
                    kernel: [3, 3],
                    stride: [1, 1],
                    pads: [1; 4],
                },
                count_include_pad: false,
            },
            &["pool"],
        ),
        node(
            "pad",
            Op::Pad {
                pads: [0, 0, 1, 1],
                value: f32::NEG_INFINITY,
            },
            &["avg"],
        ),
        node(
            "pool2",
            Op::MaxPool(Pool {
                kernel: [2, 2],
                stride: [1, 1],
                pads: [0; 4],
            }),
            &["pad"],
        ),
        node("up", Op::ResizeNearest { scale: [2, 2] }, &["pool2"]),
        node("cat", Op::Concat { axis: 1 }, &["up", "add"]),
        conv("head", "cat", 32, 12, 1, 1, &mut w),
        node(
            "rs",
            Op::Reshape {
                shape: vec![0, 3, 4, -1],
            },
            &["head"],
        ),
        node(
            "tp",
            Op::Transpose {
                perm: vec![0, 1, 3, 2],
            },
            &["rs"],
        ),
        node(
            "sl",
            Op::Slice {
                axes: vec![3],
                starts: vec![0],
                ends: vec![2],
                steps: vec![1],
            },
            &["tp"],
        ),
        node(
            "ga",
            Op::Gather {
                axis: 3,
                indices: vec![2, 3],
                scalar: false,
            },
            &["tp"],
        ),
        node("sm", Op::Softmax { axis: 3 }, &["ga"]),
    ];
    let g = Graph {
        name: "synthetic".into(),
        input: "image".into(),
        input_shape: vec![1, 3, 16, 16],
        outputs: vec!["sl".into(), "sm".into()],
        nodes,
        weights: w,
    };
    g.infer_shapes().expect("synthetic graph is valid");
    g
}

fn sample_file(bits: u8, method: Method, per_channel: bool) -> LbwFile {
    let g = synthetic_graph();
    let opts = QuantizeOptions {
        bits: Bits::new(bits).unwrap(),
        method,
        param: if method == Method::Lbw {
            Some(2.25)
        } else {
            None
        },
        per_channel,
        keep_full_precision: vec!["c1".into(), "head.w".into()],
    };
    let model = quantize_graph(&g, &opts).unwrap();
    let mut f = LbwFile::from_quantized(&model, "synthetic-test", &"ab".repeat(32)).unwrap();
    f.activation_scales.insert("image".into(), 1.0 / 255.0);
    f.activation_scales.insert("a1".into(), 0.0123);
    f.metadata.training = serde_json::json!({"epochs": 3, "loss": [1.5, 0.75], "map50": 0.61});
    f
}

#[test]
fn round_trip_preserves_everything() {
    for (bits, method, per_channel) in [
        (2, Method::Ternary, false),
        (3, Method::Lbw, true),
        (4, Method::Optimal, false),
        (6, Method::Optimal, true),
        (8, Method::Lbw, false),
    ] {
        let f = sample_file(bits, method, per_channel);
        assert_eq!(f.quantized.len(), 3, "c1 and head are kept");
        let bytes = f.to_bytes().unwrap();
        assert_eq!(&bytes[..8], &MAGIC);
        let back = LbwFile::from_bytes(&bytes).unwrap();
        assert_eq!(back, f, "b={bits} {method}");
        back.graph.infer_shapes().unwrap();
        // Deterministic: the same content gives the same bytes.
        assert_eq!(back.to_bytes().unwrap(), bytes);
    }
}

#[test]
fn write_and_read_a_file() {
    let f = sample_file(4, Method::Optimal, true);
    let dir = std::env::temp_dir().join(format!("lbw-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.lbw");
    f.write(&path).unwrap();
    assert_eq!(LbwFile::read(&path).unwrap(), f);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_truncation_and_byte_flip_is_refused() {
    let bytes = sample_file(3, Method::Optimal, false).to_bytes().unwrap();
    for len in 0..bytes.len() {
        assert!(
            matches!(LbwFile::from_bytes(&bytes[..len]), Err(Error::Model(_))),
            "truncated to {len}"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(LbwFile::from_bytes(&longer).is_err());
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 1 << (i % 8);
        assert!(
            matches!(LbwFile::from_bytes(&b), Err(Error::Model(_))),
            "flipped byte {i}"
        );
    }
}

/// Builds a file from a manifest and blob with a correct header and checksum, as an attacker would.
fn seal(json: &[u8], blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&(blob.len() as u64).to_le_bytes());
    let mut h = Sha256::new();
    h.update(&out[..32]);
    h.update(json);
    h.update(blob);
    out.extend_from_slice(&h.finalize());
    out.extend_from_slice(json);
    out.extend_from_slice(blob);
    out
}

/// Splits a valid file into its manifest (as JSON) and blob.
fn unseal(bytes: &[u8]) -> (serde_json::Value, Vec<u8>) {
    let json_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let json = &bytes[HEADER_LEN..HEADER_LEN + json_len];
    (
        serde_json::from_slice(json).unwrap(),
        bytes[HEADER_LEN + json_len..].to_vec(),
    )
}

fn reseal(v: &serde_json::Value, blob: &[u8]) -> Vec<u8> {
    seal(&serde_json::to_vec(v).unwrap(), blob)
}

#[test]
fn hostile_manifests_are_refused() {
    let bytes = sample_file(4, Method::Optimal, true).to_bytes().unwrap();
    let (manifest, blob) = unseal(&bytes);
    // Unchanged it loads.
    LbwFile::from_bytes(&reseal(&manifest, &blob)).unwrap();

    type Edit = fn(&mut serde_json::Value);
    let edits: Vec<(&str, Edit)> = vec![
        ("huge offset", |m| {
            m["tensors"][0]["offset"] = u64::MAX.into()
        }),
        ("offset past end", |m| {
            m["tensors"][0]["offset"] = 1_000_000.into()
        }),
        ("huge shape", |m| {
            m["tensors"][0]["shape"] = serde_json::json!([1u64 << 62, 1u64 << 62])
        }),
        ("shape needing more bytes", |m| {
            m["tensors"][0]["shape"] = serde_json::json!([1_000_000_000])
        }),
        ("huge alpha count", |m| {
            m["quantized"][0]["alpha_count"] = u64::MAX.into()
        }),
        ("bits 9", |m| m["quantized"][0]["bits"] = 9.into()),
        ("bits 1", |m| m["quantized"][0]["bits"] = 1.into()),
        ("overlapping regions", |m| {
            let o = m["quantized"][0]["codes"].clone();
            m["quantized"][1]["codes"] = o;
        }),
        ("alphas overlap codes", |m| {
            let o = m["quantized"][0]["codes"].clone();
            m["quantized"][0]["alphas"] = o;
        }),
        ("wrong alpha count", |m| {
            m["quantized"][0]["alpha_count"] = 3.into()
        }),
        ("duplicate tensor", |m| {
            let t = m["tensors"][0].clone();
            m["tensors"].as_array_mut().unwrap().push(t);
        }),
        ("quantized bias", |m| {
            let name = m["tensors"][0]["name"].clone();
            m["quantized"][0]["name"] = name;
        }),
        ("missing conv weight", |m| {
            m["quantized"].as_array_mut().unwrap().remove(0);
        }),
        ("unknown op", |m| {
            m["graph"]["nodes"][1]["op"]["type"] = "lstm".into()
        }),
        ("bad input shape", |m| {
            m["graph"]["input_shape"] = serde_json::json!([1, 3])
        }),
        ("dangling input", |m| {
            m["graph"]["nodes"][1]["inputs"][0] = "nowhere".into()
        }),
        ("zero groups", |m| {
            m["graph"]["nodes"][0]["op"]["groups"] = 0.into()
        }),
        ("scale for unknown value", |m| {
            m["activation_scales"]["ghost"] = 1.0.into()
        }),
        ("negative scale", |m| {
            m["activation_scales"]["a1"] = (-1.0).into()
        }),
        ("objective not a number", |m| {
            m["quantized"][0]["objective"] = "x".into()
        }),
        ("not lbw", |m| m["format"] = "onnx".into()),
        ("missing field", |m| {
            m.as_object_mut().unwrap().remove("graph");
        }),
        ("wrong type", |m| m["tensors"] = 5.into()),
    ];
    for (what, edit) in edits {
        let mut m = manifest.clone();
        edit(&mut m);
        let r = LbwFile::from_bytes(&reseal(&m, &blob));
        assert!(matches!(r, Err(Error::Model(_))), "{what}: {r:?}");
    }

    // Corrupt data regions under a valid checksum: a negative zero code, a NaN alpha, padding bits.
    let m = manifest.clone();
    let q0 = &m["quantized"][0];
    let codes_at = q0["codes"].as_u64().unwrap() as usize;
    let alphas_at = q0["alphas"].as_u64().unwrap() as usize;
    let mut b = blob.clone();
    b[codes_at] = 0b1000; // 4-bit field 1000: negative zero
    assert!(LbwFile::from_bytes(&seal(&serde_json::to_vec(&m).unwrap(), &b)).is_err());
    let mut b = blob.clone();
    b[alphas_at..alphas_at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    assert!(LbwFile::from_bytes(&seal(&serde_json::to_vec(&m).unwrap(), &b)).is_err());
    let mut b = blob.clone();
    b[alphas_at..alphas_at + 4].copy_from_slice(&(-1.0f32).to_le_bytes());
    assert!(LbwFile::from_bytes(&seal(&serde_json::to_vec(&m).unwrap(), &b)).is_err());

    // Header fields.
    let mut b = bytes.clone();
    b[8] = 2; // version
    assert!(LbwFile::from_bytes(&b).is_err());
    let mut b = bytes.clone();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes()); // manifest length
    assert!(LbwFile::from_bytes(&b).is_err());
    assert!(LbwFile::from_bytes(&seal(b"not json", &[])).is_err());
    assert!(LbwFile::from_bytes(&seal(b"", &[])).is_err());
    // Deep nesting must not overflow the stack.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(LbwFile::from_bytes(&seal(deep.as_bytes(), &[])).is_err());
}

#[test]
fn writer_refuses_what_the_reader_would_refuse() {
    let f = sample_file(4, Method::Optimal, false);
    let mut bad = f.clone();
    bad.activation_scales.insert("ghost".into(), 1.0);
    assert!(bad.to_bytes().is_err());
    let mut bad = f.clone();
    bad.activation_scales.insert("a1".into(), f32::NAN);
    assert!(bad.to_bytes().is_err());
    let mut bad = f.clone();
    let (_, q) = bad.quantized.iter_mut().next().unwrap();
    q.alphas[0] = 0.0;
    assert!(bad.to_bytes().is_err());
    let mut bad = f.clone();
    let q = bad.quantized.values().next().unwrap().clone();
    bad.quantized.insert("c1.b".into(), q);
    assert!(bad.to_bytes().is_err());
    let mut bad = f;
    bad.graph.nodes.remove(1);
    assert!(bad.to_bytes().is_err());
}

#[test]
fn metadata_defaults_and_fp32_only_files() {
    // A file with nothing quantized is valid too (an FP32 model in the same container).
    let f = LbwFile {
        graph: synthetic_graph(),
        quantized: BTreeMap::new(),
        activation_scales: BTreeMap::new(),
        activation_zero_points: BTreeMap::new(),
        metadata: LbwMetadata::default(),
    };
    let back = LbwFile::from_bytes(&f.to_bytes().unwrap()).unwrap();
    assert_eq!(back, f);
    assert_eq!(back.packed_weight_bytes(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        prop_assert!(LbwFile::from_bytes(&bytes).is_err());
    }

    #[test]
    fn random_bytes_after_a_valid_header_are_refused(
        json in prop::collection::vec(any::<u8>(), 0..512),
        blob in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        prop_assert!(LbwFile::from_bytes(&seal(&json, &blob)).is_err());
    }

    /// Any number in a valid manifest replaced by an arbitrary one: Ok or Err, never a panic, and
    /// whatever loads is a valid graph.
    #[test]
    fn mutated_numbers_never_panic(which in any::<prop::sample::Index>(), value in prop_oneof![
        any::<u64>().prop_map(serde_json::Value::from),
        (0u64..64).prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        (-1e40f64..1e40).prop_map(serde_json::Value::from),
    ]) {
        let bytes = sample_file(3, Method::Optimal, true).to_bytes().unwrap();
        let (mut manifest, blob) = unseal(&bytes);
        let mut numbers = Vec::new();
        collect_numbers(&mut manifest, &mut numbers);
        let target = which.index(numbers.len());
        let mut seen = 0;
        replace_number(&mut manifest, target, &mut seen, &value);
        if let Ok(f) = LbwFile::from_bytes(&reseal(&manifest, &blob)) {
            f.graph.infer_shapes().unwrap();
        }
    }

    /// Random blob contents under a valid manifest and checksum.
    #[test]
    fn random_blobs_never_panic(seed in any::<u64>()) {
        let bytes = sample_file(5, Method::Lbw, false).to_bytes().unwrap();
        let (manifest, blob) = unseal(&bytes);
        let mut s = seed | 1;
        let blob: Vec<u8> = blob.iter().map(|_| { s ^= s << 13; s ^= s >> 7; s ^= s << 17; s as u8 }).collect();
        let _ = LbwFile::from_bytes(&reseal(&manifest, &blob));
    }
}

fn collect_numbers(v: &mut serde_json::Value, out: &mut Vec<()>) {
    match v {
        serde_json::Value::Number(_) => out.push(()),
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| collect_numbers(x, out)),
        serde_json::Value::Object(o) => o.values_mut().for_each(|x| collect_numbers(x, out)),
        _ => {}
    }
}

fn replace_number(
    v: &mut serde_json::Value,
    target: usize,
    seen: &mut usize,
    with: &serde_json::Value,
) {
    match v {
        serde_json::Value::Number(_) => {
            if *seen == target {
                *v = with.clone();
            }
            *seen += 1;
        }
        serde_json::Value::Array(a) => a
            .iter_mut()
            .for_each(|x| replace_number(x, target, seen, with)),
        serde_json::Value::Object(o) => o
            .values_mut()
            .for_each(|x| replace_number(x, target, seen, with)),
        _ => {}
    }
}
