//! Accuracy of retrained `.lbw` files against FP32 and post-training quantization, on coco128
//! restricted to the VOC classes (the figure docs/TRAINING.md reports).
//!
//! The `.lbw` is scored through its FP32 simulation: the file's graph (`alpha * Q` weights) run by
//! tract in the standard detector pipeline. Ignored by default (it needs a trained file):
//!
//! ```text
//! LBW_EVAL_LBW=/tmp/yf6.lbw cargo test --release --test train_eval -- --ignored --nocapture
//! LBW_EVAL_PTQ=yolo-fastest-voc:6:lbw cargo test --release --test train_eval -- --ignored --nocapture
//! ```

use lbw::detect::{DetectOptions, Detector};
use lbw::engine::tract_fp32::TractFp32;
use lbw::eval::{CocoDataset, VocOptions, voc_map_on_coco};
use lbw::model::lbw_file::LbwFile;
use lbw::model::manifest;
use lbw::quant::{Bits, Method, QuantizeOptions, quantize_graph};

fn coco128_map(detector: &Detector) -> f64 {
    let root = lbw::paths::data_dir().join("coco128");
    let data = CocoDataset::load(
        root.join("annotations").join("instances.json"),
        root.join("images"),
    )
    .unwrap();
    let opts = DetectOptions {
        score_threshold: 0.005,
        ..DetectOptions::default()
    };
    let dets: Vec<_> = data
        .images
        .iter()
        .map(|im| {
            let mut d = detector.detect_file(&im.path, &opts).unwrap();
            d.image = im.stem();
            d
        })
        .collect();
    let labels = detector.manifest.labels.clone();
    let report = voc_map_on_coco(&data, &dets, &labels, &VocOptions::default());
    100.0 * report.map.unwrap()
}

#[test]
#[ignore = "needs a trained .lbw (LBW_EVAL_LBW) or a PTQ spec (LBW_EVAL_PTQ=model:bits:method)"]
fn coco128_voc_map_of_lbw_or_ptq() {
    if let Ok(path) = std::env::var("LBW_EVAL_LBW") {
        let file = LbwFile::read(std::path::Path::new(&path)).unwrap();
        let m = manifest::find(&file.metadata.source_model).unwrap();
        let det = Detector::new(m, "lbw-sim", Box::new(TractFp32::new(&file.graph).unwrap()));
        println!(
            "{path}: coco128 VOC-class mAP@0.5 = {:.2}",
            coco128_map(&det)
        );
    }
    if let Ok(spec) = std::env::var("LBW_EVAL_PTQ") {
        let parts: Vec<&str> = spec.split(':').collect();
        let model = lbw::model::load_builtin(parts[0]).unwrap();
        if parts.get(1) == Some(&"fp32") {
            let det = Detector::new(
                model.manifest,
                "fp32",
                Box::new(TractFp32::new(&model.graph).unwrap()),
            );
            println!(
                "FP32 {spec}: coco128 VOC-class mAP@0.5 = {:.2}",
                coco128_map(&det)
            );
            return;
        }
        let opts = QuantizeOptions {
            bits: Bits::new(parts[1].parse().unwrap()).unwrap(),
            method: parts.get(2).unwrap_or(&"lbw").parse::<Method>().unwrap(),
            param: None,
            per_channel: parts.get(3) == Some(&"per-channel"),
            keep_full_precision: vec![],
        };
        let q = quantize_graph(&model.graph, &opts).unwrap();
        let g = q.simulated_graph().unwrap();
        let det = Detector::new(
            model.manifest,
            "ptq-sim",
            Box::new(TractFp32::new(&g).unwrap()),
        );
        println!(
            "PTQ {spec}: coco128 VOC-class mAP@0.5 = {:.2}",
            coco128_map(&det)
        );
    }
}
