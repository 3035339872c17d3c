//! Training images: folder scanning, augmentation, and the model's own pre-processing.
//!
//! Distillation needs no labels, so any photo is a training sample. Each sample is augmented with a
//! random resized crop, a horizontal flip and colour jitter (so a few hundred photos do not get
//! memorised), then laid out exactly as [`crate::detect::preprocess`] does for inference, at the
//! training resolution.

use std::path::{Path, PathBuf};

use image::RgbImage;
use image::imageops::{self, FilterType};

use crate::detect::preprocess::preprocess;
use crate::error::{Error, Result};
use crate::model::manifest::InputSpec;
use crate::train::rng::SplitMix64;

pub(crate) const IMAGE_EXTENSIONS: [&str; 7] = ["jpg", "jpeg", "png", "bmp", "webp", "gif", "jfif"];

/// The image files found under the training folders, sorted (so the order, and with a seed the
/// whole run, does not depend on the file system's directory order).
#[derive(Debug, Clone)]
pub struct ImageSet {
    pub paths: Vec<PathBuf>,
}

impl ImageSet {
    /// Collects image files under each folder, recursively. An unreadable folder, a path that is
    /// not a folder, or no image at all is an [`Error::Input`] naming the folders.
    pub fn scan(dirs: &[PathBuf]) -> Result<ImageSet> {
        if dirs.is_empty() {
            return Err(Error::Input(
                "no image folder given: pass --images DIR".into(),
            ));
        }
        let mut paths = Vec::new();
        for dir in dirs {
            if !dir.is_dir() {
                return Err(Error::Input(format!(
                    "image folder {} does not exist or is not a folder",
                    dir.display()
                )));
            }
            let before = paths.len();
            collect_images(dir, &mut paths, 0)?;
            if paths.len() == before {
                return Err(Error::Input(format!(
                    "image folder {} holds no images ({})",
                    dir.display(),
                    IMAGE_EXTENSIONS.join(", ")
                )));
            }
        }
        paths.sort();
        paths.dedup();
        Ok(ImageSet { paths })
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }
}

fn collect_images(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) -> Result<()> {
    // Deep trees are almost certainly a symlink loop.
    if depth > 16 {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        if path.is_dir() {
            collect_images(&path, out, depth + 1)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// Augmentation strengths. `Augment::none()` feeds each image exactly as inference would.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augment {
    /// Smallest crop area as a fraction of the image (1 disables cropping).
    pub min_crop_area: f64,
    /// Crop aspect ratios are drawn log-uniformly in `[1/max_aspect, max_aspect]`.
    pub max_aspect: f64,
    pub flip: bool,
    /// Brightness, contrast and saturation factors are drawn in `[1 - jitter, 1 + jitter]`.
    pub jitter: f64,
}

impl Default for Augment {
    fn default() -> Self {
        // Mild enough that the teacher still sees natural images (its outputs are the targets), strong
        // enough that an epoch of 1,500 photos is not the same 1,500 inputs every time.
        Augment {
            min_crop_area: 0.3,
            max_aspect: 4.0 / 3.0,
            flip: true,
            jitter: 0.25,
        }
    }
}

impl Augment {
    pub fn none() -> Self {
        Augment {
            min_crop_area: 1.0,
            max_aspect: 1.0,
            flip: false,
            jitter: 0.0,
        }
    }
}

/// Decodes an image file (greyscale, palette and alpha images become RGB).
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let bytes = crate::error::read_file(path)?;
    crate::detect::image_io::decode_rgb(&bytes)
        .map_err(|e| Error::Input(format!("{}: {e}", path.display())))
}

/// One training input `[3, H, W]` (C order) at the resolution of `spec`.
pub fn augmented_input(
    img: &RgbImage,
    spec: &InputSpec,
    aug: &Augment,
    rng: &mut SplitMix64,
) -> Vec<f32> {
    augmented_sample(img, spec, aug, rng).0
}

/// Where a photo's pixels land in the training input made by [`augmented_sample`]: per axis
/// `input = scale * photo + offset` (a negative x scale is the flip), and the picture covers
/// `[0, content[0]] x [0, content[1]]` of the input (less than all of it under letterbox).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleGeometry {
    pub scale: [f64; 2],
    pub offset: [f64; 2],
    pub content: [f64; 2],
}

/// A label box keeps at least this fraction of its area after the crop, or it is dropped as a
/// positive: a box mostly cut away shows too little of the object to name it, and calling a
/// fragment an object would teach the net to fire on fragments (false positives the teacher does
/// not make). What is left of it still keeps the anchors there from being negatives
/// ([`crate::train::labels`]).
pub const MIN_VISIBLE_FRACTION: f64 = 0.25;
/// A label box narrower or lower than this many input pixels is no positive either: the resize
/// has blurred such an object into a pixel or two, so there is nothing left to detect, and its
/// log-size target (below `ln(2 / 26)` for the smallest anchor) is far outside anything the heads
/// produce.
pub const MIN_BOX_SIDE: f64 = 2.0;

impl SampleGeometry {
    /// A box `[x1, y1, x2, y2]` in photo pixels mapped to input pixels (not clipped).
    pub fn map_box(&self, b: [f64; 4]) -> [f64; 4] {
        let x = [
            b[0] * self.scale[0] + self.offset[0],
            b[2] * self.scale[0] + self.offset[0],
        ];
        let y = [
            b[1] * self.scale[1] + self.offset[1],
            b[3] * self.scale[1] + self.offset[1],
        ];
        [
            x[0].min(x[1]),
            y[0].min(y[1]),
            x[0].max(x[1]),
            y[0].max(y[1]),
        ]
    }

    /// A box mapped to input pixels and clipped to the picture; `None` when nothing is left.
    pub fn clip_box(&self, b: [f64; 4]) -> Option<[f64; 4]> {
        let m = self.map_box(b);
        let c = [
            m[0].max(0.0),
            m[1].max(0.0),
            m[2].min(self.content[0]),
            m[3].min(self.content[1]),
        ];
        (c[2] > c[0] && c[3] > c[1]).then_some(c)
    }

    /// A label box as a training target in input pixels: mapped, clipped to the picture, and
    /// `None` when too little of it is left ([`MIN_VISIBLE_FRACTION`], [`MIN_BOX_SIDE`]).
    pub fn target_box(&self, b: [f64; 4]) -> Option<[f64; 4]> {
        let m = self.map_box(b);
        let full = (m[2] - m[0]) * (m[3] - m[1]);
        let c = self.clip_box(b)?;
        let (w, h) = (c[2] - c[0], c[3] - c[1]);
        let keep = w >= MIN_BOX_SIDE && h >= MIN_BOX_SIDE && w * h >= MIN_VISIBLE_FRACTION * full;
        keep.then_some(c)
    }
}

/// [`augmented_input`] with the geometry of the crop, flip and resize, so that label boxes can
/// follow the pixels. The random draws are the same, so a sample is the same image either way.
pub fn augmented_sample(
    img: &RgbImage,
    spec: &InputSpec,
    aug: &Augment,
    rng: &mut SplitMix64,
) -> (Vec<f32>, SampleGeometry) {
    let (w, h) = img.dimensions();
    let (crop, mut view) = if aug.min_crop_area < 1.0 && w > 8 && h > 8 {
        let area = rng.uniform(aug.min_crop_area, 1.0) * f64::from(w) * f64::from(h);
        let log_aspect = rng.uniform(-aug.max_aspect.ln(), aug.max_aspect.ln());
        let aspect = log_aspect.exp();
        let cw = ((area * aspect).sqrt().round() as u32).clamp(8, w);
        let ch = ((area / aspect).sqrt().round() as u32).clamp(8, h);
        let x0 = rng.below((w - cw + 1) as usize) as u32;
        let y0 = rng.below((h - ch + 1) as usize) as u32;
        // Shrink to about the network size first: jitter then touches far fewer pixels.
        let crop = imageops::crop_imm(img, x0, y0, cw, ch).to_image();
        ([x0, y0, cw, ch], shrink_to(&crop, spec))
    } else {
        ([0, 0, w, h], shrink_to(img, spec))
    };
    let flip = aug.flip && rng.unit() < 0.5;
    if flip {
        imageops::flip_horizontal_in_place(&mut view);
    }
    if aug.jitter > 0.0 {
        let b = rng.uniform(1.0 - aug.jitter, 1.0 + aug.jitter) as f32;
        let c = rng.uniform(1.0 - aug.jitter, 1.0 + aug.jitter) as f32;
        let s = rng.uniform(1.0 - aug.jitter, 1.0 + aug.jitter) as f32;
        colour_jitter(&mut view, b, c, s);
    }
    let (vw, vh) = view.dimensions();
    let (tensor, to_image) = preprocess(&view, spec);
    // Resizes map the whole extent onto the whole extent, so each stage is a scale; the last one
    // is the inverse of the detector's own mapping back to the image (under letterbox that is
    // within a pixel of the truncated resized size, which is what inference decodes with).
    let k = [
        1.0 / f64::from(to_image.scale_x),
        1.0 / f64::from(to_image.scale_y),
    ];
    let content = [f64::from(vw) * k[0], f64::from(vh) * k[1]];
    let sx = content[0] / f64::from(crop[2]);
    let sy = content[1] / f64::from(crop[3]);
    let (x0, y0) = (f64::from(crop[0]), f64::from(crop[1]));
    let geometry = if flip {
        SampleGeometry {
            scale: [-sx, sy],
            offset: [content[0] + x0 * sx, -y0 * sy],
            content,
        }
    } else {
        SampleGeometry {
            scale: [sx, sy],
            offset: [-x0 * sx, -y0 * sy],
            content,
        }
    };
    (tensor.data, geometry)
}

/// Resizes so that the image is no more than twice the network input on either side (keeping the
/// aspect ratio); preprocessing does the final resize.
fn shrink_to(img: &RgbImage, spec: &InputSpec) -> RgbImage {
    let (w, h) = img.dimensions();
    let r = (2.0 * spec.width as f32 / w as f32).min(2.0 * spec.height as f32 / h as f32);
    if r >= 1.0 {
        return img.clone();
    }
    let nw = ((w as f32 * r) as u32).max(1);
    let nh = ((h as f32 * r) as u32).max(1);
    imageops::resize(img, nw, nh, FilterType::Triangle)
}

/// Brightness (scale), contrast (around the mean grey) and saturation (around each pixel's grey).
fn colour_jitter(img: &mut RgbImage, brightness: f32, contrast: f32, saturation: f32) {
    let n = (img.width() * img.height()).max(1) as f32;
    let grey = |p: &image::Rgb<u8>| {
        0.299 * f32::from(p.0[0]) + 0.587 * f32::from(p.0[1]) + 0.114 * f32::from(p.0[2])
    };
    let mean = img.pixels().map(grey).sum::<f32>() / n * brightness;
    for p in img.pixels_mut() {
        let g = grey(p) * brightness;
        for c in 0..3 {
            let v = f32::from(p.0[c]) * brightness;
            let v = g + saturation * (v - g);
            let v = mean + contrast * (v - mean);
            p.0[c] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::manifest::{ColorOrder, PixelScale, ResizeMode};

    fn spec() -> InputSpec {
        InputSpec {
            width: 32,
            height: 32,
            color: ColorOrder::Rgb,
            scale: PixelScale::Unit,
            resize: ResizeMode::Stretch,
            pad_value: 0.0,
        }
    }

    #[test]
    fn augmentation_is_deterministic_per_seed() {
        let img = RgbImage::from_fn(100, 60, |x, y| image::Rgb([x as u8, y as u8, 128]));
        let a = augmented_input(&img, &spec(), &Augment::default(), &mut SplitMix64::new(3));
        let b = augmented_input(&img, &spec(), &Augment::default(), &mut SplitMix64::new(3));
        let c = augmented_input(&img, &spec(), &Augment::default(), &mut SplitMix64::new(4));
        assert_eq!(a.len(), 3 * 32 * 32);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn empty_and_missing_folders_are_clear_errors() {
        let dir = std::env::temp_dir().join(format!("lbw-train-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = ImageSet::scan(std::slice::from_ref(&dir))
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds no images"), "{e}");
        let e = ImageSet::scan(&[dir.join("missing")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The bounding box of the bright pixels of channel 0 in a `[3, H, W]` input.
    fn bright_box(x: &[f32], w: usize, h: usize) -> [f64; 4] {
        let mut b = [f64::MAX, f64::MAX, f64::MIN, f64::MIN];
        for y in 0..h {
            for xx in 0..w {
                if x[y * w + xx] > 0.5 {
                    b = [
                        b[0].min(xx as f64),
                        b[1].min(y as f64),
                        b[2].max(xx as f64 + 1.0),
                        b[3].max(y as f64 + 1.0),
                    ];
                }
            }
        }
        b
    }

    #[test]
    fn label_boxes_follow_crop_flip_and_resize() {
        // A white rectangle on black: after augmentation the white pixels must sit where the
        // geometry puts the rectangle's box.
        let rect = [60.0, 30.0, 120.0, 80.0];
        let img = RgbImage::from_fn(200, 120, |x, y| {
            let inside = (60..120).contains(&x) && (30..80).contains(&y);
            image::Rgb(if inside { [255; 3] } else { [0; 3] })
        });
        let aug = Augment {
            jitter: 0.0,
            ..Augment::default()
        };
        for resize in [ResizeMode::Stretch, ResizeMode::Letterbox] {
            let spec = InputSpec {
                width: 64,
                height: 64,
                resize,
                ..spec()
            };
            let mut flipped_and_cropped = 0;
            for seed in 0..40 {
                let (x, g) = augmented_sample(&img, &spec, &aug, &mut SplitMix64::new(seed));
                let Some(want) = g.target_box(rect) else {
                    continue;
                };
                if g.scale[0] < 0.0 && g.scale[0].abs() > 64.0 / 200.0 * 1.01 {
                    flipped_and_cropped += 1;
                }
                let got = bright_box(&x, 64, 64);
                for k in 0..4 {
                    assert!(
                        (got[k] - want[k]).abs() <= 1.25,
                        "{resize:?} seed {seed}: white pixels at {got:?}, geometry says {want:?}"
                    );
                }
            }
            assert!(flipped_and_cropped > 3, "{resize:?}: too few flipped crops");
        }
        // No augmentation: a plain stretch.
        let (_, g) = augmented_sample(&img, &spec(), &Augment::none(), &mut SplitMix64::new(0));
        let m = g.map_box(rect);
        let want = [
            60.0 * 0.16,
            30.0 * 32.0 / 120.0,
            120.0 * 0.16,
            80.0 * 32.0 / 120.0,
        ];
        for k in 0..4 {
            assert!((m[k] - want[k]).abs() < 1e-4, "{m:?} vs {want:?}");
        }
    }

    #[test]
    fn cut_and_tiny_label_boxes_are_dropped() {
        // Flipped 100-pixel picture at scale 1: x -> 100 - x.
        let g = SampleGeometry {
            scale: [-1.0, 1.0],
            offset: [100.0, 0.0],
            content: [100.0, 100.0],
        };
        assert_eq!(
            g.target_box([10.0, 10.0, 30.0, 40.0]),
            Some([70.0, 10.0, 90.0, 40.0])
        );
        // Half outside: clipped, kept.
        assert_eq!(
            g.target_box([-10.0, 0.0, 10.0, 20.0]),
            Some([90.0, 0.0, 100.0, 20.0])
        );
        // 80 % outside: dropped.
        assert_eq!(g.target_box([-40.0, 0.0, 10.0, 20.0]), None);
        // Tiny: dropped.
        assert_eq!(g.target_box([10.0, 10.0, 11.0, 40.0]), None);
        // What is left of them is still there to be clipped; a box outside the picture is not.
        assert_eq!(
            g.clip_box([-40.0, 0.0, 10.0, 20.0]),
            Some([90.0, 0.0, 100.0, 20.0])
        );
        assert_eq!(g.clip_box([100.0, 0.0, 120.0, 20.0]), None);
    }
}
