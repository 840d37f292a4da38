//! The module structure the project promises (`shared/DESIGN.md`, "Layout"): no import loops
//! between the top-level modules of the engine, the kernels and the CLI, and kernels that do
//! not depend on the engine. A loop makes a module impossible to understand, test or move on its
//! own; this test names the loop when one comes back.
//!
//! `cargo test --test architecture -- --nocapture` prints which module imports which.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The `.rs` files of a top-level module: `name.rs`, or every file under `name/`.
fn module_files(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut mods = BTreeMap::new();
    for e in std::fs::read_dir(src).expect("src folder").flatten() {
        let p = e.path();
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        if p.is_dir() {
            let mut files = Vec::new();
            let mut stack = vec![p];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).expect("module folder").flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if p.extension().is_some_and(|x| x == "rs") {
                        files.push(p);
                    }
                }
            }
            mods.insert(name, files);
        } else if p.extension().is_some_and(|x| x == "rs") && name != "lib" && name != "main" {
            mods.insert(name, vec![p]);
        }
    }
    mods
}

/// The code of a file without its comments and without its unit tests (`#[cfg(test)] mod tests`
/// at the end of the file, by the project's convention).
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("source file");
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first path segment of every `crate::` path in `code`, including each item of a
/// `crate::{a, b::c}` group.
fn crate_refs(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                out.insert(ident(item.trim()));
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out
}

/// Which top-level module imports which, for one crate's `src/`.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mods = module_files(src);
    mods.iter()
        .map(|(m, files)| {
            let deps = files
                .iter()
                .flat_map(|f| crate_refs(&code(f)))
                .filter(|d| d != m && mods.contains_key(d))
                .collect();
            (m.clone(), deps)
        })
        .collect()
}

/// A loop in the graph, as the path that closes it, if there is one.
fn find_loop(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        m: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut l = path[i..].to_vec();
            l.push(m.to_string());
            return Some(l);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for d in g.get(m).into_iter().flatten() {
            if let Some(l) = visit(g, d, path, done) {
                return Some(l);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys()
        .find_map(|m| visit(g, m, &mut Vec::new(), &mut done))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn no_import_loops_between_top_level_modules() {
    for krate in ["engine/src", "kernels/src", "src"] {
        let g = graph(&root().join(krate));
        assert!(g.len() > 3, "{krate}: too few modules found: {g:?}");
        println!("{krate}:");
        for (m, deps) in &g {
            let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
            println!("  {m:14} -> {}", deps.join(", "));
        }
        if let Some(l) = find_loop(&g) {
            panic!("{krate}: import loop {}", l.join(" -> "));
        }
    }
}

#[test]
fn the_loop_finder_finds_a_loop() {
    // The check above can fail: a graph with a loop is caught and the loop named.
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(m, d)| (m.into(), d.into_iter().map(String::from).collect()))
    .collect();
    let l = find_loop(&g).expect("a loop");
    assert_eq!(l.first(), l.last());
    assert_eq!(l.len(), 4, "{l:?}");
    assert_eq!(
        crate_refs("use crate::{a::X, b};\nlet y = crate::c::f();"),
        ["a", "b", "c"].into_iter().map(String::from).collect()
    );
}

#[test]
fn kernels_do_not_depend_on_the_engine() {
    let manifest = std::fs::read_to_string(root().join("kernels/Cargo.toml")).expect("manifest");
    for other in ["recipe-engine", "recipe-algorithms", "recipe-callbacks"] {
        assert!(
            !manifest.contains(other),
            "kernels/Cargo.toml depends on {other}"
        );
    }
    let uses_engine = module_files(&root().join("kernels/src"))
        .values()
        .flatten()
        .any(|f| code(f).contains("recipe_engine"));
    assert!(!uses_engine, "kernels/src names recipe_engine");
}

/// Every algorithm file carries its method card: what it does, when it helps, its
/// hyperparameters and the expected effect (the shared helpers and the crate root excepted).
#[test]
fn every_algorithm_has_its_method_card() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("algorithms/src");
    let mut checked = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "lib.rs" || name == "mixing.rs" {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap();
        let card: String = text
            .lines()
            .take_while(|l| l.starts_with("//!"))
            .collect::<Vec<_>>()
            .join("\n");
        for part in [
            "//! # ",
            "**What.**",
            "**When it helps.**",
            "**Hyperparameters.**",
            "**Expected effect.**",
        ] {
            assert!(
                card.contains(part),
                "algorithms/src/{name}: its method card lacks `{part}`"
            );
        }
        checked += 1;
    }
    assert!(checked >= 9, "{checked} algorithm files");
}
