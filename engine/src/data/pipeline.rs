//! Per-sample transforms in torchvision's vocabulary, planned before decoding and applied in one
//! resampling.
//!
//! A list of transforms (`random_resized_crop`, `resize`, `center_crop`, `random_crop`,
//! `random_horizontal_flip`) is first walked on the image's stored size only: each step moves a
//! window over the source picture and sets the size it will have. Only then is the file decoded,
//! at the smallest DCT reduction that still keeps as many pixels as the output needs, and the
//! window resampled once (antialiased bilinear, as PIL's) straight to the output size. So a
//! 500x375 JPEG cropped to 112 pixels never exists at full size in memory, and a whole recipe of
//! transforms costs one resize.
//!
//! Random draws come from the generator the loader keys by (seed, epoch, sample position), in the
//! order of the list, and never depend on the decoded pixels: a sample is the same whatever the
//! thread that makes it, and a resumed run makes the same samples.
//!
//! Training pipelines may also carry per-sample augmentations of the resampled 8-bit picture
//! (RandAugment, AugMix: [`super::augment`]), handed over by algorithms; they run after the
//! resampling, in recipe order, before the flip and normalisation, and draw from the same
//! generator after the transforms.

use super::augment::SampleAugment;
use super::image::{decode, Image, Sample, REDUCTIONS};
use crate::error::{Error, Result};
use fast_image_resize as fir;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A side length, or `[height, width]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Square(usize),
    Rect([usize; 2]),
}

impl Size {
    /// `[height, width]`.
    pub fn hw(self) -> [usize; 2] {
        match self {
            Size::Square(s) => [s, s],
            Size::Rect(r) => r,
        }
    }
}

fn default_scale() -> [f64; 2] {
    [0.08, 1.0]
}
fn default_ratio() -> [f64; 2] {
    [3.0 / 4.0, 4.0 / 3.0]
}
fn half() -> f64 {
    0.5
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomResizedCrop {
    pub size: Size,
    /// Range of the crop's area as a fraction of the image's.
    #[serde(default = "default_scale")]
    pub scale: [f64; 2],
    /// Range of the crop's aspect ratio (width / height).
    #[serde(default = "default_ratio")]
    pub ratio: [f64; 2],
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomCrop {
    /// Output size; the input's size when absent.
    #[serde(default)]
    pub size: Option<Size>,
    /// Zero padding added on each side before cropping.
    #[serde(default)]
    pub padding: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flip {
    #[serde(default = "half")]
    pub p: f64,
}

/// One per-sample transform, with torchvision's name and defaults. In YAML, `{name: value}`, or
/// the bare name for one whose settings all have defaults (`random_horizontal_flip`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "Spec")]
pub enum Transform {
    /// A crop of random area (`scale`) and aspect (`ratio`), resized to `size`; after 10 draws
    /// that do not fit, the central crop of the nearest allowed aspect.
    RandomResizedCrop(RandomResizedCrop),
    /// Resizes so that the shorter side is this long (keeps the aspect ratio).
    Resize(usize),
    /// The central square of this side (zero padding where the image is smaller).
    CenterCrop(usize),
    /// Pads with zeros, then crops at a random offset.
    RandomCrop(RandomCrop),
    /// Mirrors left-right with probability `p` (0.5).
    RandomHorizontalFlip(Flip),
}

/// How a transform is written: a bare name, or `{name: settings}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Spec {
    Bare(String),
    Full(Tagged),
}

/// [`Transform`]'s derived form, for `{name: settings}`.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Tagged {
    RandomResizedCrop(RandomResizedCrop),
    Resize(usize),
    CenterCrop(usize),
    RandomCrop(RandomCrop),
    RandomHorizontalFlip(Flip),
}

impl TryFrom<Spec> for Transform {
    type Error = String;
    fn try_from(s: Spec) -> std::result::Result<Self, String> {
        Ok(match s {
            Spec::Bare(name) => match name.as_str() {
                "random_horizontal_flip" => Transform::RandomHorizontalFlip(Flip { p: 0.5 }),
                "random_crop" => Transform::RandomCrop(RandomCrop {
                    size: None,
                    padding: 0,
                }),
                other => {
                    return Err(format!(
                        "`{other}` is not a transform that works without settings; the transforms: random_resized_crop: {{size: 224}}, resize: 256, center_crop: 224, random_crop: {{padding: 4}}, random_horizontal_flip"
                    ))
                }
            },
            Spec::Full(Tagged::RandomResizedCrop(c)) => Transform::RandomResizedCrop(c),
            Spec::Full(Tagged::Resize(n)) => Transform::Resize(n),
            Spec::Full(Tagged::CenterCrop(n)) => Transform::CenterCrop(n),
            Spec::Full(Tagged::RandomCrop(c)) => Transform::RandomCrop(c),
            Spec::Full(Tagged::RandomHorizontalFlip(f)) => Transform::RandomHorizontalFlip(f),
        })
    }
}

/// A window over the source picture (in its stored pixels) and the size it will be resampled to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct View {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
    /// Output width and height.
    pub out: [usize; 2],
    /// Mirror the output left-right.
    pub flip: bool,
}

impl View {
    pub fn whole(width: usize, height: usize) -> View {
        View {
            x: 0.0,
            y: 0.0,
            w: width as f64,
            h: height as f64,
            out: [width, height],
            flip: false,
        }
    }

    /// Takes the window `[left, left + cw) x [top, top + ch)` of the current output.
    fn crop(&mut self, left: f64, top: f64, cw: usize, ch: usize) {
        let (sx, sy) = (self.w / self.out[0] as f64, self.h / self.out[1] as f64);
        // Seen mirrored, a window's left edge is measured from the source's right.
        let left = if self.flip {
            self.out[0] as f64 - left - cw as f64
        } else {
            left
        };
        self.x += left * sx;
        self.y += top * sy;
        self.w = cw as f64 * sx;
        self.h = ch as f64 * sy;
        self.out = [cw, ch];
    }
}

/// The output `[height, width]` of a list of transforms on inputs of `input` (`None`: inputs vary
/// in size); `None` when the output size still depends on the image.
pub fn output_size(list: &[Transform], input: Option<[usize; 2]>) -> Option<[usize; 2]> {
    list.iter().fold(input, |size, t| match t {
        Transform::RandomResizedCrop(c) => Some(c.size.hw()),
        Transform::Resize(n) => size.map(|[h, w]| {
            let (ow, oh) = resized(w, h, *n);
            [oh, ow]
        }),
        Transform::CenterCrop(c) => Some([*c, *c]),
        Transform::RandomCrop(c) => c.size.map(Size::hw).or(size),
        Transform::RandomHorizontalFlip(_) => size,
    })
}

/// Checks a list's values; `key` names it in errors.
pub fn validate(list: &[Transform], key: &str) -> Result<()> {
    for (i, t) in list.iter().enumerate() {
        let at = format!("{key}[{i}]");
        let bad = |m: &str| Err(Error::recipe(&at, m));
        match t {
            Transform::RandomResizedCrop(c) => {
                if c.size.hw().contains(&0) {
                    return bad("size must be positive");
                }
                let [a, b] = c.scale;
                if !(a > 0.0 && a <= b && b <= 1.0) {
                    return bad("scale must be [min, max] with 0 < min <= max <= 1");
                }
                let [a, b] = c.ratio;
                if !(a > 0.0 && a <= b && b.is_finite()) {
                    return bad("ratio must be [min, max] with 0 < min <= max");
                }
            }
            Transform::Resize(0) | Transform::CenterCrop(0) => return bad("size must be positive"),
            Transform::RandomCrop(c) if c.size.is_some_and(|s| s.hw().contains(&0)) => {
                return bad("size must be positive")
            }
            Transform::RandomHorizontalFlip(f) if !(0.0..=1.0).contains(&f.p) => {
                return bad("p must be a probability in [0, 1]")
            }
            _ => {}
        }
    }
    Ok(())
}

/// torchvision's `Resize(n)`: the shorter side becomes `n`, the longer `int(n * long / short)`.
fn resized(w: usize, h: usize, n: usize) -> (usize, usize) {
    if w <= h {
        (n, ((n * h) as f64 / w as f64) as usize)
    } else {
        (((n * w) as f64 / h as f64) as usize, n)
    }
}

/// torchvision's `RandomResizedCrop.get_params` on a `width` x `height` input: `(left, top, w, h)`.
pub fn random_resized_crop_box(
    width: usize,
    height: usize,
    scale: [f64; 2],
    ratio: [f64; 2],
    rng: &mut impl Rng,
) -> (usize, usize, usize, usize) {
    let area = (width * height) as f64;
    let (lr0, lr1) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = area * uniform(rng, scale[0], scale[1]);
        let aspect = uniform(rng, lr0, lr1).exp();
        let w = (target * aspect).sqrt().round_ties_even() as usize;
        let h = (target / aspect).sqrt().round_ties_even() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return (left, top, w, h);
        }
    }
    // Fallback: the central crop of the allowed aspect nearest the image's.
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio[0] {
        (
            width,
            ((width as f64 / ratio[0]).round_ties_even() as usize).min(height),
        )
    } else if in_ratio > ratio[1] {
        (
            ((height as f64 * ratio[1]).round_ties_even() as usize).min(width),
            height,
        )
    } else {
        (width, height)
    };
    ((width - w) / 2, (height - h) / 2, w, h)
}

fn uniform(rng: &mut impl Rng, a: f64, b: f64) -> f64 {
    if a < b {
        rng.random_range(a..b)
    } else {
        a
    }
}

/// Walks the transforms over a `width` x `height` image, drawing from `rng` in list order.
pub fn plan(list: &[Transform], width: usize, height: usize, rng: &mut impl Rng) -> View {
    let mut v = View::whole(width, height);
    for t in list {
        let [ow, oh] = v.out;
        match t {
            Transform::RandomResizedCrop(c) => {
                let (l, t, w, h) = random_resized_crop_box(ow, oh, c.scale, c.ratio, rng);
                v.crop(l as f64, t as f64, w, h);
                let [sh, sw] = c.size.hw();
                v.out = [sw, sh];
            }
            Transform::Resize(n) => {
                let (w, h) = resized(ow, oh, *n);
                v.out = [w, h];
            }
            Transform::CenterCrop(c) => {
                let off = |o: usize| ((o as f64 - *c as f64) / 2.0).round_ties_even();
                v.crop(off(ow), off(oh), *c, *c);
            }
            Transform::RandomCrop(c) => {
                let [th, tw] = c.size.map_or([oh, ow], Size::hw);
                let p = c.padding as i64;
                let span = |o: usize, t: usize| (o as i64 + 2 * p - t as i64).max(0);
                let top = rng.random_range(0..=span(oh, th)) - p;
                let left = rng.random_range(0..=span(ow, tw)) - p;
                v.crop(left as f64, top as f64, tw, th);
            }
            Transform::RandomHorizontalFlip(f) => {
                if f.p > 0.0 && rng.random_bool(f.p.min(1.0)) {
                    v.flip = !v.flip;
                }
            }
        }
    }
    v
}

/// The DCT reduction to decode a `width` x `height` picture at for `view`: the largest that
/// keeps at least the output's pixels across the window.
pub fn reduction(view: &View) -> usize {
    REDUCTIONS
        .iter()
        .rev()
        .copied()
        .find(|&r| {
            view.w / r as f64 >= view.out[0] as f64 && view.h / r as f64 >= view.out[1] as f64
        })
        .unwrap_or(1)
}

/// What the pipeline does with each sample.
#[derive(Clone)]
pub struct Pipeline {
    pub transforms: Vec<Transform>,
    /// Channels of the output (1 or 3): files are converted to it.
    pub channels: usize,
    /// Per-channel mean and std to normalise with; `None` leaves values in [0, 1].
    pub normalize: Option<(Vec<f32>, Vec<f32>)>,
    /// Decode JPEGs at a DCT reduction when the output is at most half the window.
    pub reduced_decode: bool,
    /// Augmentations of the resampled 8-bit picture (RandAugment, AugMix), in order, after the
    /// transforms' draws and before the flip and normalisation; they draw from the sample's
    /// generator after the transforms.
    pub augments: Vec<SampleAugment>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("transforms", &self.transforms)
            .field("channels", &self.channels)
            .field("normalize", &self.normalize)
            .field("reduced_decode", &self.reduced_decode)
            .field("augments", &self.augments.len())
            .finish()
    }
}

/// Reusable per-thread buffers.
#[derive(Default)]
pub struct Scratch {
    resizer: fir::Resizer,
}

impl Pipeline {
    /// Makes one sample: transforms `sample` (drawing from `rng`), resizes the result to `size`
    /// (`[height, width]`) when given, and writes it channel-major into `out`.
    pub fn run(
        &self,
        sample: Sample,
        size: Option<[usize; 2]>,
        rng: &mut impl Rng,
        what: &Path,
        scratch: &mut Scratch,
        out: &mut [f32],
    ) -> Result<()> {
        let mut planned = None;
        let mut choose = |w: usize, h: usize| {
            let mut v = plan(&self.transforms, w, h, rng);
            if let Some([sh, sw]) = size {
                v.out = [sw, sh];
            }
            planned = Some(v);
            if self.reduced_decode {
                reduction(&v)
            } else {
                1
            }
        };
        let (img, stored) = match sample {
            Sample::Decoded(img) => {
                choose(img.width, img.height);
                let stored = [img.width, img.height];
                (img.with_channels(self.channels), stored)
            }
            Sample::Encoded(bytes) => decode(&bytes, self.channels, what, &mut choose)?,
        };
        let mut v = planned.ok_or_else(|| {
            Error::msg(format!(
                "{}: the decoder never reported the image's size",
                what.display()
            ))
        })?;
        // Map the window from stored pixels into the (possibly reduced) decoded ones.
        let (fx, fy) = (
            img.width as f64 / stored[0] as f64,
            img.height as f64 / stored[1] as f64,
        );
        v.x *= fx;
        v.w *= fx;
        v.y *= fy;
        v.h *= fy;
        let [ow, oh] = v.out;
        if out.len() != ow * oh * self.channels {
            return Err(Error::msg(format!(
                "{}: the transforms make {ow}x{oh} images, but the batch holds {} values per sample",
                what.display(),
                out.len()
            )));
        }
        let mut pixels = resample(&img, &v, scratch)?;
        if !self.augments.is_empty() {
            pixels = self.augment(pixels, ow, oh, rng, what)?;
        }
        self.write(&pixels, ow, oh, v.flip, out);
        Ok(())
    }

    /// Runs the augmentations, in order, on the `w` x `h` resampled picture.
    fn augment(
        &self,
        pixels: Vec<u8>,
        w: usize,
        h: usize,
        rng: &mut impl Rng,
        what: &Path,
    ) -> Result<Vec<u8>> {
        let mut img = Image::new(w, h, self.channels, pixels);
        for f in &self.augments {
            f(&mut img, rng)?;
            if (img.width, img.height, img.channels) != (w, h, self.channels)
                || img.data.len() != w * h * self.channels
            {
                return Err(Error::msg(format!(
                    "{}: a per-sample augmentation changed the {w}x{h}x{} picture into {}x{}x{} ({} bytes); augmentations must keep the size",
                    what.display(),
                    self.channels,
                    img.width,
                    img.height,
                    img.channels,
                    img.data.len()
                )));
            }
        }
        Ok(img.data)
    }

    /// Interleaved bytes to channel-major floats in [0, 1], mirrored if asked, normalised.
    fn write(&self, px: &[u8], w: usize, h: usize, flip: bool, out: &mut [f32]) {
        let c = self.channels;
        for ch in 0..c {
            // Each byte's value, computed once per channel with the exact arithmetic of
            // `(v / 255 - mean) / std`.
            let lut: [f32; 256] = std::array::from_fn(|v| {
                let x = v as f32 / 255.0;
                match &self.normalize {
                    Some((m, s)) => (x - m[ch.min(m.len() - 1)]) / s[ch.min(s.len() - 1)],
                    None => x,
                }
            });
            let plane = &mut out[ch * h * w..(ch + 1) * h * w];
            for (y, dst) in plane.chunks_exact_mut(w).enumerate() {
                let row = &px[y * w * c..(y + 1) * w * c];
                let src = row.iter().skip(ch).step_by(c);
                if flip {
                    dst.iter_mut()
                        .rev()
                        .zip(src)
                        .for_each(|(d, &v)| *d = lut[v as usize]);
                } else {
                    dst.iter_mut()
                        .zip(src)
                        .for_each(|(d, &v)| *d = lut[v as usize]);
                }
            }
        }
    }
}

/// The window of `img` resampled to the view's output size, interleaved.
fn resample(img: &Image, v: &View, scratch: &mut Scratch) -> Result<Vec<u8>> {
    let [ow, oh] = v.out;
    let c = img.channels;
    let whole = |x: f64| (x - x.round()).abs() < 1e-9;
    let inside = v.x >= -1e-9
        && v.y >= -1e-9
        && v.x + v.w <= img.width as f64 + 1e-9
        && v.y + v.h <= img.height as f64 + 1e-9;
    let copy = whole(v.x)
        && whole(v.y)
        && (v.w - ow as f64).abs() < 1e-9
        && (v.h - oh as f64).abs() < 1e-9;
    if copy {
        // A crop (with zero padding where it leaves the image), no resampling.
        let (x0, y0) = (v.x.round() as i64, v.y.round() as i64);
        return Ok(window(img, x0, y0, ow, oh));
    }
    let (src, x, y) = if inside {
        (None, v.x, v.y)
    } else {
        // Pad first: the window's bounding box, zeros outside the image.
        let (x0, y0) = (v.x.floor() as i64, v.y.floor() as i64);
        let (x1, y1) = ((v.x + v.w).ceil() as i64, (v.y + v.h).ceil() as i64);
        let (bw, bh) = ((x1 - x0) as usize, (y1 - y0) as usize);
        let data = window(img, x0, y0, bw, bh);
        (
            Some(Image::new(bw, bh, c, data)),
            v.x - x0 as f64,
            v.y - y0 as f64,
        )
    };
    let src = src.as_ref().unwrap_or(img);
    let kind = if c == 1 {
        fir::PixelType::U8
    } else {
        fir::PixelType::U8x3
    };
    let fail = |e: String| Error::msg(format!("resizing failed: {e}"));
    let src_img = fir::images::ImageRef::new(src.width as u32, src.height as u32, &src.data, kind)
        .map_err(|e| fail(e.to_string()))?;
    let mut dst = fir::images::Image::new(ow as u32, oh as u32, kind);
    let opts = fir::ResizeOptions::new()
        .resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Bilinear))
        .crop(x, y, v.w, v.h);
    scratch
        .resizer
        .resize(&src_img, &mut dst, &opts)
        .map_err(|e| fail(e.to_string()))?;
    Ok(dst.into_vec())
}

/// The `w` x `h` window at `(x0, y0)` of `img`, zeros outside it.
fn window(img: &Image, x0: i64, y0: i64, w: usize, h: usize) -> Vec<u8> {
    let c = img.channels;
    let mut out = vec![0u8; w * h * c];
    for y in 0..h {
        let sy = y0 + y as i64;
        if sy < 0 || sy >= img.height as i64 {
            continue;
        }
        let (a, b) = (x0.max(0), (x0 + w as i64).min(img.width as i64));
        if a >= b {
            continue;
        }
        let src = &img.data[(sy as usize * img.width + a as usize) * c
            ..(sy as usize * img.width + b as usize) * c];
        let d = (y * w + (a - x0) as usize) * c;
        out[d..d + src.len()].copy_from_slice(src);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::image::encode_jpeg;

    fn list(yaml: &str) -> Vec<Transform> {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn run(p: &Pipeline, img: Image, seed: u64) -> Vec<f32> {
        let [c, h, w] = [p.channels, 0, 0];
        let _ = (h, w);
        let v = plan(
            &p.transforms,
            img.width,
            img.height,
            &mut crate::rng::stream(seed, "t"),
        );
        let [ow, oh] = v.out;
        let mut out = vec![0.0; c * ow * oh];
        p.run(
            Sample::Decoded(img),
            None,
            &mut crate::rng::stream(seed, "t"),
            Path::new("x"),
            &mut Scratch::default(),
            &mut out,
        )
        .unwrap();
        out
    }

    fn pipeline(yaml: &str, channels: usize) -> Pipeline {
        Pipeline {
            transforms: list(yaml),
            channels,
            normalize: None,
            reduced_decode: true,
            augments: Vec::new(),
        }
    }

    #[test]
    fn yaml_forms_parse_and_sizes_follow() {
        let t = list("[{random_resized_crop: {size: 224}}, random_horizontal_flip, {random_horizontal_flip: {p: 0.2}}]");
        assert_eq!(t.len(), 3);
        assert_eq!(output_size(&t, None), Some([224, 224]));
        let e = list("[{resize: 256}, {center_crop: 224}]");
        assert_eq!(output_size(&e, None), Some([224, 224]));
        assert_eq!(output_size(&e[..1], Some([375, 500])), Some([256, 341]));
        assert_eq!(output_size(&e[..1], None), None);
        assert_eq!(
            output_size(&list("[{random_crop: {padding: 4}}]"), Some([28, 28])),
            Some([28, 28])
        );
        let bad: std::result::Result<Vec<Transform>, _> = serde_yaml::from_str("[resize]");
        assert!(bad.unwrap_err().to_string().contains("not a transform"));
        assert!(validate(
            &list("[{random_resized_crop: {size: 8, scale: [0.5, 0.1]}}]"),
            "k"
        )
        .is_err());
    }

    #[test]
    fn random_resized_crop_stays_within_area_and_aspect_ranges() {
        let mut rng = crate::rng::stream(3, "rrc");
        for (w, h) in [(500, 375), (375, 500), (64, 64)] {
            let mut areas = Vec::new();
            for _ in 0..2000 {
                let (l, t, cw, ch) =
                    random_resized_crop_box(w, h, [0.08, 1.0], [0.75, 4.0 / 3.0], &mut rng);
                assert!(l + cw <= w && t + ch <= h && cw > 0 && ch > 0);
                let area = (cw * ch) as f64 / (w * h) as f64;
                let aspect = cw as f64 / ch as f64;
                // Rounding to whole pixels moves both by a pixel's worth at most.
                let tol = 2.0 / ch.min(cw) as f64;
                assert!((0.08 - tol..=1.0).contains(&area), "area {area}");
                assert!(
                    (0.75 * (1.0 - tol) - 1e-9..=4.0 / 3.0 * (1.0 + tol) + 1e-9).contains(&aspect),
                    "aspect {aspect}"
                );
                areas.push(area);
            }
            // Uniform in [0.08, 1] until the crop does not fit: the mean lies well inside.
            let mean = areas.iter().sum::<f64>() / areas.len() as f64;
            assert!((0.35..0.6).contains(&mean), "{w}x{h}: mean area {mean}");
        }
        // An image far outside the ratio range falls back to the central crop of the nearest ratio.
        let (l, t, cw, ch) =
            random_resized_crop_box(1000, 10, [0.9, 1.0], [0.75, 4.0 / 3.0], &mut rng);
        assert_eq!((cw, ch), (13, 10));
        assert_eq!((l, t), ((1000 - 13) / 2, 0));
    }

    #[test]
    fn resize_then_center_crop_gives_hand_computed_pixels() {
        // 8x4: left half 0, right half 200. Resize(2) halves it to 4x2 with PIL's bilinear
        // filter (support 2 source pixels each side): columns 0, 25, 175, 200. CenterCrop(2)
        // keeps columns 1 and 2.
        let data = (0..32).map(|i| if i % 8 < 4 { 0 } else { 200 }).collect();
        let img = Image::new(8, 4, 1, data);
        let out = run(&pipeline("[{resize: 2}, {center_crop: 2}]", 1), img, 0);
        let px: Vec<f32> = out.iter().map(|v| v * 255.0).collect();
        for (got, want) in px.iter().zip([25.0, 175.0, 25.0, 175.0]) {
            assert!((got - want).abs() <= 1.0, "{px:?}");
        }
        // A crop of a constant picture is that constant, whatever the scale.
        let img = Image::new(37, 23, 3, vec![77; 37 * 23 * 3]);
        let out = run(
            &pipeline(
                "[{random_resized_crop: {size: 9}}, random_horizontal_flip]",
                3,
            ),
            img,
            5,
        );
        assert_eq!(out.len(), 3 * 81);
        assert!(out.iter().all(|v| (v * 255.0 - 77.0).abs() < 0.5));
    }

    #[test]
    fn center_crop_offsets_round_half_to_even_as_torchvision() {
        // 5 wide, crop 2: offset round(1.5) = 2; 7 wide: round(2.5) = 2.
        for (w, left) in [(5usize, 2usize), (7, 2)] {
            let img = Image::new(w, 2, 1, (0..2 * w as u8).collect());
            let out = run(&pipeline("[{center_crop: 2}]", 1), img, 0);
            let px: Vec<u8> = out.iter().map(|v| (v * 255.0).round() as u8).collect();
            assert_eq!(
                px,
                vec![
                    left as u8,
                    left as u8 + 1,
                    (w + left) as u8,
                    (w + left) as u8 + 1
                ]
            );
        }
    }

    #[test]
    fn pad_crop_and_flip_move_pixels_only() {
        let img = Image::new(3, 3, 1, (1..=9).collect());
        let p = pipeline("[{random_crop: {padding: 1}}, random_horizontal_flip]", 1);
        let mut seen_flip = false;
        for s in 0..40 {
            let out = run(&p, img.clone(), s);
            let px: Vec<u8> = out.iter().map(|v| (v * 255.0).round() as u8).collect();
            assert!(px.iter().all(|v| *v <= 9), "{px:?}");
            seen_flip |= px[3..6] == [6, 5, 4];
        }
        assert!(seen_flip);
    }

    #[test]
    fn augments_see_the_resampled_bytes_and_must_keep_their_size() {
        // The augment sees the 4x2 resized picture, before normalisation and the flip.
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let mut p = pipeline("[{resize: 2}, random_horizontal_flip]", 1);
        p.normalize = Some((vec![0.5], vec![0.5]));
        p.augments.push(std::sync::Arc::new(move |img, _| {
            s2.lock()
                .unwrap()
                .push((img.width, img.height, img.channels));
            img.data.iter_mut().for_each(|v| *v = 255 - *v);
            Ok(())
        }));
        let img = Image::new(8, 4, 1, vec![0; 32]);
        let out = run(&p, img.clone(), 0);
        assert_eq!(*seen.lock().unwrap(), vec![(4, 2, 1)]);
        assert!(out.iter().all(|&v| v == 1.0), "{out:?}"); // (1 - 0.5) / 0.5
                                                           // An augment that changes the size is an error, not a wrong batch.
        p.augments = vec![std::sync::Arc::new(|img, _| {
            img.width += 1;
            Ok(())
        })];
        let mut out = vec![0.0; 8];
        let e = p
            .run(
                Sample::Decoded(img),
                None,
                &mut crate::rng::stream(0, "t"),
                Path::new("x.png"),
                &mut Scratch::default(),
                &mut out,
            )
            .unwrap_err();
        assert!(e.to_string().contains("must keep the size"), "{e}");
    }

    #[test]
    fn reduced_decode_is_chosen_only_when_the_output_allows_and_changes_little() {
        let v = View {
            x: 0.0,
            y: 0.0,
            w: 480.0,
            h: 360.0,
            out: [112, 112],
            flip: false,
        };
        assert_eq!(reduction(&v), 2);
        assert_eq!(
            reduction(&View {
                out: [224, 224],
                ..v
            }),
            1
        );
        assert_eq!(reduction(&View { out: [56, 40], ..v }), 8);
        // A smooth picture cropped to 64 from 256: reduced and full decodes agree closely.
        let data = (0..256 * 256 * 3)
            .map(|i| (((i / 3) % 256 + (i / 3 / 256)) / 2) as u8)
            .collect();
        let jpg = encode_jpeg(&Image::new(256, 256, 3, data), 95.0).unwrap();
        let mut outs = Vec::new();
        for reduced in [true, false] {
            let p = Pipeline {
                reduced_decode: reduced,
                ..pipeline("[{resize: 64}, {center_crop: 64}]", 3)
            };
            let mut out = vec![0.0; 3 * 64 * 64];
            p.run(
                Sample::Encoded(jpg.clone()),
                None,
                &mut crate::rng::stream(0, "t"),
                Path::new("x"),
                &mut Scratch::default(),
                &mut out,
            )
            .unwrap();
            outs.push(out);
        }
        let diff = outs[0]
            .iter()
            .zip(&outs[1])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 6.0 / 255.0, "max difference {diff}");
    }
}
