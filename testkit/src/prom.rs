// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A strict parser of the Prometheus text exposition format (0.0.4) as the daemon
//! writes it, for tests where `promtool` is not installed: it fails on any line that
//! is not a HELP, a TYPE or a sample of the grammar.
//!
//!
//! Owns: the grammar checks. Never fetches anything.

use std::collections::{BTreeMap, BTreeSet};

/// One sample line.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition: the samples in order and the TYPE of every family.
#[derive(Debug)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    pub types: BTreeMap<String, String>,
}

fn is_name(s: &str, colon: bool) -> bool {
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':');
    let mut cs = s.chars();
    cs.next().is_some_and(|c| ok(c) && !c.is_ascii_digit()) && cs.all(ok)
}

/// The family a sample name belongs to (histogram suffixes stripped when the
/// family is typed histogram).
fn family<'a>(types: &BTreeMap<String, String>, name: &'a str) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types.get(base).is_some_and(|t| t == "histogram") {
                return Some(base);
            }
        }
    }
    None
}

/// Parses `text`, panicking with the offending line on any violation: a line
/// outside the grammar, a TYPE after its family's samples or twice, a sample of an
/// untyped family, a family split in two, a bad label name or escape, a duplicate
/// series, a timestamp, a missing final line feed. Histograms are checked too:
/// cumulative buckets with increasing `le`, ending in `+Inf` equal to `_count`.
pub fn parse(text: &str) -> Exposition {
    assert!(
        text.ends_with('\n'),
        "the last line must end with a line feed"
    );
    let mut samples: Vec<Sample> = Vec::new();
    let mut types = BTreeMap::new();
    let mut helped = BTreeSet::new();
    let mut finished: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut series = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _) = rest.split_once(' ').expect(line);
            assert!(is_name(name, true), "{line}");
            assert!(helped.insert(name.to_string()), "two HELP lines: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect(line);
            assert!(is_name(name, true), "{line}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "a second TYPE: {line}"
            );
            assert!(!finished.contains(name), "TYPE after the samples: {line}");
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
        let (name, mut rest) = match line.find('{') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => {
                let (n, v) = line.split_once(' ').expect(line);
                (n, v)
            }
        };
        assert!(is_name(name, true), "{line}");
        let mut labels = BTreeMap::new();
        if line.contains('{') {
            loop {
                if let Some(r) = rest.strip_prefix("} ") {
                    rest = r;
                    break;
                }
                let eq = rest.find("=\"").expect(line);
                let key = &rest[..eq];
                assert!(is_name(key, false) && !key.starts_with("__"), "{line}");
                let mut value = String::new();
                let mut chars = rest[eq + 2..].char_indices();
                let end = loop {
                    let (i, c) = chars.next().expect(line);
                    match c {
                        '"' => break i,
                        '\\' => match chars.next().expect(line).1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            c => panic!("bad escape \\{c}: {line}"),
                        },
                        c => value.push(c),
                    }
                };
                assert!(labels.insert(key.to_string(), value).is_none(), "{line}");
                rest = &rest[eq + 2 + end + 1..];
                rest = rest.strip_prefix(',').unwrap_or(rest);
            }
        }
        assert!(
            !rest.contains(' '),
            "a timestamp or junk after the value: {line}"
        );
        let value = match rest {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => {
                assert!(
                    v.chars().all(|c| c.is_ascii_digit() || ".-+eE".contains(c)),
                    "{line}"
                );
                v.parse().expect(line)
            }
        };
        let fam = family(&types, name)
            .unwrap_or_else(|| panic!("a sample without a TYPE: {line}"))
            .to_string();
        if current.as_deref() != Some(&fam) {
            assert!(
                !finished.contains(&fam),
                "family {fam} split in two: {line}"
            );
            if let Some(c) = current.take() {
                finished.insert(c);
            }
            current = Some(fam.clone());
        }
        assert!(
            series.insert(format!("{name}{labels:?}")),
            "a duplicate series: {line}"
        );
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    let e = Exposition { samples, types };
    for (fam, kind) in &e.types {
        if kind == "histogram" {
            e.check_histogram(fam);
        }
    }
    e
}

impl Exposition {
    /// The one sample named `name` whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<_> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        found[0].value
    }

    /// The `(le, cumulative count)` pairs of histogram `fam`.
    pub fn buckets(&self, fam: &str) -> Vec<(f64, f64)> {
        let name = format!("{fam}_bucket");
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| {
                let le = &s.labels["le"];
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                (le, s.value)
            })
            .collect()
    }

    fn check_histogram(&self, fam: &str) {
        let b = self.buckets(fam);
        assert!(!b.is_empty(), "{fam}: no buckets");
        for w in b.windows(2) {
            assert!(w[0].0 < w[1].0, "{fam}: le must increase: {w:?}");
            assert!(w[0].1 <= w[1].1, "{fam}: buckets must be cumulative: {w:?}");
        }
        let (le, n) = *b.last().unwrap();
        assert_eq!(le, f64::INFINITY, "{fam}: the last bucket must be +Inf");
        assert_eq!(
            n,
            self.value(&format!("{fam}_count"), &[]),
            "{fam}: +Inf != _count"
        );
        self.value(&format!("{fam}_sum"), &[]);
    }
}
