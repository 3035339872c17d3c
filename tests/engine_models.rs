//! The reference interpreter against tract on the shared detectors, and the shift-add engine
//! against its FP32 simulation (same power-of-two weights, same activation grids, fake-quantized
//! in float): same detections on real photos, and every shared detector's ops run.

use lbw::detect::pipeline::{calibration_inputs, default_calibration_dir};
use lbw::detect::{DetectOptions, Detection, Detector};
use lbw::engine::Backend;
use lbw::engine::kernels::KernelChoice;
use lbw::engine::ptq::{PtqEngine, build_ptq_engine, default_quantize_options};
use lbw::engine::quant_params::RangeObserver;
use lbw::engine::reference::ReferenceInterpreter;
use lbw::engine::shift_add::{EngineOptions, ShiftAddEngine, fake_quant_simulation};
use lbw::engine::tract_fp32::TractFp32;
use lbw::model::{LoadedModel, Tensor, load_builtin};
use lbw::quant::Bits;

const MODELS: [&str; 5] = [
    "yolo-fastest-voc",
    "yolo-fastest-xl-voc",
    "mobilenetv2-yolov3-nano-voc",
    "fastestdet-coco",
    "yolox-nano-coco",
];

fn images(model: &LoadedModel, n: usize) -> Vec<Tensor> {
    calibration_inputs(
        &model.manifest,
        &default_calibration_dir(&model.manifest),
        n,
    )
    .unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.data.iter().fold(0f32, |m, v| m.max(v.abs()))
}

#[test]
fn reference_interpreter_matches_tract_on_every_shared_detector() {
    for id in MODELS {
        let model = load_builtin(id).unwrap();
        let x = images(&model, 1).remove(0);
        let want = TractFp32::new(&model.graph)
            .unwrap()
            .run(x.clone())
            .unwrap();
        let got = ReferenceInterpreter::new(&model.graph)
            .unwrap()
            .run(x)
            .unwrap();
        assert_eq!(got.len(), want.len(), "{id}");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.shape, w.shape, "{id}");
            let scale = max_abs(w).max(1.0);
            for (a, b) in g.data.iter().zip(&w.data) {
                assert!(
                    (a - b).abs() <= 1e-4 * scale,
                    "{id}: {a} vs {b} (scale {scale})"
                );
            }
        }
    }
}

fn ptq(model: &LoadedModel, bits: u8, calib: &[Tensor]) -> PtqEngine {
    build_ptq_engine(
        &model.graph,
        &default_quantize_options(Bits::new(bits).unwrap()),
        calib,
        RangeObserver::MeanMinMax,
        &EngineOptions {
            kernel: KernelChoice::Auto,
            threads: 2,
        },
    )
    .unwrap()
}

/// Every detection of `a` scoring at least `floor` has a partner in `b`: same class, IoU >= 0.8,
/// score within `tol`. Returns how many were checked.
fn all_matched(a: &[Detection], b: &[Detection], floor: f32, tol: f32, what: &str) -> usize {
    let mut checked = 0;
    for d in a.iter().filter(|d| d.score >= floor) {
        let partner = b.iter().find(|e| {
            e.class_id == d.class_id
                && lbw::detect::iou(&d.bbox, &e.bbox) >= 0.8
                && (e.score - d.score).abs() <= tol
        });
        assert!(partner.is_some(), "{what}: {d:?} has no partner in {b:?}");
        checked += 1;
    }
    checked
}

/// The integer engine and the FP32 simulation differ only where float rounding flips an 8-bit
/// code at a tie, and those flips spread through later layers. Detections above a floor must
/// appear in both, with the same class, IoU >= 0.8 and close scores.
#[test]
fn engine_gives_the_fake_quant_simulations_detections_on_photos() {
    let model = load_builtin("yolo-fastest-voc").unwrap();
    let all = images(&model, 12);
    let (calib, photos) = all.split_at(4);
    // Post-training power-of-two weights leave this model with top scores of about 0.04 (as the
    // shared models' README records; retraining fixes that, not this engine), so detections are
    // compared at mAP-style thresholds: everything above 0.03 that NMS keeps at 0.005, scores
    // within 0.01. (Below about 0.02 the candidates are noise-level and NMS reorders them.)
    let opts = DetectOptions {
        score_threshold: 0.005,
        ..DetectOptions::default()
    };
    let mut checked = 0;
    for bits in [8, 6] {
        let built = ptq(&model, bits, calib);
        let sim =
            fake_quant_simulation(&model.graph, &built.quantized.tensors, &built.engine).unwrap();
        let engine = Detector::new(model.manifest.clone(), "lbw", Box::new(built.engine));
        let sim = Detector::new(model.manifest.clone(), "sim", Box::new(sim));
        let dir = default_calibration_dir(&model.manifest);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files.iter().skip(calib.len()).take(photos.len()) {
            let img = lbw::detect::image_io::load_rgb(f).unwrap();
            let (de, _) = engine.detect(&img, &opts).unwrap();
            let (ds, _) = sim.detect(&img, &opts).unwrap();
            let floor = 0.03;
            let what = format!("lbw{bits} {}", f.display());
            checked += all_matched(&de, &ds, floor, 0.01, &what);
            all_matched(&ds, &de, floor, 0.01, &what);
        }
    }
    println!("{checked} detections compared");
    assert!(checked >= 2, "only {checked} detections compared");
}

/// All five shared detectors run on the engine (every op they use), and their raw head outputs
/// stay close to the FP32 simulation: the mean difference is a small fraction of the outputs'
/// range.
#[test]
fn engine_runs_every_shared_detector_close_to_its_simulation() {
    for id in MODELS {
        let model = load_builtin(id).unwrap();
        let all = images(&model, 3);
        let built = ptq(&model, 8, &all[..2]);
        let sim =
            fake_quant_simulation(&model.graph, &built.quantized.tensors, &built.engine).unwrap();
        let want = sim.run(all[2].clone()).unwrap();
        let got = built.engine.run(all[2].clone()).unwrap();
        // The same plan on one thread gives the same bits: the blocks threads run (output
        // channels, input channels of a split source) never share an output.
        let single = ShiftAddEngine::new(
            &model.graph,
            &built.quantized.tensors,
            &built.scales,
            &EngineOptions {
                kernel: KernelChoice::Auto,
                threads: 1,
            },
        )
        .unwrap()
        .run(all[2].clone())
        .unwrap();
        for (g, s) in got.iter().zip(&single) {
            assert_eq!(g.data, s.data, "{id}: two threads differ from one");
        }
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.shape, w.shape, "{id}");
            assert!(g.data.iter().all(|v| v.is_finite()), "{id}");
            let range = max_abs(w).max(1e-3);
            let mean = g
                .data
                .iter()
                .zip(&w.data)
                .map(|(a, b)| f64::from((a - b).abs()))
                .sum::<f64>()
                / g.data.len() as f64;
            println!("{id}: mean |engine - sim| {mean:.4}, range {range:.2}");
            assert!(
                mean <= 0.02 * f64::from(range),
                "{id}: mean diff {mean} range {range}"
            );
        }
    }
}

#[test]
fn missing_activation_scales_fail_at_load_naming_the_value() {
    let model = load_builtin("yolo-fastest-voc").unwrap();
    let q = lbw::quant::quantize_graph(
        &model.graph,
        &default_quantize_options(Bits::new(6).unwrap()),
    )
    .unwrap();
    let err = lbw::engine::shift_add::ShiftAddEngine::new(
        &model.graph,
        &q.tensors,
        &Default::default(),
        &EngineOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no activation scale"), "{err}");
}
