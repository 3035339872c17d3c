//! Turning a photo into the network input each model was trained with.

use image::RgbImage;
use image::imageops::{FilterType, resize};

use crate::model::Tensor;
use crate::model::manifest::{ColorOrder, InputSpec, PixelScale, ResizeMode};

/// How network-input coordinates map back to original image pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputTransform {
    /// Original pixels per network-input pixel, horizontally and vertically.
    pub scale_x: f32,
    pub scale_y: f32,
    pub image_width: u32,
    pub image_height: u32,
}

impl InputTransform {
    /// Maps a box in network-input pixels to original pixels, clipped to the image.
    pub fn to_image(&self, b: [f32; 4]) -> [f32; 4] {
        let (w, h) = (self.image_width as f32, self.image_height as f32);
        [
            (b[0] * self.scale_x).clamp(0.0, w),
            (b[1] * self.scale_y).clamp(0.0, h),
            (b[2] * self.scale_x).clamp(0.0, w),
            (b[3] * self.scale_y).clamp(0.0, h),
        ]
    }
}

/// Resizes (bilinear) and lays out the image as a `[1, 3, H, W]` float tensor.
pub fn preprocess(img: &RgbImage, spec: &InputSpec) -> (Tensor, InputTransform) {
    let (iw, ih) = img.dimensions();
    let (nw, nh) = (spec.width, spec.height);
    let (resized, sx, sy) = match spec.resize {
        ResizeMode::Stretch => (
            resize(img, nw, nh, FilterType::Triangle),
            iw as f32 / nw as f32,
            ih as f32 / nh as f32,
        ),
        ResizeMode::Letterbox => {
            let r = (nw as f32 / iw as f32).min(nh as f32 / ih as f32);
            let rw = ((iw as f32 * r) as u32).clamp(1, nw);
            let rh = ((ih as f32 * r) as u32).clamp(1, nh);
            (resize(img, rw, rh, FilterType::Triangle), 1.0 / r, 1.0 / r)
        }
    };
    let plane = (nw * nh) as usize;
    let div = match spec.scale {
        PixelScale::Unit => 255.0,
        PixelScale::Raw => 1.0,
    };
    let pad = spec.pad_value / div;
    let mut data = vec![pad; 3 * plane];
    let channel_of = |c: usize| match spec.color {
        ColorOrder::Rgb => c,
        ColorOrder::Bgr => 2 - c,
    };
    for (x, y, p) in resized.enumerate_pixels() {
        let i = (y * nw + x) as usize;
        for c in 0..3 {
            data[channel_of(c) * plane + i] = p.0[c] as f32 / div;
        }
    }
    let tensor = Tensor {
        shape: vec![1, 3, nh as usize, nw as usize],
        data,
    };
    (
        tensor,
        InputTransform {
            scale_x: sx,
            scale_y: sy,
            image_width: iw,
            image_height: ih,
        },
    )
}
