//! The evaluation module against reference answers on real data (`lbw::paths::data_dir()`):
//! rafaelpadilla/review_object_detection_metrics' test cases (VOC and pycocotools numbers), the VOC
//! 2007 sample, BCCD and coco128.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lbw::Error;
use lbw::detect::{Detection, ImageDetections};
use lbw::eval::{self, CocoDataset, CocoDetection, Interpolation, VocDataset, VocOptions};

fn data(sub: &str) -> PathBuf {
    lbw::paths::data_dir().join(sub)
}

fn reference(sub: &str) -> PathBuf {
    data("map-reference").join(sub)
}

/// The single class's AP of test_case_1.
fn case1_ap(iou: f64, interpolation: Interpolation, pixel_plus_one: bool) -> f64 {
    let gt = eval::load_text_gt(reference("test_case_1/gts")).unwrap();
    let dets = eval::load_text_detections(reference("test_case_1/dets")).unwrap();
    assert_eq!(gt.len(), 7);
    assert_eq!(gt.iter().map(|g| g.objects.len()).sum::<usize>(), 15);
    assert_eq!(dets.iter().map(|d| d.detections.len()).sum::<usize>(), 24);
    let report = eval::voc_map(
        &gt,
        &dets,
        &VocOptions {
            iou,
            interpolation,
            pixel_plus_one,
        },
    );
    assert_eq!(report.classes.len(), 1);
    let row = &report.classes[0];
    assert_eq!(
        (row.class.as_str(), row.num_gt, row.num_dets),
        ("object", 15, 24)
    );
    let ap = row.ap.unwrap();
    assert_eq!(report.map, Some(ap));
    ap
}

#[test]
fn test_case_1_voc_ap() {
    let ious = [0.1, 0.3, 0.5, 0.75];
    let eleven = [0.3333333333, 0.2683982683, 0.0303030303, 0.0];
    let all = [0.3371980676, 0.2456866804, 0.0222222222, 0.0];
    for (i, &iou) in ious.iter().enumerate() {
        let e = case1_ap(iou, Interpolation::ElevenPoint, true);
        let a = case1_ap(iou, Interpolation::AllPoint, true);
        assert!((e - eleven[i]).abs() < 1e-6, "11-point @{iou}: {e}");
        assert!((a - all[i]).abs() < 1e-6, "all-point @{iou}: {a}");
    }
    // Continuous coordinates: the 4-digit values EXPECTED.md states at 0.1 / 0.3, unchanged at
    // 0.5 / 0.75. EXPECTED.md attributes 0.2801 / 0.2254 to 11-point and 0.3025 / 0.2684 to
    // every-point; an independent Python re-implementation of the reference's algorithm gives the
    // same four numbers the other way round (11-point 0.30245, 0.26840; every-point 0.28013,
    // 0.22540), as this crate does, so the labels in EXPECTED.md are taken to be swapped.
    let cont_eleven = [0.3025, 0.2684];
    let cont_all = [0.2801, 0.2254];
    for (i, &iou) in ious.iter().enumerate() {
        let e = case1_ap(iou, Interpolation::ElevenPoint, false);
        let a = case1_ap(iou, Interpolation::AllPoint, false);
        if i < 2 {
            assert!((e - cont_eleven[i]).abs() < 1e-4, "11-point @{iou}: {e}");
            assert!((a - cont_all[i]).abs() < 1e-4, "all-point @{iou}: {a}");
        } else {
            assert!((e - eleven[i]).abs() < 1e-6, "11-point @{iou}: {e}");
            assert!((a - all[i]).abs() < 1e-6, "all-point @{iou}: {a}");
        }
    }
}

const COCO_EXPECTED: [f64; 12] = [
    0.503647, 0.696973, 0.571667, 0.593252, 0.557991, 0.489363, 0.386813, 0.593680, 0.595353,
    0.654764, 0.603130, 0.553744,
];

/// Equal when printed to 6 decimals, as EXPECTED.md gives them.
fn assert_six_decimals(got: [f64; 12], what: &str) {
    for (i, (g, e)) in got.iter().zip(COCO_EXPECTED).enumerate() {
        assert!(
            (g - e).abs() <= 5e-7 + 1e-12,
            "{what}: stat {i} = {g}, expected {e}"
        );
    }
}

fn coco_reference_gt() -> CocoDataset {
    let gt = reference("test_coco_eval/gts/sampled_gts_bbox_area.json");
    CocoDataset::load(&gt, reference("test_coco_eval/images")).unwrap()
}

#[test]
fn test_coco_eval() {
    let coco = coco_reference_gt();
    assert_eq!(
        (
            coco.images.len(),
            coco.annotations.len(),
            coco.categories.len()
        ),
        (100, 830, 80)
    );
    let dets = eval::load_coco_results(reference("test_coco_eval/dets/sampled_bbox_results.json"))
        .unwrap();
    assert_eq!(dets.len(), 734);
    let report = eval::coco_eval_results(&coco, &dets);
    assert_six_decimals(report.stats.to_array(), "sampled_bbox_results.json");
    assert_eq!(report.num_dets, 734);
    assert_eq!(report.classes.len(), 80);

    // The same detections as a plain results list.
    let list = eval::load_coco_results(reference("test_coco_eval/cocoapi_results.json")).unwrap();
    assert_eq!(list, dets);
    assert_six_decimals(
        eval::coco_eval_results(&coco, &list).stats.to_array(),
        "cocoapi_results.json",
    );

    let table = report.table();
    assert!(table.contains(
        "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.504"
    ));
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["stats"]["AP50"], serde_json::json!(report.stats.ap50));
}

/// The detector-facing path (file stems, label names) on the same reference. `Detection` holds
/// `f32` boxes and scores, and rounding this reference's boxes to `f32` moves some IoUs across a
/// threshold (APs by about 1e-3), so the path is checked against the exact evaluation of the
/// same `f32`-rounded detections, and only loosely against the reference numbers.
#[test]
fn test_coco_eval_from_image_detections() {
    let coco = coco_reference_gt();
    let dets = eval::load_coco_results(reference("test_coco_eval/cocoapi_results.json")).unwrap();
    let per_image = to_image_detections(&coco, &dets);
    let report = eval::coco_eval(&coco, &per_image);
    assert_eq!(report.num_dets, 734);

    let rounded: Vec<CocoDetection> = dets
        .iter()
        .map(|d| {
            let [x, y, w, h] = d.bbox;
            let b = [x as f32, y as f32, (x + w) as f32, (y + h) as f32].map(f64::from);
            CocoDetection {
                bbox: [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                score: f64::from(d.score as f32),
                ..*d
            }
        })
        .collect();
    assert_eq!(report.stats, eval::coco_eval_results(&coco, &rounded).stats);
    for (g, e) in report.stats.to_array().iter().zip(COCO_EXPECTED) {
        assert!((g - e).abs() < 2e-3, "{g} vs {e}");
    }
}

fn to_image_detections(coco: &CocoDataset, dets: &[CocoDetection]) -> Vec<ImageDetections> {
    coco.images
        .iter()
        .map(|im| ImageDetections {
            image: im.stem(),
            width: im.width,
            height: im.height,
            detections: dets
                .iter()
                .filter(|d| d.image_id == im.id)
                .map(|d| {
                    let [x, y, w, h] = d.bbox;
                    let cat = coco.categories.iter().position(|c| c.id == d.category_id);
                    Detection {
                        class_id: cat.unwrap_or(0),
                        label: cat.map_or(String::new(), |c| coco.categories[c].name.clone()),
                        score: d.score as f32,
                        bbox: [x as f32, y as f32, (x + w) as f32, (y + h) as f32],
                    }
                })
                .collect(),
        })
        .collect()
}

#[test]
fn voc_xml_of_a_real_file() {
    let ds = VocDataset::load(data("voc2007-sample"), "trainval").unwrap();
    assert_eq!(ds.images.len(), 64);
    assert!(ds.warnings.is_empty(), "{:?}", ds.warnings);
    let im = ds.images.iter().find(|i| i.id == "2007_000129").unwrap();
    assert_eq!((im.width, im.height), (334, 500));
    assert!(im.path.ends_with("JPEGImages/2007_000129.jpg"));
    assert!(im.path.is_file());
    let summary: Vec<(&str, bool, [f64; 4])> = im
        .objects
        .iter()
        .map(|o| (o.class.as_str(), o.difficult, o.bbox))
        .collect();
    assert_eq!(
        summary,
        [
            ("bicycle", false, [70.0, 202.0, 255.0, 500.0]),
            ("bicycle", true, [251.0, 242.0, 334.0, 500.0]),
            ("bicycle", true, [1.0, 144.0, 67.0, 436.0]),
            ("person", true, [1.0, 1.0, 66.0, 363.0]),
            ("person", false, [74.0, 1.0, 272.0, 462.0]),
            ("person", false, [252.0, 19.0, 334.0, 487.0]),
        ]
    );
    assert!(
        ds.classes()
            .iter()
            .all(|c| eval::VOC_CLASSES.contains(&c.as_str()))
    );
}

fn as_detections(
    images: &[eval::GtImage],
    score: impl Fn(&eval::GtObject) -> f32,
) -> Vec<ImageDetections> {
    images
        .iter()
        .map(|im| ImageDetections {
            image: im.id.clone(),
            width: im.width,
            height: im.height,
            detections: im
                .objects
                .iter()
                .map(|o| Detection {
                    class_id: 0,
                    label: o.class.clone(),
                    score: score(o),
                    bbox: o.bbox.map(|v| v as f32),
                })
                .collect(),
        })
        .collect()
}

#[test]
fn difficult_objects_are_ignored_on_real_annotations() {
    let ds = VocDataset::load(data("voc2007-sample"), "trainval").unwrap();
    let difficult = ds
        .images
        .iter()
        .flat_map(|i| &i.objects)
        .filter(|o| o.difficult)
        .count();
    assert!(difficult > 0);
    // Detections on difficult boxes rank first; they must neither count nor hurt.
    let dets = as_detections(&ds.images, |o| if o.difficult { 0.9 } else { 0.5 });
    for opts in [
        VocOptions::voc2007(),
        VocOptions::voc2012(),
        VocOptions::default(),
    ] {
        let report = eval::voc_map(&ds.images, &dets, &opts);
        assert_eq!(report.map, Some(1.0), "{}", report.table());
        let counted: usize = report
            .classes
            .iter()
            .map(|c| c.num_gt + c.num_difficult)
            .sum();
        assert_eq!(
            counted,
            ds.images.iter().map(|i| i.objects.len()).sum::<usize>()
        );
        assert_eq!(
            report
                .classes
                .iter()
                .map(|c| c.num_difficult)
                .sum::<usize>(),
            difficult
        );
    }
    // Treated as ordinary objects instead, every detection is still a true positive, but the
    // positives now include them: a control that the flag is what changes the count.
    let mut plain = ds.images.clone();
    plain
        .iter_mut()
        .flat_map(|i| &mut i.objects)
        .for_each(|o| o.difficult = false);
    let report = eval::voc_map(&plain, &dets, &VocOptions::default());
    assert_eq!(
        report
            .classes
            .iter()
            .map(|c| c.num_difficult)
            .sum::<usize>(),
        0
    );
    // Without the difficult objects' detections, recall drops below 1 only when they count.
    let only_easy: Vec<ImageDetections> = dets
        .iter()
        .map(|im| ImageDetections {
            detections: im
                .detections
                .iter()
                .filter(|d| d.score < 0.6)
                .cloned()
                .collect(),
            ..im.clone()
        })
        .collect();
    assert_eq!(
        eval::voc_map(&ds.images, &only_easy, &VocOptions::default()).map,
        Some(1.0)
    );
    assert!(
        eval::voc_map(&plain, &only_easy, &VocOptions::default())
            .map
            .unwrap()
            < 1.0
    );
}

/// A writer collecting formatted log lines, to check that warnings are emitted.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn bccd_degenerate_boxes_warn_not_panic() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let ds = tracing::subscriber::with_default(subscriber, || {
        VocDataset::load(data("bccd"), "trainval").unwrap()
    });
    assert_eq!(ds.images.len(), 292);
    assert_eq!(ds.warnings.len(), 2, "{:?}", ds.warnings);
    assert!(
        ds.warnings[0].contains("BloodImage_00338") && ds.warnings[1].contains("BloodImage_00343")
    );
    let log = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert_eq!(log.matches("WARN").count(), 2, "{log}");
    assert!(log.contains("degenerate box"));
    assert_eq!(ds.classes(), ["Platelets", "RBC", "WBC"]);
    for o in ds.images.iter().flat_map(|i| &i.objects) {
        assert!(o.bbox[2] > o.bbox[0] && o.bbox[3] > o.bbox[1]);
        assert!(o.bbox[0] >= 0.0 && o.bbox[2] <= 640.0 && o.bbox[3] <= 480.0);
    }
    let test = VocDataset::load(data("bccd"), "test").unwrap();
    assert_eq!((test.images.len(), test.warnings.len()), (72, 0));
}

fn coco128() -> CocoDataset {
    let root = data("coco128");
    CocoDataset::load(root.join("annotations/instances.json"), root.join("images")).unwrap()
}

#[test]
fn class_mapping_covers_voc_on_coco() {
    for (voc, coco) in [
        ("aeroplane", "airplane"),
        ("motorbike", "motorcycle"),
        ("sofa", "couch"),
        ("tvmonitor", "tv"),
        ("diningtable", "dining table"),
        ("pottedplant", "potted plant"),
        ("person", "person"),
        ("cow", "cow"),
    ] {
        assert_eq!(eval::voc_to_coco_name(voc), coco);
        assert_eq!(eval::coco_to_voc_name(coco), voc);
    }
    let coco = coco128();
    assert_eq!((coco.images.len(), coco.annotations.len()), (128, 939));
    let voc = coco.restrict_to_classes(&eval::VOC_CLASSES);
    assert_eq!(
        voc.categories.len(),
        20,
        "every VOC class has a COCO category"
    );
    assert!(voc.categories.iter().any(|c| c.name == "dining table"));
    assert!(voc.annotations.len() < coco.annotations.len());
    assert!(
        voc.annotations
            .iter()
            .all(|a| voc.categories.iter().any(|c| c.id == a.category_id))
    );
}

#[test]
fn voc_map_on_coco128() {
    let coco = coco128();
    let voc = coco.restrict_to_classes(&eval::VOC_CLASSES);
    let gt = voc.to_gt_images();
    // A perfect VOC-label detector: ground truth relabelled to VOC names, crowd regions included
    // at the top of the ranking (they count as difficult, so they must not hurt).
    let mut dets = as_detections(&gt, |o| if o.difficult { 0.99 } else { 0.5 });
    for d in dets.iter_mut().flat_map(|i| &mut i.detections) {
        d.label = eval::coco_to_voc_name(&d.label).to_string();
    }
    let report = eval::voc_map_on_coco(&coco, &dets, &eval::VOC_CLASSES, &VocOptions::default());
    assert_eq!(report.num_images, 128);
    assert_eq!(report.map, Some(1.0), "{}", report.table());
    // Classes present in the set are the ones with an AP; absent ones are not in the table.
    let present: std::collections::BTreeSet<&str> = gt
        .iter()
        .flat_map(|i| &i.objects)
        .filter(|o| !o.difficult)
        .map(|o| o.class.as_str())
        .collect();
    let with_ap: Vec<&str> = report
        .classes
        .iter()
        .filter(|c| c.ap.is_some())
        .map(|c| c.class.as_str())
        .collect();
    assert_eq!(with_ap, present.into_iter().collect::<Vec<_>>());
    assert!(with_ap.len() < 20);

    // A detection of a class absent from coco128 is listed without AP and leaves the mean alone.
    let absent = eval::VOC_CLASSES
        .iter()
        .find(|c| !with_ap.contains(&eval::voc_to_coco_name(c)))
        .unwrap();
    dets[0].detections.push(Detection {
        class_id: 0,
        label: absent.to_string(),
        score: 0.3,
        bbox: [1.0, 1.0, 20.0, 20.0],
    });
    let report = eval::voc_map_on_coco(&coco, &dets, &eval::VOC_CLASSES, &VocOptions::default());
    assert_eq!(report.map, Some(1.0));
    let row = report
        .classes
        .iter()
        .find(|c| c.class == eval::voc_to_coco_name(absent))
        .unwrap();
    assert_eq!((row.ap, row.num_dets), (None, 1));
    assert!(report.table().contains("mAP over"));
}

#[test]
fn coco_eval_of_ground_truth_is_perfect() {
    let coco = coco128();
    let gt = coco.to_gt_images();
    let dets = as_detections(&gt, |_| 0.9);
    let non_crowd: Vec<ImageDetections> = dets
        .into_iter()
        .zip(&gt)
        .map(|(mut im, g)| {
            let keep: Vec<bool> = g.objects.iter().map(|o| !o.difficult).collect();
            let mut k = keep.iter();
            im.detections.retain(|_| *k.next().unwrap());
            im
        })
        .collect();
    let report = eval::coco_eval(&coco, &non_crowd);
    let s = report.stats;
    for v in [
        s.ap,
        s.ap50,
        s.ap75,
        s.ap_small,
        s.ap_medium,
        s.ap_large,
        s.ar100,
    ] {
        assert!((v - 1.0).abs() < 1e-12, "{}", report.stats.summary());
    }
    assert!(s.ar1 < 1.0);
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lbw-eval-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn assert_data_error_naming<T: std::fmt::Debug>(result: lbw::Result<T>, path: &Path) {
    match result {
        Err(Error::Data(msg)) => assert!(msg.contains(&path.display().to_string()), "{msg}"),
        other => panic!(
            "expected Error::Data naming {}, got {other:?}",
            path.display()
        ),
    }
}

#[test]
fn malformed_files_are_data_errors_naming_the_file() {
    let root = scratch("voc");
    std::fs::create_dir_all(root.join("ImageSets/Main")).unwrap();
    std::fs::create_dir_all(root.join("Annotations")).unwrap();
    std::fs::write(root.join("ImageSets/Main/val.txt"), "broken\n").unwrap();
    let xml = root.join("Annotations/broken.xml");
    std::fs::write(&xml, "<annotation><object><name>cat</name></annotation>").unwrap();
    assert_data_error_naming(VocDataset::load(&root, "val"), &xml);

    let dir = scratch("coco");
    let json = dir.join("instances.json");
    std::fs::write(&json, r#"{"images": [{"id": 1}], "categories": []}"#).unwrap();
    assert_data_error_naming(CocoDataset::load(&json, &dir), &json);
    let results = dir.join("results.json");
    std::fs::write(
        &results,
        r#"[{"image_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}]"#,
    )
    .unwrap();
    assert_data_error_naming(eval::load_coco_results(&results), &results);
    std::fs::write(&results, "{\"info\": {}}").unwrap();
    assert_data_error_naming(eval::load_coco_results(&results), &results);

    let txt = scratch("txt");
    let file = txt.join("a.txt");
    std::fs::write(&file, "object 0.5 1 2 three 4\n").unwrap();
    assert_data_error_naming(eval::load_text_detections(&txt), &file);
    assert_data_error_naming(eval::load_text_gt(&txt), &file);
    for d in [root, dir, txt] {
        let _ = std::fs::remove_dir_all(d);
    }
}
