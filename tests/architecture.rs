//! The shape of `src/`, checked on every run: which top-level module may use which, how
//! many files sit at the top, and how long a file may grow.
//!
//! Dependencies point one way, from the edges of the process down to leaves. `LAYERS`
//! names that order, lowest first: a module may use those in lower layers only, so no
//! two top-level modules import each other, directly or around a cycle. `STILL_UP` lists
//! the exceptions (none today); it is exact, so a new upward use fails here, and so does
//! a listed one that is gone until it is struck off.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules, lowest layer first.
const LAYERS: &[&[&str]] = &[
    &["clock"],
    &[
        "secret",
        "body",
        "transport",
        "demo",
        "import",
        "metrics",
        "spec",
    ],
    &["trace"],
    &["error"],
    &["store"],
    &["provider"],
    &["record"],
    &["relay"],
    &["upstream"],
    &["limits"],
    &["route"],
    &["keys"],
    &["cache"],
    &["attempt"],
    &["config"],
    &["observe"],
    &["listen"],
    &["ops"],
    &["admin"],
    &["proxy"],
    &["app"],
    &["cli"],
];

/// Uses that still point up a layer: (user, used). To be struck off, never added to.
const STILL_UP: &[(&str, &str)] = &[];

/// Files longer than `MAX_LINES` today. To be split, never added to.
const STILL_LONG: &[&str] = &[];

const MAX_LINES: usize = 700;
const MAX_TOP_LEVEL_FILES: usize = 8;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module of a file under `src/` (`None` for lib.rs and main.rs).
fn module_of(path: &Path) -> Option<String> {
    let rel = path.strip_prefix(src()).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// The code of a file without its unit tests (`#[cfg(test)]` modules, which may reach
/// anywhere).
fn code(text: &str) -> String {
    let mut out = String::new();
    let mut skipping = 0usize;
    let mut pending_test = false;
    for line in text.lines() {
        let t = line.trim_start();
        if skipping > 0 {
            skipping += line.matches('{').count();
            skipping -= line.matches('}').count().min(skipping);
            continue;
        }
        if t.starts_with("#[cfg(test)]") {
            pending_test = true;
            continue;
        }
        if pending_test && t.starts_with("mod ") && t.ends_with('{') {
            pending_test = false;
            skipping = 1;
            continue;
        }
        pending_test = false;
        if !t.starts_with("//") {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Every top-level module and the top-level modules its code names as `crate::NAME`.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    for file in &files {
        let Some(from) = module_of(file) else {
            continue;
        };
        // A module's unit tests in a file of their own (`#[cfg(test)] mod tests;`).
        if file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = code(&std::fs::read_to_string(file).unwrap());
        for (i, _) in text.match_indices("crate::") {
            let before = text[..i].chars().last();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            assert!(
                !text[i + 7..].starts_with('{'),
                "{}: name each module on its own (`use crate::a::..;`), not `crate::{{..}}`, so this check sees it",
                file.display()
            );
            let name: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if name != from && modules.contains(&name) {
                edges.get_mut(&from).unwrap().insert(name);
            }
        }
    }
    edges
}

fn layer_of(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| l.contains(&module))
        .unwrap_or_else(|| panic!("module `{module}` is in no layer of tests/architecture.rs"))
}

#[test]
fn dependencies_point_down_the_layers_but_for_the_listed_few() {
    let mut up = BTreeSet::new();
    for (from, to) in graph() {
        for to in to {
            if layer_of(&to) >= layer_of(&from) {
                up.insert((from.clone(), to));
            }
        }
    }
    let listed: BTreeSet<(String, String)> = STILL_UP
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let new: Vec<_> = up.difference(&listed).collect();
    let gone: Vec<_> = listed.difference(&up).collect();
    assert!(
        new.is_empty(),
        "these uses point up the layers (use a lower module, or move the type down): {new:?}"
    );
    assert!(
        gone.is_empty(),
        "these no longer point up: strike them off STILL_UP: {gone:?}"
    );
}

#[test]
fn every_module_has_a_layer_and_the_layers_have_no_duplicates() {
    let mut seen = BTreeSet::new();
    for m in LAYERS.iter().flat_map(|l| l.iter()) {
        assert!(seen.insert(*m), "{m} is in two layers");
    }
    for m in graph().keys() {
        layer_of(m);
    }
}

#[test]
fn src_has_few_top_level_files_and_no_file_grows_past_the_limit() {
    let top: Vec<String> = std::fs::read_dir(src())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        top.len() <= MAX_TOP_LEVEL_FILES,
        "{} top-level files in src/ (at most {MAX_TOP_LEVEL_FILES}): {top:?}",
        top.len()
    );
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let long: BTreeSet<String> = files
        .iter()
        .filter(|f| std::fs::read_to_string(f).unwrap().lines().count() > MAX_LINES)
        .map(|f| f.strip_prefix(root).unwrap().display().to_string())
        .collect();
    let listed: BTreeSet<String> = STILL_LONG.iter().map(|s| s.to_string()).collect();
    let new: Vec<_> = long.difference(&listed).collect();
    let gone: Vec<_> = listed.difference(&long).collect();
    assert!(new.is_empty(), "over {MAX_LINES} lines: split {new:?}");
    assert!(
        gone.is_empty(),
        "now short: strike them off STILL_LONG: {gone:?}"
    );
}

#[test]
fn the_checker_sees_a_use_and_ignores_unit_tests() {
    let text = "use crate::a::B;\nfn f() { x::crate::c(); }\n#[cfg(test)]\nmod tests {\n    use crate::d;\n    fn g() { if true { crate::e(); } }\n}\nfn h() { crate::f::g(); }\n";
    let kept = code(text);
    assert!(kept.contains("crate::a::B") && kept.contains("crate::f::g"));
    assert!(!kept.contains("crate::d") && !kept.contains("crate::e"));
}

/// Files of `src/` outside `allowed` whose code (unit tests aside) names one of
/// `needles`, each with the first it names.
fn naming(needles: &[&str], allowed: impl Fn(&Path) -> bool) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files
        .iter()
        .filter(|f| !allowed(f))
        .filter_map(|f| {
            let text = code(&std::fs::read_to_string(f).unwrap());
            let hit = needles.iter().find(|n| text.contains(*n))?;
            Some(format!("{} has {hit}", f.display()))
        })
        .collect()
}

/// The calendar is read in one place: `clock::SystemClock`. Everything else is handed a
/// `Clock` (or a time read from one), so tests can set the date with `ManualClock`.
#[test]
fn wall_time_is_read_only_through_the_clock() {
    let readers = ["SystemTime::now", "Utc::now", "Local::now"];
    let found = naming(&readers, |f| f.ends_with("clock.rs"));
    assert!(
        found.is_empty(),
        "read wall time through crate::clock: {found:?}"
    );
}

/// SQL lives in `store/`: the rest of the crate calls its functions.
#[test]
fn sql_is_written_only_in_the_store() {
    let sql = [
        "sqlx::query",
        "PgListener",
        "\"SELECT ",
        "\"INSERT ",
        "\"UPDATE ",
        "\"DELETE ",
    ];
    let store = src().join("store");
    let found = naming(&sql, |f| f.starts_with(&store));
    assert!(found.is_empty(), "move SQL into store/: {found:?}");
}
