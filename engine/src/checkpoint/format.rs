//! The checkpoint file: its layout, and reading and writing it.
//!
//! Layout: `RCPCKPT1` magic, a little-endian u32 format version, the CRC-32 of the payload, the
//! payload length as u64, then the payload: a safetensors blob whose metadata carries the YAML
//! of [`CheckpointMeta`]. Writes go to a temporary file in the same folder, are fsynced and
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
    /// The LR of the last batch trained (what an algorithm left it at included): a run resumed
    /// after the last batch of an epoch shows it at that epoch's end, as the uninterrupted run.
    #[serde(default)]
    pub lr: Option<f64>,
    /// Why a stopper ended the run, when one did.
    #[serde(default)]
    pub stop_reason: Option<String>,
    /// Wall time of the run up to this checkpoint (all processes), in seconds.
    #[serde(default)]
    pub elapsed_seconds: f64,
    /// The part of `elapsed_seconds` spent evaluating.
    #[serde(default)]
    pub eval_seconds: f64,
    /// The dataset's class names in label order, when it has them (image folders).
    #[serde(default)]
    pub classes: Option<Vec<String>>,
    /// The model's module tree after surgery (`path: Kind(...)` per module), when it is one.
    #[serde(default)]
    pub architecture: Option<Vec<String>>,
    /// What each algorithm's surgery did to it, in order.
    #[serde(default)]
    pub rewrites: Vec<String>,
    /// The number of data-parallel processes that trained it (1 for one process).
    #[serde(default = "one")]
    pub world_size: u64,
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

fn one() -> u64 {
    1
}
