//! Checkpoint files: everything a run needs to continue exactly where it stopped.
//!
//! A checkpoint holds the model's parameters and buffers, the optimizer's state, the state of
//! every algorithm, callback and schedule (keyed by its place and name in the recipe, never by
//! type, so two plugins of one kind cannot collide), the timestamp (which is also the data
//! loader's position: epochs and in-epoch order are a function of the seed and the epoch), the
//! running metrics, the recipe as the user gave it (file plus `--set`), and the scale ratio.
//! Random generators need no saved state: every stream is derived from (seed, purpose, position).
//!
//! File layout: `RCPCKPT1` magic, a little-endian u32 format version, the CRC-32 of the payload,
//! the payload length as u64, then the payload: a safetensors blob whose metadata carries the
//! YAML of [`CheckpointMeta`]. Writes go to a temporary file in the same folder, are fsynced and
//! renamed over the target, so a crash (even SIGKILL) mid-write leaves the previous checkpoint
//! intact; truncation and flipped bytes are caught by the length and the checksum.

use crate::atomic::write_atomic;
use crate::error::{Error, Result};
use crate::state::{EpochMetrics, EvalResult};
use crate::state_dict::StateDict;
use crate::time::Timestamp;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_yaml::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"RCPCKPT1";
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 4 + 8;
const META_KEY: &str = "recipe.checkpoint";
/// The file extension of checkpoints.
pub const EXTENSION: &str = "ckpt";

/// The run length and batch geometry the checkpoint was taken under.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClockMeta {
    pub batches_per_epoch: u64,
    pub samples_per_batch: u64,
    pub max_batches: u64,
}

/// Everything in a checkpoint except tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: u32,
    /// Seconds since the Unix epoch at which it was written.
    pub created_unix: u64,
    pub recipe_name: String,
    /// The recipe as given: the file with every `--set` applied (without `--scale` and without the
    /// display callbacks the command line adds).
    pub recipe: Value,
    /// The scale ratio of the run (1 when unscaled).
    pub scale_ratio: f64,
    pub seed: u64,
    pub clock: ClockMeta,
    pub timestamp: Timestamp,
    pub epoch_metrics: EpochMetrics,
    pub last_eval: Option<EvalResult>,
    pub last_loss: Option<f64>,
    /// Why a stopper ended the run, when one did.
    #[serde(default)]
    pub stop_reason: Option<String>,
    /// Wall time of the run up to this checkpoint (all processes), in seconds.
    #[serde(default)]
    pub elapsed_seconds: f64,
    /// Plugin states (values only; tensors live in the payload as `<key>/<name>`), keyed by the
    /// plugin's place and name: `optimizer:sgd`, `schedule:cosine`, `algorithms[0]:label_smoothing`.
    pub plugins: BTreeMap<String, Value>,
    /// The model's tensor names, in order (tensors live in the payload as `model/<name>`).
    pub model_tensors: Vec<String>,
}

/// A checkpoint read from disk.
pub struct Checkpoint {
    pub path: PathBuf,
    pub meta: CheckpointMeta,
    /// Every tensor in the payload, by its full name (`model/conv1.weight`).
    pub tensors: HashMap<String, Tensor>,
}

fn corrupt(path: &Path, what: impl Into<String>) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        message: format!("corrupt checkpoint: {}", what.into()),
        hint: "the file was damaged or cut short; resume from an earlier checkpoint of the run (`--resume latest` skips damaged ones)".into(),
    }
}

impl Checkpoint {
    /// The plugin state stored under `key`, with its tensors.
    pub fn plugin(&self, key: &str) -> Option<StateDict> {
        let values = self.meta.plugins.get(key)?.clone();
        let prefix = format!("{key}/");
        let tensors = self
            .tensors
            .iter()
            .filter_map(|(n, t)| n.strip_prefix(&prefix).map(|s| (s.to_string(), t.clone())))
            .collect();
        Some(StateDict { values, tensors })
    }

    /// The model's tensors, by parameter name.
    pub fn model_tensors(&self) -> BTreeMap<String, Tensor> {
        self.tensors
            .iter()
            .filter_map(|(n, t)| n.strip_prefix("model/").map(|s| (s.to_string(), t.clone())))
            .collect()
    }

    /// Reads and verifies a checkpoint; every failure names the file and says what is wrong.
    pub fn read(path: &Path, device: &Device) -> Result<Checkpoint> {
        let bytes = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::Data {
                path: path.to_path_buf(),
                message: "checkpoint file does not exist".into(),
                hint: "give the path of a .ckpt file, or `--resume latest` to take the newest one in the run folder".into(),
            },
            _ => Error::io(path, e),
        })?;
        let payload = verify(path, &bytes)?;
        let (_, header) = safetensors::SafeTensors::read_metadata(payload)
            .map_err(|e| corrupt(path, format!("the tensor table does not parse ({e})")))?;
        let meta_text = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .ok_or_else(|| corrupt(path, "no checkpoint metadata"))?;
        let meta: CheckpointMeta = serde_yaml::from_str(meta_text)
            .map_err(|e| corrupt(path, format!("its metadata does not parse ({e})")))?;
        if meta.format > FORMAT_VERSION {
            return Err(Error::Data {
                path: path.to_path_buf(),
                message: format!(
                    "checkpoint format {} is newer than this build reads ({FORMAT_VERSION})",
                    meta.format
                ),
                hint: "resume with the version of recipe that wrote it, or a newer one".into(),
            });
        }
        let tensors = candle_core::safetensors::load_buffer(payload, device)
            .map_err(|e| corrupt(path, format!("its tensors do not load ({e})")))?;
        Ok(Checkpoint {
            path: path.to_path_buf(),
            meta,
            tensors,
        })
    }

    /// Serializes a checkpoint and writes it atomically (temporary file, fsync, rename).
    pub fn write(path: &Path, meta: &CheckpointMeta, tensors: &[(String, Tensor)]) -> Result<()> {
        let meta_text = serde_yaml::to_string(meta)
            .map_err(|e| Error::msg(format!("cannot serialize checkpoint metadata: {e}")))?;
        let info: HashMap<String, String> = [(META_KEY.to_string(), meta_text)].into();
        let payload =
            safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(info))
                .map_err(|e| Error::msg(format!("cannot serialize checkpoint tensors: {e}")))?;
        let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&payload);
        write_atomic(path, &bytes)
    }
}

/// Checks the magic, the length and the checksum; returns the payload.
fn verify<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a [u8]> {
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        let what = if bytes.len() >= 8
            && u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8])) < bytes.len() as u64
            && bytes.get(8) == Some(&b'{')
        {
            "this is a plain safetensors weights file, not a checkpoint (a run's model.safetensors holds weights only; checkpoints are the .ckpt files under checkpoints/)".to_string()
        } else if bytes.len() < HEADER_LEN {
            format!(
                "the file is {} bytes, too short for a checkpoint",
                bytes.len()
            )
        } else {
            "it does not start with the checkpoint signature".to_string()
        };
        return Err(Error::Data {
            path: path.to_path_buf(),
            message: format!("not a recipe checkpoint: {what}"),
            hint:
                "checkpoints are written by the `checkpoint` callback, or when a run is interrupted"
                    .into(),
        });
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version == 0 || version > FORMAT_VERSION {
        return Err(Error::Data {
            path: path.to_path_buf(),
            message: format!(
                "checkpoint format {version} is not one this build reads (1 to {FORMAT_VERSION})"
            ),
            hint: "a newer version of recipe wrote it, or its header is damaged; resume with the version that wrote it, or from an earlier checkpoint".into(),
        });
    }
    let crc = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[16..24]);
    let len = u64::from_le_bytes(len);
    let have = (bytes.len() - HEADER_LEN) as u64;
    if have != len {
        return Err(corrupt(
            path,
            format!("it should hold {len} bytes of data after its header but holds {have} (cut short or appended to)"),
        ));
    }
    let payload = &bytes[HEADER_LEN..];
    let actual = crc32fast::hash(payload);
    if actual != crc {
        return Err(corrupt(
            path,
            format!("checksum mismatch (stored {crc:08x}, computed {actual:08x}): some bytes changed after it was written"),
        ));
    }
    Ok(payload)
}

/// The batch count in a checkpoint's file name (`ep3-ba1407.ckpt` -> 1407).
fn batch_of(path: &Path) -> Option<u64> {
    let stem = path.file_stem()?.to_str()?;
    stem.rsplit_once("ba")?.1.parse().ok()
}

/// Checkpoint files in a run folder (the folder itself and its direct subfolders), newest first
/// by the batch count in their names.
pub fn list(run_dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut scan = |d: &Path| {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == EXTENSION) && p.is_file() {
                    if let Some(b) = batch_of(&p) {
                        found.push((b, p));
                    }
                }
            }
        }
    };
    scan(run_dir);
    if let Ok(rd) = std::fs::read_dir(run_dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                scan(&e.path());
            }
        }
    }
    found.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
    found.into_iter().map(|(_, p)| p).collect()
}

/// The newest checkpoint of a run folder that reads and verifies; damaged ones are skipped with a
/// warning naming each.
pub fn latest(run_dir: &Path, device: &Device) -> Result<Checkpoint> {
    let candidates = list(run_dir);
    if candidates.is_empty() {
        return Err(Error::Data {
            path: run_dir.to_path_buf(),
            message: "no checkpoint (.ckpt) in this run folder".into(),
            hint: "add the `checkpoint` callback to the recipe, or give a checkpoint's path to --resume".into(),
        });
    }
    let mut errors = Vec::new();
    for p in candidates {
        match Checkpoint::read(&p, device) {
            Ok(c) => {
                for e in &errors {
                    tracing::warn!("skipped a damaged checkpoint: {e}");
                }
                return Ok(c);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(Error::Data {
        path: run_dir.to_path_buf(),
        message: format!(
            "every checkpoint in this run folder is damaged:\n{}",
            errors.join("\n")
        ),
        hint: "the run has to start again".into(),
    })
}

/// Flattens a YAML value into `key.path = value` lines.
fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Mapping(m) => {
            for (k, v) in m {
                let k = match k {
                    Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other)
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                };
                flatten(&crate::error::join_key(prefix, &k), v, out);
            }
        }
        Value::Sequence(s) => {
            for (i, v) in s.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, out);
            }
        }
        Value::Tagged(t) => flatten(prefix, &t.value, out),
        other => {
            let text = serde_yaml::to_string(other)
                .unwrap_or_default()
                .trim()
                .to_string();
            out.insert(prefix.to_string(), text);
        }
    }
}

/// The differences between two recipes, one line per key: `optimizer.lr: 0.1 -> 0.2`. Keys that
/// only say where files go (`run_dir`) are ignored.
pub fn recipe_differences(saved: &Value, now: &Value) -> Vec<String> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", saved, &mut a);
    flatten("", now, &mut b);
    let ignored = |k: &str| k == "run_dir";
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| !ignored(k))
        .filter_map(|k| match (a.get(k), b.get(k)) {
            (Some(x), Some(y)) if x == y => None,
            (Some(x), Some(y)) => Some(format!("{k}: {x} -> {y}")),
            (Some(x), None) => Some(format!("{k}: {x} -> (absent)")),
            (None, Some(y)) => Some(format!("{k}: (absent) -> {y}")),
            (None, None) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> CheckpointMeta {
        CheckpointMeta {
            format: FORMAT_VERSION,
            created_unix: 0,
            recipe_name: "t".into(),
            recipe: serde_yaml::from_str("name: t\noptimizer: {name: sgd, lr: 0.1}").unwrap(),
            scale_ratio: 0.5,
            seed: 3,
            clock: ClockMeta {
                batches_per_epoch: 10,
                samples_per_batch: 4,
                max_batches: 50,
            },
            timestamp: Timestamp::default(),
            epoch_metrics: EpochMetrics {
                loss_sum: 0.1 + 0.2,
                ..Default::default()
            },
            last_eval: None,
            last_loss: Some(std::f64::consts::PI),
            stop_reason: None,
            elapsed_seconds: 1.5,
            plugins: BTreeMap::new(),
            model_tensors: vec!["w".into()],
        }
    }

    fn write_one(dir: &Path) -> PathBuf {
        let p = dir.join("ep0-ba7.ckpt");
        let t = Tensor::new(&[1.5f32, -2.0, 3.25], &Device::Cpu).unwrap();
        Checkpoint::write(&p, &meta(), &[("model/w".into(), t)]).unwrap();
        p
    }

    #[test]
    fn round_trip_is_exact() {
        let d = tempfile::tempdir().unwrap();
        let p = write_one(d.path());
        let c = Checkpoint::read(&p, &Device::Cpu).unwrap();
        assert_eq!(c.meta.epoch_metrics.loss_sum, 0.1 + 0.2);
        assert_eq!(c.meta.last_loss, Some(std::f64::consts::PI));
        assert_eq!(c.meta.scale_ratio, 0.5);
        let w = c.model_tensors()["w"].to_vec1::<f32>().unwrap();
        assert_eq!(w, vec![1.5, -2.0, 3.25]);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn truncated_flipped_and_foreign_files_are_named() {
        let d = tempfile::tempdir().unwrap();
        let p = write_one(d.path());
        let good = std::fs::read(&p).unwrap();
        for cut in [0, 5, 20, good.len() / 2, good.len() - 1] {
            std::fs::write(&p, &good[..cut]).unwrap();
            let e = Checkpoint::read(&p, &Device::Cpu)
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("ep0-ba7.ckpt"), "{e}");
            assert!(
                e.contains("too short") || e.contains("cut short") || e.contains("signature"),
                "{cut}: {e}"
            );
        }
        for at in [30, good.len() / 2, good.len() - 2] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            std::fs::write(&p, &bad).unwrap();
            let e = Checkpoint::read(&p, &Device::Cpu)
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("checksum mismatch"), "{at}: {e}");
        }
        let plain = d.path().join("model.safetensors");
        let t = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("w".to_string(), t)]), &plain).unwrap();
        let e = Checkpoint::read(&plain, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("plain safetensors weights file"), "{e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        /// Any changed byte and any cut is detected: an error naming the file, never a panic and
        /// never a checkpoint that loads with other values.
        #[test]
        fn every_damage_is_detected(at in 0usize..10_000, mask in 1u8..=255, cut in 0usize..10_000) {
            let d = tempfile::tempdir().unwrap();
            let p = write_one(d.path());
            let good = std::fs::read(&p).unwrap();
            let mut bad = good.clone();
            let at = at % good.len();
            bad[at] ^= mask;
            std::fs::write(&p, &bad).unwrap();
            let e = Checkpoint::read(&p, &Device::Cpu).err();
            proptest::prop_assert!(e.is_some(), "byte {} ^ {:#x} went unnoticed", at, mask);
            proptest::prop_assert!(e.unwrap().to_string().contains("ep0-ba7.ckpt"));
            std::fs::write(&p, &good[..cut % good.len()]).unwrap();
            proptest::prop_assert!(Checkpoint::read(&p, &Device::Cpu).is_err());
        }
    }

    #[test]
    fn latest_skips_damaged_checkpoints() {
        let d = tempfile::tempdir().unwrap();
        let sub = d.path().join("checkpoints");
        let older = write_one(&sub);
        let newer = sub.join("ep1-ba12.ckpt");
        std::fs::copy(&older, &newer).unwrap();
        assert_eq!(list(d.path()), vec![newer.clone(), older.clone()]);
        let bytes = std::fs::read(&newer).unwrap();
        std::fs::write(&newer, &bytes[..bytes.len() - 3]).unwrap();
        assert_eq!(latest(d.path(), &Device::Cpu).unwrap().path, older);
        std::fs::write(&older, b"junk").unwrap();
        let e = latest(d.path(), &Device::Cpu).err().unwrap().to_string();
        assert!(
            e.contains("every checkpoint") && e.contains("ep1-ba12"),
            "{e}"
        );
    }

    #[test]
    fn differences_name_each_key() {
        let a: Value = serde_yaml::from_str("run_dir: a\nx: 1\nl: [1, 2]\nm: {k: v}").unwrap();
        let b: Value = serde_yaml::from_str("run_dir: b\nx: 2\nl: [1]\nm: {k: v, j: 3}").unwrap();
        assert_eq!(
            recipe_differences(&a, &b),
            vec!["l[1]: 2 -> (absent)", "m.j: (absent) -> 3", "x: 1 -> 2"]
        );
        assert!(recipe_differences(&a, &a).is_empty());
    }
}
