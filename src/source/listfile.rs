//! `kind = "list"`: a text file with one image per line, `path [label]`, separated by
//! whitespace or a tab; `#` starts a comment. Paths are relative to the list file's folder.

use std::path::Path;

use super::{ImageRef, Locator, Skipped};
use crate::config::{LabelSource, SourceConfig};

/// Lists the images of the list file `file`.
pub fn list(file: &Path, cfg: &SourceConfig) -> (Vec<ImageRef>, Vec<Skipped>) {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            skipped.push(Skipped {
                id: file.display().to_string(),
                reason: format!("cannot read the list file: {e}"),
            });
            return (out, skipped);
        }
    };
    let base = file.parent().unwrap_or(Path::new("."));
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let Some(path) = parts.next() else { continue };
        let label = match parts.next() {
            Some(l) => match l.parse::<i64>() {
                Ok(v) => Some(v),
                Err(_) => {
                    skipped.push(Skipped {
                        id: path.to_string(),
                        reason: format!(
                            "{} line {}: label `{l}` is not an integer",
                            file.display(),
                            n + 1
                        ),
                    });
                    continue;
                }
            },
            None => None,
        };
        out.push(ImageRef {
            seq: 0,
            id: path.to_string(),
            loc: Locator::File(base.join(path)),
            label: if cfg.labels == LabelSource::Source {
                label
            } else {
                None
            },
        });
    }
    (out, skipped)
}
