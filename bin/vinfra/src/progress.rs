//! Progress bars for anything that takes over a second (image build, VM boot,
//! migration). They draw only on a terminal; in logs and CI they stay quiet and the
//! final message is printed as a plain line.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A spinner with a message, ticking on its own.
pub fn spinner(msg: impl Into<String>) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(msg.into());
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}
