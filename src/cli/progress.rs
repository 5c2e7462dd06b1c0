//! Progress bars on stderr for long work (the initial sync, large share grants, the
//! bench), drawn only when stderr is a terminal: in a pipe, a log file or the journal
//! they are hidden and cost nothing.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The bar log lines step around while it is drawn (`hearth up`'s initial sync).
static UNDER_LOGS: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Makes log lines step around `bar` until it finishes: each line clears it, prints,
/// and draws it again below.
pub(crate) fn under_logs(bar: &ProgressBar) {
    if let Ok(mut slot) = UNDER_LOGS.lock() {
        *slot = Some(bar.clone());
    }
}

/// Stderr for the log: a line written while a bar is drawn does not tear it.
pub(crate) struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = UNDER_LOGS
            .lock()
            .ok()
            .and_then(|slot| slot.clone())
            .filter(|b| !b.is_finished());
        match bar {
            Some(bar) => bar.suspend(|| std::io::stderr().write(buf)),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Whether bars are drawn: stderr is a terminal.
pub(crate) fn shown() -> bool {
    std::io::stderr().is_terminal()
}

/// A bar of `len` steps titled `what`; hidden when stderr is not a terminal.
pub(crate) fn bar(len: u64, what: &str) -> ProgressBar {
    if !shown() {
        return ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    // The template is fixed text; a template error would be a bug, and the plain bar
    // is a fine stand-in.
    let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(what.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_counts_its_steps_whether_drawn_or_hidden() {
        let b = bar(3, "sharing");
        assert_eq!(b.is_hidden(), !shown());
        b.inc(2);
        assert_eq!(b.position(), 2);
        assert_eq!(b.length(), Some(3));
        b.finish_and_clear();
        assert!(b.is_finished());
    }
}
