//! `recipe bench data`: images/s of the training input pipeline (read, decode, RandomResizedCrop,
//! flip, normalise, batch) on a folder of real JPEGs, through the same loader a run uses; and the
//! decode-only rate of the JPEG decoder on the same files, the ceiling of any pipeline built on it.
//! `benches/data_side_by_side.py` runs it beside torchvision's ImageFolder + DataLoader.

use recipe_engine::candle_core::Device;
use recipe_engine::data::image::decode;
use recipe_engine::data::{list_classes, Dataset, DatasetInfo, ImageFolder, Loader, LoaderConfig};
use recipe_engine::error::{Error, Result};
use recipe_engine::rayon::prelude::*;
use recipe_engine::sysinfo::cpu_seconds;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// What to measure.
#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    /// A folder of class folders of images (torchvision's ImageFolder root).
    #[arg(long)]
    pub images: PathBuf,
    /// Side of the RandomResizedCrop.
    #[arg(long, default_value_t = 224)]
    pub crop: usize,
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Batches timed (after the first, which starts the workers).
    #[arg(long, default_value_t = 8)]
    pub batches: usize,
    /// Decoding threads (default: every core).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Decode JPEGs at full size even when the crop needs fewer pixels.
    #[arg(long)]
    pub no_reduced_decode: bool,
    /// Only decode each file at full size (no crop, no batch): the decoder's ceiling.
    #[arg(long)]
    pub decode_only: bool,
    /// Print the figures as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// What was measured.
#[derive(Debug, Clone)]
pub struct DataRate {
    pub images: usize,
    pub images_per_sec: f64,
    pub cpu_ms_per_image: Option<f64>,
}

/// Measures the pipeline (or the decoder alone) on `a.images`.
pub fn data(a: &DataArgs) -> Result<DataRate> {
    let classes = list_classes(&a.images)?;
    let ds = ImageFolder::open(&a.images, &classes)?;
    if a.decode_only {
        return decode_only(&ds, a);
    }
    let cfg: LoaderConfig = recipe_engine::serde_yaml::from_str(&format!(
        "batch_size: {}\ntrain_transforms: [{{random_resized_crop: {{size: {}}}}}, random_horizontal_flip]\nreduced_decode: {}\nprefetch: 2\n{}",
        a.batch,
        a.crop,
        !a.no_reduced_decode,
        a.workers.map_or(String::new(), |w| format!("workers: {w}")),
    ))
    .map_err(|e| Error::msg(format!("bench data: {e}")))?;
    let info = DatasetInfo {
        shape: [3, 0, 0],
        num_classes: classes.len(),
        train_len: ds.len(),
        eval_len: 0,
        mean: vec![0.485, 0.456, 0.406],
        std: vec![0.229, 0.224, 0.225],
    };
    let need = a.batch * (a.batches + 1);
    if ds.len() < need {
        return Err(Error::msg(format!(
            "{} holds {} images; {} batches of {} (one to start, {} timed) need {need}",
            a.images.display(),
            ds.len(),
            a.batches + 1,
            a.batch,
            a.batches
        )));
    }
    let loader = Loader::new(Arc::new(ds), info, &cfg, true, 0)?;
    let cpu0 = cpu_seconds();
    let mut it = loader.epoch(0, 0, &Device::Cpu);
    it.next().ok_or_else(|| Error::msg("no batch"))??;
    let t0 = Instant::now();
    for _ in 0..a.batches {
        it.next()
            .ok_or_else(|| Error::msg("the epoch ended early"))??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds().zip(cpu0).map(|(b, a)| b - a);
    let images = a.batch * a.batches;
    Ok(DataRate {
        images,
        images_per_sec: images as f64 / secs,
        // Over every image made, the first batch and the prefetched ones included.
        cpu_ms_per_image: cpu.map(|c| 1e3 * c / (a.batch * (a.batches + 1 + 2)) as f64),
    })
}

fn decode_only(ds: &ImageFolder, a: &DataArgs) -> Result<DataRate> {
    let n = ds.len().min(a.batch * a.batches);
    let pool = recipe_engine::rayon::ThreadPoolBuilder::new()
        .num_threads(a.workers.unwrap_or(0))
        .build()
        .map_err(|e| Error::msg(e.to_string()))?;
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    pool.install(|| {
        (0..n).into_par_iter().try_for_each(|i| -> Result<()> {
            let bytes = std::fs::read(ds.file(i)).map_err(|e| Error::io(ds.file(i), e))?;
            decode(&bytes, 3, ds.file(i), |_, _| 1)?;
            Ok(())
        })
    })?;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds().zip(cpu0).map(|(b, a)| b - a);
    Ok(DataRate {
        images: n,
        images_per_sec: n as f64 / secs,
        cpu_ms_per_image: cpu.map(|c| 1e3 * c / n as f64),
    })
}
