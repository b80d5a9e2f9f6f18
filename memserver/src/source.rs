//! Where clone memory comes from.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::wire::ErrorCode;

/// Guest page size served (4 KiB).
pub const PAGE_SIZE: usize = 4096;

/// Why a page could not be read.
#[derive(Debug, thiserror::Error, Clone)]
pub enum SourceError {
    #[error("page {index} is out of range (the image has {pages} pages)")]
    OutOfRange { index: u64, pages: u64 },
    #[error("unknown fork family {0}")]
    UnknownFamily(u64),
    /// The source is gone or never came (e.g. the image was released).
    #[error("page source unavailable: {0}")]
    Unavailable(String),
    /// The memory server did not answer in time.
    #[error(
        "memory server {server} did not answer for family {family}, page {page} \
         after {tries} tries ({elapsed_ms} ms){}",
        if *.refused { ", connection refused" } else { "" }
    )]
    NoAnswer {
        server: SocketAddr,
        family: u64,
        page: u64,
        tries: u32,
        elapsed_ms: u128,
        /// The kernel reported ICMP port unreachable meanwhile.
        refused: bool,
    },
    /// The memory server answered with an error (`TooLarge`, `Internal`).
    #[error(
        "memory server {server} refused page {page} of family {family}: {code:?} (detail {detail})"
    )]
    Refused {
        server: SocketAddr,
        family: u64,
        page: u64,
        code: ErrorCode,
        detail: u64,
    },
    /// Page `index` was discarded after the freeze: its frozen contents are lost.
    #[error("page {index} was discarded after the freeze")]
    Discarded { index: u64 },
    /// Checking a page's protection in `/proc/self/pagemap` failed.
    #[error("reading the pagemap entry of page {index} failed")]
    Pagemap {
        index: u64,
        #[source]
        source: Arc<io::Error>,
    },
}

impl PartialEq for SourceError {
    fn eq(&self, other: &SourceError) -> bool {
        use SourceError as E;
        match (self, other) {
            (E::OutOfRange { index: a, pages: p }, E::OutOfRange { index: b, pages: q }) => {
                a == b && p == q
            }
            (E::UnknownFamily(a), E::UnknownFamily(b)) => a == b,
            (E::Unavailable(a), E::Unavailable(b)) => a == b,
            (E::Discarded { index: a }, E::Discarded { index: b }) => a == b,
            (
                E::Pagemap {
                    index: a,
                    source: s,
                },
                E::Pagemap {
                    index: b,
                    source: t,
                },
            ) => a == b && s.kind() == t.kind(),
            // Timing fields make two no-answers differ; compare the rest.
            (
                E::NoAnswer {
                    server: s,
                    family: f,
                    page: p,
                    ..
                },
                E::NoAnswer {
                    server: t,
                    family: g,
                    page: q,
                    ..
                },
            ) => s == t && f == g && p == q,
            (
                E::Refused {
                    server: s,
                    family: f,
                    page: p,
                    code: c,
                    detail: d,
                },
                E::Refused {
                    server: t,
                    family: g,
                    page: q,
                    code: k,
                    detail: e,
                },
            ) => s == t && f == g && p == q && c == k && d == e,
            _ => false,
        }
    }
}

impl Eq for SourceError {}

/// A read-only image of guest memory, addressed in 4 KiB pages
/// (page `i` holds guest-physical bytes `i * 4096 ..`).
pub trait PageSource: Send + Sync {
    /// Number of pages in the image.
    fn pages(&self) -> u64;

    /// Copies page `index` into `buf`.
    fn read_page(&self, index: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<(), SourceError>;

    /// Reads `count` pages from `first`, calling `out` for each: the one
    /// page-by-page implementation (over [`PageSource::read_page`]) that
    /// local sources use. Sources that fetch ranges in one go (the network
    /// client) override it.
    fn read_pages(
        &self,
        first: u64,
        count: u64,
        out: &mut dyn FnMut(u64, &[u8; PAGE_SIZE]),
    ) -> Result<(), SourceError> {
        let mut buf = [0u8; PAGE_SIZE];
        for i in first..first.saturating_add(count) {
            self.read_page(i, &mut buf)?;
            out(i, &buf);
        }
        Ok(())
    }
}
