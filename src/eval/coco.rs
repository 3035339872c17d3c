//! COCO datasets (instances JSON), detection results, and the glue that lets a VOC-class detector be
//! scored on COCO images.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use super::ap::{VocOptions, voc_map};
use super::classes::voc_to_coco_name;
use super::report::VocReport;
use super::voc::{GtImage, GtObject, sanitize_box};
use crate::detect::ImageDetections;
use crate::error::{Error, Result, read_file};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CocoImage {
    pub id: u64,
    pub file_name: String,
    /// `images_dir` joined with `file_name`.
    pub path: PathBuf,
    pub width: u32,
    pub height: u32,
}

impl CocoImage {
    /// The file name without extension: the id [`ImageDetections::image`] uses.
    pub fn stem(&self) -> String {
        Path::new(&self.file_name)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoCategory {
    pub id: u64,
    pub name: String,
}

/// A ground-truth instance.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CocoAnnotation {
    pub id: u64,
    pub image_id: u64,
    pub category_id: u64,
    /// `[x, y, w, h]` in pixels.
    pub bbox: [f64; 4],
    /// The annotation's `area` field (the segmentation's area in real COCO, not the box's): it is
    /// what decides the small/medium/large range. `w * h` when the file has none.
    pub area: f64,
    pub iscrowd: bool,
}

/// A COCO ground-truth set. Annotations whose image or category is not declared are dropped
/// (with a warning) when loading.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CocoDataset {
    pub images: Vec<CocoImage>,
    pub categories: Vec<CocoCategory>,
    pub annotations: Vec<CocoAnnotation>,
}

/// One detection in COCO results form.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CocoDetection {
    pub image_id: u64,
    pub category_id: u64,
    /// `[x, y, w, h]` in pixels.
    pub bbox: [f64; 4],
    pub score: f64,
}

#[derive(Deserialize)]
struct RawImage {
    id: u64,
    file_name: String,
    width: u32,
    height: u32,
}

#[derive(Deserialize)]
struct RawAnnotation {
    #[serde(default)]
    id: u64,
    image_id: u64,
    category_id: u64,
    bbox: [f64; 4],
    area: Option<f64>,
    #[serde(default, deserialize_with = "flag")]
    iscrowd: bool,
}

#[derive(Deserialize)]
struct RawCoco {
    images: Vec<RawImage>,
    #[serde(default)]
    annotations: Vec<RawAnnotation>,
    categories: Vec<CocoCategory>,
}

/// `iscrowd` is 0/1 in COCO files but `true`/`false` in some exporters.
fn flag<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Flag {
        Bool(bool),
        Int(i64),
    }
    Ok(match Flag::deserialize(d)? {
        Flag::Bool(b) => b,
        Flag::Int(i) => i != 0,
    })
}

fn data_err(origin: &Path, what: impl std::fmt::Display) -> Error {
    Error::Data(format!("{}: {what}", origin.display()))
}

impl CocoDataset {
    /// Loads an instances JSON; image paths are `images_dir/file_name`. Images need not exist.
    pub fn load(json: impl AsRef<Path>, images_dir: impl AsRef<Path>) -> Result<Self> {
        let json = json.as_ref();
        Self::from_json(&read_file(json)?, json, images_dir.as_ref())
    }

    /// Parses instances JSON held in memory; `origin` names it in errors.
    pub fn from_json(bytes: &[u8], origin: &Path, images_dir: &Path) -> Result<Self> {
        let raw: RawCoco = serde_json::from_slice(bytes).map_err(|e| data_err(origin, e))?;
        let image_ids: HashSet<u64> = raw.images.iter().map(|i| i.id).collect();
        let category_ids: HashSet<u64> = raw.categories.iter().map(|c| c.id).collect();
        let total = raw.annotations.len();
        let annotations: Vec<CocoAnnotation> = raw
            .annotations
            .into_iter()
            .filter(|a| image_ids.contains(&a.image_id) && category_ids.contains(&a.category_id))
            .map(|a| CocoAnnotation {
                id: a.id,
                image_id: a.image_id,
                category_id: a.category_id,
                bbox: a.bbox,
                area: a.area.unwrap_or(a.bbox[2] * a.bbox[3]),
                iscrowd: a.iscrowd,
            })
            .collect();
        if annotations.len() < total {
            tracing::warn!(
                "{}: {} annotations name undeclared images or categories; dropped",
                origin.display(),
                total - annotations.len()
            );
        }
        Ok(CocoDataset {
            images: raw
                .images
                .into_iter()
                .map(|i| CocoImage {
                    id: i.id,
                    path: images_dir.join(&i.file_name),
                    file_name: i.file_name,
                    width: i.width,
                    height: i.height,
                })
                .collect(),
            categories: raw.categories,
            annotations,
        })
    }

    /// Keeps only the categories named in `names` (all images are kept). Names go through
    /// [`voc_to_coco_name`] first, so a VOC detector's labels can be passed as they are; names that
    /// match no category are reported with a warning.
    pub fn restrict_to_classes<S: AsRef<str>>(&self, names: &[S]) -> CocoDataset {
        let wanted: HashSet<&str> = names.iter().map(|n| voc_to_coco_name(n.as_ref())).collect();
        let categories: Vec<CocoCategory> = self
            .categories
            .iter()
            .filter(|c| wanted.contains(c.name.as_str()))
            .cloned()
            .collect();
        let missing: Vec<&&str> = wanted
            .iter()
            .filter(|n| !categories.iter().any(|c| c.name == **n))
            .collect();
        if !missing.is_empty() {
            tracing::warn!("classes not among the dataset's categories: {missing:?}");
        }
        let kept: HashSet<u64> = categories.iter().map(|c| c.id).collect();
        CocoDataset {
            images: self.images.clone(),
            categories,
            annotations: self
                .annotations
                .iter()
                .filter(|a| kept.contains(&a.category_id))
                .cloned()
                .collect(),
        }
    }

    /// Ground truth for VOC-style AP: class = category name, box `[x, y, x + w, y + h]`, crowd
    /// regions as `difficult` (so detections on them are neither rewarded nor penalised). Boxes
    /// without area are skipped with a warning.
    pub fn to_gt_images(&self) -> Vec<GtImage> {
        let names: HashMap<u64, &str> = self
            .categories
            .iter()
            .map(|c| (c.id, c.name.as_str()))
            .collect();
        let mut per_image: HashMap<u64, Vec<GtObject>> = HashMap::new();
        let mut warnings = Vec::new();
        for a in &self.annotations {
            let Some(name) = names.get(&a.category_id) else {
                continue;
            };
            let [x, y, w, h] = a.bbox;
            let what = format!("annotation {} of image {}", a.id, a.image_id);
            // COCO boxes are already inside the image; only degenerate ones are dropped.
            if let Some(bbox) = sanitize_box([x, y, x + w, y + h], 0, 0, &what, &mut warnings) {
                per_image.entry(a.image_id).or_default().push(GtObject {
                    class: (*name).to_string(),
                    bbox,
                    difficult: a.iscrowd,
                });
            }
        }
        self.images
            .iter()
            .map(|im| GtImage {
                id: im.stem(),
                path: im.path.clone(),
                width: im.width,
                height: im.height,
                objects: per_image.remove(&im.id).unwrap_or_default(),
            })
            .collect()
    }

    /// Converts detections to COCO results: the image by file stem, the category by label (through
    /// [`voc_to_coco_name`]), the box to `[x, y, w, h]`. Detections whose image or label the
    /// dataset does not have are dropped with a warning.
    pub fn results_from_detections(&self, dets: &[ImageDetections]) -> Vec<CocoDetection> {
        let images: HashMap<String, u64> = self.images.iter().map(|i| (i.stem(), i.id)).collect();
        let categories: HashMap<&str, u64> = self
            .categories
            .iter()
            .map(|c| (c.name.as_str(), c.id))
            .collect();
        let (mut no_image, mut no_category) = (0usize, HashSet::new());
        let mut out = Vec::new();
        for im in dets {
            let Some(&image_id) = images.get(&im.image) else {
                no_image += 1;
                continue;
            };
            for d in &im.detections {
                let Some(&category_id) = categories.get(voc_to_coco_name(&d.label)) else {
                    no_category.insert(d.label.as_str());
                    continue;
                };
                let [x1, y1, x2, y2] = d.bbox.map(f64::from);
                out.push(CocoDetection {
                    image_id,
                    category_id,
                    bbox: [x1, y1, x2 - x1, y2 - y1],
                    score: f64::from(d.score),
                });
            }
        }
        if no_image > 0 {
            tracing::warn!("{no_image} detection entries name images not in the dataset; ignored");
        }
        if !no_category.is_empty() {
            tracing::warn!("detection labels without a dataset category, ignored: {no_category:?}");
        }
        out
    }
}

/// Loads COCO detection results: either the standard results list
/// (`[{image_id, category_id, bbox, score}, ...]`) or a dict whose `annotations` hold them.
pub fn load_coco_results(path: impl AsRef<Path>) -> Result<Vec<CocoDetection>> {
    let path = path.as_ref();
    let value: serde_json::Value =
        serde_json::from_slice(&read_file(path)?).map_err(|e| data_err(path, e))?;
    let list = match value {
        serde_json::Value::Array(_) => value,
        serde_json::Value::Object(mut map) => map.remove("annotations").ok_or_else(|| {
            data_err(
                path,
                "a results dict needs an `annotations` list of detections",
            )
        })?,
        _ => return Err(data_err(path, "expected a list of detections")),
    };
    serde_json::from_value(list).map_err(|e| data_err(path, e))
}

/// VOC-style AP on a COCO dataset for a detector with the given labels (e.g. the 20 VOC classes):
/// the dataset is restricted to the categories the labels map to, crowd regions count as
/// `difficult`, and detection labels are mapped to COCO names. Classes with no ground truth in the
/// dataset get no AP and stay out of the mean. The product's figure uses
/// `VocOptions::default()` (IoU 0.5, all-point, continuous coordinates).
pub fn voc_map_on_coco<S: AsRef<str>>(
    coco: &CocoDataset,
    dets: &[ImageDetections],
    labels: &[S],
    opts: &VocOptions,
) -> VocReport {
    let (gt, mapped) = voc_inputs_on_coco(coco, dets, labels);
    voc_map(&gt, &mapped, opts)
}

/// What [`voc_map_on_coco`] scores: the ground truth restricted to the categories `labels` map to,
/// and the detections of those categories under their COCO names.
pub fn voc_inputs_on_coco<S: AsRef<str>>(
    coco: &CocoDataset,
    dets: &[ImageDetections],
    labels: &[S],
) -> (Vec<GtImage>, Vec<ImageDetections>) {
    let restricted = coco.restrict_to_classes(labels);
    let kept: HashSet<&str> = restricted
        .categories
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    let mapped: Vec<ImageDetections> = dets
        .iter()
        .map(|im| ImageDetections {
            detections: im
                .detections
                .iter()
                .filter_map(|d| {
                    let name = voc_to_coco_name(&d.label);
                    kept.contains(name).then(|| {
                        let mut d = d.clone();
                        d.label = name.to_string();
                        d
                    })
                })
                .collect(),
            ..im.clone()
        })
        .collect();
    (restricted.to_gt_images(), mapped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_json_is_a_data_error_naming_the_file() {
        for bad in [
            &b"{\"images\": ["[..],
            br#"{"images": [], "categories": [], "annotations": [{"image_id": 1}]}"#,
        ] {
            match CocoDataset::from_json(bad, Path::new("/d/instances.json"), Path::new("/d")) {
                Err(Error::Data(msg)) => assert!(msg.contains("/d/instances.json"), "{msg}"),
                other => panic!("expected a data error, got {other:?}"),
            }
        }
    }

    #[test]
    fn area_defaults_to_the_box_and_crowd_accepts_bools() {
        let json = br#"{"images": [{"id": 3, "file_name": "a.jpg", "width": 10, "height": 10}],
            "categories": [{"id": 1, "name": "airplane"}, {"id": 2, "name": "cat"}],
            "annotations": [{"id": 7, "image_id": 3, "category_id": 1, "bbox": [1, 2, 3, 4], "iscrowd": true},
                            {"id": 8, "image_id": 3, "category_id": 2, "bbox": [1, 2, 3, 4], "area": 5, "iscrowd": 0},
                            {"id": 9, "image_id": 4, "category_id": 2, "bbox": [1, 2, 3, 4]}]}"#;
        let ds = CocoDataset::from_json(json, Path::new("x.json"), Path::new("imgs")).unwrap();
        assert_eq!(ds.annotations.len(), 2);
        assert_eq!(ds.annotations[0].area, 12.0);
        assert!(ds.annotations[0].iscrowd);
        assert_eq!(ds.annotations[1].area, 5.0);
        assert_eq!(ds.images[0].path, Path::new("imgs/a.jpg"));
        let voc = ds.restrict_to_classes(&["aeroplane"]);
        assert_eq!(voc.categories.len(), 1);
        let gt = voc.to_gt_images();
        assert_eq!(gt[0].id, "a");
        assert_eq!(gt[0].objects.len(), 1);
        assert_eq!(gt[0].objects[0].class, "airplane");
        assert!(gt[0].objects[0].difficult);
        assert_eq!(gt[0].objects[0].bbox, [1.0, 2.0, 4.0, 6.0]);
    }
}
