//! CIFAR-10 and CIFAR-100 in the binary version distributed by the CIFAR site
//! (`cifar-10-binary.tar.gz`, `cifar-100-binary.tar.gz`, unpacked under `root`): records of a
//! label byte (CIFAR-100: coarse then fine) and 3,072 pixel bytes, channel-major 32x32.

use super::{DataContext, Dataset, DatasetConfig, DatasetInfo, Image, Sample, Splits};
use crate::error::{Error, Result};
use crate::plugin::TimeParams;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const PIXELS: usize = 3 * 32 * 32;

/// The two datasets' layouts.
#[derive(Debug, Clone, Copy)]
struct Layout {
    name: &'static str,
    classes: usize,
    /// Label bytes before the pixels; the label used is the last (CIFAR-100's fine label).
    label_bytes: usize,
    /// The folder the archive unpacks to.
    folder: &'static str,
    python_folder: &'static str,
    train: &'static [&'static str],
    test: &'static str,
    mean: [f32; 3],
    std: [f32; 3],
}

const CIFAR10: Layout = Layout {
    name: "CIFAR-10",
    classes: 10,
    label_bytes: 1,
    folder: "cifar-10-batches-bin",
    python_folder: "cifar-10-batches-py",
    train: &[
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
    ],
    test: "test_batch.bin",
    mean: [0.4914, 0.4822, 0.4465],
    std: [0.2470, 0.2435, 0.2616],
};

const CIFAR100: Layout = Layout {
    name: "CIFAR-100",
    classes: 100,
    label_bytes: 2,
    folder: "cifar-100-binary",
    python_folder: "cifar-100-python",
    train: &["train.bin"],
    test: "test.bin",
    mean: [0.5071, 0.4865, 0.4409],
    std: [0.2673, 0.2564, 0.2762],
};

/// Images and labels of one split, in memory.
#[derive(Debug, Clone)]
pub struct CifarSet {
    pixels: Arc<Vec<u8>>,
    labels: Arc<Vec<u32>>,
}

impl Dataset for CifarSet {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn read(&self, index: usize) -> Result<(Sample, u32)> {
        let planes = &self.pixels[index * PIXELS..(index + 1) * PIXELS];
        let mut data = vec![0u8; PIXELS];
        for (i, px) in data.chunks_exact_mut(3).enumerate() {
            for (c, v) in px.iter_mut().enumerate() {
                *v = planes[c * 1024 + i];
            }
        }
        Ok((
            Sample::Decoded(Image::new(32, 32, 3, data)),
            self.labels[index],
        ))
    }
}

impl Layout {
    fn info(&self, train_len: usize, eval_len: usize) -> DatasetInfo {
        DatasetInfo {
            shape: [3, 32, 32],
            num_classes: self.classes,
            train_len,
            eval_len,
            mean: self.mean.to_vec(),
            std: self.std.to_vec(),
        }
    }

    /// The folder holding the files: `root` itself or the archive's folder inside it.
    fn locate(&self, root: &Path) -> Result<PathBuf> {
        for dir in [root.join(self.folder), root.to_path_buf()] {
            if dir.join(self.test).is_file() {
                return Ok(dir);
            }
        }
        let python = [root.join(self.python_folder), root.to_path_buf()]
            .into_iter()
            .any(|d| {
                d.join(if self.classes == 10 {
                    "test_batch"
                } else {
                    "test"
                })
                .is_file()
            });
        Err(Error::Data {
            path: root.to_path_buf(),
            message: if python {
                format!(
                    "{}: this is the python (pickled) version, which is not read yet",
                    self.name
                )
            } else {
                format!(
                    "{}: no {} here or in {}/",
                    self.name, self.test, self.folder
                )
            },
            hint: format!(
                "unpack the binary version ({}) under `data.root`",
                if self.classes == 10 {
                    "cifar-10-binary.tar.gz"
                } else {
                    "cifar-100-binary.tar.gz"
                }
            ),
        })
    }

    fn read(&self, dir: &Path, files: &[&str]) -> Result<CifarSet> {
        let record = self.label_bytes + PIXELS;
        let (mut pixels, mut labels) = (Vec::new(), Vec::new());
        for f in files {
            let path = dir.join(f);
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let bad = |m: String| Error::Data {
                path: path.clone(),
                message: format!("corrupt {} file: {m}", self.name),
                hint: "the file is damaged or from another dataset; unpack the archive again"
                    .into(),
            };
            if bytes.is_empty() || bytes.len() % record != 0 {
                return Err(bad(format!(
                    "{} bytes is not a whole number of {record}-byte records{}",
                    bytes.len(),
                    if bytes.len() % record != 0 {
                        " (truncated?)"
                    } else {
                        ""
                    }
                )));
            }
            for (i, r) in bytes.chunks_exact(record).enumerate() {
                let label = r[self.label_bytes - 1] as usize;
                if label >= self.classes {
                    return Err(bad(format!(
                        "record {i} has label {label}, beyond the {} classes",
                        self.classes
                    )));
                }
                labels.push(label as u32);
                pixels.extend_from_slice(&r[self.label_bytes..]);
            }
        }
        Ok(CifarSet {
            pixels: Arc::new(pixels),
            labels: Arc::new(labels),
        })
    }

    fn build(&self, root: &Path) -> Result<Splits> {
        let dir = self.locate(root)?;
        let train = self.read(&dir, self.train)?;
        let eval = self.read(&dir, &[self.test])?;
        Ok(Splits {
            info: self.info(train.len(), eval.len()),
            train: Arc::new(train),
            eval: Some(Arc::new(eval)),
            classes: None,
        })
    }
}

/// CIFAR-10 (binary version) under `root`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cifar10Config {
    pub root: PathBuf,
}

/// CIFAR-100 (binary version) under `root`, with the 100 fine labels.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cifar100Config {
    pub root: PathBuf,
}

impl TimeParams for Cifar10Config {}
impl TimeParams for Cifar100Config {}

impl DatasetConfig for Cifar10Config {
    fn info(&self) -> DatasetInfo {
        CIFAR10.info(50_000, 10_000)
    }
    fn build(&self, _ctx: &DataContext) -> Result<Splits> {
        CIFAR10.build(&self.root)
    }
}

impl DatasetConfig for Cifar100Config {
    fn info(&self) -> DatasetInfo {
        CIFAR100.info(50_000, 10_000)
    }
    fn build(&self, _ctx: &DataContext) -> Result<Splits> {
        CIFAR100.build(&self.root)
    }
}

crate::register_dataset!(
    Cifar10Config,
    "cifar10",
    "CIFAR-10, 50k/10k 32x32 colour, binary version (cifar-10-batches-bin) under root.",
    "root: /data/cifar10"
);
crate::register_dataset!(
    Cifar100Config,
    "cifar100",
    "CIFAR-100 (fine labels), 50k/10k 32x32 colour, binary version (cifar-100-binary) under root.",
    "root: /data/cifar100"
);

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `n` records per file: pixel (c, i) = (record + c * 50 + i) % 256, label record % k.
    fn write(dir: &Path, l: &Layout, n: usize) {
        std::fs::create_dir_all(dir).unwrap();
        for f in l.train.iter().chain([&l.test]) {
            let mut bytes = Vec::new();
            for r in 0..n {
                if l.label_bytes == 2 {
                    bytes.push((r % 20) as u8);
                }
                bytes.push((r % l.classes) as u8);
                bytes.extend((0..PIXELS).map(|i| ((r + (i / 1024) * 50 + i % 1024) % 256) as u8));
            }
            std::fs::write(dir.join(f), bytes).unwrap();
        }
    }

    #[test]
    fn both_layouts_read_labels_and_interleave_pixels() {
        let t = tempfile::tempdir().unwrap();
        for (l, nested) in [(CIFAR10, true), (CIFAR100, false)] {
            let root = t.path().join(l.name);
            write(
                &if nested {
                    root.join(l.folder)
                } else {
                    root.clone()
                },
                &l,
                7,
            );
            let s = l.build(&root).unwrap();
            assert_eq!(s.train.len(), 7 * l.train.len());
            assert_eq!(s.eval.as_ref().unwrap().len(), 7);
            let (Sample::Decoded(img), label) = s.train.read(3).unwrap() else {
                panic!("CIFAR samples are pixels")
            };
            assert_eq!(label, 3);
            // Pixel 5, channel 2 of record 3.
            assert_eq!(img.data[5 * 3 + 2], 3 + 100 + 5);
            assert_eq!(s.info.num_classes, l.classes);
        }
    }

    #[test]
    fn truncated_files_bad_labels_and_the_python_version_are_named() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().to_path_buf();
        write(&root, &CIFAR10, 2);
        let p = root.join("test_batch.bin");
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() - 10]).unwrap();
        let e = CIFAR10.build(&root).err().unwrap().to_string();
        assert!(
            e.contains("test_batch.bin") && e.contains("truncated"),
            "{e}"
        );
        let mut b2 = b.clone();
        b2[0] = 10;
        std::fs::write(&p, &b2).unwrap();
        let e = CIFAR10.build(&root).err().unwrap().to_string();
        assert!(e.contains("label 10"), "{e}");

        let py = t.path().join("py");
        std::fs::create_dir_all(py.join("cifar-10-batches-py")).unwrap();
        std::fs::write(py.join("cifar-10-batches-py/test_batch"), b"\x80\x02").unwrap();
        let e = CIFAR10.build(&py).err().unwrap().to_string();
        assert!(
            e.contains("python") && e.contains("cifar-10-binary.tar.gz"),
            "{e}"
        );
    }
}
