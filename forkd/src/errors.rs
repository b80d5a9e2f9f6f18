//! Error reporting helpers shared by the layers.

/// An error and its causes on one line (`top: cause: cause`), for logs,
/// API bodies and exit reasons, where `{:#}` of anyhow is not at hand.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
