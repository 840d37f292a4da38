//! Sharded tar datasets in WebDataset's layout: `shards: /data/train-{000000..000146}.tar`, each
//! sample a `<key>.jpg` (or `.jpeg`, `.png`) and a `<key>.cls` (the label as text) stored next to
//! each other.
//!
//! Opening reads only the tar headers (seeking over the payloads) and the tiny label members, and
//! remembers where each image lies. An epoch then streams the shards in a seeded order, through a
//! seeded shuffle buffer, as WebDataset does: reads stay sequential within a window of shards, and
//! memory holds the buffer's sample positions, not images. Because the stream is a function of
//! (seed, epoch) over positions known in advance, a run resumes at any batch with no reader state
//! in the checkpoint.

use super::{imagenet_mean, imagenet_std, planned_info};
use super::{DataContext, Dataset, DatasetConfig, DatasetInfo, Sample, Splits};
use crate::error::{Error, Result};
use crate::plugin::TimeParams;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Expands WebDataset's brace ranges: `a-{000..002}.tar` is `a-000.tar`, `a-001.tar`, `a-002.tar`
/// (zero-padded to the width of the first bound). Several ranges multiply out.
pub fn expand_braces(pattern: &str) -> std::result::Result<Vec<String>, String> {
    let Some(open) = pattern.find('{') else {
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..]
        .find('}')
        .map(|c| open + c)
        .ok_or_else(|| format!("`{pattern}`: a `{{` without its `}}`"))?;
    let inner = &pattern[open + 1..close];
    let (a, b) = inner
        .split_once("..")
        .ok_or_else(|| format!("`{{{inner}}}` is not a range like {{000000..000146}}"))?;
    let (lo, hi): (u64, u64) = match (a.parse(), b.parse()) {
        (Ok(lo), Ok(hi)) if lo <= hi => (lo, hi),
        _ => {
            return Err(format!(
                "`{{{inner}}}` is not a range of increasing numbers"
            ))
        }
    };
    let width = a.len();
    let mut out = Vec::new();
    for rest in expand_braces(&pattern[close + 1..])? {
        for n in lo..=hi {
            out.push(format!("{}{n:0width$}{rest}", &pattern[..open]));
        }
    }
    out.sort();
    Ok(out)
}

/// Where one sample's image lies.
#[derive(Debug, Clone)]
struct Member {
    shard: usize,
    offset: u64,
    len: u64,
    label: u32,
    key: String,
}

/// One split: its shards and the samples in stream order.
#[derive(Debug, Clone)]
pub struct TarShards {
    paths: Arc<Vec<PathBuf>>,
    files: Arc<Vec<File>>,
    samples: Arc<Vec<Member>>,
    /// The first sample of each shard, and one past the last.
    bounds: Arc<Vec<usize>>,
    shuffle_buffer: usize,
}

const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

impl TarShards {
    /// Reads the headers of every shard of `pattern`.
    pub fn open(pattern: &str, shuffle_buffer: usize) -> Result<Self> {
        let names = expand_braces(pattern).map_err(|m| Error::recipe("data.shards", m))?;
        let mut paths = Vec::new();
        let mut files = Vec::new();
        let mut samples = Vec::new();
        let mut bounds = vec![0];
        for (shard, name) in names.iter().enumerate() {
            let path = PathBuf::from(name);
            let file = File::open(&path).map_err(|e| Error::Data {
                path: path.clone(),
                message: format!("cannot open the shard: {e}"),
                hint: "check `data.shards`: a pattern like /data/train-{000000..000146}.tar whose every file exists".into(),
            })?;
            samples.extend(index_shard(&path, &file, shard)?);
            bounds.push(samples.len());
            paths.push(path);
            files.push(file);
        }
        Ok(TarShards {
            paths: Arc::new(paths),
            files: Arc::new(files),
            samples: Arc::new(samples),
            bounds: Arc::new(bounds),
            shuffle_buffer,
        })
    }

    fn max_label(&self) -> Option<u32> {
        self.samples.iter().map(|m| m.label).max()
    }

    /// The stream of an epoch: shards in a seeded order, each read front to back, through a
    /// shuffle buffer of `shuffle_buffer` samples that emits a random one of its samples as each
    /// new one arrives, then drains in random order.
    pub fn stream(&self, rng: &mut (impl Rng + ?Sized)) -> Vec<usize> {
        let mut shards: Vec<usize> = (0..self.paths.len()).collect();
        shards.shuffle(rng);
        let mut out = Vec::with_capacity(self.samples.len());
        let mut buf: Vec<usize> = Vec::with_capacity(self.shuffle_buffer);
        for s in shards {
            for i in self.bounds[s]..self.bounds[s + 1] {
                if buf.len() < self.shuffle_buffer.max(1) {
                    buf.push(i);
                    continue;
                }
                let k = rng.random_range(0..buf.len());
                out.push(std::mem::replace(&mut buf[k], i));
            }
        }
        buf.shuffle(rng);
        out.extend(buf);
        out
    }
}

/// The samples of one shard, from its headers: each image member paired with its `.cls`.
fn index_shard(path: &Path, file: &File, shard: usize) -> Result<Vec<Member>> {
    let bad = |m: String| {
        Error::Data {
        path: path.to_path_buf(),
        message: format!("bad shard: {m}"),
        hint: "each sample needs <key>.jpg (or .png) and <key>.cls (its label as text) in the same tar file".into(),
    }
    };
    let mut archive = tar::Archive::new(file);
    let entries = archive
        .entries_with_seek()
        .map_err(|e| bad(format!("not a tar file ({e})")))?;
    // Key -> (image offset and length, label), in the order keys first appear.
    let mut images: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut labels: BTreeMap<String, u32> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for e in entries {
        let mut e = e.map_err(|e| bad(format!("unreadable tar header ({e}); truncated?")))?;
        if !e.header().entry_type().is_file() {
            continue;
        }
        let name = e
            .path()
            .map_err(|e| bad(format!("a member name is unreadable ({e})")))?
            .to_string_lossy()
            .into_owned();
        // WebDataset: the key is the path up to the first dot of the file name.
        let (dir, file_name) = name.rsplit_once('/').unwrap_or(("", &name));
        let Some((stem, ext)) = file_name.split_once('.') else {
            continue;
        };
        let key = if dir.is_empty() {
            stem.to_string()
        } else {
            format!("{dir}/{stem}")
        };
        let ext = ext.to_ascii_lowercase();
        if !images.contains_key(&key) && !labels.contains_key(&key) {
            order.push(key.clone());
        }
        if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            images.insert(key, (e.raw_file_position(), e.size()));
        } else if ext == "cls" {
            let mut text = String::new();
            e.read_to_string(&mut text)
                .map_err(|err| bad(format!("{name}: unreadable label ({err})")))?;
            let label = text.trim().parse().map_err(|_| {
                bad(format!(
                    "{name}: label `{}` is not a class number",
                    text.trim()
                ))
            })?;
            labels.insert(key, label);
        }
    }
    let end = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut out = Vec::with_capacity(order.len());
    for key in order {
        match (images.get(&key), labels.get(&key)) {
            (Some(&(offset, len)), Some(&label)) => {
                if offset + len > end {
                    return Err(bad(format!(
                        "{key}: the image runs past the end of the file (truncated)"
                    )));
                }
                out.push(Member {
                    shard,
                    offset,
                    len,
                    label,
                    key,
                })
            }
            (Some(_), None) => {
                return Err(bad(format!(
                    "sample `{key}` has an image but no .cls label"
                )))
            }
            (None, Some(_)) => return Err(bad(format!("sample `{key}` has a label but no image"))),
            (None, None) => {}
        }
    }
    Ok(out)
}

impl Dataset for TarShards {
    fn len(&self) -> usize {
        self.samples.len()
    }
    fn read(&self, index: usize) -> Result<(Sample, u32)> {
        let m = &self.samples[index];
        let mut bytes = vec![0u8; m.len as usize];
        self.files[m.shard]
            .read_exact_at(&mut bytes, m.offset)
            .map_err(|e| Error::io(&self.paths[m.shard], e))?;
        Ok((Sample::Encoded(bytes), m.label))
    }
    fn name(&self, index: usize) -> String {
        let m = &self.samples[index];
        format!("{}:{}", self.paths[m.shard].display(), m.key)
    }
    fn epoch_order(&self, rng: &mut dyn rand::RngCore) -> Option<Vec<usize>> {
        Some(self.stream(rng))
    }
}

fn default_buffer() -> usize {
    5000
}

/// Sharded tar files (WebDataset layout).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TarShardsConfig {
    /// The training shards: a path, with `{000000..000146}` ranges.
    pub shards: String,
    /// The evaluation shards, if any.
    #[serde(default)]
    pub eval_shards: Option<String>,
    /// Samples held in the shuffle buffer (positions only, not images).
    #[serde(default = "default_buffer")]
    pub shuffle_buffer: usize,
    /// Classes and samples per split: read from the shards when absent.
    #[serde(default)]
    pub num_classes: Option<usize>,
    #[serde(default)]
    pub train_size: Option<usize>,
    #[serde(default)]
    pub eval_size: Option<usize>,
    #[serde(default = "imagenet_mean")]
    pub mean: Vec<f64>,
    #[serde(default = "imagenet_std")]
    pub std: Vec<f64>,
    #[serde(skip)]
    scanned: Arc<OnceLock<Option<DatasetInfo>>>,
}

impl TimeParams for TarShardsConfig {}

impl TarShardsConfig {
    fn open(&self) -> Result<Splits> {
        if self.shuffle_buffer == 0 {
            return Err(Error::recipe_hint(
                "data.shuffle_buffer",
                "must be at least 1",
                "1 keeps the stream order; WebDataset's usual value is a few thousand",
            ));
        }
        let train = TarShards::open(&self.shards, self.shuffle_buffer)?;
        let eval = match &self.eval_shards {
            Some(p) => Some(TarShards::open(p, self.shuffle_buffer)?),
            None => None,
        };
        let seen = train
            .max_label()
            .into_iter()
            .chain(eval.as_ref().and_then(TarShards::max_label))
            .max()
            .map_or(0, |l| l as usize + 1);
        let num_classes = self.num_classes.unwrap_or(seen);
        if seen > num_classes {
            return Err(Error::recipe_hint(
                "data.num_classes",
                format!(
                    "the shards hold label {} but the recipe says {num_classes} classes",
                    seen - 1
                ),
                "raise `data.num_classes`, or leave it out to take the largest label + 1",
            ));
        }
        let info = DatasetInfo {
            shape: [3, 0, 0],
            num_classes,
            train_len: train.len(),
            eval_len: eval.as_ref().map_or(0, Dataset::len),
            mean: self.mean.iter().map(|&v| v as f32).collect(),
            std: self.std.iter().map(|&v| v as f32).collect(),
        };
        Ok(Splits {
            train: Arc::new(train),
            eval: eval.map(|e| Arc::new(e) as Arc<dyn Dataset>),
            info,
            classes: None,
        })
    }
}

impl DatasetConfig for TarShardsConfig {
    fn info(&self) -> DatasetInfo {
        planned_info(
            [self.num_classes, self.train_size, self.eval_size],
            &self.scanned,
            || self.open().ok().map(|s| s.info),
            [0, 0, 0],
            &self.mean,
            &self.std,
        )
    }
    fn build(&self, _ctx: &DataContext) -> Result<Splits> {
        self.open()
    }
}

crate::register_dataset!(
    TarShardsConfig,
    "tar_shards",
    "Sharded tar files (WebDataset layout: <key>.jpg + <key>.cls), streamed through a seeded shuffle buffer.",
    "shards: /data/train-{000000..000146}.tar\neval_shards: /data/val-{000000..000006}.tar\nshuffle_buffer: 5000"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brace_ranges_expand_with_their_padding() {
        assert_eq!(
            expand_braces("/d/t-{000..002}.tar").unwrap(),
            vec!["/d/t-000.tar", "/d/t-001.tar", "/d/t-002.tar"]
        );
        assert_eq!(expand_braces("a{1..2}b{0..1}").unwrap().len(), 4);
        assert_eq!(expand_braces("plain.tar").unwrap(), vec!["plain.tar"]);
        assert!(expand_braces("a{3..1}").is_err());
        assert!(expand_braces("a{1..2").is_err());
        assert!(expand_braces("a{x}").is_err());
    }

    #[test]
    fn the_stream_is_a_permutation_that_mixes_shards() {
        let n_shards = 4;
        let per = 25;
        let samples = (0..n_shards * per)
            .map(|i| Member {
                shard: i / per,
                offset: 0,
                len: 0,
                label: 0,
                key: i.to_string(),
            })
            .collect();
        let t = TarShards {
            paths: Arc::new(vec![PathBuf::new(); n_shards]),
            files: Arc::new(Vec::new()),
            samples: Arc::new(samples),
            bounds: Arc::new((0..=n_shards).map(|s| s * per).collect()),
            shuffle_buffer: 10,
        };
        let a = t.stream(&mut crate::rng::stream(1, "s"));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, t.stream(&mut crate::rng::stream(1, "s")));
        assert_ne!(a, t.stream(&mut crate::rng::stream(2, "s")));
        // A buffer of 10 keeps the stream near shard order: no sample comes out more than a
        // buffer's worth before its place.
        let unbuffered = TarShards {
            shuffle_buffer: 1,
            ..t.clone()
        };
        let b = unbuffered.stream(&mut crate::rng::stream(1, "s"));
        assert!(b.windows(2).filter(|w| w[1] != w[0] + 1).count() <= n_shards);
    }
}
