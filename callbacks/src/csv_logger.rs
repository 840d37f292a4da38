//! Writes logged metrics to `metrics.csv` in the run folder: one row per step that logged
//! anything (`batch`, `epoch`, then one column per metric, empty where a metric was not logged at
//! that step). Row `n` holds what was logged while step `n` was trained and after it, until step
//! `n + 1` began (its evaluation, the epoch's metrics when it ended the epoch). A metric that first appears later (the first evaluation, say) adds a column: the
//! file is rewritten with the wider header, atomically. On resume, rows after the checkpoint are
//! dropped and the resumed run writes them again.

use crate::resume_log::belongs_to_next_step;
use recipe_engine::atomic::write_atomic;
use recipe_engine::callback::{Callback, CallbackConfig};
use recipe_engine::error::{Error, Result};
use recipe_engine::plugin::{BindContext, TimeParams};
use recipe_engine::state_dict::StateDict;
use recipe_engine::{Event, State};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

fn default_file() -> String {
    "metrics.csv".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvLoggerConfig {
    /// File name inside the run folder.
    #[serde(default = "default_file")]
    pub file: String,
}

impl TimeParams for CsvLoggerConfig {}

/// One step's values, as they will be written.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Row {
    batch: u64,
    epoch: u64,
    values: BTreeMap<String, String>,
}

struct CsvLogger {
    file_name: String,
    path: PathBuf,
    /// Metric columns, in order of first appearance.
    columns: Vec<String>,
    /// The metric columns of the header on disk.
    on_disk: Vec<String>,
    row: Option<Row>,
    out: Option<csv::Writer<File>>,
}

impl CallbackConfig for CsvLoggerConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Callback>> {
        if self.file.is_empty() || self.file.contains(['/', '\\']) {
            return Err(Error::recipe(
                format!("{}.file", ctx.path),
                "must be a plain file name (it is written inside the run folder)",
            ));
        }
        Ok(Box::new(CsvLogger {
            file_name: self.file.clone(),
            path: PathBuf::new(),
            columns: Vec::new(),
            on_disk: Vec::new(),
            row: None,
            out: None,
        }))
    }
}

fn csv_err(path: &Path, e: csv::Error) -> Error {
    Error::msg(format!("{}: {e}", path.display()))
}

/// Reads a metrics CSV: metric columns and rows (batch, epoch, values).
fn read(path: &Path) -> Result<(Vec<String>, Vec<Row>)> {
    let mut r = match csv::Reader::from_path(path) {
        Ok(r) => r,
        Err(e) if matches!(e.kind(), csv::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::NotFound) => {
            return Ok((Vec::new(), Vec::new()))
        }
        Err(e) => return Err(csv_err(path, e)),
    };
    let header: Vec<String> = r
        .headers()
        .map_err(|e| csv_err(path, e))?
        .iter()
        .map(String::from)
        .collect();
    let metrics: Vec<String> = header.iter().skip(2).cloned().collect();
    let mut rows = Vec::new();
    for rec in r.records() {
        // A line cut short by a crash ends the file.
        let Ok(rec) = rec else { break };
        let (Some(Ok(batch)), Some(Ok(epoch))) = (
            rec.get(0).map(str::parse::<u64>),
            rec.get(1).map(str::parse::<u64>),
        ) else {
            break;
        };
        let values = metrics
            .iter()
            .zip(rec.iter().skip(2))
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect();
        rows.push(Row {
            batch,
            epoch,
            values,
        });
    }
    Ok((metrics, rows))
}

fn record(row: &Row, columns: &[String]) -> Vec<String> {
    let mut r = vec![row.batch.to_string(), row.epoch.to_string()];
    r.extend(
        columns
            .iter()
            .map(|c| row.values.get(c).cloned().unwrap_or_default()),
    );
    r
}

/// The whole file as CSV text: header and rows.
fn render(columns: &[String], rows: &[Row]) -> Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header = vec!["batch".to_string(), "epoch".to_string()];
    header.extend(columns.iter().cloned());
    let e = |e: csv::Error| Error::msg(format!("cannot format CSV: {e}"));
    w.write_record(&header).map_err(e)?;
    for row in rows {
        w.write_record(record(row, columns)).map_err(e)?;
    }
    w.into_inner()
        .map_err(|e| Error::msg(format!("cannot format CSV: {e}")))
}

impl CsvLogger {
    fn open(&mut self, state: &State) -> Result<()> {
        self.path = state.run_dir.join(&self.file_name);
        let mut rows = Vec::new();
        if let Some(ts) = &state.resumed_from {
            let (columns, old) = read(&self.path)?;
            self.columns = columns;
            rows = old.into_iter().filter(|r| r.batch <= ts.batch).collect();
            // The checkpoint's own step goes on collecting values.
            if rows.last().is_some_and(|r: &Row| r.batch == ts.batch) {
                self.row = rows.pop();
            }
        }
        self.rewrite(&rows)
    }

    /// Writes the file anew (header with the current columns, then `rows`) and reopens it for
    /// appending.
    fn rewrite(&mut self, rows: &[Row]) -> Result<()> {
        self.out = None;
        write_atomic(&self.path, &render(&self.columns, rows)?)?;
        self.on_disk = self.columns.clone();
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io(&self.path, e))?;
        self.out = Some(csv::Writer::from_writer(f));
        Ok(())
    }

    fn finish_row(&mut self) -> Result<()> {
        let Some(row) = self.row.take() else {
            return Ok(());
        };
        if self.columns != self.on_disk {
            self.flush()?;
            let (_, rows) = read(&self.path)?;
            self.rewrite(&rows)?;
        }
        if let Some(out) = &mut self.out {
            out.write_record(record(&row, &self.columns))
                .map_err(|e| csv_err(&self.path, e))?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if let Some(out) = &mut self.out {
            out.flush().map_err(|e| Error::io(&self.path, e))?;
        }
        Ok(())
    }
}

impl Callback for CsvLogger {
    fn is_logger(&self) -> bool {
        true
    }

    /// The row still being filled (the checkpoint's own step) goes into the checkpoint, so the
    /// resumed run completes it rather than losing it.
    fn state_dict(&self) -> Result<StateDict> {
        Ok(StateDict::encode(&self.row))
    }

    fn load_state_dict(&mut self, state: &StateDict) -> Result<()> {
        let row: Option<Row> = state.decode("csv_logger")?;
        if row.is_some() {
            self.row = row;
        }
        Ok(())
    }

    fn run_event(&mut self, event: Event, state: &mut State) -> Result<()> {
        if self.out.is_none() {
            self.open(state)?;
        }
        if !state.pending_log.is_empty() {
            let ts = &state.timestamp;
            let step = ts.batch + u64::from(belongs_to_next_step(event.name()));
            if self.row.as_ref().is_some_and(|r| r.batch != step) {
                self.finish_row()?;
            }
            let row = self.row.get_or_insert_with(|| Row {
                batch: step,
                epoch: ts.epoch,
                values: BTreeMap::new(),
            });
            for (k, v) in &state.pending_log {
                if !self.columns.contains(k) {
                    self.columns.push(k.clone());
                }
                row.values.insert(k.clone(), v.to_string());
            }
        }
        match event {
            Event::FitEnd => {
                self.finish_row()?;
                self.flush()?;
            }
            Event::BatchCheckpoint | Event::EpochCheckpoint | Event::EvalEnd => self.flush()?,
            _ => {}
        }
        Ok(())
    }
}

recipe_engine::register_callback!(
    CsvLoggerConfig,
    "csv_logger",
    "Writes logged metrics as CSV (one row per step, one column per metric) into the run folder.",
    "file: metrics.csv"
);
