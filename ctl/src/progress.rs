//! Progress for long work (build context upload, image import/load/push/pull): one line on
//! stderr, redrawn in place, only when stderr is a terminal. Anywhere else (a pipe, a file, CI)
//! a [`Progress`] writes nothing at all, so scripted output has no escape codes or carriage
//! returns; what a command prints on stdout is the same either way.
//!
//! [`render`] is the pure part (what the line says); [`Progress`] owns the drawing: a shared
//! handle (the build's upload thread counts bytes through it) that redraws at most every
//! [`REDRAW`], plus a ticker task while a runtime is there so the elapsed time moves even when
//! no bytes do.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The least time between two draws (a bar redrawn per 64 KiB chunk would flood a slow tty).
const REDRAW: Duration = Duration::from_millis(100);
/// How often the ticker redraws while nothing else does.
const TICK: Duration = Duration::from_millis(250);
/// Cells of the bar itself.
const BAR: usize = 24;
/// The longest label shown (characters).
const MAX_LABEL: usize = 48;
/// Spinner frames: plain ASCII, so any terminal shows them.
const FRAMES: [char; 4] = ['|', '/', '-', '\\'];

/// The progress line: `LABEL [#####.....]  42%  1.2 MiB/3.0 MiB  3s` with a total, or
/// `LABEL |  1.2 MiB  3s` (a spinner frame, bytes once some moved) without one.
pub fn render(
    label: &str,
    done: u64,
    total: Option<u64>,
    elapsed: Duration,
    frame: usize,
) -> String {
    // One terminal line: a long label (many services) would wrap and break the redraw.
    let label: String = if label.chars().count() > MAX_LABEL {
        label.chars().take(MAX_LABEL - 1).collect::<String>() + "…"
    } else {
        label.to_string()
    };
    let secs = elapsed.as_secs();
    match total {
        Some(total) if total > 0 => {
            let done = done.min(total);
            let filled = ((done as u128 * BAR as u128) / total as u128) as usize;
            let pct = (done as u128 * 100 / total as u128) as u64;
            format!(
                "{label} [{}{}] {pct:>3}%  {}/{}  {secs}s",
                "#".repeat(filled),
                ".".repeat(BAR - filled),
                human(done),
                human(total)
            )
        }
        _ => {
            let spin = FRAMES[frame % FRAMES.len()];
            if done > 0 {
                format!("{label} {spin}  {}  {secs}s", human(done))
            } else {
                format!("{label} {spin}  {secs}s")
            }
        }
    }
}

/// Bytes as `512 B`, `1.5 KiB`, `3.0 MiB`, `1.2 GiB`.
fn human(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

struct State {
    label: String,
    total: Option<u64>,
    done: u64,
    start: Instant,
    frame: usize,
    last_draw: Option<Instant>,
    finished: bool,
    out: Box<dyn Write + Send>,
}

impl State {
    fn draw(&mut self, force: bool) {
        if self.finished {
            return;
        }
        let now = Instant::now();
        if !force && self.last_draw.is_some_and(|t| now - t < REDRAW) {
            return;
        }
        self.last_draw = Some(now);
        self.frame += 1;
        let line = render(
            &self.label,
            self.done,
            self.total,
            now - self.start,
            self.frame,
        );
        // A failed write to the terminal only loses a frame.
        let _ = write!(self.out, "\r{line}\x1b[K");
        let _ = self.out.flush();
    }

    fn clear(&mut self) {
        let _ = write!(self.out, "\r\x1b[K");
        let _ = self.out.flush();
    }
}

/// A progress line on stderr (see the module doc); cloning shares it.
#[derive(Clone)]
pub struct Progress {
    /// `None`: not a terminal, nothing is drawn.
    state: Option<Arc<Mutex<State>>>,
}

impl Progress {
    /// Draws on stderr when it is a terminal; otherwise a quiet handle.
    pub fn start(label: impl Into<String>, total: Option<u64>) -> Progress {
        let stderr = std::io::stderr();
        let tty = stderr.is_terminal();
        Progress::on(label, total, Box::new(stderr), tty)
    }

    /// Draws nothing (`--quiet`).
    pub fn quiet() -> Progress {
        Progress { state: None }
    }

    /// Draws into `out` when `tty`, else nothing (tests give both).
    pub fn on(
        label: impl Into<String>,
        total: Option<u64>,
        out: Box<dyn Write + Send>,
        tty: bool,
    ) -> Progress {
        if !tty {
            return Progress::quiet();
        }
        let state = Arc::new(Mutex::new(State {
            label: label.into(),
            total,
            done: 0,
            start: Instant::now(),
            frame: 0,
            last_draw: None,
            finished: false,
            out,
        }));
        let weak = Arc::downgrade(&state);
        let p = Progress { state: Some(state) };
        p.with(|s| s.draw(true));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                loop {
                    tokio::time::sleep(TICK).await;
                    let Some(state) = weak.upgrade() else { return };
                    let Ok(mut s) = state.lock() else { return };
                    if s.finished {
                        return;
                    }
                    s.draw(true);
                }
            });
        }
        p
    }

    fn with(&self, f: impl FnOnce(&mut State)) {
        if let Some(state) = &self.state {
            // A poisoned lock means a panic elsewhere: drawing is not worth a second one.
            if let Ok(mut s) = state.lock() {
                f(&mut s);
            }
        }
    }

    /// Whether anything is drawn.
    pub fn is_drawn(&self) -> bool {
        self.state.is_some()
    }

    /// `n` more bytes (or items) done.
    pub fn inc(&self, n: u64) {
        self.with(|s| {
            s.done += n;
            s.draw(false);
        });
    }

    /// Prints `line` on stdout, the progress line cleared first and drawn again after it.
    pub fn println(&self, line: &str) {
        match &self.state {
            None => println!("{line}"),
            Some(_) => self.with(|s| {
                s.clear();
                println!("{line}");
                s.draw(true);
            }),
        }
    }

    /// Prints `line` on stderr (a status line that stays), the progress line cleared first and
    /// drawn again after it.
    pub fn eprintln(&self, line: &str) {
        match &self.state {
            None => eprintln!("{line}"),
            Some(_) => self.with(|s| {
                s.clear();
                let _ = writeln!(s.out, "{line}");
                s.draw(true);
            }),
        }
    }

    /// Clears the line for good (also when the last handle is dropped).
    pub fn finish(&self) {
        self.with(|s| {
            if !s.finished {
                s.clear();
                s.finished = true;
            }
        });
    }
}

impl Drop for State {
    fn drop(&mut self) {
        if !self.finished {
            self.clear();
        }
    }
}

/// Runs `fut` with a spinner (label and elapsed time) on stderr when it is a terminal.
pub async fn during<F: std::future::Future>(label: impl Into<String>, fut: F) -> F::Output {
    let p = Progress::start(label, None);
    let out = fut.await;
    p.finish();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[test]
    fn the_line_says_how_far_and_how_long() {
        let l = render(
            "upload",
            512 << 10,
            Some(1 << 20),
            Duration::from_secs(3),
            0,
        );
        assert_eq!(
            l,
            "upload [############............]  50%  512.0 KiB/1.0 MiB  3s"
        );
        let done = render("upload", 5 << 20, Some(1 << 20), Duration::ZERO, 0);
        assert!(
            done.contains(&format!("[{}] 100%", "#".repeat(BAR))),
            "{done}"
        );
        assert_eq!(
            render("import", 0, None, Duration::from_secs(2), 1),
            "import /  2s"
        );
        assert_eq!(
            render("pull", 2048, None, Duration::from_secs(2), 2),
            "pull -  2.0 KiB  2s"
        );
        assert_eq!(render("x", 0, Some(0), Duration::ZERO, 0), "x |  0s");
        let long = render(&"s, ".repeat(40), 0, None, Duration::ZERO, 0);
        assert_eq!(long.chars().count(), MAX_LABEL + " |  0s".len(), "{long}");
    }

    #[test]
    fn not_a_terminal_draws_nothing() {
        let out = Shared::default();
        let p = Progress::on("upload", Some(100), Box::new(out.clone()), false);
        assert!(!p.is_drawn());
        p.inc(50);
        p.finish();
        drop(p);
        assert_eq!(out.text(), "", "no escape codes, no carriage returns");
    }

    #[test]
    fn a_terminal_gets_one_line_redrawn_then_cleared() {
        let out = Shared::default();
        let p = Progress::on("upload", Some(100), Box::new(out.clone()), true);
        p.inc(100);
        p.finish();
        p.inc(1);
        let text = out.text();
        assert!(text.starts_with("\rupload ["), "{text:?}");
        assert!(text.ends_with("\r\x1b[K"), "{text:?}");
        assert!(!text.contains('\n'), "{text:?}");
        let after = text.len();
        drop(p);
        assert_eq!(out.text().len(), after, "nothing after finish");

        let out = Shared::default();
        let p = Progress::on("wait", None, Box::new(out.clone()), true);
        p.eprintln("web: 1/2 running");
        let text = out.text();
        assert!(
            text.contains("\r\x1b[Kweb: 1/2 running\n\rwait "),
            "the status line is written on a cleared line, the spinner after it: {text:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_ticker_moves_the_clock_and_stops_when_finished() {
        let out = Shared::default();
        let p = Progress::on("import", None, Box::new(out.clone()), true);
        tokio::time::sleep(TICK * 3).await;
        tokio::task::yield_now().await;
        let frames = out.text().matches('\r').count();
        assert!(frames >= 2, "{:?}", out.text());
        p.finish();
        tokio::time::sleep(TICK * 3).await;
        let before = out.text();
        tokio::time::sleep(TICK * 3).await;
        assert_eq!(out.text(), before);
    }
}
