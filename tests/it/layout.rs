//! The shape of the source tree: the services under `src/` import one another one way
//! only, none of them reaches up into the HTTP or CLI layers, and no source file grows past
//! 1200 lines before its tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The service folders under `src/`.
const SERVICES: &[&str] = &[
    "entities",
    "rooms",
    "pairing",
    "sharing",
    "revocation",
    "peers",
    "locks",
    "propagation",
    "users",
    "alerts",
    "sessions",
    "activities",
    "mqtt",
    "playback",
];
/// Modules that serve people and programs over HTTP or the command line.
const SURFACES: &[&str] = &["api", "ws", "cli", "verbs", "client", "watch", "bench"];
/// Longest a source file may be before its `#[cfg(test)]` module.
const MAX_LINES_BEFORE_TESTS: usize = 1200;

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

/// The file's code before its tests.
fn code_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// Top-level module of `src/` a file belongs to: `src/sharing/grants.rs` -> `sharing`.
fn top_module(src: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// Which top-level modules each top-level module names through `crate::`.
fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in files {
        let from = top_module(src, &path);
        let code = code_of(&path);
        for (at, _) in code.match_indices("crate::") {
            let name: String = code[at + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() && name != from {
                graph.entry(from.clone()).or_default().insert(name);
            }
        }
    }
    graph
}

/// A cycle through `graph` restricted to `nodes`, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>, nodes: &[&str]) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        nodes: &[&str],
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if nodes.contains(&next.as_str())
                && let Some(cycle) = visit(next, graph, nodes, path, done)
            {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    nodes
        .iter()
        .find_map(|n| visit(n, graph, nodes, &mut Vec::new(), &mut done))
}

#[test]
fn services_import_one_another_one_way_and_never_the_surfaces() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = imports(&src);
    for service in SERVICES {
        assert!(
            src.join(service).is_dir(),
            "no service folder src/{service}"
        );
    }
    // The service graph, for `cargo test --test it layout -- --nocapture`.
    for service in SERVICES {
        let to: Vec<&str> = graph
            .get(*service)
            .into_iter()
            .flatten()
            .map(String::as_str)
            .filter(|m| SERVICES.contains(m) || *m == "core")
            .collect();
        println!("{service} -> {}", to.join(", "));
    }
    if let Some(cycle) = find_cycle(&graph, SERVICES) {
        panic!(
            "service folders import one another in a cycle: {}",
            cycle.join(" -> ")
        );
    }
    for service in SERVICES {
        let reached: Vec<_> = graph
            .get(*service)
            .into_iter()
            .flatten()
            .filter(|m| SURFACES.contains(&m.as_str()))
            .collect();
        assert!(reached.is_empty(), "src/{service} imports {reached:?}");
    }
}

#[test]
fn a_cycle_is_found_when_there_is_one() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph.entry("a".into()).or_default().insert("b".into());
    graph.entry("b".into()).or_default().insert("c".into());
    assert_eq!(find_cycle(&graph, &["a", "b", "c"]), None);
    graph.entry("c".into()).or_default().insert("a".into());
    let cycle = find_cycle(&graph, &["a", "b", "c"]).unwrap();
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 4);
}

#[test]
fn no_source_file_is_over_1200_lines_before_its_tests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["src", "crdt/src", "net/src", "storage/src"] {
        rust_files(&root.join(dir), &mut files);
    }
    let long: Vec<_> = files
        .iter()
        .map(|f| (f, code_of(f).lines().count()))
        .filter(|(_, n)| *n > MAX_LINES_BEFORE_TESTS)
        .collect();
    assert!(
        long.is_empty(),
        "over {MAX_LINES_BEFORE_TESTS} lines: {long:?}"
    );
}
