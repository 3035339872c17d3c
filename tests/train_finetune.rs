//! `lbw finetune` end to end on a few real photos at a small resolution: the distillation loss goes
//! down, a stopped run resumes from its checkpoint at the saved step and ends where an
//! uninterrupted run ends, and the written `.lbw` loads and detects.

mod common;

use std::path::{Path, PathBuf};

use common::log_steps;
use lbw::detect::{DetectOptions, Detector, load_detector};
use lbw::engine::tract_fp32::TractFp32;
use lbw::model::lbw_file::LbwFile;
use lbw::model::manifest;
use lbw::train::{FinetuneConfig, finetune};

fn scratch(name: &str) -> PathBuf {
    common::scratch("lbw-train", name)
}

/// Four VOC photos in their own folder (one of them greyscale, to exercise the RGB conversion).
fn photos(dir: &Path) -> PathBuf {
    let src = lbw::paths::data_dir()
        .join("voc2007-sample")
        .join("JPEGImages");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    let out = dir.join("photos");
    std::fs::create_dir_all(&out).unwrap();
    for (i, p) in names.iter().take(4).enumerate() {
        if i == 0 {
            let grey = image::open(p).unwrap().to_luma8();
            grey.save(out.join("grey.png")).unwrap();
        } else {
            std::fs::copy(p, out.join(p.file_name().unwrap())).unwrap();
        }
    }
    out
}

fn config(dir: &Path, images: &Path, out: &str) -> FinetuneConfig {
    common::short_run(images, dir.join(out), 8, 7)
}

/// The mean absolute difference of two outputs, and the largest magnitude of the second.
fn mean_abs_diff_and_range(got: &lbw::model::Tensor, want: &lbw::model::Tensor) -> (f32, f32) {
    let range = want.data.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let sum: f32 = got
        .data
        .iter()
        .zip(&want.data)
        .map(|(a, b)| (a - b).abs())
        .sum();
    (sum / got.data.len() as f32, range)
}

#[test]
fn finetune_reduces_loss_resumes_and_writes_a_loadable_lbw() {
    let dir = scratch("e2e");
    let images = photos(&dir);

    // An interrupted run: 4 of 8 steps, then a resume.
    let mut first = config(&dir, &images, "resumed.lbw");
    first.stop_after = Some(4);
    let s1 = finetune(&first, &mut |_| {}).unwrap();
    assert_eq!((s1.start_step, s1.end_step, s1.total_steps), (0, 4, 8));
    assert!(s1.output.is_none(), "no .lbw before the schedule ends");
    assert!(s1.checkpoint.exists());
    assert!(!dir.join("resumed.lbw").exists());

    let mut second = config(&dir, &images, "resumed.lbw");
    second.resume = Some(s1.checkpoint.clone());
    let mut seen = Vec::new();
    let s2 = finetune(&second, &mut |r| seen.push(r.step)).unwrap();
    assert_eq!((s2.start_step, s2.end_step), (4, 8));
    assert_eq!(
        seen,
        vec![5, 6, 7, 8],
        "the resumed run continues at the saved step"
    );

    let log = log_steps(&s2.log);
    assert_eq!(
        log.iter().map(|r| r.step).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    // The schedule continues rather than restarting: the resumed run's learning rates are the
    // cosine tail.
    assert!(log[4].lr < log[1].lr && log[7].lr < log[4].lr);
    let first_loss = log[0].loss.total;
    let last_loss = (log[6].loss.total + log[7].loss.total) / 2.0;
    assert!(
        last_loss < 0.8 * first_loss,
        "distillation loss should fall: {first_loss} -> {last_loss}"
    );

    // The same schedule without the interruption ends with the same weights.
    let straight = finetune(&config(&dir, &images, "straight.lbw"), &mut |_| {}).unwrap();
    let a = LbwFile::read(s2.output.as_ref().unwrap()).unwrap();
    let b = LbwFile::read(straight.output.as_ref().unwrap()).unwrap();
    assert_eq!(a.quantized, b.quantized, "resume must not change the run");

    // The file loads, says how it was made, and detects.
    assert_eq!(a.metadata.source_model, "yolo-fastest-voc");
    assert_eq!(a.metadata.bits, Some(6));
    assert_eq!(a.metadata.training["steps"], 8);
    assert!(!a.quantized.is_empty());
    let detector = Detector::new(
        manifest::find("yolo-fastest-voc").unwrap(),
        "lbw6",
        Box::new(TractFp32::new(&a.graph).unwrap()),
    );
    let photo = std::fs::read_dir(&images)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let opts = DetectOptions {
        score_threshold: 0.005,
        ..DetectOptions::default()
    };
    let result = detector.detect_file(&photo, &opts).unwrap();
    assert!(result.width > 0);

    // It carries the 8-bit grids it trained with, so it runs on the shift-add engine, and the
    // engine computes what its FP32 fake-quant simulation computes.
    assert!(!a.activation_scales.is_empty());
    assert_eq!(a.activation_scales.len(), a.activation_zero_points.len());
    let path = s2.output.as_ref().unwrap().to_str().unwrap().to_string();
    let engine = load_detector(&path).unwrap();
    assert_eq!(
        (engine.variant.as_str(), engine.backend().engine()),
        ("lbw6", "shift-add")
    );
    let sim = load_detector(&format!("{path}@sim")).unwrap();
    assert_eq!(sim.backend().engine(), "reference-fake-quant");
    let img = lbw::detect::image_io::load_rgb(&photo).unwrap();
    let (input, _) = lbw::detect::preprocess::preprocess(&img, &engine.manifest.input);
    let got = engine.backend().run(input.clone()).unwrap();
    let want = sim.backend().run(input).unwrap();
    for (g, w) in got.iter().zip(&want) {
        let (mean_diff, range) = mean_abs_diff_and_range(g, w);
        assert!(
            mean_diff < 0.02 * range,
            "engine vs simulation: mean |diff| {mean_diff} of range {range}"
        );
    }

    // `@activations`: the FP32 model's weights with the file's grids. Its outputs are the FP32
    // model's rounded through 8-bit grids: near them, not equal.
    let acts = load_detector(&format!("{path}@activations")).unwrap();
    assert_eq!(
        (acts.variant.as_str(), acts.backend().engine()),
        ("fp32-act8", "reference-fake-quant")
    );
    let fp32 = load_detector("yolo-fastest-voc").unwrap();
    let (input, _) = lbw::detect::preprocess::preprocess(&img, &fp32.manifest.input);
    let got = acts.backend().run(input.clone()).unwrap();
    let want = fp32.backend().run(input).unwrap();
    for (g, w) in got.iter().zip(&want) {
        let (mean_diff, range) = mean_abs_diff_and_range(g, w);
        assert!(
            mean_diff > 0.0 && mean_diff < 0.05 * range,
            "8-bit activations vs FP32: mean |diff| {mean_diff} of range {range}"
        );
    }
    // A file without grids cannot say what its activations cost.
    let mut plain = a.clone();
    plain.activation_scales.clear();
    plain.activation_zero_points.clear();
    let plain_path = dir.join("plain.lbw");
    plain.write(&plain_path).unwrap();
    let e = load_detector(&format!("{}@activations", plain_path.display()))
        .err()
        .expect("no grids")
        .to_string();
    assert!(e.contains("no activation grids"), "{e}");

    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = scratch("errors");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let cfg = config(&dir, &empty, "x.lbw");
    let e = finetune(&cfg, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("holds no images"), "{e}");

    let cfg = config(&dir, &dir.join("missing"), "x.lbw");
    let e = finetune(&cfg, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("does not exist"), "{e}");

    let images = photos(&dir);
    let mut cfg = config(&dir, &images, "x.lbw");
    cfg.resume = Some(dir.join("no-such.ckpt"));
    assert!(finetune(&cfg, &mut |_| {}).is_err());
    std::fs::write(dir.join("junk.ckpt"), b"not a checkpoint").unwrap();
    cfg.resume = Some(dir.join("junk.ckpt"));
    let e = finetune(&cfg, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("checkpoint"), "{e}");

    // A checkpoint with learned scales does not resume as a run that recomputes them.
    let mut cfg = config(&dir, &images, "alphas.lbw");
    cfg.stop_after = Some(1);
    let s = finetune(&cfg, &mut |_| {}).unwrap();
    let mut cfg = config(&dir, &images, "alphas.lbw");
    cfg.learned_alphas = false;
    cfg.resume = Some(s.checkpoint);
    let e = finetune(&cfg, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("--alphas learned"), "{e}");

    let mut cfg = config(&dir, &images, "x.lbw");
    cfg.resolution = Some(100);
    assert!(finetune(&cfg, &mut |_| {}).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--holdout`: the held-out loss is measured where asked and logged, the lowest one's parameters
/// are written beside the output (and as the output with `--select best`), and the photos it
/// holds out leave training.
#[test]
fn held_out_loss_is_measured_and_the_best_parameters_kept() {
    let dir = scratch("holdout");
    let images = photos(&dir);
    let mut cfg = common::short_run(&images, dir.join("best.lbw"), 4, 3);
    cfg.holdout = 1;
    cfg.validate_every = Some(2);
    cfg.select_best = true;
    let s = finetune(&cfg, &mut |_| {}).unwrap();
    assert_eq!((s.images_available, s.holdout_photos), (3, 1));
    let log = log_steps(&s.log);
    let measured: Vec<u64> = log
        .iter()
        .filter(|r| r.holdout_loss.is_some())
        .map(|r| r.step)
        .collect();
    assert_eq!(measured, vec![2, 4]);
    let initial = s
        .initial_holdout_loss
        .expect("measured before the first step");
    let best = s.best_holdout.expect("a best measurement");
    let all: Vec<f64> = std::iter::once(initial)
        .chain(log.iter().filter_map(|r| r.holdout_loss))
        .collect();
    assert!(all.iter().all(|l| l.is_finite() && *l > 0.0), "{all:?}");
    let lowest = all.iter().copied().fold(f64::INFINITY, f64::min);
    assert_eq!(best.loss, lowest);
    // The output is the best file, and says which step it holds.
    let out = std::fs::read(dir.join("best.lbw")).unwrap();
    assert_eq!(out, std::fs::read(dir.join("best.lbw.best.lbw")).unwrap());
    let file = LbwFile::read(&dir.join("best.lbw")).unwrap();
    assert_eq!(file.metadata.training["step"], best.step);
    assert_eq!(file.metadata.training["holdout_photos"], 1);
    assert!(load_detector(dir.join("best.lbw").to_str().unwrap()).is_ok());

    // `--stop-after 0` measures the starting weights alone (here the best file's) and leaves a
    // checkpoint to resume.
    let mut cfg = common::short_run(&images, dir.join("measure.lbw"), 4, 3);
    cfg.holdout = 1;
    cfg.stop_after = Some(0);
    cfg.init = Some(dir.join("best.lbw"));
    let m = finetune(&cfg, &mut |_| panic!("no step runs")).unwrap();
    assert!(m.output.is_none() && m.checkpoint.exists());
    assert!(m.initial_holdout_loss.is_some_and(|l| l.is_finite()));

    // Holding out every photo, or selecting the best without held-out photos, is refused.
    let mut cfg = common::short_run(&images, dir.join("x.lbw"), 2, 3);
    cfg.holdout = 4;
    let e = finetune(&cfg, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("--holdout 4 leaves no training photo"), "{e}");
    cfg.holdout = 0;
    cfg.select_best = true;
    let e = finetune(&cfg, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("--select best needs"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The training interpreter must compute what the inference engines compute, or the student
/// would learn to imitate a teacher that is not the FP32 model.
#[test]
fn training_interpreter_matches_tract_on_the_fp32_model() {
    use burn::tensor::Device;
    use lbw::train::net::{ActivationQuant, ForwardWeights, TrainGraph, tensor_from, to_host};
    let model = lbw::model::load_builtin("yolo-fastest-voc").unwrap();
    let photo = lbw::paths::data_dir()
        .join("voc2007-sample")
        .join("JPEGImages");
    let first = std::fs::read_dir(&photo)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let img = lbw::detect::image_io::load_rgb(&first).unwrap();
    let (input, _) = lbw::detect::preprocess::preprocess(&img, &model.manifest.input);
    use lbw::engine::Backend;
    let want = TractFp32::new(&model.graph)
        .unwrap()
        .run(input.clone())
        .unwrap();
    let device = Device::flex();
    let mut w = ForwardWeights::default();
    for (name, t) in &model.graph.weights {
        if t.shape.len() == 4 {
            let s = [t.shape[0], t.shape[1], t.shape[2], t.shape[3]];
            w.weights
                .insert(name.clone(), tensor_from(t.data.clone(), s, &device));
        } else {
            w.biases.insert(
                name.clone(),
                tensor_from(t.data.clone(), [t.len()], &device),
            );
        }
    }
    let net = TrainGraph::new(&model.graph).unwrap();
    let s = input.shape.clone();
    let x = tensor_from(input.data, [s[0], s[1], s[2], s[3]], &device);
    let got = net.forward(x, &w, &mut ActivationQuant::default()).unwrap();
    assert_eq!(got.len(), want.len());
    for (g, t) in got.into_iter().zip(want) {
        let g = to_host(g).unwrap();
        let max_diff = g
            .iter()
            .zip(&t.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(max_diff < 1e-2, "outputs differ by {max_diff}");
    }
}

/// A conv kept at full precision runs on the engine as a float step whose output is stored on an
/// 8-bit grid before its activation; training must round that value too, or the written file
/// could not run on the engine. Here the stem conv is kept, and the file loads on the engine.
#[test]
fn a_kept_conv_trains_and_runs_on_the_engine() {
    let dir = scratch("keep");
    let images = photos(&dir);
    let mut cfg = config(&dir, &images, "kept.lbw");
    cfg.steps = Some(2);
    cfg.checkpoint_every = 2;
    cfg.keep_full_precision = vec!["conv0.weight".into()];
    let s = finetune(&cfg, &mut |_| {}).unwrap();
    let out = s.output.unwrap();
    let file = LbwFile::read(&out).unwrap();
    assert!(!file.quantized.contains_key("conv0.weight"));
    assert!(file.activation_scales.contains_key("conv0"));
    let engine = load_detector(out.to_str().unwrap()).unwrap();
    assert_eq!(engine.backend().engine(), "shift-add");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--init`: a 6-bit run started from a 4-bit file begins exactly at that file (4-bit levels are
/// 6-bit levels, and the file's alphas are taken over), and a missing file is an error naming
/// `--init`.
#[test]
fn a_run_starts_from_a_lower_bit_width_file() {
    let dir = scratch("init");
    let images = photos(&dir);
    let mut low = config(&dir, &images, "four.lbw");
    low.bits = lbw::quant::Bits::new(4).unwrap();
    low.steps = Some(4);
    low.checkpoint_every = 2;
    let four = finetune(&low, &mut |_| {}).unwrap();
    let four_path = four.output.clone().unwrap();
    let a = LbwFile::read(&four_path).unwrap();

    // One step at a learning rate too small to move any weight off its level.
    let mut high = config(&dir, &images, "six.lbw");
    high.init = Some(four_path.clone());
    high.steps = Some(1);
    high.lr = 1e-9;
    let six = finetune(&high, &mut |_| {}).unwrap();
    let b = LbwFile::read(six.output.as_ref().unwrap()).unwrap();
    assert_eq!(b.metadata.bits, Some(6));
    assert_eq!(b.metadata.training["init"], four_path.display().to_string());
    assert_eq!(a.quantized.len(), b.quantized.len());
    let mut compared = 0;
    for (name, qa) in &a.quantized {
        let (wa, wb) = (&a.graph.weights[name].data, &b.graph.weights[name].data);
        let scale = wa.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        for (x, y) in wa.iter().zip(wb) {
            assert!(
                (x - y).abs() <= 1e-4 * scale,
                "{name}: {x} became {y} (the 6-bit run did not start at the 4-bit file)"
            );
        }
        assert_eq!(qa.codes.len(), b.quantized[name].codes.len());
        compared += 1;
    }
    assert!(compared > 0);
    // And the 6-bit student was not the PTQ of the FP32 weights: that would differ from the file.
    let first = log_steps(&six.log)[0].loss.total;
    let low_log = log_steps(&four.log);
    let ptq_loss = low_log[0].loss.total;
    assert!(
        first < ptq_loss,
        "the 6-bit run's first loss {first} should be below the 4-bit PTQ loss {ptq_loss}"
    );

    // With --keep-zeros, four steps at a learning rate that moves weights keep every zero of the
    // 4-bit file at zero; without it, some of them leave zero.
    let zeros_of = |f: &LbwFile| -> Vec<(String, usize)> {
        f.quantized
            .iter()
            .flat_map(|(n, q)| {
                q.codes
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.is_zero())
                    .map(move |(i, _)| (n.clone(), i))
            })
            .collect()
    };
    let four_zeros = zeros_of(&a);
    assert!(!four_zeros.is_empty(), "a 4-bit file has zero weights");
    let run_six = |name: &str, keep: bool| {
        let mut cfg = config(&dir, &images, name);
        cfg.init = Some(four_path.clone());
        cfg.steps = Some(4);
        cfg.lr = 2e-2;
        cfg.keep_zeros = keep;
        let s = finetune(&cfg, &mut |_| {}).unwrap();
        LbwFile::read(s.output.as_ref().unwrap()).unwrap()
    };
    let kept = run_six("kept.lbw", true);
    assert_eq!(kept.metadata.training["keep_zeros"], true);
    let kept_zeros: std::collections::HashSet<_> = zeros_of(&kept).into_iter().collect();
    assert!(four_zeros.iter().all(|z| kept_zeros.contains(z)));
    let free_zeros: std::collections::HashSet<_> =
        zeros_of(&run_six("free.lbw", false)).into_iter().collect();
    assert!(
        four_zeros.iter().any(|z| !free_zeros.contains(z)),
        "without --keep-zeros some zeros move (else this test checks nothing)"
    );
    let mut no_init = config(&dir, &images, "x.lbw");
    no_init.keep_zeros = true;
    let err = finetune(&no_init, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("--keep-zeros"), "{err}");

    let mut wrong = config(&dir, &images, "wrong.lbw");
    wrong.init = Some(dir.join("no-such.lbw"));
    let err = finetune(&wrong, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("--init"), "{err}");

    let _ = std::fs::remove_dir_all(&dir);
}
