//! A small client of the host API: one HTTP/1.1 request per connection
//! (`Connection: close`) over the daemon's Unix socket, or over TCP with a
//! bearer token. Used by `forkd vm`.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

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

/// Bounds of one exchange.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// To connect (TCP).
    pub connect: Duration,
    /// For the whole exchange, however slowly the answer drips.
    pub total: Duration,
    /// Largest response read.
    pub max_response: u64,
}

/// What `forkd vm` allows a request: a create boots a VM, a fork builds
/// clones.
pub const CLI_BOUNDS: Bounds = Bounds {
    connect: Duration::from_secs(5),
    total: REQUEST_TIMEOUT,
    max_response: MAX_RESPONSE,
};

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

impl Endpoint {
    fn connect(&self, b: &Bounds) -> Result<Box<dyn Stream>, ClientError> {
        let err = |source| ClientError::Connect {
            at: self.to_string(),
            source,
        };
        let stream: Box<dyn Stream> = match self {
            Endpoint::Unix(path) => {
                let s = UnixStream::connect(path).map_err(err)?;
                s.set_read_timeout(Some(b.total)).map_err(err)?;
                s.set_write_timeout(Some(b.total)).map_err(err)?;
                Box::new(s)
            }
            Endpoint::Tcp { addr, .. } => {
                let s = TcpStream::connect_timeout(addr, b.connect).map_err(err)?;
                s.set_read_timeout(Some(b.total)).map_err(err)?;
                s.set_write_timeout(Some(b.total)).map_err(err)?;
                Box::new(s)
            }
        };
        Ok(stream)
    }

    /// One request within `b`; the status and the raw (de-chunked) body.
    pub fn exchange(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        b: &Bounds,
    ) -> Result<(u16, Vec<u8>), ClientError> {
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
        let auth = match self {
            Endpoint::Tcp { token: Some(t), .. } => format!("Authorization: Bearer {t}\r\n"),
            _ => String::new(),
        };
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: forkd\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n{auth}\r\n",
            body.len()
        );
        let mut stream = self.connect(b)?;
        stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body))
            .map_err(io)?;
        let deadline = Instant::now() + b.total;
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 << 10];
        loop {
            if Instant::now() > deadline {
                return Err(malformed("no whole answer in time"));
            }
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) if (raw.len() + n) as u64 <= b.max_response => {
                    raw.extend_from_slice(&buf[..n])
                }
                Ok(_) => return Err(malformed("answer too large")),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io(e)),
            }
        }
        parse_response(&raw).ok_or_else(|| malformed("not an HTTP response"))
    }

    /// Sends a request; any status is returned as a [`Reply`].
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, ClientError> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, payload) = self.exchange(method, path, body.as_bytes(), &CLI_BOUNDS)?;
        let body = if payload.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&payload).map_err(|_| ClientError::Malformed {
                method: method.into(),
                path: path.into(),
                why: "body is not JSON",
            })?
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

/// Status and body of a whole HTTP/1.1 response (Content-Length or
/// chunked).
pub fn parse_response(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = &raw[split + 4..];
    if !chunked {
        return Some((status, body.to_vec()));
    }
    dechunk(body).map(|b| (status, b))
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
