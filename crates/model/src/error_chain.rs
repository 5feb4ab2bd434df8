//! The one printer of an error with its causes. Errors here never put their
//! source in their own message (see STYLE.md §4), so whatever logs or stores an
//! error as a string walks the chain with this.

use std::error::Error;

/// `err: cause: cause…`: `e`'s message followed by each of its sources.
///
/// ```
/// #[derive(Debug, thiserror::Error)]
/// #[error("cannot open disk {path}")]
/// struct OpenError { path: String, #[source] err: std::io::Error }
///
/// let e = OpenError { path: "/d.img".into(), err: std::io::Error::other("no space") };
/// assert_eq!(model::error_chain(&e), "cannot open disk /d.img: no space");
/// ```
pub fn error_chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
