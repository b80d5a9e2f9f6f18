//! A `forkd serve` process for a test, and a minimal HTTP/1.1 client
//! (`Connection: close`, one request per connection) over its Unix socket
//! or TCP. Every response is checked against the OpenAPI document.

use super::schema::spec;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request's bound (boot, fork and kill answer well within it).
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Server start and stop bound.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `error` message of an error response.
    pub fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_owned()
    }
}

fn decode_chunked(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let end = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size = std::str::from_utf8(&raw[..end]).expect("chunk size");
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .expect("hex chunk size");
        raw = &raw[end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// Sends one request on `stream` and reads the whole response.
pub fn exchange<S: Read + Write>(
    stream: S,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Response {
    exchange_with(stream, method, path, body, &[])
}

/// [`exchange`] with extra request headers.
pub fn exchange_with<S: Read + Write>(
    mut stream: S,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Response {
    let body = body.unwrap_or("");
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).expect("send the request");
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("{method} {path}: no complete response: {e}"));
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {path}: no header end in {raw:?}"));
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut resp = Response {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    };
    if resp
        .header("transfer-encoding")
        .is_some_and(|t| t.contains("chunked"))
    {
        resp.body = decode_chunked(&resp.body);
    } else if let Some(n) = resp.header("content-length") {
        let n: usize = n.parse().expect("content-length");
        assert_eq!(resp.body.len(), n, "{method} {path}: body length");
    }
    resp
}

/// Checks a response against the OpenAPI document (panics on a mismatch).
pub fn check_spec(method: &str, path: &str, resp: &Response) {
    if resp
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain"))
    {
        if let Err(e) = spec().check_text_response(method, path, resp.status) {
            panic!("response does not match the OpenAPI spec: {e}");
        }
        return;
    }
    let body = (!resp.body.is_empty()).then(|| resp.json());
    if let Err(e) = spec().check_response(method, path, resp.status, body.as_ref()) {
        panic!("response does not match the OpenAPI spec: {e}");
    }
}

/// One request over the Unix socket at `socket`, checked against the spec.
pub fn call_unix(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Response {
    let stream =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let resp = exchange(stream, method, path, body);
    check_spec(method, path, &resp);
    resp
}

/// One request over TCP with extra headers, checked against the spec.
pub fn call_tcp_with(addr: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let resp = exchange_with(stream, method, path, None, headers);
    check_spec(method, path, &resp);
    resp
}

pub struct Server {
    child: Child,
    pub socket: PathBuf,
    stderr: Arc<Mutex<String>>,
    /// The line printed when listening.
    pub banner: String,
}

impl Server {
    /// Starts `forkd serve --socket SOCKET ARGS...` and waits until it
    /// listens.
    pub fn start(socket: &Path, args: &[&str]) -> Server {
        match Server::try_start(socket, args) {
            Ok(s) => s,
            Err((status, stderr)) => panic!("forkd serve failed ({status:?}): {stderr}"),
        }
    }

    /// Like [`Server::start`]; a server that exits first gives its status
    /// and stderr.
    pub fn try_start(socket: &Path, args: &[&str]) -> Result<Server, (ExitStatus, String)> {
        let mut child = Command::new(tests::forkd_bin())
            .arg("serve")
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start forkd serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        {
            let pipe = child.stderr.take().expect("piped stderr");
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if line.contains("listening on") {
                        let _ = tx.send(line.clone());
                    }
                    let mut s = stderr.lock().unwrap_or_else(|e| e.into_inner());
                    s.push_str(&line);
                    s.push('\n');
                }
            });
        }
        let start = Instant::now();
        loop {
            if let Ok(banner) = rx.recv_timeout(Duration::from_millis(20)) {
                return Ok(Server {
                    child,
                    socket: socket.to_owned(),
                    stderr,
                    banner,
                });
            }
            if let Some(status) = child.try_wait().expect("wait on forkd serve") {
                // Let the reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(50));
                let text = stderr.lock().unwrap_or_else(|e| e.into_inner()).clone();
                return Err((status, text));
            }
            if start.elapsed() > PROCESS_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("forkd serve did not listen within {PROCESS_TIMEOUT:?}");
            }
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// One request over the Unix socket, checked against the spec.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        call_unix(&self.socket, method, path, body)
    }

    pub fn get(&self, path: &str) -> Response {
        self.call("GET", path, None)
    }

    pub fn post(&self, path: &str, body: &str) -> Response {
        self.call("POST", path, Some(body))
    }

    /// One request over TCP, checked against the spec.
    pub fn call_tcp(addr: &str, method: &str, path: &str) -> Response {
        call_tcp_with(addr, method, path, &[])
    }

    /// Sends `signal` and waits (bounded) for the server to exit.
    pub fn stop_with(mut self, signal: i32) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait on forkd serve") {
                return status;
            }
            assert!(
                start.elapsed() < PROCESS_TIMEOUT,
                "forkd serve did not stop within {PROCESS_TIMEOUT:?} of signal {signal}; stderr: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM; the server must exit 0 and remove its socket.
    pub fn stop(self) {
        let socket = self.socket.clone();
        let stderr = self.stderr.clone();
        let status = self.stop_with(libc::SIGTERM);
        let text = stderr.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert!(status.success(), "forkd serve exited {status:?}: {text}");
        assert!(
            !socket.exists(),
            "{} is still there after shutdown",
            socket.display()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A failing test shows what the daemon logged (e.g. a vCPU that
        // would not stop).
        if std::thread::panicking() {
            let log = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
            if !log.is_empty() {
                eprintln!("forkd serve's stderr:\n{log}");
            }
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
