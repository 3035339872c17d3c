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

const IMAGE_EXTENSIONS: [&str; 7] = ["jpg", "jpeg", "png", "bmp", "webp", "gif", "jfif"];

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
    let (w, h) = img.dimensions();
    let mut view = if aug.min_crop_area < 1.0 && w > 8 && h > 8 {
        let area = rng.uniform(aug.min_crop_area, 1.0) * f64::from(w) * f64::from(h);
        let log_aspect = rng.uniform(-aug.max_aspect.ln(), aug.max_aspect.ln());
        let aspect = log_aspect.exp();
        let cw = ((area * aspect).sqrt().round() as u32).clamp(8, w);
        let ch = ((area / aspect).sqrt().round() as u32).clamp(8, h);
        let x0 = rng.below((w - cw + 1) as usize) as u32;
        let y0 = rng.below((h - ch + 1) as usize) as u32;
        // Shrink to about the network size first: jitter then touches far fewer pixels.
        let crop = imageops::crop_imm(img, x0, y0, cw, ch).to_image();
        shrink_to(&crop, spec)
    } else {
        shrink_to(img, spec)
    };
    if aug.flip && rng.unit() < 0.5 {
        imageops::flip_horizontal_in_place(&mut view);
    }
    if aug.jitter > 0.0 {
        let b = rng.uniform(1.0 - aug.jitter, 1.0 + aug.jitter) as f32;
        let c = rng.uniform(1.0 - aug.jitter, 1.0 + aug.jitter) as f32;
        let s = rng.uniform(1.0 - aug.jitter, 1.0 + aug.jitter) as f32;
        colour_jitter(&mut view, b, c, s);
    }
    let (tensor, _) = preprocess(&view, spec);
    tensor.data
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
}
