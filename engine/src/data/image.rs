//! Images: 8-bit pixels in memory, and the decoders that make them from JPEG and PNG files.
//!
//! JPEG goes through mozjpeg (libjpeg-turbo's decoder, built from source with its SIMD code when
//! `nasm` is installed), because it decodes at 1/2, 1/4 and 1/8 of the stored size in the DCT
//! domain: a crop that will be shrunk anyway costs a fraction of a full decode
//! (`benches/README.md`). PNG goes through the `png` crate. Files are recognised by their first
//! bytes, not their extension.

use crate::error::{Error, Result};
use std::path::Path;

/// A decoded image: `height` rows of `width` pixels of `channels` (1 or 3) interleaved bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl Image {
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<u8>) -> Self {
        debug_assert_eq!(data.len(), width * height * channels);
        Image {
            width,
            height,
            channels,
            data,
        }
    }

    /// The same picture with `channels` channels: grey is repeated into RGB, RGB is averaged
    /// with ITU-R 601 weights into grey (PIL's `convert("L")`).
    pub fn with_channels(self, channels: usize) -> Image {
        match (self.channels, channels) {
            (a, b) if a == b => self,
            (1, 3) => Image {
                data: self.data.iter().flat_map(|&v| [v, v, v]).collect(),
                channels: 3,
                ..self
            },
            (3, 1) => Image {
                data: self
                    .data
                    .chunks_exact(3)
                    .map(|p| {
                        ((p[0] as u32 * 299 + p[1] as u32 * 587 + p[2] as u32 * 114 + 500) / 1000)
                            as u8
                    })
                    .collect(),
                channels: 1,
                ..self
            },
            (a, b) => unreachable!("images have 1 or 3 channels, not {a} -> {b}"),
        }
    }
}

/// What a dataset hands the pipeline: pixels, or a file's bytes still encoded (decoded by the
/// pipeline once it knows how small it may decode).
#[derive(Debug, Clone)]
pub enum Sample {
    Decoded(Image),
    Encoded(Vec<u8>),
}

/// The encodings read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jpeg,
    Png,
}

/// The format of encoded bytes, from their signature.
pub fn sniff(bytes: &[u8]) -> Option<Format> {
    if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        Some(Format::Jpeg)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(Format::Png)
    } else {
        None
    }
}

/// The reductions a JPEG decoder can apply for free: 1/1, 1/2, 1/4, 1/8.
pub const REDUCTIONS: [usize; 4] = [1, 2, 4, 8];

/// Decodes `bytes` into an image of `channels` channels. `reduce` is told the stored size (once,
/// always) and answers the reduction to decode at (one of [`REDUCTIONS`]; PNG ignores it). Returns the image
/// and the stored size. `what` names the file in errors.
pub fn decode(
    bytes: &[u8],
    channels: usize,
    what: &Path,
    reduce: impl FnOnce(usize, usize) -> usize,
) -> Result<(Image, [usize; 2])> {
    let bad = |m: String| Error::Data {
        path: what.to_path_buf(),
        message: format!("cannot decode the image: {m}"),
        hint:
            "replace or delete the file, or set `data.on_bad_image: skip` to leave such files out"
                .into(),
    };
    match sniff(bytes) {
        Some(Format::Jpeg) => jpeg(bytes, channels, reduce).map_err(bad),
        Some(Format::Png) => {
            let (img, stored) = png_decode(bytes, channels).map_err(bad)?;
            reduce(stored[0], stored[1]); // PNG has no reduced decode; the caller still plans
            Ok((img, stored))
        }
        None => Err(bad("it is neither a JPEG nor a PNG file".into())),
    }
}

fn jpeg(
    bytes: &[u8],
    channels: usize,
    reduce: impl FnOnce(usize, usize) -> usize,
) -> std::result::Result<(Image, [usize; 2]), String> {
    // libjpeg reports fatal errors by unwinding out of the decoder (mozjpeg's design); the
    // unwind is caught here and becomes the file's error.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut d = mozjpeg::decompress::DecompressBuilder::new()
            .with_err(strict_errors())
            .from_mem(bytes)
            .map_err(|e| e.to_string())?;
        let stored = [d.width(), d.height()];
        let r = reduce(stored[0], stored[1]);
        if r > 1 {
            d.scale((8 / r.clamp(1, 8)) as u8);
        }
        use mozjpeg::ColorSpace as Cs;
        if matches!(d.color_space(), Cs::JCS_CMYK | Cs::JCS_YCCK) {
            // libjpeg converts CMYK to nothing else: read the inks and convert them here.
            let mut started = d.to_colorspace(Cs::JCS_CMYK).map_err(|e| e.to_string())?;
            let (w, h) = (started.width(), started.height());
            let mut inks = vec![0u8; w * h * 4];
            started
                .read_scanlines_into(&mut inks)
                .map_err(|e| e.to_string())?;
            started.finish().map_err(|e| e.to_string())?;
            let rgb = cmyk_to_rgb(&inks);
            return Ok((Image::new(w, h, 3, rgb).with_channels(channels), stored));
        }
        let mut started = if channels == 1 {
            d.grayscale()
        } else {
            d.rgb()
        }
        .map_err(|e| e.to_string())?;
        let (w, h) = (started.width(), started.height());
        let mut data = vec![0u8; w * h * channels];
        started
            .read_scanlines_into(&mut data)
            .map_err(|e| e.to_string())?;
        started.finish().map_err(|e| e.to_string())?;
        Ok((Image::new(w, h, channels, data), stored))
    }))
    .unwrap_or_else(|p| {
        Err(p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the JPEG decoder failed".into()))
    })
}

/// RGB from CMYK JPEG samples as Adobe software stores them (inverted: 255 is no ink), the way
/// PIL converts them: each colour is `ink' * black' / 255` of the stored values.
fn cmyk_to_rgb(inks: &[u8]) -> Vec<u8> {
    inks.chunks_exact(4)
        .flat_map(|p| {
            let k = p[3] as u32;
            [0, 1, 2].map(|i| ((p[i] as u32 * k + 127) / 255) as u8)
        })
        .collect()
}

/// libjpeg's error manager, with fatal errors unwinding (as mozjpeg's own does) and the
/// "premature end of file" warning fatal too: libjpeg would pad a truncated file with grey and
/// carry on, and a half-grey picture must not train silently. Other warnings (corrupt but
/// readable data, common in ImageNet) stay warnings, as in PIL.
fn strict_errors() -> mozjpeg_sys::jpeg_error_mgr {
    use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr, jpeg_std_error, JWRN_JPEG_EOF};
    use std::os::raw::c_int;

    fn message(cinfo: &mut jpeg_common_struct) -> String {
        let mut buf = [0u8; 80];
        // SAFETY: libjpeg's format_message writes at most JMSG_LENGTH_MAX (80) bytes.
        unsafe {
            if let Some(f) = cinfo.err.as_ref().and_then(|e| e.format_message) {
                let f: unsafe extern "C-unwind" fn(&mut jpeg_common_struct, &mut [u8; 80]) =
                    std::mem::transmute(f);
                f(cinfo, &mut buf);
            }
        }
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    }
    extern "C-unwind" fn exit(cinfo: &mut jpeg_common_struct) {
        std::panic::resume_unwind(Box::new(message(cinfo)));
    }
    extern "C-unwind" fn emit(cinfo: &mut jpeg_common_struct, level: c_int) {
        // SAFETY: cinfo.err points at this error manager while libjpeg runs.
        let code = unsafe { cinfo.err.as_ref().map_or(0, |e| e.msg_code) };
        if level < 0 && code == JWRN_JPEG_EOF as c_int {
            std::panic::resume_unwind(Box::new(
                "the file ends before the image does (truncated)".to_string(),
            ));
        }
    }
    // SAFETY: jpeg_std_error fills in every field of a zeroed error manager.
    let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { jpeg_std_error(&mut err) };
    err.error_exit = Some(exit);
    err.emit_message = Some(emit);
    err
}

fn png_decode(bytes: &[u8], channels: usize) -> std::result::Result<(Image, [usize; 2]), String> {
    let mut d = png::Decoder::new(bytes);
    d.set_transformations(png::Transformations::normalize_to_color8());
    let mut r = d.read_info().map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).map_err(|e| e.to_string())?;
    let (w, h) = (info.width as usize, info.height as usize);
    buf.truncate(info.buffer_size());
    let have = info.color_type.samples();
    // Alpha is dropped, as PIL's convert("RGB") does.
    let img = match have {
        1 | 3 => Image::new(w, h, have, buf),
        2 | 4 => {
            let keep = have - 1;
            let data = buf
                .chunks_exact(have)
                .flat_map(|p| p[..keep].to_vec())
                .collect();
            Image::new(w, h, keep, data)
        }
        n => return Err(format!("{n} samples per pixel")),
    };
    Ok((img.with_channels(channels), [w, h]))
}

/// Encodes an image as a JPEG of `quality` (1-100): for test fixtures and the data benchmark.
pub fn encode_jpeg(img: &Image, quality: f32) -> Result<Vec<u8>> {
    std::panic::catch_unwind(|| -> std::io::Result<Vec<u8>> {
        let mut c = mozjpeg::Compress::new(if img.channels == 1 {
            mozjpeg::ColorSpace::JCS_GRAYSCALE
        } else {
            mozjpeg::ColorSpace::JCS_RGB
        });
        c.set_size(img.width, img.height);
        c.set_quality(quality);
        let mut s = c.start_compress(Vec::new())?;
        s.write_scanlines(&img.data)?;
        s.finish()
    })
    .map_err(|_| Error::msg("the JPEG encoder failed"))?
    .map_err(|e| Error::msg(format!("the JPEG encoder failed: {e}")))
}

/// Encodes an image as a PNG: for test fixtures.
pub fn encode_png(img: &Image) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut e = png::Encoder::new(&mut out, img.width as u32, img.height as u32);
        e.set_color(if img.channels == 1 {
            png::ColorType::Grayscale
        } else {
            png::ColorType::Rgb
        });
        e.set_depth(png::BitDepth::Eight);
        let mut w = e
            .write_header()
            .map_err(|e| Error::msg(format!("png: {e}")))?;
        w.write_image_data(&img.data)
            .map_err(|e| Error::msg(format!("png: {e}")))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: usize, h: usize, c: usize) -> Image {
        let data = (0..w * h * c)
            .map(|i| {
                let p = i / c;
                ((p % w) * 200 / w.max(1) + (i % c) * 20) as u8
            })
            .collect();
        Image::new(w, h, c, data)
    }

    #[test]
    fn jpeg_and_png_round_trip_in_both_channel_counts() {
        let p = Path::new("x");
        for c in [1, 3] {
            let img = gradient(40, 24, c);
            let (d, stored) = decode(&encode_png(&img).unwrap(), c, p, |_, _| 1).unwrap();
            assert_eq!((d, stored), (img.clone(), [40, 24]));
            let (d, stored) = decode(&encode_jpeg(&img, 95.0).unwrap(), c, p, |_, _| 1).unwrap();
            assert_eq!(stored, [40, 24]);
            let err = d
                .data
                .iter()
                .zip(&img.data)
                .map(|(a, b)| (*a as i32 - *b as i32).abs())
                .max()
                .unwrap();
            assert!(err <= 12, "JPEG error {err}");
        }
        // Grey files decode to RGB and back.
        let grey = gradient(8, 8, 1);
        let (rgb, _) = decode(&encode_png(&grey).unwrap(), 3, p, |_, _| 1).unwrap();
        assert_eq!(rgb.channels, 3);
        assert_eq!(rgb.with_channels(1), grey);
    }

    #[test]
    fn jpeg_decodes_reduced_in_the_dct_domain() {
        let img = gradient(64, 48, 3);
        let jpg = encode_jpeg(&img, 90.0).unwrap();
        for r in REDUCTIONS {
            let (d, stored) = decode(&jpg, 3, Path::new("x"), |w, h| {
                assert_eq!((w, h), (64, 48));
                r
            })
            .unwrap();
            assert_eq!(stored, [64, 48]);
            assert_eq!((d.width, d.height), (64 / r, 48 / r));
        }
    }

    /// A CMYK JPEG as Adobe tools write them (inverted values), the kind ImageNet holds a few of.
    fn cmyk_jpeg(w: usize, h: usize, cmyk: [u8; 4]) -> Vec<u8> {
        let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_CMYK);
        c.set_size(w, h);
        c.set_quality(95.0);
        let mut s = c.start_compress(Vec::new()).unwrap();
        let inverted = cmyk.map(|v| 255 - v);
        let data: Vec<u8> = (0..w * h).flat_map(|_| inverted).collect();
        s.write_scanlines(&data).unwrap();
        s.finish().unwrap()
    }

    #[test]
    fn cmyk_jpegs_decode_to_rgb() {
        // Pure cyan at full strength, no black: RGB (0, 255, 255).
        let jpg = cmyk_jpeg(16, 16, [255, 0, 0, 0]);
        for c in [3, 1] {
            let (img, stored) = decode(&jpg, c, Path::new("x"), |_, _| 1).unwrap();
            assert_eq!((stored, img.channels), ([16, 16], c));
            let px = &img.data[..c];
            let want: &[u8] = if c == 3 { &[0, 255, 255] } else { &[179] };
            for (g, w) in px.iter().zip(want) {
                assert!((*g as i32 - *w as i32).abs() <= 3, "{px:?}");
            }
        }
    }

    #[test]
    fn broken_files_are_errors_that_name_the_file() {
        let p = Path::new("/data/cat/broken.jpg");
        let jpg = encode_jpeg(&gradient(64, 64, 3), 90.0).unwrap();
        let png = encode_png(&gradient(64, 64, 3)).unwrap();
        for (bytes, why) in [
            (&jpg[..jpg.len() / 2], "truncated"),
            (&png[..png.len() / 2], ""),
            (&b"not an image at all"[..], "neither a JPEG nor a PNG"),
            (&jpg[..3], ""),
        ] {
            let e = decode(bytes, 3, p, |_, _| 1).unwrap_err().to_string();
            assert!(e.contains("/data/cat/broken.jpg") && e.contains(why), "{e}");
            assert!(e.contains("on_bad_image"), "{e}");
        }
    }
}
