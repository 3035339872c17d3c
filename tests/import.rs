//! Import of the five shared detectors: exact byte accounting for darknet, ONNX loading, rejection
//! of damaged files, ONNX export round trip, and outputs checked against independent runtimes.

use lbw::engine::Backend;
use lbw::engine::tract_fp32::TractFp32;
use lbw::model::manifest::{self, DecoderSpec};
use lbw::model::{Tensor, darknet, load_builtin, onnx};

const DARKNET: [&str; 3] = [
    "yolo-fastest-voc",
    "yolo-fastest-xl-voc",
    "mobilenetv2-yolov3-nano-voc",
];

fn darknet_files(id: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let m = manifest::find(id).unwrap();
    (
        m.verified_path("cfg").unwrap(),
        m.verified_path("weights").unwrap(),
    )
}

#[test]
fn darknet_import_consumes_every_byte_and_matches_manifest() {
    for id in DARKNET {
        let (cfg, weights) = darknet_files(id);
        let model = darknet::load(&cfg, &weights).unwrap();
        let size = std::fs::metadata(&weights).unwrap().len() as usize;
        assert_eq!(model.header_bytes + 4 * model.floats_read, size, "{id}");
        model.graph.infer_shapes().unwrap();
        let m = manifest::find(id).unwrap();
        let DecoderSpec::Yolov3 {
            anchors,
            masks,
            scale_x_y,
        } = &m.decoder
        else {
            panic!("{id}: not yolov3")
        };
        assert_eq!(model.heads.len(), masks.len(), "{id}");
        assert_eq!(
            model.graph.outputs,
            model
                .heads
                .iter()
                .map(|h| h.output.clone())
                .collect::<Vec<_>>()
        );
        for (k, head) in model.heads.iter().enumerate() {
            assert_eq!(&head.mask, &masks[k], "{id} head {k}");
            assert_eq!(head.classes, m.labels.len(), "{id}");
            assert!(
                (head.scale_x_y - scale_x_y[k]).abs() < 1e-6,
                "{id} head {k}"
            );
            let cfg_anchors: Vec<[f32; 2]> = head.anchors.iter().map(|&(w, h)| [w, h]).collect();
            assert_eq!(&cfg_anchors, anchors, "{id}");
        }
    }
    // yolo-fastest-voc: 85 convs, 28 of them depthwise/grouped (shared/models/README.md).
    let g = load_builtin("yolo-fastest-voc").unwrap().graph;
    assert_eq!(g.convs().count(), 85);
    assert_eq!(g.convs().filter(|(_, c)| c.groups > 1).count(), 28);
    let macs = g.conv_macs().unwrap() as f64;
    assert!((macs / 1e9 - 0.12).abs() < 0.01, "{macs}");
}

#[test]
fn damaged_darknet_weights_are_rejected() {
    let (cfg, weights) = darknet_files("yolo-fastest-voc");
    let cfg = std::fs::read_to_string(cfg).unwrap();
    let bytes = std::fs::read(weights).unwrap();
    let short = darknet::from_bytes("t", &cfg, &bytes[..bytes.len() - 4])
        .unwrap_err()
        .to_string();
    assert!(short.contains("too short"), "{short}");
    let mut long = bytes.clone();
    long.extend_from_slice(&[0; 8]);
    let long = darknet::from_bytes("t", &cfg, &long)
        .unwrap_err()
        .to_string();
    assert!(long.contains("too long"), "{long}");
    assert!(darknet::from_bytes("t", &cfg, &bytes[..10]).is_err());
    assert!(darknet::from_bytes("t", &cfg, &[]).is_err());
    // A .cfg that does not belong to the weights.
    let other = cfg.replacen("filters=8", "filters=9", 1);
    assert!(darknet::from_bytes("t", &other, &bytes).is_err());
    assert!(darknet::from_bytes("t", "[net]\nwidth=320\n", &bytes).is_err());
    assert!(darknet::from_bytes("t", "garbage", &bytes).is_err());
    assert!(darknet::from_bytes("t", &cfg.replace("[yolo]", "[mystery]"), &bytes).is_err());
}

#[test]
fn onnx_models_load_and_damaged_files_are_rejected() {
    for id in ["fastestdet-coco", "yolox-nano-coco"] {
        let m = manifest::find(id).unwrap();
        let path = m.verified_path("onnx").unwrap();
        let g = onnx::load(&path).unwrap();
        assert_eq!(
            g.input_shape,
            vec![1, 3, m.input.height as usize, m.input.width as usize]
        );
        assert_eq!(g.outputs.len(), 1);
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            onnx::from_bytes(id, &bytes[..bytes.len() / 2]).is_err(),
            "{id} truncated"
        );
        assert!(onnx::from_bytes(id, b"not a protobuf at all").is_err());
    }
}

#[test]
fn onnx_export_round_trips() {
    for id in manifest::builtin_ids() {
        let g = load_builtin(id).unwrap().graph;
        let bytes = onnx::to_onnx_bytes(&g).unwrap();
        let back = onnx::from_bytes(&g.name, &bytes).unwrap();
        assert_eq!(back.nodes, g.nodes, "{id}");
        assert_eq!(back.weights, g.weights, "{id}");
        assert_eq!(back.outputs, g.outputs, "{id}");
    }
}

/// Outputs on a fixed synthetic input, computed by independent runtimes: OpenCV 4.14's own darknet
/// reader (`cv2.dnn.readNetFromDarknet`) for the darknet models and ONNX Runtime on the original
/// ONNX files. Each row: model, output index, sum of |values|, (flat index, value) samples.
#[allow(clippy::type_complexity)]
const REFERENCE: [(&str, usize, f64, &[(usize, f32)]); 8] = [
    (
        "yolo-fastest-voc",
        0,
        39182.746,
        &[
            (0, 0.68892),
            (1234, -6.13971),
            (4321, -9.36238),
            (3750, -5.85564),
            (7499, -5.8416),
        ],
    ),
    (
        "yolo-fastest-voc",
        1,
        170602.359,
        &[
            (0, 0.81316),
            (1234, -0.84273),
            (4321, -8.31491),
            (15000, -2.91319),
            (29999, -5.0842),
        ],
    ),
    (
        "yolo-fastest-xl-voc",
        0,
        34073.156,
        &[
            (0, 0.57453),
            (1234, -3.63389),
            (4321, -4.53936),
            (3750, -3.34461),
            (7499, -0.24582),
        ],
    ),
    (
        "yolo-fastest-xl-voc",
        1,
        117424.312,
        &[
            (0, 0.13522),
            (1234, -0.35523),
            (4321, 3.63097),
            (15000, -6.33547),
            (29999, -4.27034),
        ],
    ),
    (
        "mobilenetv2-yolov3-nano-voc",
        0,
        35310.105,
        &[
            (0, 1.19802),
            (1234, -5.58528),
            (4321, -6.156),
            (3750, -2.4776),
            (7499, -0.35361),
        ],
    ),
    (
        "mobilenetv2-yolov3-nano-voc",
        1,
        69225.375,
        &[
            (0, 0.71144),
            (1234, -0.27477),
            (4321, -1.51058),
            (15000, -1.45054),
            (29999, -2.04721),
        ],
    ),
    (
        "fastestdet-coco",
        0,
        2615.811,
        &[
            (0, 0.00964),
            (1234, -0.6301),
            (4321, 0.00709),
            (20570, 0.01357),
            (41139, 0.00821),
        ],
    ),
    (
        "yolox-nano-coco",
        0,
        17815.438,
        &[
            (0, 1.03657),
            (1234, 0.00148),
            (4321, 9e-05),
            (150832, 0.00361),
            (301664, 0.00256),
        ],
    ),
];

#[test]
fn outputs_match_independent_runtimes() {
    for id in manifest::builtin_ids() {
        let model = load_builtin(id).unwrap();
        let shape = model.graph.input_shape.clone();
        let n: usize = shape.iter().product();
        // YOLOX takes 0-255 pixels, the others 0-1.
        let scale = if id == "yolox-nano-coco" { 255.0 } else { 1.0 };
        let data = (0..n)
            .map(|i| ((i as u64 * 7919) % 1000) as f32 / 1000.0 * scale)
            .collect();
        let backend = TractFp32::new(&model.graph).unwrap();
        let outputs = backend.run(Tensor::new(shape, data).unwrap()).unwrap();
        for (rid, k, abs_sum, samples) in REFERENCE.iter().filter(|r| r.0 == id) {
            let out = &outputs[*k].data;
            let sum: f64 = out.iter().map(|v| v.abs() as f64).sum();
            assert!(
                (sum - abs_sum).abs() / abs_sum < 1e-4,
                "{rid} output {k}: sum {sum} vs {abs_sum}"
            );
            for &(i, v) in *samples {
                assert!(
                    (out[i] - v).abs() < 2e-3 + 1e-4 * v.abs(),
                    "{rid} output {k}[{i}]: {} vs {v}",
                    out[i]
                );
            }
        }
    }
}
