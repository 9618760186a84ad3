// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The layering rule of `src/` (see the map in `src/lib.rs` and docs/design.md):
//! every module sits on a floor, and a module may import only from its own floor or
//! the floors below; nothing may form an import circle.
//!
//! Owns: the floor table and the check over `crate::` paths. Never compiles or runs
//! the code: it reads the source as text, like a reviewer would.
//!
//! `cargo test --test layers -- --nocapture` prints every import edge between
//! modules with its floors.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// Floors from the bottom up. A module path maps to the floor of its longest
/// prefix in this table.
const FLOORS: &[(&str, &[&str])] = &[
    ("utilities", &["sys", "jsonl", "util", "service", "trust"]),
    (
        "core",
        &[
            "backing",
            "blockmap",
            "blockmap::check",
            "durability",
            "region",
            "state",
            "media::ranges",
        ],
    ),
    ("report", &["events", "report"]),
    (
        "services",
        &["device", "media", "guard", "control", "state::health"],
    ),
    (
        "runtime",
        &["socket", "sandbox", "systemd", "config", "host"],
    ),
    ("apps", &["app"]),
];

fn floor_of(module: &str) -> Option<(usize, &'static str)> {
    let mut best: Option<(usize, usize, &'static str)> = None;
    for (i, (_, mods)) in FLOORS.iter().enumerate() {
        for m in *mods {
            let hit = module == *m || module.starts_with(&format!("{m}::"));
            if hit && best.is_none_or(|(_, len, _)| m.len() > len) {
                best = Some((i, m.len(), m));
            }
        }
    }
    best.map(|(i, _, m)| (i, m))
}

/// `src/a/b.rs` -> `a::b`, `src/a/mod.rs` -> `a`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without comments and without its test-only items (each item
/// after a `#[cfg(test)]`: up to its `;`, or through its braces).
fn production_code(text: &str) -> String {
    let code: String = text
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = String::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..i]);
        let item = &rest[i..];
        let end = match (item.find(';'), item.find('{')) {
            (Some(semi), Some(open)) if semi < open => semi + 1,
            (_, Some(open)) => {
                let mut depth = 0;
                let mut end = item.len();
                for (j, c) in item[open..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = open + j + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (Some(semi), None) => semi + 1,
            (None, None) => item.len(),
        };
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

/// Expands `a::{b, c::{d, e}}` into `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        return vec![tree.to_string()];
    };
    let prefix = tree[..open].trim_end_matches("::").trim();
    let inner = &tree[open + 1..tree.rfind('}').unwrap()];
    let mut items = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, ch) in inner.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items
        .into_iter()
        .filter(|s| !s.trim().is_empty())
        .flat_map(expand)
        .map(|s| {
            if s == "self" {
                prefix.to_string()
            } else if prefix.is_empty() {
                s
            } else {
                format!("{prefix}::{s}")
            }
        })
        .collect()
}

/// Every `crate::` path a file's production code names.
fn crate_paths(code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    // `use crate::...;` statements, braces expanded.
    let mut rest = code;
    while let Some(i) = rest.find("use crate::") {
        let stmt_start = i + "use crate::".len();
        let end = rest[stmt_start..].find(';').unwrap() + stmt_start;
        paths.extend(expand(&rest[stmt_start..end]));
        rest = &rest[end..];
    }
    // Inline `crate::a::b` paths anywhere else.
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let tail = &rest[i + "crate::".len()..];
        let path: String = tail
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        if !path.starts_with('{') && !path.is_empty() {
            paths.push(path.trim_end_matches(':').to_string());
        }
        rest = tail;
    }
    paths
}

/// The known module a path points into (its longest module prefix).
fn target_module(path: &str, modules: &BTreeSet<String>) -> Option<String> {
    let segs: Vec<&str> = path.split("::").map(str::trim).collect();
    (1..=segs.len())
        .rev()
        .map(|n| segs[..n].join("::"))
        .find(|m| modules.contains(m))
}

struct Edge {
    from: String,
    to: String,
    via: String,
}

fn edges() -> (BTreeSet<String>, Vec<Edge>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    // The binary's own modules (`mod x;` in main.rs) are not the library's.
    let main = fs::read_to_string(src.join("main.rs")).unwrap();
    let binary_mods: Vec<String> = main
        .lines()
        .filter_map(|l| l.trim().strip_prefix("mod "))
        .map(|m| format!("{}.rs", m.trim_end_matches(';')))
        .collect();
    let mut modules = BTreeSet::new();
    let mut texts = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        // Binaries and the test-only fuzz tree are not modules of the library.
        if rel.starts_with("bin")
            || rel == Path::new("main.rs")
            || rel.starts_with("fuzz")
            || binary_mods.iter().any(|m| rel == Path::new(m))
        {
            continue;
        }
        if rel == Path::new("lib.rs") {
            continue;
        }
        let m = module_of(&src, f);
        modules.insert(m.clone());
        texts.push((m, fs::read_to_string(f).unwrap()));
    }
    let mut out = Vec::new();
    for (m, text) in &texts {
        for p in crate_paths(&production_code(text)) {
            // The crate root's own items (the error type, helpers) sit below all.
            let Some(to) = target_module(&p, &modules) else {
                continue;
            };
            if to == *m || to.starts_with(&format!("{m}::")) || m.starts_with(&format!("{to}::")) {
                continue;
            }
            out.push(Edge {
                from: m.clone(),
                to,
                via: p,
            });
        }
    }
    (modules, out)
}

#[test]
fn every_module_has_a_floor() {
    let (modules, _) = edges();
    let missing: Vec<_> = modules.iter().filter(|m| floor_of(m).is_none()).collect();
    assert!(
        missing.is_empty(),
        "modules on no floor (add them to FLOORS here and to the map in src/lib.rs): {missing:?}"
    );
}

#[test]
fn imports_point_only_down_or_across() {
    let (_, edges) = edges();
    let mut up = Vec::new();
    for e in &edges {
        let (Some((ff, _)), Some((tf, _))) = (floor_of(&e.from), floor_of(&e.to)) else {
            continue;
        };
        println!(
            "{} ({}) -> {} ({}) via {}",
            e.from, FLOORS[ff].0, e.to, FLOORS[tf].0, e.via
        );
        if tf > ff {
            up.push(format!(
                "{} (floor {}) imports {} (floor {}) via crate::{}",
                e.from, FLOORS[ff].0, e.to, FLOORS[tf].0, e.via
            ));
        }
    }
    up.sort();
    up.dedup();
    assert!(
        up.is_empty(),
        "{} import(s) point up:\n{}",
        up.len(),
        up.join("\n")
    );
}

#[test]
fn no_import_circle() {
    let (modules, edges) = edges();
    // Edges between top-level-ish modules as the floor table names them.
    let unit = |m: &str| floor_of(m).map_or(m.to_string(), |(_, name)| name.to_string());
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for m in &modules {
        graph.entry(unit(m)).or_default();
    }
    for e in &edges {
        let (a, b) = (unit(&e.from), unit(&e.to));
        if a != b {
            graph.entry(a).or_default().insert(b);
        }
    }
    // Depth-first search for a back edge; report the circle it closes.
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        circles: &mut Vec<String>,
    ) {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut c = stack[i..].to_vec();
            c.push(n.to_string());
            circles.push(c.join(" -> "));
            return;
        }
        if done.contains(n) {
            return;
        }
        stack.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            visit(m, g, stack, done, circles);
        }
        stack.pop();
        done.insert(n.to_string());
    }
    let mut circles = Vec::new();
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        visit(n, &graph, &mut Vec::new(), &mut done, &mut circles);
    }
    assert!(
        circles.is_empty(),
        "import circles:\n{}",
        circles.join("\n")
    );
}

#[test]
fn the_checker_sees_nested_use_trees_and_inline_paths() {
    let code = "use crate::{a::{self, b::C}, d};\nfn f() { crate::e::g(); }";
    let p = crate_paths(code);
    assert_eq!(p, ["a", "a::b::C", "d", "e::g"]);
    let code = "fn a() { crate::x::y(); }\n#[cfg(test)]\nfn t() { if true { crate::up::z(); } }\n\
                #[cfg(test)]\nuse crate::up2;\nfn b() { crate::w::v(); } // crate::c::d";
    assert_eq!(crate_paths(&production_code(code)), ["x::y", "w::v"]);
    assert_eq!(floor_of("blockmap::prepare"), Some((1, "blockmap")));
    assert_eq!(floor_of("media::ranges"), Some((1, "media::ranges")));
    assert_eq!(floor_of("media::channel"), Some((3, "media")));
}
