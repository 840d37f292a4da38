//! The idx format of MNIST and Fashion-MNIST (gzipped or raw), the datasets that read it, and the
//! embedded mini set.

use super::{DataContext, Dataset, DatasetInfo, Image, Sample, Splits};
use crate::data::DatasetConfig;
use crate::error::{Error, Result};
use crate::plugin::TimeParams;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A parsed idx file: its dimensions and its bytes.
#[derive(Debug, Clone)]
pub struct Idx {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Parses idx bytes (gzipped or raw). `what` names the source in errors.
pub fn parse_idx(bytes: &[u8], what: &Path) -> Result<Idx> {
    let corrupt = |m: String| {
        Error::Data {
        path: what.to_path_buf(),
        message: format!("corrupt idx file: {m}"),
        hint: "the file is damaged or not an idx file; reinstall it (apt-get install --reinstall dataset-fashion-mnist) or point `data.root` at good copies".into(),
    }
    };
    let raw;
    let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| corrupt(format!("gzip stream is broken ({e})")))?;
        raw = out;
        &raw[..]
    } else {
        bytes
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(corrupt("bad magic number".into()));
    }
    if bytes[2] != 0x08 {
        return Err(corrupt(format!(
            "element type 0x{:02x} is not unsigned bytes (0x08)",
            bytes[2]
        )));
    }
    let ndim = bytes[3] as usize;
    if ndim == 0 || bytes.len() < 4 + 4 * ndim {
        return Err(corrupt("header is truncated".into()));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| {
            u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap_or([0; 4])) as usize
        })
        .collect();
    let n = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| corrupt(format!("header dimensions {dims:?} are impossibly large")))?;
    let body = &bytes[4 + 4 * ndim..];
    if body.len() != n {
        return Err(corrupt(format!(
            "header says {dims:?} ({n} bytes) but the file holds {} bytes{}",
            body.len(),
            if body.len() < n { " (truncated)" } else { "" }
        )));
    }
    Ok(Idx {
        dims,
        data: body.to_vec(),
    })
}

/// Reads an idx file from disk.
pub fn read_idx(path: &Path) -> Result<Idx> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_idx(&bytes, path)
}

/// Greyscale or colour images in memory as bytes, with labels; `[start, end)` selects a range.
#[derive(Debug, Clone)]
pub struct ImageSet {
    pixels: Arc<Vec<u8>>,
    labels: Arc<Vec<u32>>,
    sample: usize,
    side: usize,
    start: usize,
    end: usize,
}

impl ImageSet {
    /// Pairs an images idx ([N, H, W]) with a labels idx ([N]), checking that they agree;
    /// errors name `what` (the images file) or `labels_file`, whichever is at fault.
    pub fn from_idx(
        images: Idx,
        labels: Idx,
        num_classes: usize,
        what: &Path,
        labels_file: &Path,
    ) -> Result<Self> {
        let bad = |m: String| Error::Data {
            path: what.to_path_buf(),
            message: m,
            hint: "the images and labels files must come from the same split of the same dataset"
                .into(),
        };
        if images.dims.len() != 3 || labels.dims.len() != 1 {
            return Err(bad(format!(
                "expected images [N, H, W] and labels [N], got {:?} and {:?}",
                images.dims, labels.dims
            )));
        }
        if images.dims[0] != labels.dims[0] {
            return Err(bad(format!(
                "{} images but {} labels",
                images.dims[0], labels.dims[0]
            )));
        }
        if images.dims[1] * images.dims[2] != 28 * 28 {
            return Err(Error::Data {
                path: what.to_path_buf(),
                message: format!(
                    "images are {}x{}, this dataset's are 28x28",
                    images.dims[1], images.dims[2]
                ),
                hint: "point `data.root` at the dataset's own idx files".into(),
            });
        }
        if let Some((i, l)) = labels
            .data
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= num_classes)
        {
            return Err(Error::Data {
                path: labels_file.to_path_buf(),
                message: format!(
                    "label {l} of sample {i} is out of range for {num_classes} classes (0 to {})",
                    num_classes - 1
                ),
                hint: "the labels file is damaged or belongs to another dataset; point `data.root` at the dataset's own idx files".into(),
            });
        }
        let n = images.dims[0];
        Ok(ImageSet {
            sample: images.dims[1] * images.dims[2],
            side: images.dims[1],
            pixels: Arc::new(images.data),
            labels: Arc::new(labels.data.into_iter().map(u32::from).collect()),
            start: 0,
            end: n,
        })
    }

    /// Samples `[start, end)` of this set, sharing its memory.
    pub fn range(&self, start: usize, end: usize) -> Self {
        let end = end.min(self.len()) + self.start;
        ImageSet {
            start: (self.start + start).min(end),
            end,
            ..self.clone()
        }
    }
}

impl Dataset for ImageSet {
    fn len(&self) -> usize {
        self.end - self.start
    }
    fn read(&self, index: usize) -> Result<(Sample, u32)> {
        let i = self.start + index;
        let src = &self.pixels[i * self.sample..(i + 1) * self.sample];
        Ok((
            Sample::Decoded(Image::new(self.side, self.side, 1, src.to_vec())),
            self.labels[i],
        ))
    }
}

fn fashion_info(train_len: usize, eval_len: usize) -> DatasetInfo {
    DatasetInfo {
        shape: [1, 28, 28],
        num_classes: 10,
        train_len,
        eval_len,
        mean: vec![0.2860],
        std: vec![0.3530],
    }
}

/// Finds `<root>/<stem>` or `<root>/<stem>.gz`.
fn find_file(root: &Path, stem: &str, dataset: &str, install_hint: &str) -> Result<PathBuf> {
    if root.exists() && !root.is_dir() {
        return Err(Error::Data {
            path: root.to_path_buf(),
            message: format!("the {dataset} data root is a file, not a folder"),
            hint: "set `data.root` to the folder that holds the idx files".to_string(),
        });
    }
    if !root.is_dir() {
        return Err(Error::Data {
            path: root.to_path_buf(),
            message: format!("the {dataset} data folder does not exist"),
            hint: install_hint.to_string(),
        });
    }
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let p = root.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::Data {
        path: root.join(format!("{stem}.gz")),
        message: format!("{dataset}: neither {stem}.gz nor {stem} is in the data folder"),
        hint: install_hint.to_string(),
    })
}

fn load_split(root: &Path, prefix: &str, dataset: &str, hint: &str) -> Result<ImageSet> {
    let img = find_file(root, &format!("{prefix}-images-idx3-ubyte"), dataset, hint)?;
    let lab = find_file(root, &format!("{prefix}-labels-idx1-ubyte"), dataset, hint)?;
    ImageSet::from_idx(read_idx(&img)?, read_idx(&lab)?, 10, &img, &lab)
}

fn default_fashion_root() -> PathBuf {
    PathBuf::from("/usr/share/datasets/fashion-mnist")
}

const FASHION_HINT: &str =
    "install the Debian package (apt-get install dataset-fashion-mnist), or set `data.root` to a folder with the idx files";

/// Fashion-MNIST, 60,000 train and 10,000 test images of 28x28, from idx files under `root`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FashionMnistConfig {
    #[serde(default = "default_fashion_root")]
    pub root: PathBuf,
}

impl TimeParams for FashionMnistConfig {}

impl DatasetConfig for FashionMnistConfig {
    fn info(&self) -> DatasetInfo {
        fashion_info(60_000, 10_000)
    }
    fn build(&self, _ctx: &DataContext) -> Result<Splits> {
        let train = load_split(&self.root, "train", "Fashion-MNIST", FASHION_HINT)?;
        let eval = load_split(&self.root, "t10k", "Fashion-MNIST", FASHION_HINT)?;
        Ok(Splits {
            info: fashion_info(train.len(), eval.len()),
            train: Arc::new(train),
            eval: Some(Arc::new(eval)),
            classes: None,
        })
    }
}

/// MNIST digits from idx files under `root`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MnistConfig {
    pub root: PathBuf,
}

impl TimeParams for MnistConfig {}

impl DatasetConfig for MnistConfig {
    fn info(&self) -> DatasetInfo {
        DatasetInfo {
            shape: [1, 28, 28],
            num_classes: 10,
            train_len: 60_000,
            eval_len: 10_000,
            mean: vec![0.1307],
            std: vec![0.3081],
        }
    }
    fn build(&self, _ctx: &DataContext) -> Result<Splits> {
        let hint = "set `data.root` to a folder with train-images-idx3-ubyte(.gz) and the other three idx files";
        let train = load_split(&self.root, "train", "MNIST", hint)?;
        let eval = load_split(&self.root, "t10k", "MNIST", hint)?;
        let info = DatasetInfo {
            train_len: train.len(),
            eval_len: eval.len(),
            ..self.info()
        };
        Ok(Splits {
            info,
            train: Arc::new(train),
            eval: Some(Arc::new(eval)),
            classes: None,
        })
    }
}

static MINI_IMAGES: &[u8] = include_bytes!("../../data/t10k-images-idx3-ubyte.gz");
static MINI_LABELS: &[u8] = include_bytes!("../../data/t10k-labels-idx1-ubyte.gz");
const MINI_TRAIN: usize = 8_000;

/// The embedded default: Fashion-MNIST's 10,000-image test split, shipped inside the binary and
/// split 8,000 train / 2,000 eval. Not the full dataset.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FashionMnistMiniConfig {}

impl TimeParams for FashionMnistMiniConfig {}

impl DatasetConfig for FashionMnistMiniConfig {
    fn info(&self) -> DatasetInfo {
        fashion_info(MINI_TRAIN, 10_000 - MINI_TRAIN)
    }
    fn build(&self, _ctx: &DataContext) -> Result<Splits> {
        let what = Path::new("<embedded fashion_mnist_mini>");
        let all = ImageSet::from_idx(
            parse_idx(MINI_IMAGES, what)?,
            parse_idx(MINI_LABELS, what)?,
            10,
            what,
            what,
        )?;
        Ok(Splits {
            info: self.info(),
            train: Arc::new(all.range(0, MINI_TRAIN)),
            eval: Some(Arc::new(all.range(MINI_TRAIN, all.len()))),
            classes: None,
        })
    }
}

crate::register_dataset!(
    FashionMnistConfig,
    "fashion_mnist",
    "Fashion-MNIST, 60k/10k 28x28 greyscale, from idx files (Debian: dataset-fashion-mnist).",
    "root: /usr/share/datasets/fashion-mnist"
);
crate::register_dataset!(
    MnistConfig,
    "mnist",
    "MNIST digits, 60k/10k 28x28 greyscale, from idx files under root.",
    "root: /data/mnist"
);
crate::register_dataset!(
    FashionMnistMiniConfig,
    "fashion_mnist_mini",
    "Embedded default: Fashion-MNIST's test split, 8k train / 2k eval (not the full dataset).",
    "{}"
);

#[cfg(test)]
mod tests {
    use super::*;

    fn idx_bytes(dims: &[u32], body: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend(d.to_be_bytes());
        }
        v.extend(body);
        v
    }

    #[test]
    fn parses_raw_and_gzip_and_rejects_corruption() {
        let p = Path::new("x");
        let ok = idx_bytes(&[2, 2], &[1, 2, 3, 4]);
        assert_eq!(parse_idx(&ok, p).unwrap().dims, vec![2, 2]);
        let mut gz = Vec::new();
        {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(&mut gz, flate2::Compression::fast());
            e.write_all(&ok).unwrap();
        }
        assert_eq!(parse_idx(&gz, p).unwrap().data, vec![1, 2, 3, 4]);
        let truncated = &ok[..ok.len() - 1];
        assert!(parse_idx(truncated, p)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        assert!(parse_idx(&gz[..gz.len() / 2], p)
            .unwrap_err()
            .to_string()
            .contains("gzip"));
        assert!(parse_idx(b"hello world", p)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        assert!(parse_idx(&[0, 0, 8], p).is_err());
        assert!(parse_idx(&[0, 0, 8, 4, 0, 0], p)
            .unwrap_err()
            .to_string()
            .contains("header"));
    }

    #[test]
    fn embedded_mini_set_is_balanced_enough_and_split_8000_2000() {
        let s = FashionMnistMiniConfig {}
            .build(&DataContext {
                seed: 0,
                path: "data".into(),
            })
            .unwrap();
        assert_eq!(s.train.len(), 8000);
        let eval = s.eval.unwrap();
        assert_eq!(eval.len(), 2000);
        let mut counts = [0usize; 10];
        for i in 0..eval.len() {
            let (sample, label) = eval.read(i).unwrap();
            counts[label as usize] += 1;
            let Sample::Decoded(img) = sample else {
                panic!("idx samples are pixels")
            };
            assert_eq!((img.width, img.height, img.channels), (28, 28, 1));
        }
        assert!(counts.iter().all(|&c| c > 150), "{counts:?}");
    }

    #[test]
    fn missing_folder_says_how_to_install() {
        let c = FashionMnistConfig {
            root: "/nonexistent/fm".into(),
        };
        let e = c
            .build(&DataContext {
                seed: 0,
                path: "data".into(),
            })
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("apt-get install dataset-fashion-mnist") && e.contains("/nonexistent/fm"),
            "{e}"
        );
    }
}
