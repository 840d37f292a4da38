//! Checkpoint files: everything a run needs to continue exactly where it stopped.
//!
//! A checkpoint holds the model's parameters and buffers, the optimizer's state, the state of
//! every algorithm, callback and schedule (keyed by its place and name in the recipe, never by
//! type, so two plugins of one kind cannot collide), the timestamp (which is also the data
//! loader's position: epochs and in-epoch order are a function of the seed and the epoch), the
//! running metrics, the recipe as the user gave it (file plus `--set`), and the scale ratio.
//! Random generators need no saved state: every stream is derived from (seed, purpose, position).
//!
//! - `format.rs`: the file (layout, checksum, atomic write, read with every failure named).
//! - `capture.rs`: capture from a live run, restore into a freshly built one, and what differs
//!   between a checkpoint and the run that wants to continue from it.
//! - `files.rs`: checkpoint files in a run folder: names, listing, the newest good one, what
//!   `--resume` names.
//!
//! The trainer captures and restores; the `checkpoint` callback asks for checkpoints by file
//! name; the command line resolves `--resume` and reads checkpoints for `export`.

mod capture;
mod files;
mod format;

pub use capture::{
    capture, check_restorable, differences, plugin_key, recipe_differences, restore, PluginState,
    RunInfo,
};
pub use files::{file_name, latest, list, resolve, set_aside_after};
pub use format::{Checkpoint, CheckpointMeta, ClockMeta, EXTENSION, FORMAT_VERSION, MAGIC};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::EpochMetrics;
    use crate::time::Timestamp;
    use candle_core::{Device, Tensor};
    use serde_yaml::Value;
    use std::collections::BTreeMap;
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};

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
            lr: Some(0.05),
            stop_reason: None,
            elapsed_seconds: 1.5,
            eval_seconds: 0.5,
            classes: None,
            architecture: None,
            rewrites: Vec::new(),
            world_size: 2,
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
