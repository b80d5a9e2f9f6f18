//! A small client of the host API: one HTTP/1.1 request per connection
//! (`Connection: close`) over the daemon's Unix socket, or over TCP with a
//! bearer token. Used by `forkd vm`.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// How long one request may take (a create boots a VM; a fork builds
/// clones).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest response read (a console is at most a few MiB).
const MAX_RESPONSE: u64 = 64 << 20;

/// Where the daemon's API is.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp {
        addr: SocketAddr,
        token: Option<String>,
    },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp { addr, .. } => write!(f, "tcp:{addr}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the API at {at}")]
    Connect {
        at: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{method} {path}: the connection failed")]
    Io {
        method: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{method} {path}: malformed response: {why}")]
    Malformed {
        method: String,
        path: String,
        why: &'static str,
    },
    #[error("{method} {path}: {status}: {message}")]
    Status {
        method: String,
        path: String,
        status: u16,
        message: String,
    },
}

/// One response: status and JSON body (`null` when empty).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

impl Endpoint {
    fn connect(&self) -> Result<Box<dyn Stream>, ClientError> {
        let err = |source| ClientError::Connect {
            at: self.to_string(),
            source,
        };
        let stream: Box<dyn Stream> = match self {
            Endpoint::Unix(path) => {
                let s = UnixStream::connect(path).map_err(err)?;
                s.set_read_timeout(Some(REQUEST_TIMEOUT)).map_err(err)?;
                s.set_write_timeout(Some(REQUEST_TIMEOUT)).map_err(err)?;
                Box::new(s)
            }
            Endpoint::Tcp { addr, .. } => {
                let s = TcpStream::connect_timeout(addr, Duration::from_secs(5)).map_err(err)?;
                s.set_read_timeout(Some(REQUEST_TIMEOUT)).map_err(err)?;
                s.set_write_timeout(Some(REQUEST_TIMEOUT)).map_err(err)?;
                Box::new(s)
            }
        };
        Ok(stream)
    }

    /// Sends a request; any status is returned as a [`Reply`].
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, ClientError> {
        let io = |source| ClientError::Io {
            method: method.into(),
            path: path.into(),
            source,
        };
        let malformed = |why| ClientError::Malformed {
            method: method.into(),
            path: path.into(),
            why,
        };
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let auth = match self {
            Endpoint::Tcp { token: Some(t), .. } => format!("Authorization: Bearer {t}\r\n"),
            _ => String::new(),
        };
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: forkd\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n{auth}\r\n{body}",
            body.len()
        );
        let mut stream = self.connect()?;
        stream.write_all(request.as_bytes()).map_err(io)?;
        let mut raw = Vec::new();
        stream
            .take(MAX_RESPONSE)
            .read_to_end(&mut raw)
            .map_err(io)?;
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| malformed("no end of headers"))?;
        let head =
            std::str::from_utf8(&raw[..split]).map_err(|_| malformed("headers not UTF-8"))?;
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| malformed("no status line"))?;
        let chunked = lines.any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("transfer-encoding")
                    && v.trim().eq_ignore_ascii_case("chunked")
            })
        });
        let payload = &raw[split + 4..];
        let payload = if chunked {
            dechunk(payload).ok_or_else(|| malformed("bad chunked body"))?
        } else {
            payload.to_vec()
        };
        let body = if payload.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&payload).map_err(|_| malformed("body is not JSON"))?
        };
        Ok(Reply { status, body })
    }

    /// [`Endpoint::call`], with any non-2xx status turned into an error
    /// carrying the API's `{"error": ...}` message.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let r = self.call(method, path, body)?;
        if (200..300).contains(&r.status) {
            return Ok(r.body);
        }
        Err(ClientError::Status {
            method: method.into(),
            path: path.into(),
            status: r.status,
            message: r.body["error"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| r.body.to_string()),
        })
    }
}

/// Decodes a chunked transfer-encoded body.
fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&raw[..end]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        raw = raw.get(end + 2..)?;
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_decode_and_bad_ones_are_refused() {
        assert_eq!(
            dechunk(b"4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n").as_deref(),
            Some(&b"{\"a\":1}"[..])
        );
        assert_eq!(dechunk(b"zz\r\n"), None);
        assert_eq!(dechunk(b"10\r\nshort"), None);
    }
}
