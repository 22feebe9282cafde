//! Log lines for the journal. A unit with `StandardOutput=journal` writes its stdout into a
//! stream journald reads line by line, and systemd says so in `JOURNAL_STREAM` (`DEV:INODE` of
//! that stream). journald stamps every entry itself and reads a leading `<N>` as the line's
//! syslog priority (`SyslogLevelPrefix=`, on by default); a line without one is priority 6
//! (info). So, seen under systemd, the plain text format loses every level — `journalctl -p
//! warning -u rudder-agent` found nothing even when the agent warned — and repeats the time.
//!
//! [`JournalFormat`] is the daemons' format when [`stdout_is_journal`]: `<N>` from the event's
//! level, no timestamp, the rest as usual. Anywhere else (the lab's log files, a terminal)
//! nothing changes.

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The variable systemd sets when stdout or stderr goes to the journal.
pub const JOURNAL_STREAM: &str = "JOURNAL_STREAM";

/// The syslog priority journald records for `level`.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// Whether `JOURNAL_STREAM`'s `value` names the stream `(dev, ino)`. Pure.
pub fn names_stream(value: &str, dev: u64, ino: u64) -> bool {
    value
        .split_once(':')
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
        == Some((dev, ino))
}

/// Whether this process's stdout is the journal stream systemd gave it (not merely inherited
/// the variable from a parent that had one: the stream must be the same file).
pub fn stdout_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Some(value) = std::env::var_os(JOURNAL_STREAM) else {
        return false;
    };
    // stat(2) of the fd's magic link is fstat(2) of the fd.
    std::fs::metadata("/proc/self/fd/1")
        .map(|m| names_stream(&value.to_string_lossy(), m.dev(), m.ino()))
        .unwrap_or(false)
}

/// The event format for the journal: `<priority>` and the usual line without its timestamp.
#[derive(Debug)]
pub struct JournalFormat<F = Format<Full, ()>> {
    inner: F,
}

impl JournalFormat {
    pub fn new() -> Self {
        JournalFormat {
            inner: tracing_subscriber::fmt::format()
                .without_time()
                .with_ansi(false),
        }
    }
}

impl Default for JournalFormat {
    fn default() -> Self {
        Self::new()
    }
}

impl<S, N, F> FormatEvent<S, N> for JournalFormat<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        // The level is right-aligned (" INFO"): no space between the prefix and the text.
        write!(
            writer,
            "<{}>{}",
            priority(event.metadata().level()),
            line.trim_start()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
        assert_eq!(priority(&Level::TRACE), 7);
    }

    #[test]
    fn journal_stream_names_one_stream() {
        assert!(names_stream("64768:123456", 64768, 123456));
        for other in [
            "64768:123457",
            "1:123456",
            "",
            "64768",
            "x:y",
            "64768:123456:1",
        ] {
            assert!(!names_stream(other, 64768, 123456), "{other:?}");
        }
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_carry_their_priority_and_no_time() {
        let sink = Sink::default();
        let out = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .with_max_level(Level::DEBUG)
            .event_format(JournalFormat::new())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(code = 3, "broken");
            tracing::warn!("odd");
            tracing::info!(addr = "0.0.0.0:4243", "serving");
            tracing::debug!("detail");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "<3>ERROR rudder_sdnotify::journal::tests: broken code=3",
                "<4>WARN rudder_sdnotify::journal::tests: odd",
                "<6>INFO rudder_sdnotify::journal::tests: serving addr=\"0.0.0.0:4243\"",
                "<7>DEBUG rudder_sdnotify::journal::tests: detail",
            ]
        );
    }
}
