//! Progress bars on stderr for long work (the initial sync, large share grants, the
//! bench), drawn only when stderr is a terminal: in a pipe, a log file or the journal
//! they are hidden and cost nothing.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

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
