//! CIFAR-10 and CIFAR-100 in both versions distributed by the CIFAR site, unpacked under `root`:
//! the binary version (`cifar-10-batches-bin/`, `cifar-100-binary/`: records of a label byte,
//! CIFAR-100's coarse then fine, and 3,072 pixel bytes, channel-major 32x32) and the python
//! version (`cifar-10-batches-py/`, `cifar-100-python/`: pickled dicts whose `data` is a numpy
//! array of N x 3,072 bytes in the same order, read with serde-pickle without Python).

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
    /// The python version's files and label key.
    python_train: &'static [&'static str],
    python_test: &'static str,
    python_labels: &'static str,
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
    python_train: &[
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
    ],
    python_test: "test_batch",
    python_labels: "labels",
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
    python_train: &["train"],
    python_test: "test",
    python_labels: "fine_labels",
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

    /// The folder holding the files (`root` itself or the archive's folder inside it) and
    /// whether it is the python version.
    fn locate(&self, root: &Path) -> Result<(PathBuf, bool)> {
        for dir in [root.join(self.folder), root.to_path_buf()] {
            if dir.join(self.test).is_file() {
                return Ok((dir, false));
            }
        }
        for dir in [root.join(self.python_folder), root.to_path_buf()] {
            if dir.join(self.python_test).is_file() {
                return Ok((dir, true));
            }
        }
        Err(Error::Data {
            path: root.to_path_buf(),
            message: format!(
                "{}: neither {} (binary version) nor {} (python version) here or in {}/ or {}/",
                self.name, self.test, self.python_test, self.folder, self.python_folder
            ),
            hint: "unpack the dataset's archive from the CIFAR site under `data.root`".into(),
        })
    }

    /// One pickled batch of the python version: its pixels and labels.
    fn read_python(&self, path: &Path) -> Result<(Vec<u8>, Vec<u32>)> {
        use serde_pickle::{HashableValue as K, Value as V};
        let bad = |m: String| Error::Data {
            path: path.to_path_buf(),
            message: format!("not a {} python batch: {m}", self.name),
            hint: "the file is damaged or from another dataset; unpack the archive again".into(),
        };
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let value = serde_pickle::value_from_slice(
            &bytes,
            serde_pickle::DeOptions::new().replace_unresolved_globals(),
        )
        .map_err(|e| bad(format!("unreadable pickle ({e})")))?;
        let V::Dict(d) = value else {
            return Err(bad("the pickle is not a dict".into()));
        };
        // Python 2 wrote the keys as byte strings; a re-pickle from Python 3 may use str.
        let get = |k: &str| {
            d.get(&K::Bytes(k.as_bytes().to_vec()))
                .or_else(|| d.get(&K::String(k.to_string())))
        };
        let Some(V::List(items)) = get(self.python_labels) else {
            return Err(bad(format!("no `{}` list", self.python_labels)));
        };
        let labels = items
            .iter()
            .map(|v| match v {
                V::I64(l) if (0..self.classes as i64).contains(l) => Ok(*l as u32),
                other => Err(bad(format!(
                    "label {other:?} is not one of the {} classes",
                    self.classes
                ))),
            })
            .collect::<Result<Vec<u32>>>()?;
        // A numpy array unpickles (its class unresolved) to its state: (version, shape, dtype,
        // fortran order, raw bytes).
        let pixels = match get("data") {
            Some(V::Tuple(state)) => state.iter().find_map(|v| match v {
                V::Bytes(b) => Some(b.clone()),
                _ => None,
            }),
            _ => None,
        }
        .ok_or_else(|| bad("no `data` array".into()))?;
        if pixels.len() != labels.len() * PIXELS {
            return Err(bad(format!(
                "{} labels but {} bytes of pixels (expected {} per image)",
                labels.len(),
                pixels.len(),
                PIXELS
            )));
        }
        Ok((pixels, labels))
    }

    fn read(&self, dir: &Path, files: &[&str], python: bool) -> Result<CifarSet> {
        let record = self.label_bytes + PIXELS;
        let (mut pixels, mut labels) = (Vec::new(), Vec::new());
        for f in files {
            let path = dir.join(f);
            if python {
                let (p, l) = self.read_python(&path)?;
                pixels.extend(p);
                labels.extend(l);
                continue;
            }
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
        let (dir, python) = self.locate(root)?;
        let (train, test) = if python {
            (self.python_train, self.python_test)
        } else {
            (self.train, self.test)
        };
        let train = self.read(&dir, train, python)?;
        let eval = self.read(&dir, &[test], python)?;
        Ok(Splits {
            info: self.info(train.len(), eval.len()),
            train: Arc::new(train),
            eval: Some(Arc::new(eval)),
            classes: None,
        })
    }
}

/// CIFAR-10 (binary or python version) under `root`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cifar10Config {
    pub root: PathBuf,
}

/// CIFAR-100 (binary or python version) under `root`, with the 100 fine labels.
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
    "CIFAR-10, 50k/10k 32x32 colour, binary or python version (cifar-10-batches-bin/-py) under root.",
    "root: /data/cifar10"
);
crate::register_dataset!(
    Cifar100Config,
    "cifar100",
    "CIFAR-100 (fine labels), 50k/10k 32x32 colour, binary or python version under root.",
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
    fn truncated_files_and_bad_labels_are_named() {
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
    }

    #[test]
    fn python_version_batches_pickled_by_numpy_are_read() {
        // Written by numpy 2.4 with pickle protocol 2, as the CIFAR site's files (see
        // engine/tests/fixtures/README.md): 4 images, pixel (c, i) of record r = (r + 50c + i) % 256.
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let t = tempfile::tempdir().unwrap();
        for (l, file, labels) in [
            (CIFAR10, "cifar10_python_batch.pkl", vec![0, 1, 2, 3]),
            (CIFAR100, "cifar100_python_batch.pkl", vec![0, 37, 74, 11]),
        ] {
            let dir = t.path().join(l.name).join(l.python_folder);
            std::fs::create_dir_all(&dir).unwrap();
            for f in l.python_train.iter().chain([&l.python_test]) {
                std::fs::copy(fixtures.join(file), dir.join(f)).unwrap();
            }
            let s = l.build(&t.path().join(l.name)).unwrap();
            assert_eq!(s.train.len(), 4 * l.python_train.len());
            let got: Vec<u32> = (0..4)
                .map(|i| s.eval.as_ref().unwrap().read(i).unwrap().1)
                .collect();
            assert_eq!(got, labels);
            let (Sample::Decoded(img), _) = s.train.read(3).unwrap() else {
                panic!("CIFAR samples are pixels")
            };
            assert_eq!(img.data[5 * 3 + 2], 3 + 100 + 5);
            // A cut pickle is named.
            let p = dir.join(l.python_test);
            let b = std::fs::read(&p).unwrap();
            std::fs::write(&p, &b[..b.len() / 2]).unwrap();
            let e = l.build(&t.path().join(l.name)).err().unwrap().to_string();
            assert!(e.contains(l.python_test) && e.contains("pickle"), "{e}");
        }
    }
}
