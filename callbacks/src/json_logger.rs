//! Writes every logged metric to `metrics.jsonl` in the run folder: one JSON object per event that
//! logged something, with the batch, epoch and event name. When a run resumes into its folder,
//! the records up to the checkpoint are kept and those the interrupted run wrote after it are
//! dropped (the resumed run writes them again).

use crate::resume_log::before_checkpoint;
use recipe_engine::atomic::write_atomic;
use recipe_engine::callback::{Callback, CallbackConfig};
use recipe_engine::error::{Error, Result};
use recipe_engine::plugin::{BindContext, TimeParams};
use recipe_engine::time::Timestamp;
use recipe_engine::{Event, State};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

fn default_file() -> String {
    "metrics.jsonl".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonLoggerConfig {
    /// File name inside the run folder.
    #[serde(default = "default_file")]
    pub file: String,
}

impl TimeParams for JsonLoggerConfig {}

struct JsonLogger {
    file_name: String,
    out: Option<BufWriter<File>>,
}

impl CallbackConfig for JsonLoggerConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Callback>> {
        if self.file.is_empty() || self.file.contains(['/', '\\']) {
            return Err(Error::recipe(
                format!("{}.file", ctx.path),
                "must be a plain file name (it is written inside the run folder)",
            ));
        }
        Ok(Box::new(JsonLogger {
            file_name: self.file.clone(),
            out: None,
        }))
    }
}

impl Callback for JsonLogger {
    fn is_logger(&self) -> bool {
        true
    }

    fn run_event(&mut self, event: Event, state: &mut State) -> Result<()> {
        if self.out.is_none() {
            let path = state.run_dir.join(&self.file_name);
            let f = match &state.resumed_from {
                Some(ts) => {
                    keep_until(&path, ts)?;
                    std::fs::OpenOptions::new()
                        .append(true)
                        .create(true)
                        .open(&path)
                }
                None => File::create(&path),
            }
            .map_err(|e| Error::io(&path, e))?;
            self.out = Some(BufWriter::new(f));
        }
        let Some(out) = self.out.as_mut() else {
            return Ok(());
        };
        let path = state.run_dir.join(&self.file_name);
        if !state.pending_log.is_empty() {
            let mut m = serde_json::Map::new();
            m.insert("batch".into(), state.timestamp.batch.into());
            m.insert("epoch".into(), state.timestamp.epoch.into());
            m.insert("event".into(), event.name().into());
            for (k, v) in &state.pending_log {
                m.insert(
                    k.clone(),
                    serde_json::Number::from_f64(*v).map_or(serde_json::Value::Null, Into::into),
                );
            }
            serde_json::to_writer(&mut *out, &m)
                .map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
            out.write_all(b"\n").map_err(|e| Error::io(&path, e))?;
        }
        // Flushed at every checkpoint event: what precedes a checkpoint is on disk with it.
        if matches!(
            event,
            Event::BatchCheckpoint | Event::EpochCheckpoint | Event::EvalEnd | Event::FitEnd
        ) {
            out.flush().map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }
}

/// Rewrites a metrics file with only the records logged before the checkpoint at `ts` (a cut-off
/// last line from a crash goes too).
fn keep_until(path: &Path, ts: &Timestamp) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut kept = String::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let batch = v.get("batch").and_then(|b| b.as_u64());
        let event = v.get("event").and_then(|e| e.as_str()).unwrap_or("");
        if batch.is_some_and(|b| before_checkpoint(b, event, ts)) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    write_atomic(path, kept.as_bytes())
}

recipe_engine::register_callback!(
    JsonLoggerConfig,
    "json_logger",
    "Writes every logged metric as JSON lines into the run folder.",
    "file: metrics.jsonl"
);
