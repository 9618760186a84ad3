// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Where the log and the command line's own messages go, and how they look: lines
//! for the journal (`<N>` priority prefixes, no timestamps, no colours) when stderr
//! is the stream systemd passed (`JOURNAL_STREAM` names its device and inode), a
//! human format otherwise (timestamps; colours only on a terminal). The filter comes
//! from `--log-level`, else `RUST_LOG`, else the config file's `log-level`, else
//! `info`.
//!
//! Owns: the one decision "journal, terminal or plain", taken once at start-up (the
//! terminal check is an ioctl; the seccomp filter installed later need not allow
//! it), the line formats, and the `error: ...` / `warning: ...` lines of the command
//! line. Never decides what is logged, and never touches the terminal after
//! [`Output::detect`].

use std::{
    error::Error,
    ffi::OsStr,
    fmt::Write as _,
    io::{self, Write as _},
};

use env_logger::fmt::{Target, WriteStyle};
use log::{Level, SetLoggerError};
use vhost_device_pmem::config::LogLevel;

/// What stderr is, decided once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// systemd's journal stream: `<N>message` lines.
    Journal,
    /// A terminal, a pipe or a file: `[time LEVEL target] message`, coloured only
    /// when `color`.
    Human { color: bool },
}

impl Output {
    /// Looks at stderr once: the journal when `JOURNAL_STREAM` names it (systemd's
    /// convention: compare the device and inode of fd 2), else the human format,
    /// coloured when stderr is a terminal and the colour conventions (`NO_COLOR`,
    /// `CLICOLOR`, `CLICOLOR_FORCE`, `TERM=dumb`) allow it.
    pub fn detect() -> Self {
        let stderr = io::stderr();
        let stat = rustix::fs::fstat(&stderr).ok();
        let journal = stat.is_some_and(|st| {
            std::env::var_os("JOURNAL_STREAM")
                .is_some_and(|v| journal_stream_names(&v, st.st_dev, st.st_ino))
        });
        if journal {
            return Self::Journal;
        }
        // The only terminal check (an ioctl, inside `choice`): every line after this
        // one is written with the choice made here.
        let color = anstream::AutoStream::choice(&stderr) != anstream::ColorChoice::Never;
        Self::Human { color }
    }

    /// Installs the logger with the filter `spec` (env_logger's syntax: `debug`,
    /// `vhost_device_pmem=trace,info`, ...).
    pub fn init_logger(self, spec: &str) -> Result<(), SetLoggerError> {
        let logger = self.logger(spec, Box::new(io::stderr()));
        // The most verbose level the filter lets through anywhere, so `log` skips
        // the rest before formatting.
        let max = logger.filter();
        log::set_boxed_logger(Box::new(logger))?;
        log::set_max_level(max);
        Ok(())
    }

    /// The logger writing to `sink` (stderr, or a buffer in tests). Each record is
    /// formatted into a buffer and written with one `write`; env_logger's own
    /// stderr target is not used because, when it colours, it asks whether stderr
    /// is a terminal again for every line.
    fn logger(self, spec: &str, sink: Box<dyn io::Write + Send>) -> env_logger::Logger {
        let mut b = env_logger::Builder::new();
        b.parse_filters(spec).target(Target::Pipe(sink));
        match self {
            Self::Journal => {
                b.write_style(WriteStyle::Never).format(|buf, record| {
                    let prio = priority(record.level());
                    // Every line of a multi-line message gets the prefix, or the
                    // journal files the later ones at the default priority.
                    for line in record.args().to_string().split('\n') {
                        writeln!(buf, "<{prio}>{line}")?;
                    }
                    Ok(())
                });
            }
            Self::Human { color } => {
                b.write_style(if color {
                    WriteStyle::Always
                } else {
                    WriteStyle::Never
                });
            }
        }
        b.build()
    }

    /// Prints `error: MESSAGE: caused by SOURCE: ...` to stderr (with the error
    /// priority in the journal): how the command line reports a failure.
    pub fn error(self, e: &(dyn Error + 'static)) {
        self.line(
            Level::Error,
            &format!("error: {}", vhost_device_pmem::error_chain(e)),
        );
    }

    /// Prints `warning: MESSAGE` to stderr (warning priority in the journal).
    pub fn warning(self, msg: &str) {
        self.line(Level::Warn, &format!("warning: {msg}"));
    }

    fn line(self, level: Level, text: &str) {
        let mut out = String::new();
        for line in text.split('\n') {
            if self == Self::Journal {
                let _ = write!(out, "<{}>", priority(level));
            }
            out.push_str(line);
            out.push('\n');
        }
        let _ = io::stderr().write_all(out.as_bytes());
    }
}

/// Whether `JOURNAL_STREAM`'s value (`DEVICE:INODE`, decimal) names this device and
/// inode.
pub fn journal_stream_names(value: &OsStr, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

/// The sd-daemon(3) priority prefix of a level: error 3, warn 4, info 6, debug and
/// trace 7.
pub fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// The log filter: `--log-level` wins, then `RUST_LOG` (which may name modules),
/// then the config file's `log-level`, then `info`.
pub fn filter_spec(
    flag: Option<LogLevel>,
    rust_log: Option<&str>,
    file: Option<LogLevel>,
) -> String {
    if let Some(level) = flag {
        return level.to_string();
    }
    if let Some(spec) = rust_log.filter(|s| !s.trim().is_empty()) {
        return spec.to_string();
    }
    file.unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use log::Log;

    use super::*;

    /// A sink the test can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn emit(output: Output, spec: &str, records: &[(Level, &str)]) -> String {
        let sink = Captured::default();
        let logger = output.logger(spec, Box::new(sink.clone()));
        for (level, msg) in records {
            logger.log(
                &log::Record::builder()
                    .level(*level)
                    .target("vhost_device_pmem::daemon")
                    .args(format_args!("{msg}"))
                    .build(),
            );
        }
        let bytes = sink.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn journal_lines_carry_the_priority_and_nothing_else() {
        let text = emit(
            Output::Journal,
            "trace",
            &[
                (Level::Error, "sync failed"),
                (Level::Warn, "downgraded"),
                (Level::Info, "listening"),
                (Level::Debug, "probe"),
                (Level::Trace, "ring"),
                (Level::Info, "two\nlines"),
            ],
        );
        assert_eq!(
            text,
            "<3>sync failed\n<4>downgraded\n<6>listening\n<7>probe\n<7>ring\n<6>two\n<6>lines\n"
        );
    }

    #[test]
    fn human_lines_are_coloured_only_when_asked() {
        let plain = emit(
            Output::Human { color: false },
            "info",
            &[(Level::Warn, "w"), (Level::Debug, "hidden")],
        );
        assert!(!plain.contains('\x1b'), "{plain:?}");
        assert!(plain.contains("WARN") && plain.contains("vhost_device_pmem::daemon] w"));
        assert!(!plain.contains("hidden"), "{plain:?}");
        // A timestamp, as today: "[2026-...Z WARN ...".
        assert!(plain.starts_with("[2"), "{plain:?}");
        let coloured = emit(Output::Human { color: true }, "info", &[(Level::Warn, "w")]);
        assert!(coloured.contains("\x1b["), "{coloured:?}");
    }

    #[test]
    fn journal_stream_is_matched_by_device_and_inode() {
        assert!(journal_stream_names(OsStr::new("8:1234"), 8, 1234));
        assert!(!journal_stream_names(OsStr::new("8:1234"), 8, 1235));
        assert!(!journal_stream_names(OsStr::new("9:1234"), 8, 1234));
        assert!(!journal_stream_names(OsStr::new("8"), 8, 1234));
        assert!(!journal_stream_names(OsStr::new(""), 0, 0));
        assert!(!journal_stream_names(OsStr::new("x:y"), 0, 0));
    }

    #[test]
    fn the_flag_wins_then_rust_log_then_the_file() {
        use LogLevel::*;
        assert_eq!(filter_spec(Some(Debug), Some("trace"), Some(Warn)), "debug");
        assert_eq!(
            filter_spec(None, Some("vhost=trace,info"), Some(Warn)),
            "vhost=trace,info"
        );
        assert_eq!(filter_spec(None, Some(" "), Some(Warn)), "warn");
        assert_eq!(filter_spec(None, None, None), "info");
        let max = |spec| Output::Journal.logger(spec, Box::new(io::sink())).filter();
        assert_eq!(max("vhost=trace,info"), log::LevelFilter::Trace);
        assert_eq!(max("off"), log::LevelFilter::Off);
    }
}
