//! What can go wrong with the output folder as a whole: a problem of this
//! machine (disk full, folder read-only or gone, a temp folder in the way),
//! not of one URL, so a run that meets it stops.

use std::io;

/// What the output folder's operations return.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Said plainly, with what to do about it.
    #[error("{0}")]
    Folder(String),
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Os(#[from] rustix::io::Errno),
    /// `source`, met while doing what `context` says.
    #[error("{context}")]
    Context {
        context: String,
        #[source]
        source: Box<Error>,
    },
}

crate::context::define_context!(Error, Error::Folder);
