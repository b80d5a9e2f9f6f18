//! Where clone memory comes from.

/// Guest page size served (4 KiB).
pub const PAGE_SIZE: usize = 4096;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SourceError {
    #[error("page {index} is out of range (the image has {pages} pages)")]
    OutOfRange { index: u64, pages: u64 },
    #[error("unknown fork family {0}")]
    UnknownFamily(u64),
    #[error("page source unavailable: {0}")]
    Unavailable(String),
}

/// A read-only image of guest memory, addressed in 4 KiB pages
/// (page `i` holds guest-physical bytes `i * 4096 ..`).
pub trait PageSource: Send + Sync {
    /// Number of pages in the image.
    fn pages(&self) -> u64;

    /// Copies page `index` into `buf`.
    fn read_page(&self, index: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<(), SourceError>;

    /// Reads `count` pages from `first`, calling `out` for each. Sources
    /// that can fetch ranges in one go (the network client) override this.
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
