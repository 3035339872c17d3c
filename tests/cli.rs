//! The `lbw` binary end to end: outputs on real data, and a message plus a non-zero exit for bad
//! input (never a panic).

use std::path::PathBuf;
use std::process::{Command, Output};

use lbw::paths::data_dir;

fn lbw(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lbw"))
        .args(args)
        .output()
        .expect("run lbw")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lbw-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn photo() -> String {
    data_dir()
        .join("voc2007-sample/JPEGImages/2007_000032.jpg")
        .display()
        .to_string()
}

fn assert_fails(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success: {err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn detect_json_then_eval_the_saved_detections() {
    let o = lbw(&[
        "detect",
        "--model",
        "yolo-fastest-voc",
        "--json",
        "--score-threshold",
        "0.005",
        &photo(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line = String::from_utf8(o.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["image"], "2007_000032");
    assert_eq!(
        (v["width"].as_u64(), v["height"].as_u64()),
        (Some(500), Some(281))
    );
    let dets = v["detections"].as_array().unwrap();
    assert!(
        dets.iter()
            .any(|d| d["label"] == "aeroplane" && d["score"].as_f64().unwrap() > 0.5)
    );
    assert!(dets.iter().all(|d| d["box"].as_array().unwrap().len() == 4));

    let saved = tmp("dets.jsonl");
    std::fs::write(&saved, &line).unwrap();
    let voc = data_dir().join("voc2007-sample").display().to_string();
    let o = lbw(&[
        "eval",
        "--detections",
        saved.to_str().unwrap(),
        "--data",
        &voc,
        "--format",
        "voc",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // One image of 64 was detected, so AP is low but the aeroplane class has true positives.
    let aeroplane = report["classes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["class"] == "aeroplane")
        .unwrap();
    assert!(
        aeroplane["true_positives"].as_u64().unwrap() >= 1,
        "{aeroplane}"
    );
}

#[test]
fn bad_input_is_a_message_and_a_non_zero_exit() {
    assert_fails(
        &lbw(&["detect", "--model", "no-such-model", &photo()]),
        "unknown model",
    );
    let corrupt = tmp("corrupt.jpg");
    let bytes = std::fs::read(photo()).unwrap();
    std::fs::write(&corrupt, &bytes[..bytes.len() / 3]).unwrap();
    assert_fails(&lbw(&["detect", corrupt.to_str().unwrap()]), "corrupt.jpg");
    let text = tmp("not-an-image.jpg");
    std::fs::write(&text, "hello").unwrap();
    assert_fails(&lbw(&["detect", text.to_str().unwrap()]), "not an image");
    assert_fails(&lbw(&["detect", "/no/such/file.jpg"]), "/no/such/file.jpg");
    assert_fails(
        &lbw(&["detect", "--score-threshold", "2", &photo()]),
        "score threshold",
    );
    assert_fails(
        &lbw(&[
            "quantize",
            "--model",
            "yolo-fastest-voc",
            "--bits",
            "9",
            "-o",
            "/tmp/x.lbw",
        ]),
        "bit",
    );
    let hostile = tmp("hostile.lbw");
    std::fs::write(&hostile, b"\x89LBW\r\n\x1a\n\xff\xff\xff\xff garbage").unwrap();
    assert_fails(
        &lbw(&["detect", "--model", hostile.to_str().unwrap(), &photo()]),
        "hostile.lbw",
    );
    let o = lbw(&["detect", "--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let missing = lbw(&["detect", "/no/such/file.jpg"]);
    let message = stderr(&missing);
    assert_eq!(
        message.matches("No such file").count(),
        1,
        "the io cause is said once: {message}"
    );
}

#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    // `lbw eval --json | head -1`: the reader goes away before the report is written.
    let mut child = Command::new(env!("CARGO_BIN_EXE_lbw"))
        .args(["models", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run lbw");
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn quantize_writes_a_loadable_lbw_and_quantize_tensor_round_trips_npy() {
    let out = tmp("yf4.lbw");
    let o = lbw(&[
        "quantize",
        "--model",
        "yolo-fastest-voc",
        "--bits",
        "4",
        "--method",
        "optimal",
        "-o",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["layers"].as_array().unwrap().len(), 85);
    let ratio = report["compression_ratio"].as_f64().unwrap();
    assert!(
        ratio > 6.0 && ratio < 8.0,
        "4-bit codes should be close to 8x smaller than FP32: {ratio}"
    );
    let o = lbw(&[
        "detect",
        "--model",
        out.to_str().unwrap(),
        "--json",
        &photo(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The same file on the shift-add engine: its own 4-bit weights, activations calibrated.
    let file = out.to_str().unwrap();
    let o = lbw(&[
        "bench",
        "--model",
        file,
        "--variant",
        "lbw4",
        "--iters",
        "2",
        "--steps",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bench: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(bench["engine"], "shift-add");
    assert!(bench["p50_ms"].as_f64().unwrap() > 0.0);
    // --steps lists every step once, each conv with its arithmetic, and the per-kind rows add up
    // to the same steps.
    let steps = bench["steps"].as_array().unwrap();
    let kinds = bench["layers"].as_array().unwrap();
    let per_kind: u64 = kinds.iter().map(|k| k["steps"].as_u64().unwrap()).sum();
    assert_eq!(per_kind as usize, steps.len());
    let convs: Vec<_> = steps.iter().filter(|s| !s["conv"].is_null()).collect();
    assert!(convs.len() > 20, "{} convs", convs.len());
    for s in &convs {
        assert!(s["us"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["conv"]["terms"].as_u64().unwrap() > 0, "{s}");
        assert!(s["lane_adds_per_ns"].as_f64().unwrap() > 0.0, "{s}");
    }
    assert_fails(
        &lbw(&[
            "bench",
            "--model",
            file,
            "--variant",
            "lbw6",
            "--iters",
            "1",
        ]),
        "4-bit",
    );

    let input = tmp("w.npy");
    let w: Vec<f32> = (0..64)
        .map(|i| ((i * 37 % 29) as f32 - 14.0) / 10.0)
        .collect();
    lbw::quant::write_npy_file(&input, &[4, 16], &w).unwrap();
    let output = tmp("q.npy");
    let o = lbw(&[
        "quantize-tensor",
        "--bits",
        "2",
        "--method",
        "ternary",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let alpha = r["alpha"].as_f64().unwrap() as f32;
    let q = lbw::quant::read_npy_file(&output).unwrap();
    assert_eq!(q.shape, vec![4, 16]);
    // Ternary: every value is 0 or ±alpha, and the objective is the squared error actually made.
    assert!(
        q.data
            .iter()
            .all(|&v| v == 0.0 || (v.abs() - alpha).abs() < 1e-6)
    );
    let err: f64 = w
        .iter()
        .zip(&q.data)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    assert!(
        (err - r["objective"].as_f64().unwrap()).abs() < 1e-4,
        "{err} vs {}",
        r["objective"]
    );
}

#[test]
fn a_calibrated_lbw_file_runs_on_the_shift_add_engine() {
    let out = tmp("cal6.lbw");
    let file = out.to_str().unwrap();
    let o = lbw(&[
        "calibrate",
        "--model",
        "yolo-fastest-voc",
        "--bits",
        "6",
        "--limit",
        "8",
        "-o",
        file,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lbw_file = lbw::model::lbw_file::LbwFile::read(&out).unwrap();
    assert!(lbw_file.activation_scales.len() > 50);
    assert_eq!(
        lbw_file.activation_scales.keys().collect::<Vec<_>>(),
        lbw_file.activation_zero_points.keys().collect::<Vec<_>>()
    );
    // The file's grids and weights are the in-memory PTQ variant's (same quantizer, same 8
    // calibration images), so the engine must give byte-identical detections.
    let args = |m: &str| {
        [
            "detect",
            "--model",
            m,
            "--json",
            "--score-threshold",
            "0.01",
            &photo(),
        ]
        .map(String::from)
    };
    let from_file = lbw(&args(file).each_ref().map(String::as_str));
    let in_memory = lbw(&args("yolo-fastest-voc@lbw6").each_ref().map(String::as_str));
    assert!(from_file.status.success(), "{}", stderr(&from_file));
    assert_eq!(from_file.stdout, in_memory.stdout);
}

#[test]
fn eval_bootstrap_reports_intervals_and_a_zero_paired_difference_to_itself() {
    let data = data_dir().join("coco128").display().to_string();
    let dets = tmp("boot.dets.jsonl");
    let common = [
        "eval",
        "--model",
        "yolo-fastest-voc",
        "--data",
        &data,
        "--format",
        "coco",
        "--limit",
        "32",
        "--score-threshold",
        "0.005",
    ];
    let first = lbw(&[&common[..], &["--save-detections", dets.to_str().unwrap()]].concat());
    assert!(first.status.success(), "{}", stderr(&first));
    let o = lbw(&[
        &common[..],
        &[
            "--bootstrap",
            "200",
            "--baseline-detections",
            dets.to_str().unwrap(),
            "--json",
        ],
    ]
    .concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let b = &v["voc_style"]["bootstrap"];
    let lo = b["map"][0].as_f64().unwrap();
    let hi = b["map"][1].as_f64().unwrap();
    assert!(0.0 <= lo && lo < hi && hi <= 1.0, "{b}");
    assert_eq!(b["resamples"], 200);
    // The model against its own saved detections: every resample's difference is exactly zero.
    assert_eq!(
        b["difference"]["interval"],
        serde_json::json!([0.0, 0.0]),
        "{b}"
    );
    assert!(
        (b["difference"]["baseline_map"].as_f64().unwrap()
            - v["voc_style"]["map"].as_f64().unwrap())
        .abs()
            < 1e-12
    );
}

/// `lbw finetune --bits 6` runs in two stages by default (the schedule at 4 bits, then a tenth of
/// it at 6 bits from that file); `--via-bits none` trains at 6 bits throughout, and a bad value is
/// a message.
#[test]
fn finetune_at_six_bits_goes_through_four_by_default() {
    let images = tmp("staged-photos");
    std::fs::create_dir_all(&images).unwrap();
    let src = data_dir().join("voc2007-sample/JPEGImages");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for p in names.iter().take(3) {
        std::fs::copy(p, images.join(p.file_name().unwrap())).unwrap();
    }
    let images = images.display().to_string();
    let out = tmp("staged.lbw");
    let out_s = out.display().to_string();
    let common = [
        "finetune",
        "--model",
        "yolo-fastest-voc",
        "--bits",
        "6",
        "--images",
        &images,
        "--steps",
        "10",
        "--batch",
        "2",
        "--resolution",
        "96",
    ];
    let o = lbw(&[&common[..], &["-o", &out_s]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let first = tmp("staged.lbw.via4.lbw");
    let a = lbw::model::lbw_file::LbwFile::read(&first).unwrap();
    let b = lbw::model::lbw_file::LbwFile::read(&out).unwrap();
    assert_eq!((a.metadata.bits, b.metadata.bits), (Some(4), Some(6)));
    assert_eq!(a.metadata.training["steps"], 10);
    assert_eq!(
        b.metadata.training["steps"], 1,
        "a tenth of the first stage"
    );
    assert_eq!(b.metadata.training["init"], first.display().to_string());
    assert!(a.metadata.training["init"].is_null());

    // Interrupted in the first stage and resumed: the same two files.
    let resumed = tmp("resumed.lbw");
    let resumed_s = resumed.display().to_string();
    let o = lbw(&[&common[..], &["--stop-after", "5", "-o", &resumed_s]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!resumed.exists());
    let ck = tmp("resumed.lbw.via4.lbw.ckpt").display().to_string();
    assert!(stderr(&o).contains(&ck), "{}", stderr(&o));
    let o = lbw(&[&common[..], &["--resume", &ck, "-o", &resumed_s]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let r = lbw::model::lbw_file::LbwFile::read(&resumed).unwrap();
    assert_eq!(r.quantized, b.quantized, "resuming must not change the run");

    let single = tmp("single.lbw");
    let single_s = single.display().to_string();
    let o = lbw(&[&common[..], &["--via-bits", "none", "-o", &single_s]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let c = lbw::model::lbw_file::LbwFile::read(&single).unwrap();
    assert_eq!(c.metadata.training["steps"], 10);
    assert!(c.metadata.training["init"].is_null());
    assert!(!tmp("single.lbw.via4.lbw").exists());

    let o = lbw(&[&common[..], &["--via-bits", "four", "-o", &single_s]].concat());
    assert_fails(&o, "--via-bits must be");
    let o = lbw(&[
        &common[..],
        &["--via-bits", "none", "--final-steps", "5", "-o", &single_s],
    ]
    .concat());
    assert_fails(&o, "--final-steps applies to a staged run");
}
