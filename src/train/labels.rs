//! Ground truth for `lbw finetune --labels`: VOC folders (`Annotations/*.xml` beside
//! `JPEGImages/`), matched to the training photos so that a labelled photo also gets the YOLOv3
//! detection loss ([`crate::train::yolo_loss`]).
//!
//! The XML is read with the conventions of the VOC evaluation loader (`crate::eval`): direct
//! children only (VOC2012 person layouts nest `<part><bndbox>`), 1-based pixel coordinates, boxes
//! clipped to the stated image size. Unlike evaluation, a bad file must not end an hour-long run:
//! a malformed annotation is skipped with a warning naming it, and its photo trains by distillation
//! only.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::train::data::{IMAGE_EXTENSIONS, ImageSet, SampleGeometry};

/// One object of a label file, in photo pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LabelBox {
    /// Index into the model's labels (meaningless when `ignore`).
    pub class: usize,
    /// `[x1, y1, x2, y2]` pixel edges, 0-based and continuous (VOC's `xmin = 1` is edge 0).
    pub bbox: [f64; 4],
    /// VOC `difficult`, or a class the model does not have: neither a positive nor a negative.
    /// Unknown names stay as ignore regions rather than background because a misspelt or
    /// differently named class (`airplane`, `tv`) is still an object there, and teaching the
    /// network that it is background would work against the teacher.
    pub ignore: bool,
}

/// A photo's label file.
#[derive(Debug, Clone, PartialEq)]
pub struct PhotoLabels {
    /// The photo size the boxes were written for (`None` where the file does not say).
    pub size: Option<[u32; 2]>,
    pub boxes: Vec<LabelBox>,
}

/// A label box in training-input pixels, after the sample's augmentation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TargetBox {
    pub class: usize,
    pub bbox: [f64; 4],
    pub ignore: bool,
}

impl PhotoLabels {
    /// The boxes of one augmented sample of this photo (decoded at `photo` = `[width, height]`)
    /// in input pixels. A box mostly cut away by the crop, or tiny, is no positive
    /// ([`SampleGeometry::target_box`]) but stays as an ignore region; one wholly outside is gone.
    pub fn targets(&self, photo: [u32; 2], geometry: &SampleGeometry) -> Vec<TargetBox> {
        // A label file written for another size of the same photo (a resized copy) still fits.
        let (fx, fy) = match self.size {
            Some([w, h]) if w > 0 && h > 0 && [w, h] != photo => (
                f64::from(photo[0]) / f64::from(w),
                f64::from(photo[1]) / f64::from(h),
            ),
            _ => (1.0, 1.0),
        };
        self.boxes
            .iter()
            .filter_map(|b| {
                let p = [
                    b.bbox[0] * fx,
                    b.bbox[1] * fy,
                    b.bbox[2] * fx,
                    b.bbox[3] * fy,
                ];
                match geometry.target_box(p) {
                    Some(bbox) => Some(TargetBox {
                        class: b.class,
                        bbox,
                        ignore: b.ignore,
                    }),
                    // Too cut or too small to be a positive, but still part of an object: an
                    // ignore region, so that the net is not taught that a fragment is background
                    // (the teacher may well fire on it).
                    None => geometry.clip_box(p).map(|bbox| TargetBox {
                        class: b.class,
                        bbox,
                        ignore: true,
                    }),
                }
            })
            .collect()
    }
}

/// The label files of the `--labels` folders, by the photo they describe.
#[derive(Debug, Clone, Default)]
pub struct LabelSet {
    pub photos: BTreeMap<PathBuf, Arc<PhotoLabels>>,
    /// What was skipped, one line each (also logged with `tracing::warn!`).
    pub warnings: Vec<String>,
}

impl LabelSet {
    /// Reads `DIR/Annotations/*.xml` of each folder; `classes` are the model's labels. A folder
    /// without annotations is an [`Error::Input`] naming it.
    pub fn scan(dirs: &[PathBuf], classes: &[String]) -> Result<LabelSet> {
        let mut set = LabelSet::default();
        let mut unknown: BTreeMap<String, usize> = BTreeMap::new();
        let mut no_photo = 0usize;
        for dir in dirs {
            let ann = dir.join("Annotations");
            let mut xmls: Vec<PathBuf> = match std::fs::read_dir(&ann) {
                Ok(entries) => entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("xml")))
                    .collect(),
                Err(_) => Vec::new(),
            };
            if xmls.is_empty() {
                return Err(Error::Input(format!(
                    "--labels {}: no Annotations/*.xml there (a VOC folder holds Annotations/ \
                     beside JPEGImages/)",
                    dir.display()
                )));
            }
            xmls.sort();
            for xml in xmls {
                let parsed = std::fs::read_to_string(&xml)
                    .map_err(|e| e.to_string())
                    .and_then(|text| parse_voc_xml(&text, classes, &mut unknown));
                let (filename, labels) = match parsed {
                    Ok(p) => p,
                    Err(e) => {
                        set.warn(format!(
                            "label file {} skipped (its photo trains by distillation only): {e}",
                            xml.display()
                        ));
                        continue;
                    }
                };
                match find_photo(dir, &xml, filename.as_deref()) {
                    Some(photo) => {
                        set.photos.insert(photo, Arc::new(labels));
                    }
                    None => no_photo += 1,
                }
            }
        }
        if !unknown.is_empty() {
            let n: usize = unknown.values().sum();
            let names: Vec<String> = unknown.iter().map(|(k, v)| format!("{k} ({v})")).collect();
            set.warn(format!(
                "{n} labelled boxes of classes the model does not have are ignored (neither \
                 object nor background): {}",
                names.join(", ")
            ));
        }
        if no_photo > 0 {
            set.warn(format!(
                "{no_photo} label files have no photo in JPEGImages/ and are not used"
            ));
        }
        Ok(set)
    }

    fn warn(&mut self, msg: String) {
        tracing::warn!("{msg}");
        self.warnings.push(msg);
    }

    pub fn is_empty(&self) -> bool {
        self.photos.is_empty()
    }
}

/// The training photos and, aligned with them, each photo's labels (empty without labels): the
/// `--images` folders plus every labelled photo (so `--labels DIR` alone trains on DIR), each
/// photo once however its path was spelt.
pub fn labelled_images(
    image_dirs: &[PathBuf],
    labels: &LabelSet,
) -> Result<(ImageSet, Vec<Option<Arc<PhotoLabels>>>)> {
    if labels.is_empty() {
        return Ok((ImageSet::scan(image_dirs)?, Vec::new()));
    }
    let mut images = if image_dirs.is_empty() {
        ImageSet { paths: Vec::new() }
    } else {
        ImageSet::scan(image_dirs)?
    };
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let by_photo: HashMap<PathBuf, &Arc<PhotoLabels>> = labels
        .photos
        .iter()
        .map(|(p, l)| (canonical(p), l))
        .collect();
    let mut seen: HashSet<PathBuf> = images.paths.iter().map(|p| canonical(p)).collect();
    for p in labels.photos.keys() {
        if seen.insert(canonical(p)) {
            images.paths.push(p.clone());
        }
    }
    images.paths.sort();
    let aligned = images
        .paths
        .iter()
        .map(|p| by_photo.get(&canonical(p)).map(|l| Arc::clone(l)))
        .collect();
    Ok((images, aligned))
}

/// The photo of `Annotations/X.xml`: `JPEGImages/<filename>` as the file names it, else
/// `JPEGImages/X.<ext>` for the usual image extensions.
fn find_photo(dir: &Path, xml: &Path, filename: Option<&str>) -> Option<PathBuf> {
    let photos = dir.join("JPEGImages");
    if let Some(f) = filename.filter(|f| !f.contains(['/', '\\'])) {
        let p = photos.join(f);
        if p.is_file() {
            return Some(p);
        }
    }
    let stem = xml.file_stem()?.to_str()?;
    IMAGE_EXTENSIONS
        .iter()
        .flat_map(|e| [e.to_string(), e.to_ascii_uppercase()])
        .map(|e| photos.join(format!("{stem}.{e}")))
        .find(|p| p.is_file())
}

/// The class index of a label name: the model's own spelling, or the COCO spelling of a VOC class
/// (`airplane` for `aeroplane`), which converted datasets use.
fn class_index(name: &str, classes: &[String]) -> Option<usize> {
    classes.iter().position(|c| c == name).or_else(|| {
        let voc = crate::eval::coco_to_voc_name(name);
        classes.iter().position(|c| c == voc)
    })
}

/// One VOC annotation: the `<filename>` it names and its boxes. Unknown class names are counted
/// into `unknown` and kept as ignore regions; a box with no area is dropped.
fn parse_voc_xml(
    text: &str,
    classes: &[String],
    unknown: &mut BTreeMap<String, usize>,
) -> std::result::Result<(Option<String>, PhotoLabels), String> {
    let xml = crate::eval::read_voc_xml(text)?;
    let size = match (xml.width, xml.height) {
        (Some(w), Some(h)) if w >= 1.0 && h >= 1.0 => Some([w as u32, h as u32]),
        _ => None,
    };
    let mut boxes = Vec::new();
    let mut counted: Vec<String> = Vec::new();
    for obj in xml.objects {
        let raw = obj.bbox;
        // VOC pixel indices are 1-based and inclusive: pixel `xmin` covers edges `xmin - 1 ..
        // xmin`, so the box spans edges `xmin - 1 .. xmax`.
        let mut b = [raw[0] - 1.0, raw[1] - 1.0, raw[2], raw[3]];
        if let Some(size) = size {
            b = crate::eval::clip_box(b, size);
        }
        if b[2] <= b[0] || b[3] <= b[1] {
            continue;
        }
        let class = class_index(&obj.name, classes);
        if class.is_none() {
            counted.push(obj.name);
        }
        boxes.push(LabelBox {
            class: class.unwrap_or(0),
            bbox: b,
            ignore: obj.difficult || class.is_none(),
        });
    }
    // Counted only once the whole file parsed, so a skipped file adds nothing.
    for name in counted {
        *unknown.entry(name).or_default() += 1;
    }
    Ok((xml.filename, PhotoLabels { size, boxes }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes() -> Vec<String> {
        ["aeroplane", "person"].map(String::from).to_vec()
    }

    #[test]
    fn voc_xml_boxes_classes_and_difficult() {
        let xml = r#"<annotation><filename>a.jpg</filename>
            <size><width>100</width><height>50</height></size>
            <object><name>airplane</name><difficult>0</difficult>
              <bndbox><xmin>1</xmin><ymin>11</ymin><xmax>40</xmax><ymax>60</ymax></bndbox></object>
            <object><name>person</name><difficult>1</difficult>
              <bndbox><xmin>5</xmin><ymin>5</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>
              <part><name>head</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></part></object>
            <object><name>unicorn</name>
              <bndbox><xmin>5</xmin><ymin>5</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>
            </annotation>"#;
        let mut unknown = BTreeMap::new();
        let (filename, labels) = parse_voc_xml(xml, &classes(), &mut unknown).unwrap();
        assert_eq!(filename.as_deref(), Some("a.jpg"));
        assert_eq!(labels.size, Some([100, 50]));
        assert_eq!(
            labels.boxes,
            vec![
                LabelBox {
                    class: 0,
                    bbox: [0.0, 10.0, 40.0, 50.0],
                    ignore: false
                },
                LabelBox {
                    class: 1,
                    bbox: [4.0, 4.0, 9.0, 9.0],
                    ignore: true
                },
                LabelBox {
                    class: 0,
                    bbox: [4.0, 4.0, 9.0, 9.0],
                    ignore: true
                },
            ]
        );
        assert_eq!(unknown.get("unicorn"), Some(&1));
        let bad = parse_voc_xml("<annotation><object>", &classes(), &mut unknown);
        assert!(bad.is_err());
        let bad = parse_voc_xml(
            "<annotation><object><name>person</name></object></annotation>",
            &classes(),
            &mut unknown,
        );
        assert!(bad.unwrap_err().contains("bndbox"));
    }

    #[test]
    fn cut_boxes_become_ignore_regions_and_sizes_are_rescaled() {
        let labels = PhotoLabels {
            size: Some([200, 100]),
            boxes: vec![
                LabelBox {
                    class: 1,
                    bbox: [10.0, 20.0, 60.0, 60.0],
                    ignore: false,
                },
                LabelBox {
                    class: 0,
                    bbox: [0.0, 0.0, 100.0, 20.0],
                    ignore: false,
                },
                LabelBox {
                    class: 0,
                    bbox: [0.0, 80.0, 20.0, 100.0],
                    ignore: false,
                },
            ],
        };
        // The photo was decoded at half the annotated size; the crop keeps x >= 25 of it (scale 1).
        let g = SampleGeometry {
            scale: [1.0, 1.0],
            offset: [-25.0, 0.0],
            content: [75.0, 50.0],
        };
        let t = labels.targets([100, 50], &g);
        assert_eq!(
            t,
            vec![
                TargetBox {
                    class: 1,
                    bbox: [0.0, 10.0, 5.0, 30.0],
                    ignore: true
                },
                TargetBox {
                    class: 0,
                    bbox: [0.0, 0.0, 25.0, 10.0],
                    ignore: false
                },
            ]
        );
    }
}
