//! `--set key.path=value`: key paths (`optimizer.lr`, `algorithms[0].smoothing`,
//! `algorithms.label_smoothing.smoothing`) and their application to the recipe's YAML tree.

use crate::error::{join_key, Error, Result};
use serde_yaml::{Mapping, Value};

/// `algorithms.0.smoothing` and `algorithms[0].smoothing` name the same key.
pub(super) fn normalize_path(p: &str) -> String {
    parse_path(p)
        .map(|segs| render_path(&segs))
        .unwrap_or_else(|_| p.to_string())
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

pub(super) fn parse_path(p: &str) -> Result<Vec<Seg>> {
    let mut out = Vec::new();
    for part in p.split('.') {
        let (head, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if head.is_empty() && rest.is_empty() {
            return Err(Error::msg(format!("`{p}` has an empty key")));
        }
        if !head.is_empty() {
            match head.parse::<usize>() {
                Ok(i) => out.push(Seg::Index(i)),
                Err(_) => out.push(Seg::Key(head.to_string())),
            }
        }
        while let Some(r) = rest.strip_prefix('[') {
            let end = r
                .find(']')
                .ok_or_else(|| Error::msg(format!("`{p}`: unclosed `[`")))?;
            let i = r[..end]
                .parse::<usize>()
                .map_err(|_| Error::msg(format!("`{p}`: `{}` is not an index", &r[..end])))?;
            out.push(Seg::Index(i));
            rest = &r[end + 1..];
        }
    }
    Ok(out)
}

fn render_path(segs: &[Seg]) -> String {
    let mut s = String::new();
    for seg in segs {
        match seg {
            Seg::Key(k) => s = join_key(&s, k),
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// Applies `key.path=value` to the tree. The value is read as YAML (`0.2` is a number, `3ep` a
/// string, `[1, 2]` a list). In a list, a segment may be an index or a plugin's name.
pub fn apply_override(root: &mut Value, o: &str) -> Result<()> {
    let bad = |m: String| {
        Error::msg(format!(
            "--set {o}: {m}\n  hint: write --set key.path=value, e.g. --set optimizer.lr=0.2"
        ))
    };
    let (path, value) = o.split_once('=').ok_or_else(|| bad("no `=`".into()))?;
    let path = path.trim();
    if path.is_empty() {
        return Err(bad("no key before `=`".into()));
    }
    let segs = parse_path(path).map_err(|e| bad(e.to_string()))?;
    let value: Value = if value.trim().is_empty() {
        Value::Null
    } else {
        serde_yaml::from_str(value)
            .map_err(|e| bad(format!("the value is not valid YAML ({e})")))?
    };
    let mut cur = root;
    for (i, seg) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        let here = render_path(&segs[..i]);
        cur = match (cur, seg) {
            (Value::Mapping(m), Seg::Key(k)) => {
                if last {
                    m.insert(Value::String(k.clone()), value);
                    return Ok(());
                }
                let e = m
                    .entry(Value::String(k.clone()))
                    .or_insert(Value::Mapping(Mapping::new()));
                let plugin_block = i == 0 && PLUGIN_BLOCKS.contains(&k.as_str());
                if let (Value::String(name), true) = (e.clone(), plugin_block) {
                    // A plugin given by name only (`schedule: cosine`) becomes a block.
                    let mut b = Mapping::new();
                    b.insert("name".into(), Value::String(name));
                    *e = Value::Mapping(b);
                }
                if e.is_null() {
                    *e = Value::Mapping(Mapping::new());
                }
                e
            }
            (Value::Sequence(s), seg) => {
                let idx = match seg {
                    Seg::Index(i) => *i,
                    Seg::Key(name) => {
                        let hits: Vec<usize> = s
                            .iter()
                            .enumerate()
                            .filter(|(_, v)| entry_name(v) == Some(name.as_str()))
                            .map(|(i, _)| i)
                            .collect();
                        match hits.as_slice() {
                            [i] => *i,
                            [] => {
                                let names: Vec<&str> = s.iter().filter_map(entry_name).collect();
                                return Err(bad(format!(
                                    "`{here}` has no entry named `{name}` (entries: {})",
                                    names.join(", ")
                                )));
                            }
                            _ => {
                                return Err(bad(format!(
                                "`{here}` has several `{name}` entries; use an index: {here}[{}]",
                                hits[0]
                            )))
                            }
                        }
                    }
                };
                let n = s.len();
                let e = s.get_mut(idx).ok_or_else(|| {
                    bad(format!(
                        "`{here}` has {n} entries; index {idx} is out of range"
                    ))
                })?;
                if last {
                    *e = value;
                    return Ok(());
                }
                if let Value::String(name) = e.clone() {
                    let mut b = Mapping::new();
                    b.insert("name".into(), Value::String(name));
                    *e = Value::Mapping(b);
                }
                e
            }
            (other, _) => {
                return Err(bad(format!(
                    "`{here}` is {}, not a block with keys",
                    describe(other)
                )));
            }
        };
    }
    Err(bad("nothing to set".into()))
}

/// Top-level keys that hold one plugin block (which a recipe may give by name only).
const PLUGIN_BLOCKS: &[&str] = &["data", "model", "optimizer", "schedule"];

pub(super) fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "empty",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

pub fn entry_name(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Mapping(m) => m.get("name").and_then(Value::as_str),
        _ => None,
    }
}
