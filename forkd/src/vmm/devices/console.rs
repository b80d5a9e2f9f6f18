//! Where the guest's console bytes go: split into lines, kept for the API
//! and tests, optionally echoed to stdout with a `[name]` prefix.

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Longest line kept; longer guest lines are cut (never unbounded memory).
const MAX_LINE: usize = 4096;
/// Lines kept per VM (older ones are dropped).
const MAX_LINES: usize = 10_000;

#[derive(Debug, Default)]
pub struct ConsoleLog {
    pub lines: Vec<String>,
    /// When each line of `lines` was complete (its newline arrived), in step
    /// with `lines`.
    pub line_times: Vec<Instant>,
    partial: Vec<u8>,
    pub first_output: Option<Instant>,
    pub dropped_lines: u64,
}

impl ConsoleLog {
    pub fn last_line(&self) -> Option<&str> {
        self.lines.last().map(String::as_str)
    }

    /// When the last line starting with `prefix` was complete.
    pub fn line_time(&self, prefix: &str) -> Option<Instant> {
        let i = self.lines.iter().rposition(|l| l.starts_with(prefix))?;
        self.line_times.get(i).copied()
    }
}

/// A cloneable handle on one VM's console.
#[derive(Clone, Debug)]
pub struct Console {
    log: Arc<Mutex<ConsoleLog>>,
    echo_prefix: Option<Arc<str>>,
}

impl Console {
    /// `echo`: print every line to stdout, prefixed by `[name] ` if given.
    pub fn new(echo: bool, name: Option<&str>) -> Self {
        Console {
            log: Arc::new(Mutex::new(ConsoleLog::default())),
            echo_prefix: echo.then(|| match name {
                Some(n) => Arc::from(format!("[{n}] ")),
                None => Arc::from(""),
            }),
        }
    }

    pub fn log(&self) -> MutexGuard<'_, ConsoleLog> {
        // A panic elsewhere must not take the console down with it.
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn lines(&self) -> Vec<String> {
        self.log().lines.clone()
    }

    pub fn last_line(&self) -> Option<String> {
        self.log().last_line().map(str::to_owned)
    }

    pub fn first_output(&self) -> Option<Instant> {
        self.log().first_output
    }

    /// When the last line starting with `prefix` was complete (its newline
    /// reached the console), if there is one.
    pub fn line_time(&self, prefix: &str) -> Option<Instant> {
        self.log().line_time(prefix)
    }

    pub(crate) fn partial(&self) -> Vec<u8> {
        self.log().partial.clone()
    }

    pub(crate) fn restore_partial(&self, bytes: &[u8]) {
        self.log().partial = bytes[..bytes.len().min(MAX_LINE)].to_vec();
    }

    pub fn push_bytes(&self, bytes: &[u8]) {
        for &b in bytes {
            self.push_byte(b);
        }
    }

    pub fn push_byte(&self, b: u8) {
        let mut log = self.log();
        if log.first_output.is_none() {
            log.first_output = Some(Instant::now());
        }
        match b {
            b'\n' => {
                let at = Instant::now();
                let raw = std::mem::take(&mut log.partial);
                let line = String::from_utf8_lossy(&raw)
                    .trim_end_matches('\r')
                    .to_string();
                if let Some(prefix) = &self.echo_prefix {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{prefix}{line}");
                    let _ = out.flush();
                }
                if log.lines.len() == MAX_LINES {
                    log.lines.remove(0);
                    log.line_times.remove(0);
                    log.dropped_lines += 1;
                }
                log.lines.push(line);
                log.line_times.push(at);
            }
            _ if log.partial.len() < MAX_LINE => log.partial.push(b),
            _ => {}
        }
    }
}

/// The writer vm-superio's UART sends transmitted bytes to.
pub struct ConsoleWriter(pub Console);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            self.0.push_byte(b);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_times_follow_lines() {
        let c = Console::new(false, None);
        let before = Instant::now();
        c.push_bytes(b"zone: start\nzone: done clone=0\npartial");
        let after = Instant::now();
        let log = c.log();
        assert_eq!(log.lines.len(), log.line_times.len());
        let start = log.line_time("zone: start").unwrap();
        let done = log.line_time("zone: done").unwrap();
        assert!(before <= start && start <= done && done <= after);
        assert!(log.line_time("partial").is_none());
    }
}
