//! `lbw finetune --labels` on real VOC photos: the labelled YOLOv3 loss is reported beside the
//! distillation terms, a resumed labelled run still ends with the weights of an uninterrupted one,
//! and bad label folders are clear errors or warnings.

mod common;

use std::path::{Path, PathBuf};

use common::log_steps;
use lbw::model::lbw_file::LbwFile;
use lbw::train::labels::LabelSet;
use lbw::train::{FinetuneConfig, StepReport, finetune};

fn scratch(name: &str) -> PathBuf {
    common::scratch("lbw-labels", name)
}

/// A VOC folder with the first `n` voc2007-sample photos and their annotations.
fn voc_folder(dir: &Path, n: usize) -> PathBuf {
    let src = lbw::paths::data_dir().join("voc2007-sample");
    let mut names: Vec<PathBuf> = std::fs::read_dir(src.join("JPEGImages"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    let out = dir.join("voc");
    std::fs::create_dir_all(out.join("JPEGImages")).unwrap();
    std::fs::create_dir_all(out.join("Annotations")).unwrap();
    for p in names.iter().take(n) {
        let stem = p.file_stem().unwrap().to_str().unwrap();
        std::fs::copy(p, out.join("JPEGImages").join(p.file_name().unwrap())).unwrap();
        std::fs::copy(
            src.join("Annotations").join(format!("{stem}.xml")),
            out.join("Annotations").join(format!("{stem}.xml")),
        )
        .unwrap();
    }
    out
}

/// Two photos without labels.
fn unlabelled(dir: &Path) -> PathBuf {
    let src = lbw::paths::data_dir()
        .join("unlabeled")
        .join("voc-animalpose");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    let out = dir.join("plain");
    std::fs::create_dir_all(&out).unwrap();
    for p in names.iter().take(2) {
        std::fs::copy(p, out.join(p.file_name().unwrap())).unwrap();
    }
    out
}

fn config(dir: &Path, voc: &Path, plain: &Path, out: &str) -> FinetuneConfig {
    let mut cfg = common::short_run(plain, dir.join(out), 6, 3);
    cfg.label_dirs = vec![voc.to_path_buf()];
    cfg
}

#[test]
fn labelled_run_reports_its_loss_and_resumes_exactly() {
    let dir = scratch("e2e");
    let voc = voc_folder(&dir, 4);
    let plain = unlabelled(&dir);

    let mut first = config(&dir, &voc, &plain, "resumed.lbw");
    first.stop_after = Some(3);
    let s1 = finetune(&first, &mut |_| {}).unwrap();
    assert_eq!(
        s1.images_available, 6,
        "labelled photos join the --images ones"
    );
    let mut second = config(&dir, &voc, &plain, "resumed.lbw");
    second.resume = Some(s1.checkpoint.clone());
    let s2 = finetune(&second, &mut |_| {}).unwrap();
    assert_eq!((s2.start_step, s2.end_step), (3, 6));

    let log = log_steps(&s2.log);
    assert_eq!(log.len(), 6);
    let mut labelled_steps = 0;
    for r in &log {
        let d = r.loss.objectness + r.loss.class + r.loss.bbox;
        match r.loss.labelled {
            Some(l) => {
                labelled_steps += 1;
                eprintln!(
                    "step {}: distillation {d:.4}, labelled {:.4} (obj {:.4} cls {:.4} box {:.4}, \
                     {} images, {} boxes), total {:.4}",
                    r.step,
                    l.total,
                    l.objectness,
                    l.class,
                    l.bbox,
                    l.images,
                    l.positives,
                    r.loss.total
                );
                assert!(l.total.is_finite() && l.total > 0.0, "{l:?}");
                assert!(l.images >= 1 && l.positives >= 1, "{l:?}");
                assert!((l.objectness + l.class + l.bbox - l.total).abs() < 1e-9);
                // The step minimises distillation plus half the labelled loss (the default).
                assert!((d + 0.5 * l.total - r.loss.total).abs() < 1e-6 * r.loss.total.max(1.0));
            }
            None => assert!((d - r.loss.total).abs() < 1e-9),
        }
    }
    assert!(labelled_steps >= 4, "4 of 6 photos are labelled");
    // A log line without the optional field (written before labels existed) still reads.
    let old = r#"{"step":1,"total_steps":2,"loss":{"total":1.0,"objectness":0.5,"class":0.25,"bbox":0.25},"lr":0.001,"images_per_s":3.0,"elapsed_s":1.0}"#;
    let r: StepReport = serde_json::from_str(old).unwrap();
    assert_eq!(r.loss.labelled, None);

    let straight = finetune(&config(&dir, &voc, &plain, "straight.lbw"), &mut |_| {}).unwrap();
    let a = LbwFile::read(s2.output.as_ref().unwrap()).unwrap();
    let b = LbwFile::read(straight.output.as_ref().unwrap()).unwrap();
    assert_eq!(a.quantized, b.quantized, "resume must not change the run");
    assert_eq!(a.metadata.training["label_weight"], 0.5);
    assert_eq!(a.metadata.training["labelled_images"], 4);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_label_folders_are_clear_errors_or_warnings() {
    let dir = scratch("errors");
    let voc = voc_folder(&dir, 3);
    let plain = unlabelled(&dir);
    let labels: Vec<String> = lbw::model::manifest::find("yolo-fastest-voc")
        .unwrap()
        .labels
        .clone();

    // No annotations: an error naming the folder.
    let e = LabelSet::scan(std::slice::from_ref(&plain), &labels)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&plain.display().to_string()) && e.contains("Annotations"),
        "{e}"
    );

    // A malformed file is skipped with a warning naming it; an unknown class is counted.
    let ann = voc.join("Annotations");
    let mut xmls: Vec<PathBuf> = std::fs::read_dir(&ann)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    xmls.sort();
    std::fs::write(&xmls[0], "<annotation><object><name>dog</name>").unwrap();
    let text = std::fs::read_to_string(&xmls[1]).unwrap();
    let first = text.find("<name>").unwrap();
    let end = text[first..].find("</name>").unwrap() + first;
    let renamed = format!("{}<name>unicorn{}", &text[..first], &text[end..]);
    std::fs::write(&xmls[1], renamed).unwrap();
    let set = LabelSet::scan(std::slice::from_ref(&voc), &labels).unwrap();
    assert_eq!(set.photos.len(), 2, "{:?}", set.warnings);
    let name = xmls[0].display().to_string();
    assert!(
        set.warnings.iter().any(|w| w.contains(&name)),
        "{:?}",
        set.warnings
    );
    assert!(
        set.warnings.iter().any(|w| w.contains("unicorn (1)")),
        "{:?}",
        set.warnings
    );
    let unicorn = set
        .photos
        .values()
        .flat_map(|p| p.boxes.iter())
        .filter(|b| b.ignore)
        .count();
    assert!(unicorn >= 1);

    // Through finetune: a folder without annotations, and a head without anchors.
    let mut cfg = config(&dir, &plain, &plain, "x.lbw");
    let e = finetune(&cfg, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("no Annotations"), "{e}");
    cfg.label_dirs = vec![voc.clone()];
    cfg.model = "fastestdet-coco".into();
    let e = finetune(&cfg, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("YOLOv3"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
