//! Where a recipe came from (its file, text and `--set` overrides) and where in it a key is:
//! errors name the file and line, or the `--set` that set the key.

use super::set::{apply_override, normalize_path, parse_path, Seg};
use crate::error::{Error, Result};
use serde_yaml::{Mapping, Value};
use std::path::{Path, PathBuf};

/// Where a recipe came from: its file and text (to locate keys), and the `--set` overrides.
#[derive(Debug, Clone, Default)]
pub struct RecipeSource {
    pub file: Option<PathBuf>,
    pub text: String,
    pub overrides: Vec<String>,
}

impl RecipeSource {
    pub fn read(path: &Path, overrides: &[String]) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::msg(format!(
                "recipe file {} does not exist; the recipes that ship with the project are in recipes/",
                path.display()
            )),
            std::io::ErrorKind::IsADirectory => Error::msg(format!(
                "{} is a folder; give a recipe file (.yaml)",
                path.display()
            )),
            _ => Error::io(path, e),
        })?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let ok = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line = ok.iter().filter(|&&b| b == b'\n').count() + 1;
            let column = ok.len() - ok.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) + 1;
            Error::msg(format!(
                "{}:{line}:{column}: not valid UTF-8 (byte offset {})\n  hint: save the recipe as UTF-8 text",
                path.display(),
                ok.len()
            ))
        })?;
        Ok(RecipeSource {
            file: Some(path.to_path_buf()),
            text,
            overrides: overrides.to_vec(),
        })
    }

    pub fn from_text(text: &str, overrides: &[String]) -> Self {
        RecipeSource {
            file: None,
            text: text.to_string(),
            overrides: overrides.to_vec(),
        }
    }

    fn file_name(&self) -> String {
        self.file
            .as_ref()
            .map_or("<recipe>".to_string(), |f| f.display().to_string())
    }

    /// The YAML tree with every override applied.
    pub fn raw(&self) -> Result<Value> {
        let mut v: Value = serde_yaml::from_str(&self.text).map_err(|e| {
            let loc = e.location().map_or(String::new(), |l| format!(":{}:{}", l.line(), l.column()));
            let msg = e.to_string();
            if msg.contains(" as u128") || msg.contains(" as i128") {
                let n = msg.split('`').nth(1).unwrap_or("the number");
                return Error::msg(format!(
                    "{}{loc}: the number {n} is too large: whole numbers in a recipe go up to {}",
                    self.file_name(),
                    u64::MAX
                ));
            }
            Error::msg(format!(
                "{}{loc}: malformed YAML: {e}\n  hint: check the indentation and the `key: value` syntax near that line",
                self.file_name()
            ))
        })?;
        if v.is_null() {
            v = Value::Mapping(Mapping::new());
        }
        if !v.is_mapping() {
            return Err(Error::msg(format!(
                "{}: a recipe is a YAML mapping of keys (name, max_duration, data, model, optimizer, ...)",
                self.file_name()
            )));
        }
        for o in &self.overrides {
            apply_override(&mut v, o)?;
        }
        Ok(v)
    }

    /// Fills in where an error's key came from: the `--set` that set it, or the file and line.
    pub fn locate(&self, e: Error) -> Error {
        let Error::Recipe {
            key,
            message,
            hint,
            origin: None,
        } = e
        else {
            return e;
        };
        let from_set = self.overrides.iter().rev().find(|o| {
            let k = o.split('=').next().unwrap_or("");
            let k = normalize_path(k);
            key.starts_with(&k) || k.starts_with(&key)
        });
        let origin = match from_set {
            Some(o) => Some(format!("--set {o}")),
            None => match locate_line(&self.text, &key) {
                Some(line) => Some(format!("{}:{line}", self.file_name())),
                None => Some(self.file_name()),
            },
        };
        Error::Recipe {
            key,
            message,
            hint,
            origin,
        }
    }
}

/// The 1-based line of a key path in block-style YAML (best effort: a key inside a flow-style
/// block `{a: 1}` gives the line of the block).
pub fn locate_line(text: &str, key: &str) -> Option<usize> {
    let segs = parse_path(key).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    let is_content = |l: &str| {
        let t = l.trim_start();
        !t.is_empty() && !t.starts_with('#')
    };
    let indent = |l: &str| l.len() - l.trim_start().len();
    let is_item = |l: &str| {
        let t = l.trim_start();
        t.starts_with("- ") || t == "-"
    };
    // Indent of the key on a line (`- key:` counts from after the dash).
    let key_indent = |l: &str| if is_item(l) { indent(l) + 2 } else { indent(l) };
    let (mut lo, mut hi) = (0usize, lines.len());
    let mut found = None;
    for seg in &segs {
        let Some(first) = (lo..hi).find(|&i| is_content(lines[i])) else {
            return found;
        };
        match seg {
            Seg::Key(k) => {
                let level = key_indent(lines[first]);
                let hit = (lo..hi).find(|&i| {
                    let l = lines[i];
                    if !is_content(l) || key_indent(l) != level {
                        return false;
                    }
                    let t = l.trim_start();
                    let t = t.strip_prefix("- ").unwrap_or(t);
                    t.starts_with(&format!("{k}:")) || t.starts_with(&format!("\"{k}\":"))
                });
                let Some(i) = hit else { return found };
                found = Some(i + 1);
                // The key's block: the following lines indented deeper (or list items at its level).
                let end = (i + 1..hi)
                    .find(|&j| {
                        let l = lines[j];
                        is_content(l)
                            && (indent(l) < level
                                || (indent(l) == level && !is_item(l))
                                || (is_item(l) && indent(l) < level))
                    })
                    .unwrap_or(hi);
                lo = i + 1;
                hi = end;
            }
            Seg::Index(n) => {
                if !is_item(lines[first]) {
                    return found;
                }
                let d = indent(lines[first]);
                let items: Vec<usize> = (lo..hi)
                    .filter(|&i| is_item(lines[i]) && indent(lines[i]) == d)
                    .collect();
                let Some(&i) = items.get(*n) else {
                    return found;
                };
                found = Some(i + 1);
                let end = items.get(n + 1).copied().unwrap_or(hi);
                lo = i;
                hi = end;
            }
        }
    }
    found
}
