//! VOC-style ground truth: VOCdevkit datasets (XML annotations) and the plain-text reference format
//! (`class x y w h` per line), plus a loader for detections in the matching text format.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::detect::{Detection, ImageDetections};
use crate::error::{Error, Result, read_file};

/// One ground-truth object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GtObject {
    pub class: String,
    /// `[x1, y1, x2, y2]` in pixels, as written in the annotation (VOC XML is 1-based).
    pub bbox: [f64; 4],
    /// VOC `difficult` (COCO `iscrowd` when converted): neither a positive nor a false-positive trap.
    pub difficult: bool,
}

/// The ground truth of one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GtImage {
    /// The image file's stem, which is what [`ImageDetections::image`] holds.
    pub id: String,
    pub path: PathBuf,
    /// Image size in pixels; 0 where the source format does not say (the text reference format).
    pub width: u32,
    pub height: u32,
    pub objects: Vec<GtObject>,
}

/// A dataset in VOCdevkit layout: `Annotations/<id>.xml`, `ImageSets/Main/<split>.txt`,
/// `JPEGImages/<id>.jpg`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VocDataset {
    pub root: PathBuf,
    pub split: String,
    pub images: Vec<GtImage>,
    /// Every box that was clipped to the image or skipped as degenerate, one line each (also logged
    /// with `tracing::warn!`), so callers can report how clean the annotations were.
    pub warnings: Vec<String>,
}

impl VocDataset {
    /// Loads the images listed in `ImageSets/Main/<split>.txt` with their XML annotations. Images
    /// need not exist: the size comes from the XML and only falls back to reading the image header.
    pub fn load(root: impl AsRef<Path>, split: &str) -> Result<Self> {
        let root = root.as_ref();
        let list = root
            .join("ImageSets")
            .join("Main")
            .join(format!("{split}.txt"));
        let text = read_text(&list)?;
        let mut images = Vec::new();
        let mut warnings = Vec::new();
        // Class-specific split files carry a second column (`id -1`); the id is always the first.
        for id in text.lines().filter_map(|l| l.split_whitespace().next()) {
            let xml = root.join("Annotations").join(format!("{id}.xml"));
            let image = root.join("JPEGImages").join(format!("{id}.jpg"));
            let text = read_text(&xml)?;
            images.push(parse_annotation(&text, &xml, id, image, &mut warnings)?);
        }
        Ok(VocDataset {
            root: root.to_path_buf(),
            split: split.to_string(),
            images,
            warnings,
        })
    }

    /// The class names present in the ground truth, sorted.
    pub fn classes(&self) -> Vec<String> {
        gt_classes(&self.images)
    }
}

/// The sorted class names present in some ground truth.
pub fn gt_classes(images: &[GtImage]) -> Vec<String> {
    let set: BTreeSet<&str> = images
        .iter()
        .flat_map(|im| im.objects.iter().map(|o| o.class.as_str()))
        .collect();
    set.into_iter().map(str::to_string).collect()
}

pub(crate) fn read_text(path: &Path) -> Result<String> {
    String::from_utf8(read_file(path)?)
        .map_err(|_| Error::Data(format!("{}: not UTF-8 text", path.display())))
}

fn data_err(origin: &Path, what: impl std::fmt::Display) -> Error {
    Error::Data(format!("{}: {what}", origin.display()))
}

type Node<'a, 'i> = roxmltree::Node<'a, 'i>;

/// A direct child element: VOC2012 person layouts nest `<part><bndbox>` inside an object, and
/// those must not be mistaken for the object's own box.
fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children()
        .find(|c| c.is_element() && c.has_tag_name(name))
}

fn field<'a>(node: Node<'a, '_>, name: &str) -> Option<&'a str> {
    child(node, name).and_then(|c| c.text()).map(str::trim)
}

fn parse_annotation(
    text: &str,
    origin: &Path,
    id: &str,
    image: PathBuf,
    warnings: &mut Vec<String>,
) -> Result<GtImage> {
    let xml = read_voc_xml(text).map_err(|e| data_err(origin, e))?;
    // Some converters write sizes as `500.0`; a size of 0 means "unknown" in VOC exports.
    let mut width = xml.width.map_or(0, |v| v.max(0.0) as u32);
    let mut height = xml.height.map_or(0, |v| v.max(0.0) as u32);
    if width == 0 || height == 0 {
        let (w, h) = image::image_dimensions(&image).map_err(|e| {
            data_err(
                origin,
                format!("no image size and {} unreadable: {e}", image.display()),
            )
        })?;
        (width, height) = (w, h);
    }
    let mut objects = Vec::new();
    for o in xml.objects {
        let what = format!("{}: object {} ({})", origin.display(), o.index, o.name);
        if let Some(bbox) = sanitize_box(o.bbox, width, height, &what, warnings) {
            objects.push(GtObject {
                class: o.name,
                bbox,
                difficult: o.difficult,
            });
        }
    }
    Ok(GtImage {
        id: id.to_string(),
        path: image,
        width,
        height,
        objects,
    })
}

/// What a VOC annotation file says, before a reader decides what its boxes mean: the evaluator
/// clips them to the image, training turns them into targets of the model's classes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct VocXml {
    /// `<filename>`, when present and not empty.
    pub filename: Option<String>,
    /// `<size>`'s width and height when they are numbers (`500.0` happens; 0 means unknown).
    pub width: Option<f64>,
    pub height: Option<f64>,
    pub objects: Vec<VocXmlObject>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct VocXmlObject {
    /// Position among the file's objects, for messages.
    pub index: usize,
    pub name: String,
    pub difficult: bool,
    /// `[xmin, ymin, xmax, ymax]` as written: 1-based, inclusive pixel indices.
    pub bbox: [f64; 4],
}

/// Parses one VOC annotation. An object without a name, box or numeric coordinates, or with a
/// `<difficult>` that is not 0/1, makes the whole file an error (its other boxes cannot be
/// trusted either).
pub(crate) fn read_voc_xml(text: &str) -> std::result::Result<VocXml, String> {
    let doc = roxmltree::Document::parse(text).map_err(|e| e.to_string())?;
    let root = doc.root_element();
    let number = |node: Node<'_, '_>, name: &str| -> std::result::Result<f64, String> {
        let s = field(node, name).ok_or_else(|| format!("missing <{name}>"))?;
        s.parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| format!("<{name}> is not a number: {s:?}"))
    };
    let size = child(root, "size");
    let mut objects = Vec::new();
    for (index, obj) in root
        .children()
        .filter(|c| c.is_element() && c.has_tag_name("object"))
        .enumerate()
    {
        let name = field(obj, "name")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format!("object {index} has no <name>"))?
            .to_string();
        let difficult = match field(obj, "difficult") {
            None | Some("") | Some("0") | Some("false") => false,
            Some("1") | Some("true") => true,
            Some(other) => return Err(format!("object {index}: bad <difficult> {other:?}")),
        };
        let bndbox =
            child(obj, "bndbox").ok_or_else(|| format!("object {index} has no <bndbox>"))?;
        let bbox = [
            number(bndbox, "xmin")?,
            number(bndbox, "ymin")?,
            number(bndbox, "xmax")?,
            number(bndbox, "ymax")?,
        ];
        objects.push(VocXmlObject {
            index,
            name,
            difficult,
            bbox,
        });
    }
    Ok(VocXml {
        filename: field(root, "filename")
            .filter(|f| !f.is_empty())
            .map(str::to_string),
        width: size.and_then(|s| number(s, "width").ok()),
        height: size.and_then(|s| number(s, "height").ok()),
        objects,
    })
}

/// `[x1, y1, x2, y2]` clipped to `[0, width] x [0, height]`.
pub(crate) fn clip_box(b: [f64; 4], [width, height]: [u32; 2]) -> [f64; 4] {
    let (w, h) = (f64::from(width), f64::from(height));
    [
        b[0].clamp(0.0, w),
        b[1].clamp(0.0, h),
        b[2].clamp(0.0, w),
        b[3].clamp(0.0, h),
    ]
}

/// Clips a box to the image and rejects one with no area, recording a warning for either. VOC
/// coordinates are 1-based and a box may touch `width`, so the clip range is `[0, width]`; a box
/// that is a single point (as two in BCCD are) has no area in any convention and is skipped.
pub(crate) fn sanitize_box(
    raw: [f64; 4],
    width: u32,
    height: u32,
    what: &str,
    warnings: &mut Vec<String>,
) -> Option<[f64; 4]> {
    let mut b = raw;
    if width > 0 && height > 0 {
        b = clip_box(b, [width, height]);
    }
    if b[2] <= b[0] || b[3] <= b[1] {
        let msg = format!("{what}: degenerate box {raw:?} skipped");
        tracing::warn!("{msg}");
        warnings.push(msg);
        return None;
    }
    if b != raw {
        let msg = format!("{what}: box {raw:?} clipped to the {width}x{height} image: {b:?}");
        tracing::warn!("{msg}");
        warnings.push(msg);
    }
    Some(b)
}

/// The `.txt` files of a folder, sorted by name so results do not depend on directory order.
fn text_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.extension().is_some_and(|e| e == "txt") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Splits `class n1 .. nk` where the class name may itself contain spaces (`dining table`): the
/// last `k` fields are the numbers.
fn split_line<const K: usize>(
    line: &str,
    path: &Path,
    lineno: usize,
) -> Result<(String, [f64; K])> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let bad = || {
        data_err(
            path,
            format!("line {lineno}: expected a class and {K} numbers"),
        )
    };
    if fields.len() <= K {
        return Err(bad());
    }
    let (name, nums) = fields.split_at(fields.len() - K);
    let mut out = [0.0; K];
    for (o, s) in out.iter_mut().zip(nums) {
        *o = s
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(bad)?;
    }
    Ok((name.join(" "), out))
}

/// Loads ground truth in the plain-text reference format: one `<id>.txt` per image, one
/// `class x y w h` line per object (absolute pixels, top-left corner and size). `x2 = x + w`, as
/// the reference implementation computes it. Sizes are unknown (0) and boxes are not clipped.
pub fn load_text_gt(dir: impl AsRef<Path>) -> Result<Vec<GtImage>> {
    let mut images = Vec::new();
    for path in text_files(dir.as_ref())? {
        let text = read_text(&path)?;
        let mut objects = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (class, [x, y, w, h]) = split_line::<4>(line, &path, i + 1)?;
            objects.push(GtObject {
                class,
                bbox: [x, y, x + w, y + h],
                difficult: false,
            });
        }
        images.push(GtImage {
            id: stem(&path),
            path,
            width: 0,
            height: 0,
            objects,
        });
    }
    Ok(images)
}

/// Loads detections in the plain-text reference format: one `<id>.txt` per image, one
/// `class confidence x y w h` line per detection (absolute pixels). Class ids are the index of the
/// label among all labels seen, sorted; evaluation matches by label, not id.
pub fn load_text_detections(dir: impl AsRef<Path>) -> Result<Vec<ImageDetections>> {
    let mut per_file = Vec::new();
    for path in text_files(dir.as_ref())? {
        let text = read_text(&path)?;
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            rows.push(split_line::<5>(line, &path, i + 1)?);
        }
        per_file.push((stem(&path), rows));
    }
    let labels: BTreeSet<String> = per_file
        .iter()
        .flat_map(|(_, rows)| rows.iter().map(|(c, _)| c.clone()))
        .collect();
    let labels: Vec<String> = labels.into_iter().collect();
    Ok(per_file
        .into_iter()
        .map(|(image, rows)| ImageDetections {
            image,
            width: 0,
            height: 0,
            detections: rows
                .into_iter()
                .map(|(label, [score, x, y, w, h])| Detection {
                    class_id: labels.binary_search(&label).unwrap_or(0),
                    label,
                    score: score as f32,
                    bbox: [x as f32, y as f32, (x + w) as f32, (y + h) as f32],
                })
                .collect(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<(GtImage, Vec<String>)> {
        let mut warnings = Vec::new();
        let im = parse_annotation(
            text,
            Path::new("/x/Annotations/a.xml"),
            "a",
            PathBuf::from("/x/JPEGImages/a.jpg"),
            &mut warnings,
        )?;
        Ok((im, warnings))
    }

    const HEADER: &str = "<annotation><size><width>100</width><height>50</height></size>";

    #[test]
    fn parses_objects_difficult_and_ignores_part_boxes() {
        let xml = format!(
            "{HEADER}<object><name>person</name><difficult>1</difficult>\
             <bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30.5</xmax><ymax>40</ymax></bndbox>\
             <part><name>head</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>6</xmax><ymax>6</ymax></bndbox></part>\
             </object><object><name>dog</name>\
             <bndbox><xmin>10</xmin><ymin>10</ymin><xmax>20</xmax><ymax>20</ymax></bndbox></object></annotation>"
        );
        let (im, warnings) = parse(&xml).unwrap();
        assert!(warnings.is_empty());
        assert_eq!((im.width, im.height), (100, 50));
        assert_eq!(im.objects.len(), 2);
        assert_eq!(im.objects[0].class, "person");
        assert!(im.objects[0].difficult);
        assert_eq!(im.objects[0].bbox, [1.0, 2.0, 30.5, 40.0]);
        assert!(!im.objects[1].difficult);
    }

    #[test]
    fn clips_and_skips_with_warnings() {
        let xml = format!(
            "{HEADER}<object><name>a</name><bndbox><xmin>-3</xmin><ymin>2</ymin><xmax>130</xmax><ymax>40</ymax></bndbox></object>\
             <object><name>b</name><bndbox><xmin>7</xmin><ymin>8</ymin><xmax>7</xmax><ymax>8</ymax></bndbox></object>\
             <object><name>c</name><bndbox><xmin>200</xmin><ymin>8</ymin><xmax>300</xmax><ymax>9</ymax></bndbox></object></annotation>"
        );
        let (im, warnings) = parse(&xml).unwrap();
        assert_eq!(im.objects.len(), 1);
        assert_eq!(im.objects[0].bbox, [0.0, 2.0, 100.0, 40.0]);
        assert_eq!(warnings.len(), 3, "{warnings:?}");
    }

    #[test]
    fn malformed_xml_is_a_data_error_naming_the_file() {
        for bad in [
            "<annotation><object>",
            "<annotation><size><width>1</width><height>1</height></size><object><name>a</name></object></annotation>",
            "<annotation><size><width>9</width><height>9</height></size><object><name>a</name>\
             <bndbox><xmin>x</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></object></annotation>",
        ] {
            match parse(bad) {
                Err(Error::Data(msg)) => assert!(msg.contains("/x/Annotations/a.xml"), "{msg}"),
                other => panic!("expected a data error, got {other:?}"),
            }
        }
    }
}
