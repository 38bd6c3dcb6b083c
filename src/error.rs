//! The library's error type: every variant names the file, setting or tensor involved and,
//! where there is one, what the user can do about it.

use std::path::PathBuf;

/// Errors raised by the freqtag library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pipeline file has one or more problems; all of them are listed.
    #[error("{} problem(s) in pipeline {}:\n{}", .problems.len(), .file.display(), format_problems(.problems))]
    Config {
        /// The pipeline file.
        file: PathBuf,
        /// Every problem found, one sentence each.
        problems: Vec<String>,
    },
    /// A weights file could not be read or does not fit the model.
    #[error("weights {}: {msg}", .file.display())]
    Weights {
        /// The weights file.
        file: PathBuf,
        /// What is wrong and what to do.
        msg: String,
    },
    /// An input image could not be used.
    #[error("image {}: {msg}", .file.display())]
    Image {
        /// The image file.
        file: PathBuf,
        /// Why it was skipped.
        msg: String,
    },
    /// An output could not be written.
    #[error("output {}: {msg}", .file.display())]
    Output {
        /// The output file or folder.
        file: PathBuf,
        /// What failed.
        msg: String,
    },
    /// Fetching weights failed.
    #[error("fetch {what}: {msg}")]
    Fetch {
        /// The model or file being fetched.
        what: String,
        /// What failed and what to do.
        msg: String,
    },
    /// The run was interrupted (Ctrl-C); committed parts are kept for `--resume`.
    #[error("interrupted after {processed} images; the committed parts are kept in {}: continue with the same command and --resume", .out.display())]
    Interrupted {
        /// The output folder.
        out: PathBuf,
        /// Images committed so far.
        processed: u64,
    },
    /// The device of `model.device` cannot be used.
    #[error("device: {msg}")]
    Device {
        /// What went wrong and what to do.
        msg: String,
    },
    /// A tensor operation failed inside the model.
    #[error("model: {0}")]
    Candle(#[from] candle_core::Error),
    /// An I/O error with the path it concerns.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

fn format_problems(problems: &[String]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Result alias for the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
