//! The modules of src/ import one another in one direction only: from the
//! command line down to the store. A module that names `crate::x` depends on
//! `x`; this test fails, naming the loop, when those dependencies go round in
//! a circle (`commands` -> `fetch` -> `commands`, say), which is how an
//! arrow pointing up shows.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every top-level module and the top-level modules it names.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut folders = vec![src.clone()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).expect("src/ is readable") {
            let path = entry.expect("src/ is readable").path();
            if path.is_dir() {
                folders.push(path);
                continue;
            }
            if path.extension().is_none_or(|ext| ext != "rs") {
                continue;
            }
            let relative = path.strip_prefix(&src).expect("beneath src/");
            let first = relative.components().next().expect("a file name");
            let module = Path::new(first.as_os_str())
                .file_stem()
                .expect("a file name")
                .to_string_lossy()
                .into_owned();
            if module == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("a source file is UTF-8");
            let named = graph.entry(module.clone()).or_default();
            for (at, _) in text.match_indices("crate::") {
                let name: String = text[at + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                // `crate::{a, b}` is not used in this code base; a name
                // starting with a capital is an item of the crate root.
                if !name.is_empty()
                    && name != module
                    && name.starts_with(|c: char| c.is_lowercase())
                {
                    named.insert(name);
                }
            }
        }
    }
    graph
}

/// A circle of dependencies, if there is one.
fn find_circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        module: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(module) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = path.iter().position(|m| m == module).expect("on the path");
                let mut circle = path[from..].to_vec();
                circle.push(module.to_string());
                return Some(circle);
            }
            None => {}
        }
        marks.insert(module.to_string(), Mark::Open);
        path.push(module.to_string());
        for next in graph.get(module).into_iter().flatten() {
            if let Some(circle) = visit(next, graph, marks, path) {
                return Some(circle);
            }
        }
        path.pop();
        marks.insert(module.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    graph
        .keys()
        .find_map(|module| visit(module, graph, &mut marks, &mut Vec::new()))
}

#[test]
fn modules_depend_on_each_other_without_a_circle() {
    let graph = dependencies();
    assert!(
        graph.contains_key("commands") && graph.contains_key("store"),
        "src/ was not read: {:?}",
        graph.keys().collect::<Vec<_>>()
    );
    if let Some(circle) = find_circle(&graph) {
        panic!(
            "the modules of src/ depend on each other in a circle: {}; \
             move what the lower module takes from the higher one down",
            circle.join(" -> ")
        );
    }
}

#[test]
fn a_circle_is_found() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("commands", &["fetch"][..]),
        ("fetch", &["format", "commands"][..]),
        ("format", &[][..]),
    ]
    .into_iter()
    .map(|(module, named)| {
        (
            module.to_string(),
            named.iter().map(|n| n.to_string()).collect(),
        )
    })
    .collect();
    assert_eq!(
        find_circle(&graph),
        Some(vec!["commands".into(), "fetch".into(), "commands".into()])
    );
}
