//! Per-sample augmentations of decoded 8-bit images: the operations that RandAugment and AugMix
//! compose (Composer's `augmentation_primitives`, themselves PIL's), as pure functions on
//! [`Image`], and the hook through which an algorithm hands the training loader its per-sample
//! augmentation.
//!
//! Each operation follows PIL's definition, so that a recipe ported from Composer augments the
//! same way:
//! - `autocontrast`, `equalize`, `posterize`, `solarize`: `ImageOps`' lookup tables, per channel.
//! - `rotate`, `shear_x`/`shear_y`, `translate_x`/`translate_y`: `Image.transform(AFFINE)` with
//!   bilinear resampling (what Composer asks for), sampling each output pixel's centre; a point that
//!   falls outside the picture is 0 (black), and the picture keeps its size.
//! - `color`, `contrast`, `brightness`, `sharpness`: `ImageEnhance`, a blend of the picture with a
//!   degenerate version (grey; its mean grey; black; smoothed) by a factor (1 is the identity,
//!   0 the degenerate picture, above 1 an extrapolation clipped to 0..255).
//!
//! On 1-channel (grey) pictures every operation works per channel as well; `color` is the
//! identity there, as in PIL.
//!
//! The leveled layer ([`Op::apply`]) maps a severity in 0..=10 to each operation's parameter,
//! with Composer's random draws (a level uniform in [0.1, severity], a random sign, the
//! "symmetric" factor draw of the enhancements); the draws come from the caller's generator.

use super::image::Image;
use crate::error::Result;
use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// What an algorithm hands the training loader: a function that augments one training sample in
/// place, drawing from that sample's generator (keyed by seed, epoch and position), after the
/// geometric transforms and before normalisation. It must keep the picture's size and channels.
pub type SampleAugment = Arc<dyn Fn(&mut Image, &mut dyn RngCore) -> Result<()> + Send + Sync>;

// ---------------------------------------------------------------------------------------------
// Lookup-table operations (PIL's ImageOps).

/// Applies a per-channel lookup table.
fn map_lut(img: &Image, luts: &[[u8; 256]]) -> Image {
    let c = img.channels.max(1);
    let data = img
        .data
        .iter()
        .enumerate()
        .map(|(i, &v)| luts[(i % c).min(luts.len() - 1)][v as usize])
        .collect();
    Image {
        data,
        ..img.clone_shape()
    }
}

/// The 256-bin histogram of each channel.
fn histograms(img: &Image) -> Vec<[u64; 256]> {
    let c = img.channels.max(1);
    let mut h = vec![[0u64; 256]; c];
    for (i, &v) in img.data.iter().enumerate() {
        h[i % c][v as usize] += 1;
    }
    h
}

fn identity_lut() -> [u8; 256] {
    std::array::from_fn(|i| i as u8)
}

/// Stretches each channel so that its darkest value becomes 0 and its lightest 255 (PIL's
/// `ImageOps.autocontrast` without cutoff). A constant channel is left as it is.
pub fn autocontrast(img: &Image) -> Image {
    let luts: Vec<[u8; 256]> = histograms(img)
        .iter()
        .map(|h| {
            let lo = h.iter().position(|&n| n > 0);
            let hi = h.iter().rposition(|&n| n > 0);
            match (lo, hi) {
                (Some(lo), Some(hi)) if hi > lo => {
                    let scale = 255.0 / (hi - lo) as f64;
                    let offset = -(lo as f64) * scale;
                    std::array::from_fn(|i| (i as f64 * scale + offset).clamp(0.0, 255.0) as u8)
                }
                _ => identity_lut(),
            }
        })
        .collect();
    map_lut(img, &luts)
}

/// Equalises each channel's histogram (PIL's `ImageOps.equalize`): values are mapped through
/// the cumulative histogram so that they spread evenly over 0..255.
pub fn equalize(img: &Image) -> Image {
    let luts: Vec<[u8; 256]> = histograms(img)
        .iter()
        .map(|h| {
            let used: Vec<u64> = h.iter().copied().filter(|&n| n > 0).collect();
            let last = used.last().copied().unwrap_or(0);
            let step = (used.iter().sum::<u64>() - last) / 255;
            if used.len() <= 1 || step == 0 {
                return identity_lut();
            }
            let mut n = step / 2;
            std::array::from_fn(|i| {
                let v = (n / step).min(255) as u8;
                n += h[i];
                v
            })
        })
        .collect();
    map_lut(img, &luts)
}

/// Keeps the `bits` most significant bits of each value (PIL's `ImageOps.posterize`; 8 is the
/// identity, 0 makes the picture black).
pub fn posterize(img: &Image, bits: u32) -> Image {
    let mask = !((1u32 << (8 - bits.min(8))) - 1) as u8;
    map_lut(img, &[std::array::from_fn(|i| i as u8 & mask)])
}

/// Inverts every value at or above `threshold` (PIL's `ImageOps.solarize`; 256 is the identity).
pub fn solarize(img: &Image, threshold: u32) -> Image {
    map_lut(
        img,
        &[std::array::from_fn(|i| {
            if (i as u32) < threshold {
                i as u8
            } else {
                255 - i as u8
            }
        })],
    )
}

// ---------------------------------------------------------------------------------------------
// Geometric operations (PIL's Image.transform(AFFINE, resample=BILINEAR)).

/// PIL's affine transform: output pixel `(x, y)` takes the input at
/// `(a x' + b y' + c, d x' + e y' + f)` with `(x', y')` the output pixel's centre, resampled
/// bilinearly (edge pixels repeated within the picture, truncated to a byte); a point outside the
/// picture gives 0. The output has the input's size.
pub fn affine(img: &Image, m: [f64; 6]) -> Image {
    let (w, h, c) = (img.width, img.height, img.channels);
    let mut out = vec![0u8; img.data.len()];
    let (wf, hf) = (w as f64, h as f64);
    let px = |x: usize, y: usize, ch: usize| img.data[(y * w + x) * c + ch] as f64;
    for y in 0..h {
        for x in 0..w {
            let (xo, yo) = (x as f64 + 0.5, y as f64 + 0.5);
            let sx = m[0] * xo + m[1] * yo + m[2];
            let sy = m[3] * xo + m[4] * yo + m[5];
            // Written so that NaN also falls outside.
            if !(sx >= 0.0 && sx < wf && sy >= 0.0 && sy < hf) {
                continue;
            }
            let (sx, sy) = (sx - 0.5, sy - 0.5);
            let (fx, fy) = (sx.floor(), sy.floor());
            let (dx, dy) = (sx - fx, sy - fy);
            let (ix, iy) = (fx as i64, fy as i64);
            let clip_x = |v: i64| v.clamp(0, w as i64 - 1) as usize;
            let (x0, x1) = (clip_x(ix), clip_x(ix + 1));
            let y0 = iy.clamp(0, h as i64 - 1) as usize;
            let y1 = (iy + 1 >= 0 && iy + 1 < h as i64).then_some((iy + 1) as usize);
            for ch in 0..c {
                let lerp = |row: usize| px(x0, row, ch) + (px(x1, row, ch) - px(x0, row, ch)) * dx;
                let top = lerp(y0);
                let bottom = y1.map_or(top, lerp);
                out[(y * w + x) * c + ch] = (top + (bottom - top) * dy) as u8;
            }
        }
    }
    Image {
        data: out,
        ..img.clone_shape()
    }
}

/// Python's `round(v, 15)`, which PIL applies to the rotation's sines and cosines (so that 90
/// degrees gives exact zeros).
fn round15(v: f64) -> f64 {
    (v * 1e15).round() / 1e15
}

/// The affine matrix (in [`affine`]'s form) of PIL's `rotate(degrees)` about the picture's centre.
pub fn rotation_matrix(width: usize, height: usize, degrees: f64) -> [f64; 6] {
    let t = -degrees.rem_euclid(360.0).to_radians();
    let (cos, sin) = (round15(t.cos()), round15(t.sin()));
    let (cx, cy) = (width as f64 / 2.0, height as f64 / 2.0);
    [
        cos,
        sin,
        cos * -cx + sin * -cy + cx,
        -sin,
        cos,
        -sin * -cx + cos * -cy + cy,
    ]
}

/// Rotates counter-clockwise by `degrees` about the centre, keeping the size (PIL's
/// `Image.rotate(degrees, resample=BILINEAR)`): corners that come from outside are black.
/// 0 and 180 degrees, and 90 and 270 on a square, are exact pixel moves, as in PIL.
pub fn rotate(img: &Image, degrees: f64) -> Image {
    let a = degrees.rem_euclid(360.0);
    let (w, h, c) = (img.width, img.height, img.channels);
    let remap = |f: &dyn Fn(usize, usize) -> (usize, usize)| {
        let mut data = Vec::with_capacity(img.data.len());
        for y in 0..h {
            for x in 0..w {
                let (sx, sy) = f(x, y);
                let i = (sy * w + sx) * c;
                data.extend_from_slice(&img.data[i..i + c]);
            }
        }
        Image {
            data,
            ..img.clone_shape()
        }
    };
    if a == 0.0 {
        img.clone()
    } else if a == 180.0 {
        remap(&|x, y| (w - 1 - x, h - 1 - y))
    } else if a == 90.0 && w == h {
        remap(&|x, y| (w - 1 - y, x))
    } else if a == 270.0 && w == h {
        remap(&|x, y| (y, h - 1 - x))
    } else {
        affine(img, rotation_matrix(w, h, a))
    }
}

/// Shears horizontally: output `(x, y)` takes the input at `(x + s y, y)` (about the top-left
/// corner, as Composer's `shear_x`).
pub fn shear_x(img: &Image, s: f64) -> Image {
    affine(img, [1.0, s, 0.0, 0.0, 1.0, 0.0])
}

/// Shears vertically: output `(x, y)` takes the input at `(x, y + s x)`.
pub fn shear_y(img: &Image, s: f64) -> Image {
    affine(img, [1.0, 0.0, 0.0, s, 1.0, 0.0])
}

/// Moves the picture `t` pixels to the left (right for negative `t`): output `(x, y)` takes the
/// input at `(x + t, y)`.
pub fn translate_x(img: &Image, t: f64) -> Image {
    affine(img, [1.0, 0.0, t, 0.0, 1.0, 0.0])
}

/// Moves the picture `t` pixels up (down for negative `t`).
pub fn translate_y(img: &Image, t: f64) -> Image {
    affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, t])
}

// ---------------------------------------------------------------------------------------------
// Enhancements (PIL's ImageEnhance: Image.blend(degenerate, image, factor)).

/// PIL's `Image.blend(degenerate, img, factor)`: `d + factor (i - d)` in single precision,
/// truncated to a byte; clipped to 0..255 when extrapolating (factor outside [0, 1]).
fn blend(degenerate: &[u8], img: &Image, factor: f64) -> Image {
    let a = factor as f32;
    let data = degenerate
        .iter()
        .zip(&img.data)
        .map(|(&d, &i)| {
            let v = d as f32 + a * (i as f32 - d as f32);
            if (0.0..=1.0).contains(&a) {
                v as u8
            } else if v <= 0.0 {
                0
            } else if v >= 255.0 {
                255
            } else {
                v as u8
            }
        })
        .collect();
    Image {
        data,
        ..img.clone_shape()
    }
}

/// Grey levels as PIL's `convert("L")` makes them: `(19595 R + 38470 G + 7471 B + 2^15) >> 16`.
fn grey_levels(img: &Image) -> Vec<u8> {
    if img.channels == 3 {
        img.data
            .chunks_exact(3)
            .map(|p| {
                ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16)
                    as u8
            })
            .collect()
    } else {
        img.data.clone()
    }
}

/// Repeats each grey level into every channel of `img`.
fn spread(grey: &[u8], channels: usize) -> Vec<u8> {
    grey.iter()
        .flat_map(|&g| std::iter::repeat_n(g, channels))
        .collect()
}

/// Saturation (PIL's `ImageEnhance.Color`): 0 gives the grey picture, 1 the picture; the
/// identity on grey pictures.
pub fn color(img: &Image, factor: f64) -> Image {
    if img.channels == 1 {
        return img.clone();
    }
    blend(&spread(&grey_levels(img), img.channels), img, factor)
}

/// Contrast (PIL's `ImageEnhance.Contrast`): 0 gives a flat picture of the mean grey level
/// (rounded), 1 the picture.
pub fn contrast(img: &Image, factor: f64) -> Image {
    let grey = grey_levels(img);
    let sum: u64 = grey.iter().map(|&g| g as u64).sum();
    let mean = (sum as f64 / grey.len().max(1) as f64 + 0.5) as u8;
    blend(&vec![mean; img.data.len()], img, factor)
}

/// Brightness (PIL's `ImageEnhance.Brightness`): 0 gives black, 1 the picture.
pub fn brightness(img: &Image, factor: f64) -> Image {
    blend(&vec![0; img.data.len()], img, factor)
}

/// PIL's `ImageFilter.SMOOTH` (3x3 kernel `[1 1 1; 1 5 1; 1 1 1] / 13`, rounded), which leaves
/// the border pixels as they are; a picture under 3x3 is left whole.
fn smooth(img: &Image) -> Vec<u8> {
    let (w, h, c) = (img.width, img.height, img.channels);
    let mut out = img.data.clone();
    if w < 3 || h < 3 {
        return out;
    }
    let k = [1.0f32 / 13.0, 5.0 / 13.0];
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            for ch in 0..c {
                let p = |xx: usize, yy: usize| img.data[(yy * w + xx) * c + ch] as f32;
                // PIL's order: the row below, the row, the row above; rounding by adding 0.5.
                let mut s = 0.5f32;
                for (yy, centre) in [(y + 1, false), (y, true), (y - 1, false)] {
                    let mid = if centre { k[1] } else { k[0] };
                    s += p(x - 1, yy) * k[0] + p(x, yy) * mid + p(x + 1, yy) * k[0];
                }
                out[(y * w + x) * c + ch] = if s <= 0.0 {
                    0
                } else if s >= 255.0 {
                    255
                } else {
                    s as u8
                };
            }
        }
    }
    out
}

/// Sharpness (PIL's `ImageEnhance.Sharpness`): 0 gives the smoothed picture, 1 the picture,
/// above 1 a sharpened one.
pub fn sharpness(img: &Image, factor: f64) -> Image {
    blend(&smooth(img), img, factor)
}

impl Image {
    /// An empty picture of this one's size and channels, for the operations to fill.
    fn clone_shape(&self) -> Image {
        Image {
            width: self.width,
            height: self.height,
            channels: self.channels,
            data: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Leveled operations: Composer's augmentation_primitives.

/// Composer's augmentation sets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AugmentationSet {
    /// Every operation, with Composer's "symmetric" draw for the enhancements.
    #[default]
    All,
    /// Only those that do not overlap with the ImageNet-C/CIFAR-10-C corruptions (no colour,
    /// contrast, brightness or sharpness).
    Safe,
    /// Every operation, with the original AugMix repository's draw for the enhancements.
    Original,
}

/// One leveled operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    AutoContrast,
    Equalize,
    Posterize,
    Rotate,
    Solarize,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Color,
    Contrast,
    Brightness,
    Sharpness,
    ColorOriginal,
    ContrastOriginal,
    BrightnessOriginal,
    SharpnessOriginal,
}

const ALL: [Op; 13] = [
    Op::AutoContrast,
    Op::Equalize,
    Op::Posterize,
    Op::Rotate,
    Op::Solarize,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateX,
    Op::TranslateY,
    Op::Color,
    Op::Contrast,
    Op::Brightness,
    Op::Sharpness,
];

/// `safe`: `all` without the four enhancements (colour, contrast, brightness, sharpness) that
/// overlap ImageNet-C's corruptions.
const SAFE: &[Op] = ALL.split_at(9).0;

const ORIGINAL: [Op; 13] = [
    Op::AutoContrast,
    Op::Equalize,
    Op::Posterize,
    Op::Rotate,
    Op::Solarize,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateX,
    Op::TranslateY,
    Op::ColorOriginal,
    Op::ContrastOriginal,
    Op::BrightnessOriginal,
    Op::SharpnessOriginal,
];

impl AugmentationSet {
    /// The operations of the set, in Composer's order.
    pub fn ops(self) -> &'static [Op] {
        match self {
            AugmentationSet::All => &ALL,
            AugmentationSet::Safe => SAFE,
            AugmentationSet::Original => &ORIGINAL,
        }
    }

    /// One operation of the set, uniformly (`np.random.choice`).
    pub fn choose(self, rng: &mut dyn RngCore) -> Op {
        let ops = self.ops();
        ops[rng.random_range(0..ops.len())]
    }
}

/// numpy's `uniform(lo, hi)`: `lo + (hi - lo) u`, also when `hi < lo`.
fn uniform(rng: &mut dyn RngCore, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// Composer's `_sample_level`: a level uniform in [0.1, severity].
fn sample_level(rng: &mut dyn RngCore, severity: f64) -> f64 {
    uniform(rng, 0.1, severity)
}

/// Composer's `_int_parameter`: `int(level * max / 10)`.
fn int_parameter(level: f64, max: f64) -> i64 {
    (level * max / 10.0) as i64
}

/// Composer's `_float_parameter`.
fn float_parameter(level: f64, max: f64) -> f64 {
    level * max / 10.0
}

/// A random sign (`uniform() > 0.5` flips it).
fn random_sign(rng: &mut dyn RngCore, v: f64) -> f64 {
    if rng.random::<f64>() > 0.5 {
        -v
    } else {
        v
    }
}

/// Composer's `_symmetric_sample`: with even odds a factor in [1, severity] or in
/// [1 - 0.09 severity, 1], so that weakening and strengthening are equally likely.
fn symmetric_factor(rng: &mut dyn RngCore, severity: f64) -> f64 {
    if rng.random::<f64>() > 0.5 {
        uniform(rng, 1.0, severity)
    } else {
        uniform(rng, 1.0 - 0.09 * severity, 1.0)
    }
}

/// The original AugMix draw of an enhancement factor: `level * 1.8 / 10 + 0.1`.
fn original_factor(rng: &mut dyn RngCore, severity: f64) -> f64 {
    float_parameter(sample_level(rng, severity), 1.8) + 0.1
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::AutoContrast => "autocontrast",
            Op::Equalize => "equalize",
            Op::Posterize => "posterize",
            Op::Rotate => "rotate",
            Op::Solarize => "solarize",
            Op::ShearX => "shear_x",
            Op::ShearY => "shear_y",
            Op::TranslateX => "translate_x",
            Op::TranslateY => "translate_y",
            Op::Color => "color",
            Op::Contrast => "contrast",
            Op::Brightness => "brightness",
            Op::Sharpness => "sharpness",
            Op::ColorOriginal => "color_original",
            Op::ContrastOriginal => "contrast_original",
            Op::BrightnessOriginal => "brightness_original",
            Op::SharpnessOriginal => "sharpness_original",
        }
    }

    /// Applies the operation at `severity` (0..=10), drawing its parameter as Composer does:
    /// - posterize: `4 - int(l * 4 / 10)` bits; solarize: threshold `256 - int(l * 256 / 10)`;
    /// - rotate: `int(l * 30 / 10)` degrees; shear: `l * 0.3 / 10`; translate:
    ///   `int(l * side / 3 / 10)` pixels; each with a random sign;
    /// - color, contrast, brightness, sharpness: the symmetric factor draw (brightness's factor
    ///   above 1 scaled by 0.75); the `_original` ones: `l * 1.8 / 10 + 0.1`;
    ///
    /// with `l` uniform in [0.1, severity].
    pub fn apply(self, img: &Image, severity: f64, rng: &mut dyn RngCore) -> Image {
        match self {
            Op::AutoContrast => autocontrast(img),
            Op::Equalize => equalize(img),
            Op::Posterize => {
                let l = int_parameter(sample_level(rng, severity), 4.0);
                posterize(img, (4 - l).clamp(0, 8) as u32)
            }
            Op::Rotate => {
                let d = int_parameter(sample_level(rng, severity), 30.0) as f64;
                rotate(img, random_sign(rng, d))
            }
            Op::Solarize => {
                let l = int_parameter(sample_level(rng, severity), 256.0);
                solarize(img, (256 - l).clamp(0, 256) as u32)
            }
            Op::ShearX => {
                let s = float_parameter(sample_level(rng, severity), 0.3);
                shear_x(img, random_sign(rng, s))
            }
            Op::ShearY => {
                let s = float_parameter(sample_level(rng, severity), 0.3);
                shear_y(img, random_sign(rng, s))
            }
            Op::TranslateX => {
                let t = int_parameter(sample_level(rng, severity), img.width as f64 / 3.0);
                translate_x(img, random_sign(rng, t as f64))
            }
            Op::TranslateY => {
                let t = int_parameter(sample_level(rng, severity), img.height as f64 / 3.0);
                translate_y(img, random_sign(rng, t as f64))
            }
            Op::Color => color(img, symmetric_factor(rng, severity)),
            Op::Contrast => contrast(img, symmetric_factor(rng, severity)),
            Op::Brightness => {
                let f = symmetric_factor(rng, severity);
                brightness(img, if f > 1.0 { f * 0.75 } else { f })
            }
            Op::Sharpness => sharpness(img, symmetric_factor(rng, severity)),
            Op::ColorOriginal => color(img, original_factor(rng, severity)),
            Op::ContrastOriginal => contrast(img, original_factor(rng, severity)),
            Op::BrightnessOriginal => brightness(img, original_factor(rng, severity)),
            Op::SharpnessOriginal => sharpness(img, original_factor(rng, severity)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grey(w: usize, h: usize, f: impl Fn(usize, usize) -> u8) -> Image {
        let data = (0..h)
            .flat_map(|y| (0..w).map(move |x| (x, y)))
            .map(|(x, y)| f(x, y));
        Image::new(w, h, 1, data.collect())
    }

    fn rgb(w: usize, h: usize, seed: u64) -> Image {
        let mut r = crate::rng::stream(seed, "pixels");
        Image::new(w, h, 3, (0..w * h * 3).map(|_| r.random::<u8>()).collect())
    }

    #[test]
    fn posterize_keeps_the_high_bits_and_solarize_inverts_above_the_threshold() {
        let ramp = grey(16, 16, |x, y| (y * 16 + x) as u8);
        let p = posterize(&ramp, 2);
        assert!(p.data.iter().all(|v| v & 0b0011_1111 == 0));
        assert_eq!(p.data[0xC5], 0xC0);
        assert_eq!(posterize(&ramp, 8), ramp);
        assert!(posterize(&ramp, 0).data.iter().all(|&v| v == 0));
        let s = solarize(&ramp, 128);
        assert_eq!((s.data[127], s.data[128], s.data[255]), (127, 127, 0));
        assert_eq!(solarize(&ramp, 256), ramp);
        assert!(solarize(&ramp, 0)
            .data
            .iter()
            .zip(&ramp.data)
            .all(|(a, b)| *a == 255 - b));
    }

    #[test]
    fn autocontrast_stretches_each_channel_to_the_full_range() {
        // 10..=95: the scale is 3, exactly.
        let img = grey(86, 1, |x, _| 10 + x as u8);
        let a = autocontrast(&img);
        assert_eq!(a.data.iter().min(), Some(&0));
        assert_eq!(a.data.iter().max(), Some(&255));
        assert!(a.data.iter().enumerate().all(|(i, &v)| v as usize == 3 * i));
        // 50..=149: PIL's table is int(i * 255 / 99 - 50 * 255 / 99), truncated in floating
        // point, so that 149 maps to 254 (PIL 13 gives the same).
        let img = grey(10, 10, |x, y| 50 + (x + 10 * y) as u8);
        let a = autocontrast(&img);
        assert_eq!(a.data.iter().min(), Some(&0));
        assert_eq!(a.data.iter().max(), Some(&254));
        assert_eq!(a.data[1], (255.0 / 99.0) as u8);
        // RGB: each channel stretched on its own; a constant channel stays.
        let c = Image::new(
            2,
            1,
            3,
            vec![10, 7, 5, 20, 7, 90], // R 10..20, G constant 7, B 5..90
        );
        assert_eq!(autocontrast(&c).data, vec![0, 7, 0, 255, 7, 255]);
    }

    #[test]
    fn equalize_spreads_a_narrow_ramp_evenly_over_the_range() {
        // Values 0..63, 85 pixels each: PIL's step is 63 * 85 / 255 = 21, and value i maps to
        // (10 + 85 i) / 21, i.e. 64 distinct levels about 4 apart from 0 to 255.
        let img = grey(85, 64, |_, y| y as u8);
        let e = equalize(&img);
        let mut levels: Vec<u8> = e.data.clone();
        levels.dedup();
        assert_eq!(levels.len(), 64);
        assert_eq!((levels[0], levels[63]), (0, 255));
        assert!(levels.windows(2).all(|w| (4..=5).contains(&(w[1] - w[0]))));
        let hist = histograms(&e);
        assert!(hist[0].iter().all(|&n| n == 0 || n == 85), "flat histogram");
        // A full, flat ramp is already equalised; a constant picture is left alone.
        let full = grey(256, 2, |x, _| x as u8);
        assert_eq!(equalize(&full), full);
        let flat = grey(5, 5, |_, _| 9);
        assert_eq!(equalize(&flat), flat);
    }

    #[test]
    fn rotate_by_quarter_turns_moves_pixels_exactly() {
        let img = rgb(5, 5, 1);
        let r = rotate(&img, 90.0);
        // Counter-clockwise: output (x, y) is input (w - 1 - y, x), i.e. the transpose flipped
        // upside down.
        for y in 0..5 {
            for x in 0..5 {
                let o = (y * 5 + x) * 3;
                let i = (x * 5 + (4 - y)) * 3;
                assert_eq!(r.data[o..o + 3], img.data[i..i + 3]);
            }
        }
        // The bilinear path agrees with the fast path at 90 degrees (PIL rounds the matrix).
        assert_eq!(affine(&img, rotation_matrix(5, 5, 90.0)), r);
        assert_eq!(rotate(&rotate(&img, 90.0), 270.0), img);
        assert_eq!(rotate(&rotate(&img, 180.0), -180.0), img);
        assert_eq!(rotate(&img, 360.0), img);
        // Off the quarter turns, corners come from outside: black.
        let white = grey(9, 9, |_, _| 255);
        let r = rotate(&white, 30.0);
        assert_eq!(r.data[0], 0);
        assert_eq!(r.data[4 * 9 + 4], 255);
    }

    #[test]
    fn shifts_and_shears_move_pixels_and_fill_with_black() {
        let img = rgb(6, 4, 2);
        let t = translate_x(&img, 2.0);
        for y in 0..4 {
            for x in 0..6 {
                let o = (y * 6 + x) * 3;
                if x + 2 < 6 {
                    let i = (y * 6 + x + 2) * 3;
                    assert_eq!(t.data[o..o + 3], img.data[i..i + 3]);
                } else {
                    assert_eq!(t.data[o..o + 3], [0, 0, 0]);
                }
            }
        }
        let t = translate_y(&img, -1.0);
        assert_eq!(t.data[..18], [0; 18]);
        assert_eq!(t.data[18..], img.data[..72 - 18]);
        // Zero magnitude: identities.
        for op in [shear_x, shear_y, translate_x, translate_y, rotate] {
            assert_eq!(op(&img, 0.0), img);
        }
        // A shear by 1 moves row y by y pixels (bilinear at whole pixels is exact).
        let s = shear_x(&img, 1.0);
        let (y, x) = (2, 1);
        // Output centre (1.5, 2.5) samples the input at (1.5 + 2.5, 2.5): halfway between the
        // centres of columns 3 and 4 of row 2.
        let o = (y * 6 + x) * 3;
        for ch in 0..3 {
            let a = img.data[(y * 6 + 3) * 3 + ch] as f64;
            let b = img.data[(y * 6 + 4) * 3 + ch] as f64;
            assert_eq!(s.data[o + ch], (a + (b - a) * 0.5) as u8);
        }
    }

    #[test]
    fn enhancements_are_identities_at_one_and_degenerate_at_zero() {
        let img = rgb(7, 6, 3);
        for op in [color, contrast, brightness, sharpness] {
            assert_eq!(op(&img, 1.0), img);
        }
        assert!(brightness(&img, 0.0).data.iter().all(|&v| v == 0));
        let c = contrast(&img, 0.0);
        assert!(c.data.iter().all(|&v| v == c.data[0]));
        let g = color(&img, 0.0);
        assert!(g.data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
        // Extrapolation clips: a factor of 10 leaves only 0 and 255 for brightness above 25.
        assert!(brightness(&img, 10.0)
            .data
            .iter()
            .zip(&img.data)
            .all(|(o, i)| if *i >= 26 { *o == 255 } else { *o == i * 10 }));
        // Grey pictures: colour is the identity, the others work.
        let gimg = grey(6, 6, |x, y| if (x + y) % 2 == 0 { 200 } else { 10 });
        assert_eq!(color(&gimg, 0.0), gimg);
        assert_ne!(sharpness(&gimg, 0.0), gimg);
        // Smoothing keeps the border and a constant picture.
        let s = sharpness(&gimg, 0.0);
        assert_eq!(s.data[..6], gimg.data[..6]);
        let flat = grey(5, 5, |_, _| 100);
        assert_eq!(sharpness(&flat, 3.0), flat);
    }

    #[test]
    fn leveled_ops_keep_the_shape_and_draw_deterministically() {
        for (img, seed) in [(rgb(12, 9, 4), 1), (grey(28, 28, |x, y| (x * y) as u8), 2)] {
            for set in [
                AugmentationSet::All,
                AugmentationSet::Safe,
                AugmentationSet::Original,
            ] {
                for &op in set.ops() {
                    for severity in [0.0, 3.0, 9.0, 10.0] {
                        let mut r1 = crate::rng::item_stream(seed, op.name(), 0);
                        let mut r2 = crate::rng::item_stream(seed, op.name(), 0);
                        let a = op.apply(&img, severity, &mut r1);
                        assert_eq!(
                            (a.width, a.height, a.channels, a.data.len()),
                            (img.width, img.height, img.channels, img.data.len())
                        );
                        assert_eq!(a, op.apply(&img, severity, &mut r2));
                    }
                }
            }
        }
        assert_eq!(AugmentationSet::Safe.ops().len(), 9);
        assert_eq!(AugmentationSet::All.ops().len(), 13);
    }
}
