//! One conv per shape on every shift-add kernel this CPU supports, against an f32 direct conv.
//! `cargo bench --bench conv_kernels`. Shapes are yolo-fastest-voc's: 1x1 48->96 and 96->48 at
//! 40x40, depthwise 3x3 96 channels at 40x40, and the 3->8 stride-2 stem at 320x320. Each shift-add
//! run includes what the engine does around the kernel (input quantisation, padding copy, tiles,
//! the fused bias + LeakyReLU epilogue); the output is f32, as for a detection head.

use std::collections::BTreeMap;

use criterion::{Criterion, criterion_group, criterion_main};
use lbw::engine::Backend;
use lbw::engine::kernels::{KernelChoice, available_kernels};
use lbw::engine::quant_params::{ActivationScales, QParams};
use lbw::engine::reference::ReferenceInterpreter;
use lbw::engine::shift_add::{EngineOptions, ShiftAddEngine};
use lbw::model::{Conv, Graph, Node, Op, Tensor};
use lbw::quant::{Bits, Method, QuantizedTensor};

struct Shape {
    name: &'static str,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    groups: usize,
    hw: usize,
}

const SHAPES: [Shape; 4] = [
    Shape {
        name: "1x1_48to96_40",
        cin: 48,
        cout: 96,
        k: 1,
        stride: 1,
        groups: 1,
        hw: 40,
    },
    Shape {
        name: "1x1_96to48_40",
        cin: 96,
        cout: 48,
        k: 1,
        stride: 1,
        groups: 1,
        hw: 40,
    },
    Shape {
        name: "dw3x3_96_40",
        cin: 96,
        cout: 96,
        k: 3,
        stride: 1,
        groups: 96,
        hw: 40,
    },
    Shape {
        name: "stem3x3s2_3to8_320",
        cin: 3,
        cout: 8,
        k: 3,
        stride: 2,
        groups: 1,
        hw: 320,
    },
];

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

fn setup(
    s: &Shape,
) -> (
    Graph,
    BTreeMap<String, QuantizedTensor>,
    ActivationScales,
    Tensor,
) {
    let wshape = vec![s.cout, s.cin / s.groups, s.k, s.k];
    let n: usize = wshape.iter().product();
    let w = values(n, 1);
    let q = Method::Lbw
        .quantizer(None)
        .unwrap()
        .quantize_tensor(&w, &wshape, Bits::new(6).unwrap(), true)
        .unwrap();
    let mut weights = BTreeMap::new();
    weights.insert("w".to_string(), q.to_tensor());
    weights.insert(
        "b".to_string(),
        Tensor::new(vec![s.cout], values(s.cout, 2)).unwrap(),
    );
    let pad = s.k / 2;
    let graph = Graph {
        name: s.name.into(),
        input: "x".into(),
        input_shape: vec![1, s.cin, s.hw, s.hw],
        outputs: vec!["a".into()],
        nodes: vec![
            Node {
                name: "conv".into(),
                op: Op::Conv(Conv {
                    weight: "w".into(),
                    bias: Some("b".into()),
                    kernel: [s.k, s.k],
                    stride: [s.stride, s.stride],
                    pads: [pad; 4],
                    dilation: [1, 1],
                    groups: s.groups,
                }),
                inputs: vec!["x".into()],
                output: "y".into(),
            },
            Node {
                name: "act".into(),
                op: Op::LeakyRelu { alpha: 0.1 },
                inputs: vec!["y".into()],
                output: "a".into(),
            },
        ],
        weights,
    };
    let mut scales = BTreeMap::new();
    scales.insert("x".to_string(), QParams::from_range(-1.0, 1.0));
    let mut quantized = BTreeMap::new();
    quantized.insert("w".to_string(), q);
    let input = Tensor::new(vec![1, s.cin, s.hw, s.hw], values(s.cin * s.hw * s.hw, 3)).unwrap();
    (graph, quantized, ActivationScales { scales }, input)
}

fn bench(c: &mut Criterion) {
    for s in &SHAPES {
        let (graph, quantized, scales, input) = setup(s);
        let mut group = c.benchmark_group(s.name);
        let reference = ReferenceInterpreter::new(&graph).unwrap();
        group.bench_function("f32-direct", |b| {
            b.iter(|| reference.run(input.clone()).unwrap())
        });
        for k in available_kernels() {
            let engine = ShiftAddEngine::new(
                &graph,
                &quantized,
                &scales,
                &EngineOptions {
                    kernel: KernelChoice::parse(k.name()).unwrap(),
                    threads: 1,
                },
            )
            .unwrap();
            group.bench_function(k.name(), |b| b.iter(|| engine.run(input.clone()).unwrap()));
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
