//! Bearer tokens on TCP: `forkd serve --token-file PATH` reads one token
//! (the file's first line, surrounding whitespace trimmed) and every TCP
//! request must carry `Authorization: Bearer <token>`; anything else is a
//! 401 with a JSON error. The Unix socket needs no token (its file mode
//! protects it). Tokens are compared in constant time.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// Shortest token accepted (16 bytes, hex-encoded).
pub const MIN_TOKEN_LEN: usize = 32;
/// Longest token file read.
const MAX_TOKEN_FILE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the token file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the token file {path} is readable by group or others (mode {mode:o}); chmod 600 it")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("the token file {0} is larger than {MAX_TOKEN_FILE} bytes")]
    TooLarge(PathBuf),
    #[error("the token in {path} is {len} characters; at least {MIN_TOKEN_LEN} printable ASCII characters without spaces are needed")]
    Weak { path: PathBuf, len: usize },
}

/// The token TCP requests must present.
#[derive(Clone)]
pub struct Token(Arc<[u8]>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// Reads the token from `path`; the file must not be readable by
    /// group or others.
    pub fn from_file(path: &Path) -> Result<Token, TokenError> {
        let read = |source| TokenError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TokenError::Exposed {
                path: path.to_owned(),
                mode,
            });
        }
        if meta.len() > MAX_TOKEN_FILE {
            return Err(TokenError::TooLarge(path.to_owned()));
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        let token = text.lines().next().unwrap_or("").trim();
        if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::Weak {
                path: path.to_owned(),
                len: token.len(),
            });
        }
        Ok(Token(token.as_bytes().into()))
    }

    /// The token itself (for the daemon's own requests to its peers).
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// Whether an `Authorization` header value carries this token.
    pub fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let Some(value) = authorization else {
            return false;
        };
        let Some(presented) = strip_bearer(value) else {
            return false;
        };
        constant_time_eq(presented, &self.0)
    }
}

/// The credentials of `Bearer <credentials>` (scheme case-insensitive).
fn strip_bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Middleware of the TCP router: lets a request through only with the
/// right token.
pub async fn require_token(State(token): State<Token>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if token.admits(presented) {
        return next.run(req).await;
    }
    let why = if presented.is_some() {
        "the bearer token is wrong"
    } else {
        "this API needs an 'Authorization: Bearer <token>' header on TCP"
    };
    let mut resp = ApiError::Unauthorized(why.into()).into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn admits_only_the_bearer_token() {
        let t = Token(b"0123456789abcdef0123456789abcdef".as_slice().into());
        assert!(t.admits(Some(b"Bearer 0123456789abcdef0123456789abcdef")));
        assert!(t.admits(Some(b"bearer 0123456789abcdef0123456789abcdef ")));
        assert!(!t.admits(Some(b"Bearer 0123456789abcdef0123456789abcdeF")));
        assert!(!t.admits(Some(b"Basic 0123456789abcdef0123456789abcdef")));
        assert!(!t.admits(Some(b"Bearer")));
        assert!(!t.admits(Some(b"")));
        assert!(!t.admits(None));
    }

    #[test]
    fn token_files_must_be_private_and_strong() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "0123456789abcdef0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Token::from_file(&p),
            Err(TokenError::Exposed { .. })
        ));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Token::from_file(&p).is_ok());
        std::fs::write(&p, "short\n").unwrap();
        assert!(matches!(Token::from_file(&p), Err(TokenError::Weak { .. })));
        let missing = dir.path().join("nope");
        assert!(matches!(
            Token::from_file(&missing),
            Err(TokenError::Read { .. })
        ));
    }
}
