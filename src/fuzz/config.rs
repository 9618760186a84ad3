// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fuzz target: the TOML config file. Arbitrary text never panics; generated valid
//! files give exactly the configuration they say; a file broken in one key is
//! refused with an error that names that key. Owns only properties.

use std::path::{Path, PathBuf};

use proptest::{collection::vec, prelude::*, prop_oneof};

use crate::{
    config::{
        Config, ServeArgs, DEFAULT_METRICS_INTERVAL, DEFAULT_SCRUB_RATE, DEFAULT_VERIFY_INTERVAL,
    },
    control::clients::{DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CLIENTS},
    durability::Mode,
    sandbox::SeccompMode,
    state::health::{HealthCopy, RecordOptions},
};

const NAME: &str = "fuzz.toml";

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Any string, TOML-quoted.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![4 => "[a-zA-Z0-9/._-]{1,16}", 1 => "\\PC{1,12}", 1 => "[\"\\\\'\\t ]{1,4}"]
}

#[derive(Clone, Debug)]
enum Val {
    Path(String),
    Str(String),
    Num(u64),
    Bool(bool),
    Mode(Mode),
    Seccomp(SeccompMode),
}

impl Val {
    fn render(&self) -> String {
        match self {
            Val::Path(s) | Val::Str(s) => toml_str(s),
            // TOML integers are i64.
            Val::Num(n) => n.to_string(),
            Val::Bool(b) => b.to_string(),
            Val::Mode(m) => toml_str(&format!("{m:?}").to_lowercase()),
            Val::Seccomp(s) => toml_str(&s.to_string()),
        }
    }
}

/// A valid file: each key present or not, with a value of its type.
fn valid() -> impl Strategy<Value = Vec<(&'static str, Val)>> {
    let path = || text().prop_map(Val::Path);
    let num = || (0u64..=i64::MAX as u64).prop_map(Val::Num);
    let mode = prop_oneof![
        Just(Mode::Auto),
        Just(Mode::Direct),
        Just(Mode::Datasync),
        Just(Mode::Fsync),
        Just(Mode::Volatile)
    ]
    .prop_map(Val::Mode);
    let keys = (
        (
            path().prop_map(|v| ("socket-path", v)),
            path().prop_map(|v| ("file", v)),
            proptest::option::of(mode.prop_map(|v| ("mode", v))),
            proptest::option::of(any::<bool>().prop_map(|b| ("readonly", Val::Bool(b)))),
            proptest::option::of(path().prop_map(|v| ("control-socket", v))),
            proptest::option::of(text().prop_map(|s| ("socket-group", Val::Str(s)))),
            proptest::option::of(
                any::<bool>().prop_map(|b| ("allow-shared-permissions", Val::Bool(b))),
            ),
            proptest::option::of(num().prop_map(|v| ("verify-interval", v))),
            proptest::option::of(any::<bool>().prop_map(|b| ("seal", Val::Bool(b)))),
        ),
        (
            proptest::option::of(path().prop_map(|v| ("agent-socket", v))),
            proptest::option::of(text().prop_map(|s| ("guest-pci-address", Val::Str(s)))),
            proptest::option::of(path().prop_map(|v| ("state-dir", v))),
            proptest::option::of(num().prop_map(|v| ("scrub-interval", v))),
            proptest::option::of(num().prop_map(|v| ("scrub-rate", v))),
            proptest::option::of(
                "[a-z0-9/_-]{0,8}[a-z0-9_-]"
                    .prop_map(|s| ("metrics-file", Val::Path(format!("{s}.prom")))),
            ),
            proptest::option::of(
                (1u64..=i64::MAX as u64).prop_map(|n| ("metrics-interval", Val::Num(n))),
            ),
            proptest::option::of(text().prop_map(|s| ("metrics-instance", Val::Str(s)))),
            proptest::option::of(
                prop_oneof![
                    Just(SeccompMode::Enforce),
                    Just(SeccompMode::Log),
                    Just(SeccompMode::Off)
                ]
                .prop_map(|s| ("seccomp", Val::Seccomp(s))),
            ),
        ),
        (
            proptest::option::of(text().prop_map(|s| ("control-group", Val::Str(s)))),
            proptest::option::of(text().prop_map(|s| ("operator-group", Val::Str(s)))),
            proptest::option::of(
                (1u64..=i64::MAX as u64).prop_map(|n| ("control-max-clients", Val::Num(n))),
            ),
            proptest::option::of(
                (1u64..=i64::MAX as u64).prop_map(|n| ("control-idle-timeout", Val::Num(n))),
            ),
            proptest::option::of(path().prop_map(|v| ("health-copy-dir", v))),
            proptest::option::of(any::<bool>().prop_map(|b| ("health-copy", Val::Bool(b)))),
            proptest::option::of(
                any::<bool>().prop_map(|b| ("allow-shared-socket-dir", Val::Bool(b))),
            ),
        ),
    );
    (keys, any::<prop::sample::Index>()).prop_map(
        |(
            ((a, b, c, d, e, f, g, h, i), (j, k, l, m, n, o, p, q, r), (s, t, u, w, x, y, z)),
            shuffle,
        )| {
            let mut kv: Vec<_> = [
                Some(a),
                Some(b),
                c,
                d,
                e,
                f,
                g,
                h,
                i,
                j,
                k,
                l,
                m,
                n,
                o,
                p,
                q,
                r,
                s,
                t,
                u,
                w,
                x,
                y,
                z,
            ]
            .into_iter()
            .flatten()
            .collect();
            let len = kv.len();
            kv.rotate_left(shuffle.index(len));
            kv
        },
    )
}

fn render(kv: &[(&str, Val)]) -> String {
    kv.iter()
        .map(|(k, v)| format!("{k} = {}\n", v.render()))
        .collect()
}

/// What the file says, built by hand with the documented defaults.
fn expected(kv: &[(&str, Val)]) -> Config {
    let get = |key: &str| kv.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone());
    let path = |key| match get(key) {
        Some(Val::Path(s)) => Some(PathBuf::from(s)),
        _ => None,
    };
    let string = |key| match get(key) {
        Some(Val::Str(s)) => Some(s),
        _ => None,
    };
    let num = |key, default| match get(key) {
        Some(Val::Num(n)) => n,
        _ => default,
    };
    let flag = |key| matches!(get(key), Some(Val::Bool(true)));
    Config {
        socket_path: path("socket-path").unwrap(),
        file: path("file").unwrap(),
        mode: match get("mode") {
            Some(Val::Mode(m)) => m,
            _ => Mode::Auto,
        },
        readonly: flag("readonly"),
        control_socket: path("control-socket"),
        socket_group: string("socket-group"),
        control_group: string("control-group"),
        operator_group: string("operator-group"),
        control_max_clients: num("control-max-clients", DEFAULT_MAX_CLIENTS as u64) as usize,
        control_idle_timeout: num("control-idle-timeout", DEFAULT_IDLE_TIMEOUT),
        allow_shared_permissions: flag("allow-shared-permissions"),
        verify_interval: num("verify-interval", DEFAULT_VERIFY_INTERVAL),
        seal: flag("seal"),
        agent_socket: path("agent-socket"),
        guest_pci_address: string("guest-pci-address"),
        state_dir: path("state-dir"),
        records: RecordOptions {
            health_copy: match (get("health-copy"), path("health-copy-dir")) {
                (Some(Val::Bool(false)), _) => HealthCopy::Off,
                (_, Some(d)) => HealthCopy::Dir(d),
                _ => HealthCopy::Default,
            },
            adopt_legacy: false,
        },
        allow_shared_socket_dir: flag("allow-shared-socket-dir"),
        scrub_interval: num("scrub-interval", 0),
        scrub_rate: num("scrub-rate", DEFAULT_SCRUB_RATE),
        flush_rate_limit: None,
        metrics_file: path("metrics-file"),
        metrics_interval: num("metrics-interval", DEFAULT_METRICS_INTERVAL),
        metrics_instance: string("metrics-instance").filter(|s| !s.is_empty()),
        seccomp: match get("seccomp") {
            Some(Val::Seccomp(s)) => s,
            _ => SeccompMode::Enforce,
        },
        log_level: None,
    }
}

#[test]
fn config_arbitrary_text() {
    let line = prop_oneof![
        3 => valid().prop_map(|kv| render(&kv)),
        2 => "[a-z-]{1,20} ?= ?[\\[\\]{}\"'0-9a-z.,=+-]{0,20}",
        1 => "\\PC{0,40}",
        1 => "\\[[a-z.]{0,10}\\]",
    ];
    let case = vec(line, 0..4).prop_map(|l| l.join("\n"));
    super::run("config-text", case, |text| {
        // Anything but a panic; an error is fine.
        let _ = Config::from_file_text(ServeArgs::default(), &text, Path::new(NAME));
        Ok(())
    });
}

#[test]
fn config_round_trip() {
    super::run("config-round-trip", valid(), |kv| {
        let text = render(&kv);
        // An empty metrics-instance is refused (checked by the next target).
        prop_assume!(
            !matches!(kv.iter().find(|(k, _)| *k == "metrics-instance"), Some((_, Val::Str(s))) if s.is_empty())
        );
        let got = Config::from_file_text(ServeArgs::default(), &text, Path::new(NAME))
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(got, expected(&kv), "{}", text);
        Ok(())
    });
}

/// One key broken: a value of the wrong type, a misspelt name, or a value the
/// checks refuse, or a required key left out.
#[derive(Clone, Debug)]
enum Break {
    WrongType(usize, String),
    Misspelt(usize),
    Refused(&'static str, String),
    Missing(&'static str),
}

#[test]
fn config_errors_name_the_key() {
    let wrong = prop_oneof![
        Just("\"x\"".to_string()),
        Just("-1".to_string()),
        Just("1.5".to_string()),
        Just("[1]".to_string()),
        Just("{ a = 1 }".to_string()),
        Just("true".to_string()),
        Just("7".to_string()),
        Just("\"autox\"".to_string()),
    ];
    let brk = prop_oneof![
        (any::<usize>(), wrong).prop_map(|(i, w)| Break::WrongType(i, w)),
        any::<usize>().prop_map(Break::Misspelt),
        Just(Break::Refused("metrics-interval", "0".into())),
        Just(Break::Refused("control-max-clients", "0".into())),
        Just(Break::Refused("control-idle-timeout", "0".into())),
        Just(Break::Refused("metrics-instance", "\"\"".into())),
        Just(Break::Refused("metrics-file", "\"/m.txt\"".into())),
        Just(Break::Refused("metrics-file", "\"/dir/.prom\"".into())),
        Just(Break::Missing("socket-path")),
        Just(Break::Missing("file")),
    ];
    super::run("config-errors", (valid(), brk), |(mut kv, brk)| {
        let mut text = String::new();
        let key: String = match &brk {
            Break::WrongType(i, w) => {
                let i = i % kv.len();
                let (k, v) = &kv[i];
                // Skip a "wrong" value that is of the right type after all.
                let right = match v {
                    Val::Num(_) => w == "7",
                    Val::Bool(_) => w == "true",
                    Val::Path(_) | Val::Str(_) => w.starts_with('"'),
                    Val::Mode(_) | Val::Seccomp(_) => false,
                };
                prop_assume!(!right);
                let k = k.to_string();
                kv.remove(i);
                text.push_str(&format!("{k} = {w}\n"));
                k
            }
            Break::Misspelt(i) => {
                let (k, v) = kv.remove(i % kv.len());
                let k = format!("{k}x");
                text.push_str(&format!("{k} = {}\n", v.render()));
                k
            }
            Break::Refused(k, v) => {
                kv.retain(|(key, _)| key != k);
                text.push_str(&format!("{k} = {v}\n"));
                k.to_string()
            }
            Break::Missing(k) => {
                kv.retain(|(key, _)| key != k);
                k.to_string()
            }
        };
        text.push_str(&render(&kv));
        match Config::from_file_text(ServeArgs::default(), &text, Path::new(NAME)) {
            Ok(c) => Err(TestCaseError::fail(format!(
                "accepted ({brk:?}):\n{text}-> {c:?}"
            ))),
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(
                    msg.contains(&key),
                    "the error does not name `{key}`: {msg}\n{text}"
                );
                Ok(())
            }
        }
    });
}
