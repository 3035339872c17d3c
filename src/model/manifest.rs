//! Model manifests (`models/*.toml`): what a pretrained detector is, where its files come from, and
//! how to feed and decode it. The manifests are compiled into the binary so `lbw` works from any
//! directory; the weight files are found under [`crate::paths::model_dir`] and verified by sha256.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The model `lbw serve` runs when none is named.
pub const DEFAULT_MODEL: &str = "yolo-fastest-voc";

const BUILTIN: [(&str, &str); 5] = [
    (
        "yolo-fastest-voc",
        include_str!("../../models/yolo-fastest-voc.toml"),
    ),
    (
        "yolo-fastest-xl-voc",
        include_str!("../../models/yolo-fastest-xl-voc.toml"),
    ),
    (
        "mobilenetv2-yolov3-nano-voc",
        include_str!("../../models/mobilenetv2-yolov3-nano-voc.toml"),
    ),
    (
        "fastestdet-coco",
        include_str!("../../models/fastestdet-coco.toml"),
    ),
    (
        "yolox-nano-coco",
        include_str!("../../models/yolox-nano-coco.toml"),
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Darknet,
    Onnx,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelFile {
    /// `cfg` / `weights` for darknet, `onnx` for ONNX.
    pub role: String,
    pub name: String,
    pub sha256: String,
    /// Public source of the file at a fixed commit.
    pub url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColorOrder {
    Rgb,
    Bgr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelScale {
    /// pixel / 255, in [0, 1].
    Unit,
    /// pixel values 0-255 unchanged.
    Raw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeMode {
    /// Plain resize to the input size, aspect ratio not kept.
    Stretch,
    /// Aspect-preserving resize placed at the top-left corner, the rest padded.
    Letterbox,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    pub width: u32,
    pub height: u32,
    pub color: ColorOrder,
    pub scale: PixelScale,
    pub resize: ResizeMode,
    /// Padding value (0-255 scale) for letterboxing.
    #[serde(default)]
    pub pad_value: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DecoderSpec {
    /// Darknet YOLOv3 heads: one graph output per head, `[1, A*(5+C), H, W]`.
    Yolov3 {
        /// All anchors as (w, h) in input pixels.
        anchors: Vec<[f32; 2]>,
        /// Anchor indices of each head, in graph output order.
        masks: Vec<Vec<usize>>,
        /// Per-head `scale_x_y` (1.0 = plain YOLOv3).
        scale_x_y: Vec<f32>,
    },
    /// FastestDet: one `[1, 5+C, H, W]` output (obj, dx, dy, w, h, class probabilities).
    Fastestdet { obj_power: f32, cls_power: f32 },
    /// YOLOX: one `[1, cells, 5+C]` output over the grids of `strides`.
    Yolox { strides: Vec<u32> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub id: String,
    pub format: Format,
    pub description: String,
    pub license: String,
    pub published_accuracy: String,
    pub labels: Vec<String>,
    pub files: Vec<ModelFile>,
    pub input: InputSpec,
    pub decoder: DecoderSpec,
}

impl Manifest {
    pub fn parse(text: &str) -> Result<Self> {
        let m: Manifest = toml::from_str(text)
            .map_err(|e| Error::Model(format!("invalid model manifest: {e}")))?;
        m.validate()?;
        Ok(m)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Model(format!("manifest {}: {m}", self.id)));
        if self.labels.is_empty() {
            return bad("no labels".into());
        }
        if self.input.width == 0 || self.input.height == 0 {
            return bad("input size must be positive".into());
        }
        if let DecoderSpec::Yolov3 {
            anchors,
            masks,
            scale_x_y,
        } = &self.decoder
            && (masks.len() != scale_x_y.len()
                || masks.iter().flatten().any(|&i| i >= anchors.len()))
        {
            return bad("decoder masks, anchors and scale_x_y do not agree".into());
        }
        let roles: &[&str] = match self.format {
            Format::Darknet => &["cfg", "weights"],
            Format::Onnx => &["onnx"],
        };
        for r in roles {
            if !self.files.iter().any(|f| f.role == *r) {
                return bad(format!("no file with role {r:?}"));
            }
        }
        Ok(())
    }

    pub fn file(&self, role: &str) -> Result<&ModelFile> {
        self.files
            .iter()
            .find(|f| f.role == role)
            .ok_or_else(|| Error::Model(format!("manifest {} has no {role} file", self.id)))
    }

    /// sha256 of the file holding the weights (darknet `.weights`, or the `.onnx`): the provenance
    /// recorded in `.lbw` files made from this model.
    pub fn weights_sha256(&self) -> &str {
        let role = match self.format {
            Format::Darknet => "weights",
            Format::Onnx => "onnx",
        };
        self.file(role)
            .map(|f| f.sha256.as_str())
            .unwrap_or_default()
    }

    /// Folder where this model's files are expected.
    pub fn dir(&self) -> PathBuf {
        crate::paths::model_dir().join(&self.id)
    }

    /// Path of a file of the model under [`crate::paths::model_dir`], verified by sha256.
    pub fn verified_path(&self, role: &str) -> Result<PathBuf> {
        self.verified_path_in(&crate::paths::model_dir(), role)
    }

    /// Path of a file of the model under `models_root/<id>/`, verified against the manifest's sha256.
    pub fn verified_path_in(&self, models_root: &Path, role: &str) -> Result<PathBuf> {
        let f = self.file(role)?;
        let path = models_root.join(&self.id).join(&f.name);
        let bytes = std::fs::read(&path).map_err(|e| {
            Error::Model(format!(
                "model {}: cannot read {} ({e}). Put the file there, or set {} to the folder that holds \
                 {}/{}; it comes from {}",
                self.id,
                path.display(),
                crate::paths::MODEL_DIR_VAR,
                self.id,
                f.name,
                f.url
            ))
        })?;
        let digest = sha256_hex(&bytes);
        if !digest.eq_ignore_ascii_case(&f.sha256) {
            return Err(Error::Model(format!(
                "model {}: {} has sha256 {digest}, the manifest expects {}; get the original from {}",
                self.id,
                path.display(),
                f.sha256,
                f.url
            )));
        }
        Ok(path)
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// sha256 of a file on disk.
pub fn sha256_file(path: &Path) -> Result<String> {
    Ok(sha256_hex(&crate::error::read_file(path)?))
}

/// All built-in manifests, in a stable order.
pub fn builtin() -> Result<Vec<Manifest>> {
    BUILTIN
        .iter()
        .map(|(_, text)| Manifest::parse(text))
        .collect()
}

pub fn builtin_ids() -> Vec<&'static str> {
    BUILTIN.iter().map(|(id, _)| *id).collect()
}

/// The manifest of a built-in model.
pub fn find(id: &str) -> Result<Manifest> {
    let (_, text) = BUILTIN.iter().find(|(i, _)| *i == id).ok_or_else(|| {
        Error::Input(format!(
            "unknown model {id:?}; known models: {}",
            builtin_ids().join(", ")
        ))
    })?;
    Manifest::parse(text)
}
