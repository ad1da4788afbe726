//! The crate's import rules, checked from the source: no import circle
//! between top-level modules, and no module importing a layer above its own
//! (the layer table of ARCHITECTURE.md, which must equal [`LAYERS`]).
//!
//! It reads `src/**/*.rs` as text and collects every `crate::X` path (and
//! `ringlb::X` in `main.rs`), test code included, comments excluded. A
//! `crate::X` in a string would count too; none is needed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layers, lowest first; a module may import its own layer and the ones
/// before it. Keep in step with the table in ARCHITECTURE.md (checked).
const LAYERS: &[(&str, &[&str])] = &[
    (
        "pure logic",
        &[
            "errno",
            "fd_reserve",
            "geo",
            "health",
            "maglev",
            "output",
            "protocol",
            "proxy",
            "sockaddr",
            "stats",
            "systemd",
            "token_bucket",
            "transparent",
        ],
    ),
    ("config", &["config"]),
    ("snapshot", &["admission", "flow_key", "snapshot"]),
    (
        "data plane",
        &["access_log", "conn", "engine", "listen", "udp", "worker"],
    ),
    (
        "control plane",
        &["control", "fleet", "model", "server", "state_file", "whatif"],
    ),
    ("start-up", &["demo", "host_check", "startup"]),
    ("CLI", &["fuzzing", "main"]),
];

/// One import: `from` names `to` in `file`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Edge {
    from: String,
    to: String,
    file: String,
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The text without `//` and `/* */` comments (string literals are kept;
/// a `//` inside one cuts the rest of its line, which can only hide a path).
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("//") {
            rest = after.find('\n').map_or("", |i| &after[i..]);
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.find("*/").map_or("", |i| &after[i + 2..]);
            out.push(' ');
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// Top-level modules named after `prefix` (`crate::` or `ringlb::`),
/// including the members of `crate::{a::x, b}`.
fn targets(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in text.match_indices(prefix) {
        let before = text[..i].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue; // e.g. `$crate::` or `my_crate::`
        }
        let after = &text[i + prefix.len()..];
        if let Some(group) = after.strip_prefix('{') {
            // Top-level members of the group: split on commas at depth 0.
            let mut depth = 0;
            let mut start = 0;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        found.insert(ident_at(group[start..j].trim_start()).to_string());
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(ident_at(group[start..j].trim_start()).to_string());
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident_at(after).to_string());
        }
    }
    found.retain(|t| !t.is_empty() && t != "self");
    found
}

/// Every import between two different top-level modules.
fn edges() -> Vec<Edge> {
    let root = src();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut edges = Vec::new();
    for path in files {
        let rel = path.strip_prefix(&root).unwrap().to_string_lossy().replace('\\', "/");
        let first = rel.split('/').next().unwrap();
        let module = first.strip_suffix(".rs").unwrap_or(first).to_string();
        if module == "lib" {
            continue; // only `pub mod` lines
        }
        let text = strip_comments(&std::fs::read_to_string(&path).unwrap());
        let prefix = if module == "main" { "ringlb::" } else { "crate::" };
        for to in targets(&text, prefix) {
            if to != module {
                edges.push(Edge {
                    from: module.clone(),
                    to,
                    file: rel.clone(),
                });
            }
        }
    }
    edges.sort();
    edges
}

fn layer_of() -> BTreeMap<&'static str, usize> {
    let mut map = BTreeMap::new();
    for (i, (_, modules)) in LAYERS.iter().enumerate() {
        for m in *modules {
            assert!(map.insert(*m, i).is_none(), "{m} is in two layers of LAYERS");
        }
    }
    map
}

/// The modules `src/lib.rs` declares, plus `main`.
fn declared_modules() -> BTreeSet<String> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let mut mods: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("pub mod ")
                .or_else(|| l.trim().strip_prefix("mod "))
        })
        .map(|l| l.trim_end_matches(';').trim().to_string())
        .collect();
    mods.insert("main".into());
    mods
}

/// Problems with the module graph: one line per cycle and per upward import.
fn problems(edges: &[Edge], layers: &BTreeMap<&str, usize>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for e in edges {
        graph.entry(&e.from).or_default().insert(&e.to);
    }
    let files = |from: &str, to: &str| -> String {
        let f: Vec<&str> = edges
            .iter()
            .filter(|e| e.from == from && e.to == to)
            .map(|e| e.file.as_str())
            .collect();
        f.join(", ")
    };
    for component in strongly_connected(&graph) {
        // Name one circle through the component's first module, with the
        // files that make each step.
        let path = circle(&graph, &component);
        let steps: Vec<String> = path
            .windows(2)
            .map(|w| format!("{} -> {} ({})", w[0], w[1], files(w[0], w[1])))
            .collect();
        problems.push(format!(
            "import circle among {{{}}}: {}",
            component.join(", "),
            steps.join("; ")
        ));
    }
    for e in edges {
        match (layers.get(e.from.as_str()), layers.get(e.to.as_str())) {
            (Some(&a), Some(&b)) if b > a => problems.push(format!(
                "{} ({}) imports {} of a higher layer ({}) in src/{}",
                e.from, LAYERS[a].0, e.to, LAYERS[b].0, e.file
            )),
            _ => {}
        }
    }
    problems
}

/// Components of more than one module (Tarjan's algorithm; the graph is tiny).
fn strongly_connected<'a>(graph: &BTreeMap<&'a str, BTreeSet<&'a str>>) -> Vec<Vec<&'a str>> {
    struct Tarjan<'a, 'g> {
        graph: &'g BTreeMap<&'a str, BTreeSet<&'a str>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        out: Vec<Vec<&'a str>>,
    }
    impl<'a> Tarjan<'a, '_> {
        fn visit(&mut self, v: &'a str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            for &w in self.graph.get(v).into_iter().flatten() {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.stack.contains(&w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                loop {
                    let w = self.stack.pop().unwrap();
                    component.push(w);
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.out.push(component);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        out: Vec::new(),
    };
    for &v in graph.keys() {
        if !t.index.contains_key(v) {
            t.visit(v);
        }
    }
    t.out
}

/// A shortest circle from the component's first module back to it
/// (breadth-first inside the component).
fn circle<'a>(graph: &BTreeMap<&'a str, BTreeSet<&'a str>>, component: &[&'a str]) -> Vec<&'a str> {
    let start = component[0];
    let inside: BTreeSet<&str> = component.iter().copied().collect();
    let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for &w in graph.get(v).into_iter().flatten() {
            if !inside.contains(w) {
                continue;
            }
            if w == start {
                let mut path = vec![start, v];
                let mut at = v;
                while at != start {
                    at = parent[at];
                    path.push(at);
                }
                path.reverse();
                // path: start ... v start, reversed from the walk back
                return path;
            }
            if !parent.contains_key(w) {
                parent.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    component.to_vec()
}

#[test]
fn no_import_circles_and_no_upward_imports() {
    let layers = layer_of();
    let edges = edges();
    assert!(
        edges.len() > 50,
        "found only {} imports: is the scan broken?",
        edges.len()
    );
    let problems = problems(&edges, &layers);
    assert!(
        problems.is_empty(),
        "{} problem(s) with the module layers:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn every_module_has_a_layer() {
    let layers = layer_of();
    let declared = declared_modules();
    let missing: Vec<&String> = declared.iter().filter(|m| !layers.contains_key(m.as_str())).collect();
    assert!(
        missing.is_empty(),
        "modules with no layer in LAYERS (tests/layers.rs): {missing:?}"
    );
    let stale: Vec<&&str> = layers.keys().filter(|m| !declared.contains(**m)).collect();
    assert!(
        stale.is_empty(),
        "LAYERS names modules src/lib.rs does not declare: {stale:?}"
    );
}

/// ARCHITECTURE.md's table, between `<!-- layers -->` and
/// `<!-- /layers -->`: rows `| layer | `m1`, `m2` |`.
#[test]
fn architecture_md_has_the_same_layers() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let start = text
        .find("<!-- layers -->")
        .expect("ARCHITECTURE.md: no <!-- layers --> marker");
    let end = text
        .find("<!-- /layers -->")
        .expect("ARCHITECTURE.md: no <!-- /layers --> marker");
    let mut documented: Vec<(String, Vec<String>)> = Vec::new();
    for line in text[start..end].lines() {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() < 2 || cells[0] == "layer" || cells[0].starts_with('-') {
            continue;
        }
        let mut modules: Vec<String> = cells[1]
            .split(',')
            .map(|m| m.trim().trim_matches('`').to_string())
            .filter(|m| !m.is_empty())
            .collect();
        modules.sort();
        documented.push((cells[0].to_string(), modules));
    }
    let ours: Vec<(String, Vec<String>)> = LAYERS
        .iter()
        .map(|(name, m)| {
            let mut m: Vec<String> = m.iter().map(|s| s.to_string()).collect();
            m.sort();
            (name.to_string(), m)
        })
        .collect();
    assert_eq!(
        documented, ours,
        "ARCHITECTURE.md's layer table differs from LAYERS in tests/layers.rs"
    );
}

/// The checker itself: a circle and an upward import are found and named.
#[test]
fn the_checker_finds_a_circle_and_an_upward_import() {
    let e = |from: &str, to: &str| Edge {
        from: from.into(),
        to: to.into(),
        file: format!("{from}/x.rs"),
    };
    let layers = layer_of();
    let found = problems(
        &[e("config", "engine"), e("engine", "config"), e("maglev", "stats")],
        &layers,
    );
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(
        found[0].starts_with(
            "import circle among {config, engine}: config -> engine (config/x.rs); engine -> config (engine/x.rs)"
        ),
        "{}",
        found[0]
    );
    assert!(
        found[1].contains("config (config) imports engine of a higher layer (data plane)"),
        "{}",
        found[1]
    );
    let grouped = targets(
        "use crate::{config::X, stats::{a, b}, self};\n let y = crate::maglev::f();",
        "crate::",
    );
    assert_eq!(
        grouped,
        ["config", "maglev", "stats"].map(String::from).into_iter().collect()
    );
    assert!(targets(&strip_comments("// crate::engine\n/* crate::udp */ x"), "crate::").is_empty());
}
