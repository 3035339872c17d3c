//! Post-training quantization of a real detector (yolo-fastest-voc, darknet) end to end, and the
//! calibration behind [`LbwThreshold`]'s default parameter.
//!
//! The model files live outside the repository (`lbw::paths::model_dir()`); without them these
//! tests print a note and pass, so a checkout without the shared data still builds and tests.

use std::path::PathBuf;

use lbw::model::Graph;
use lbw::model::lbw_file::LbwFile;
use lbw::quant::{
    Bits, LayerKind, LbwThreshold, Method, OptimalSweep, QuantizeOptions, Quantizer,
    quantize_graph, relative_error,
};

fn yolo_fastest() -> Option<Graph> {
    let dir = lbw::paths::model_dir().join("yolo-fastest-voc");
    let (cfg, weights) = (
        dir.join("yolo-fastest.cfg"),
        dir.join("yolo-fastest.weights"),
    );
    if !cfg.is_file() || !weights.is_file() {
        eprintln!(
            "skipped: {} not found (set {})",
            dir.display(),
            lbw::paths::MODEL_DIR_VAR
        );
        return None;
    }
    Some(lbw::model::darknet::load(&cfg, &weights).unwrap().graph)
}

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lbw-quant-real-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn ptq_of_yolo_fastest_packs_to_b_over_32() {
    let Some(graph) = yolo_fastest() else { return };
    let convs: Vec<_> = graph.convs().collect();
    assert_eq!(convs.len(), 85);
    let conv_weights: usize = convs
        .iter()
        .map(|(_, c)| graph.weight(&c.weight).unwrap().len())
        .sum();
    for (bits, method) in [
        (2, Method::Ternary),
        (3, Method::Lbw),
        (4, Method::Optimal),
        (6, Method::Optimal),
        (8, Method::Lbw),
    ] {
        let opts = QuantizeOptions {
            bits: Bits::new(bits).unwrap(),
            method,
            param: None,
            per_channel: false,
            keep_full_precision: vec![],
        };
        let model = quantize_graph(&graph, &opts).unwrap();
        let r = &model.report;
        assert_eq!(r.quantized_layers, 85);
        assert_eq!(r.fp32_bytes, 4 * conv_weights);
        let file = LbwFile::from_quantized(&model, "yolo-fastest-voc", "00").unwrap();
        let path = temp_path(&format!("yolo-fastest-{bits}.lbw"));
        file.write(&path).unwrap();
        let ratio = file.packed_weight_bytes() as f64 / file.fp32_weight_bytes() as f64;
        let ideal = f64::from(bits) / 32.0;
        // Overhead: one f32 alpha and at most one partial byte per layer.
        assert!(
            ratio >= ideal && ratio < ideal + 0.002,
            "b={bits}: packed/FP32 = {ratio}"
        );
        assert_eq!(file.packed_weight_bytes(), r.packed_bytes);
        // The whole file: packed weights, FP32 biases, manifest and alignment.
        let size = std::fs::metadata(&path).unwrap().len() as f64;
        let biases: usize = convs
            .iter()
            .filter_map(|(_, c)| c.bias.as_ref())
            .map(|b| 4 * graph.weight(b).unwrap().len())
            .sum();
        let payload = (file.packed_weight_bytes() + biases) as f64;
        assert!(
            size > payload && size < payload + 120_000.0,
            "b={bits}: file {size} bytes for {payload} bytes of weights"
        );
        let back = LbwFile::read(&path).unwrap();
        assert_eq!(back, file);
        back.graph.infer_shapes().unwrap();
        assert_eq!(back.graph, model.simulated_graph().unwrap());
        eprintln!(
            "b={bits} {method}: conv weights {} B FP32 -> {} B packed ({:.4} of FP32, ideal {ideal:.4}), \
             file {size} B, compression {:.2}x, mean rel. L2 error {:.3}",
            r.fp32_bytes,
            r.packed_bytes,
            ratio,
            r.compression_ratio,
            r.layers.iter().map(|l| l.relative_error).sum::<f64>() / r.layers.len() as f64
        );
    }
    std::fs::remove_dir_all(temp_path("x").parent().unwrap()).unwrap();
}

#[test]
fn ptq_report_with_kept_layers_and_per_channel() {
    let Some(graph) = yolo_fastest() else { return };
    let convs: Vec<_> = graph.convs().map(|(n, _)| n.name.clone()).collect();
    // Keep the first conv (raw image input) and the two detection heads (the convs feeding outputs).
    let heads: Vec<String> = graph
        .convs()
        .filter(|(n, _)| graph.outputs.contains(&n.output))
        .map(|(n, _)| n.name.clone())
        .collect();
    assert_eq!(heads.len(), 2);
    let mut keep = vec![convs[0].clone()];
    keep.extend(heads);
    let opts = QuantizeOptions {
        bits: Bits::new(4).unwrap(),
        method: Method::Optimal,
        param: None,
        per_channel: true,
        keep_full_precision: keep.clone(),
    };
    let model = quantize_graph(&graph, &opts).unwrap();
    let r = &model.report;
    assert_eq!(r.kept_layers, 3);
    assert_eq!(r.quantized_layers, 82);
    assert!(r.compression_ratio > 2.0 && r.compression_ratio < 8.0);
    let mut kinds = std::collections::BTreeMap::new();
    for l in &r.layers {
        *kinds.entry(l.kind).or_insert(0) += 1;
        if keep.contains(&l.layer) {
            assert!(!l.quantized && l.alphas.is_empty() && l.packed_bytes == l.fp32_bytes);
        } else {
            assert_eq!(l.alphas.len(), l.shape[0]);
            assert!(l.relative_error > 0.0 && l.relative_error < 0.5, "{l:?}");
            assert!((0.0..1.0).contains(&l.zero_fraction));
        }
    }
    assert!(kinds.get(&LayerKind::Depthwise).is_some_and(|&n| n > 0));
    assert!(kinds.get(&LayerKind::Pointwise).is_some_and(|&n| n > 0));
    // A typo in the keep list is an error, not a silently quantized layer.
    let mut bad = opts.clone();
    bad.keep_full_precision.push("no_such_layer".into());
    assert!(quantize_graph(&graph, &bad).is_err());
    eprintln!(
        "4-bit optimal per-channel, kept {keep:?}: {} B -> {} B ({:.2}x); kinds {kinds:?}",
        r.fp32_bytes, r.packed_bytes, r.compression_ratio
    );
}

/// Per bit-width over the conv layers: how stable the optimal scale is relative to max|W| and to
/// mean|W| (coefficient of variation across layers), and the `c` in `alpha = c * max|W|` that
/// minimises the mean relative L2 error. Asserts that max|W| is the steadier statistic and that the
/// shipped defaults are the grid minimisers, per tensor and per channel (`LBW_CALIBRATE=1` prints
/// the table without asserting the defaults, for refitting).
#[test]
fn lbw_default_scale_is_calibrated() {
    let Some(graph) = yolo_fastest() else { return };
    let tensors: Vec<(Vec<f32>, Vec<usize>)> = graph
        .convs()
        .map(|(_, c)| {
            let t = graph.weight(&c.weight).unwrap();
            (t.data.clone(), t.shape.clone())
        })
        .collect();
    let cv = |v: &[f64]| {
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64;
        (m, var.sqrt() / m)
    };
    for per_channel in [false, true] {
        // The groups one alpha covers: whole tensors, or output channels.
        let groups: Vec<&[f32]> = tensors
            .iter()
            .flat_map(|(w, shape)| {
                w.chunks(if per_channel {
                    w.len() / shape[0]
                } else {
                    w.len()
                })
            })
            .filter(|g| g.iter().any(|&x| x != 0.0))
            .collect();
        for b in 2..=8u8 {
            let bits = Bits::new(b).unwrap();
            let (mut to_mean, mut to_max, mut opt_err) = (vec![], vec![], 0.0);
            for w in &groups {
                let q = OptimalSweep.quantize(w, bits).unwrap();
                let mean = w.iter().map(|x| f64::from(x.abs())).sum::<f64>() / w.len() as f64;
                let max = w.iter().fold(0f64, |m, x| m.max(f64::from(x.abs())));
                to_mean.push(f64::from(q.alphas[0]) / mean);
                to_max.push(f64::from(q.alphas[0]) / max);
                opt_err += relative_error(w, q.objective) / groups.len() as f64;
            }
            let ((m_mean, cv_mean), (m_max, cv_max)) = (cv(&to_mean), cv(&to_max));
            let mean_err = |c: f32| {
                let q = LbwThreshold::with_scale(c).unwrap();
                groups
                    .iter()
                    .map(|w| relative_error(w, q.quantize(w, bits).unwrap().objective))
                    .sum::<f64>()
                    / groups.len() as f64
            };
            let (best_c, best_err) = (1..=150)
                .map(|i| i as f32 * 0.01)
                .map(|c| (c, mean_err(c)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap();
            let default_c = LbwThreshold::default_scale(bits, per_channel);
            let default_err = mean_err(default_c);
            eprintln!(
                "{} b={b}: alpha*/max|W| {m_max:.3} (cv {cv_max:.3}), alpha*/mean|W| {m_mean:.3} (cv {cv_mean:.3}); \
                 lbw best c {best_c:.2} err {best_err:.4}, default c {default_c} err {default_err:.4}, optimal err {opt_err:.4}",
                if per_channel {
                    "per-channel"
                } else {
                    "per-tensor "
                }
            );
            assert!(cv_max < cv_mean, "b={b}: max|W| should track alpha* better");
            assert!(opt_err <= best_err);
            if std::env::var_os("LBW_CALIBRATE").is_none() {
                assert!(
                    default_err <= best_err * 1.001,
                    "b={b}: default c={default_c} gives {default_err}, c={best_c} gives {best_err}"
                );
            }
        }
    }
}
