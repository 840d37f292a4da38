//! Folders of images in torchvision's `ImageFolder` layout: `root/train/<class>/**/*.jpg` and
//! `root/val/<class>/**/*.jpg`. Classes are the sorted folder names of the training split, files
//! are JPEG or PNG (extensions compared without case), and a sample is read as its file's bytes:
//! the loader's pipeline decodes it, at reduced size where it can.

use super::{imagenet_mean, imagenet_std, planned_info};
use super::{DataContext, Dataset, DatasetConfig, DatasetInfo, Sample, Splits};
use crate::error::{Error, Result};
use crate::plugin::TimeParams;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// The extensions read (compared lower-case).
const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The sorted names of the folders in `dir`: the classes.
pub fn list_classes(dir: &Path) -> Result<Vec<String>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::Data {
        path: dir.to_path_buf(),
        message: format!("cannot read the image folder: {e}"),
        hint:
            "set `data.root` to a folder holding train/<class>/ and val/<class>/ folders of images"
                .into(),
    })?;
    let mut classes = Vec::new();
    for e in entries {
        let e = e.map_err(|e| Error::io(dir, e))?;
        if e.path().is_dir() {
            classes.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    classes.sort();
    if classes.is_empty() {
        let loose = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| is_image(&e.path()));
        return Err(Error::Data {
            path: dir.to_path_buf(),
            message: if loose {
                "images lie directly in this folder, with no class folders".into()
            } else {
                "no class folders here".into()
            },
            hint: "each class needs its own folder of images: <split>/<class>/*.jpg (ImageNet's validation images come in one folder: sort them into class folders with the devkit's ground truth, as torchvision expects)".into(),
        });
    }
    Ok(classes)
}

/// Every image file under `dir`, recursively, in sorted order.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::io(dir, e))?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_image(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// One split of an image folder: files and their labels.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    files: Arc<Vec<(PathBuf, u32)>>,
}

impl ImageFolder {
    /// Reads the split at `dir`, labelling each class folder by its place in `classes` (the
    /// training split's). A class folder that is not in `classes`, or holds no image, is an error.
    pub fn open(dir: &Path, classes: &[String]) -> Result<Self> {
        let index: HashMap<&str, u32> = classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), i as u32))
            .collect();
        let mut files = Vec::new();
        for name in list_classes(dir)? {
            let Some(&label) = index.get(name.as_str()) else {
                return Err(Error::Data {
                    path: dir.join(&name),
                    message: format!("class `{name}` is not among the training split's classes"),
                    hint: "the evaluation split's class folders must also exist in the training split (labels follow the training split's sorted folder names)".into(),
                });
            };
            let mut found = Vec::new();
            walk(&dir.join(&name), &mut found)?;
            if found.is_empty() {
                return Err(Error::Data {
                    path: dir.join(&name),
                    message: format!("class folder `{name}` holds no JPEG or PNG file"),
                    hint: "add images (.jpg, .jpeg or .png) or remove the folder".into(),
                });
            }
            files.extend(found.into_iter().map(|p| (p, label)));
        }
        Ok(ImageFolder {
            files: Arc::new(files),
        })
    }

    pub fn file(&self, index: usize) -> &Path {
        &self.files[index].0
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn read(&self, index: usize) -> Result<(Sample, u32)> {
        let (path, label) = &self.files[index];
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Ok((Sample::Encoded(bytes), *label))
    }
    fn name(&self, index: usize) -> String {
        self.files[index].0.display().to_string()
    }
}

fn train_dir() -> String {
    "train".into()
}
fn val_dir() -> Option<String> {
    Some("val".into())
}

/// A folder of images in `ImageFolder` layout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageFolderConfig {
    pub root: PathBuf,
    /// The training split's folder under `root`.
    #[serde(default = "train_dir")]
    pub train_dir: String,
    /// The evaluation split's folder under `root`; `null` for none.
    #[serde(default = "val_dir")]
    pub val_dir: Option<String>,
    /// Classes, images per split: read from the folder when absent. Give them to plan (`recipe
    /// show`) or to run on synthetic stand-in data without the folder.
    #[serde(default)]
    pub num_classes: Option<usize>,
    #[serde(default)]
    pub train_size: Option<usize>,
    #[serde(default)]
    pub eval_size: Option<usize>,
    /// Per-channel mean and std of the images (ImageNet's by default).
    #[serde(default = "imagenet_mean")]
    pub mean: Vec<f64>,
    #[serde(default = "imagenet_std")]
    pub std: Vec<f64>,
    /// What a scan of the folder found, kept for the other calls to `info`.
    #[serde(skip)]
    scanned: Arc<OnceLock<Option<DatasetInfo>>>,
}

impl TimeParams for ImageFolderConfig {}

impl ImageFolderConfig {
    /// Info from the recipe's values, a scan of the folder's file names where the recipe is
    /// silent, `fallback`'s where the folder cannot be read.
    fn info_or(&self, fallback: [usize; 3]) -> DatasetInfo {
        planned_info(
            [self.num_classes, self.train_size, self.eval_size],
            &self.scanned,
            || self.open().ok().map(|s| s.info),
            fallback,
            &self.mean,
            &self.std,
        )
    }

    fn open(&self) -> Result<Splits> {
        let train_root = self.root.join(&self.train_dir);
        if !self.root.is_dir() {
            return Err(Error::Data {
                path: self.root.clone(),
                message: "the image folder does not exist".into(),
                hint: "set `data.root` to a folder holding train/<class>/ and val/<class>/ folders of images".into(),
            });
        }
        let classes = list_classes(&train_root)?;
        if let Some(n) = self.num_classes {
            if n != classes.len() {
                return Err(Error::Data {
                    path: train_root,
                    message: format!(
                        "the recipe says {n} classes, the folder holds {} class folders",
                        classes.len()
                    ),
                    hint: "fix `data.num_classes` (or leave it out to take the folder's count)"
                        .into(),
                });
            }
        }
        let train = ImageFolder::open(&train_root, &classes)?;
        let eval = match &self.val_dir {
            Some(v) => Some(ImageFolder::open(&self.root.join(v), &classes)?),
            None => None,
        };
        let info = DatasetInfo {
            shape: [3, 0, 0],
            num_classes: classes.len(),
            train_len: train.len(),
            eval_len: eval.as_ref().map_or(0, Dataset::len),
            mean: self.mean.iter().map(|&v| v as f32).collect(),
            std: self.std.iter().map(|&v| v as f32).collect(),
        };
        Ok(Splits {
            train: Arc::new(train),
            eval: eval.map(|e| Arc::new(e) as Arc<dyn Dataset>),
            info,
            classes: Some(classes),
        })
    }
}

impl DatasetConfig for ImageFolderConfig {
    fn info(&self) -> DatasetInfo {
        self.info_or([0, 0, 0])
    }
    fn build(&self, _ctx: &DataContext) -> Result<Splits> {
        self.open()
    }
}

/// ImageNet (ILSVRC-2012) in `ImageFolder` layout: `image_folder` with ImageNet's sizes as the
/// plan when the folder is not there (`recipe show`, `data.synthetic: true`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ImageNetConfig(ImageFolderConfig);

impl TimeParams for ImageNetConfig {}

impl DatasetConfig for ImageNetConfig {
    fn info(&self) -> DatasetInfo {
        self.0.info_or([1000, 1_281_167, 50_000])
    }
    fn build(&self, _ctx: &DataContext) -> Result<Splits> {
        self.0.open()
    }
}

crate::register_dataset!(
    ImageFolderConfig,
    "image_folder",
    "JPEG/PNG files in root/train/<class>/ and root/val/<class>/ (torchvision's ImageFolder layout).",
    "root: /data/images\ntrain_dir: train\nval_dir: val"
);
crate::register_dataset!(
    ImageNetConfig,
    "imagenet",
    "ImageNet (ILSVRC-2012) as an image folder: root/train/<wnid>/*.JPEG, root/val/<wnid>/*.JPEG.",
    "root: /data/imagenet"
);
