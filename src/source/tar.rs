//! `kind = "tar"`: WebDataset shards. Members are grouped by key (the member name up to the first
//! dot of its file name); a key's `.jpg`/`.jpeg`/`.png` member is the image and its `.cls` member
//! the label. Only headers and `.cls` members are read when listing; a shard cut short keeps the
//! members before the cut, and the rest is reported.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::{shard_name, ImageRef, Locator, Skipped};
use crate::config::{LabelSource, SourceConfig};

const BLOCK: u64 = 512;

fn octal(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // base-256 (GNU) for large sizes
        return Some(field[1..].iter().fold(0u64, |a, b| (a << 8) | *b as u64));
    }
    let s: String = field
        .iter()
        .take_while(|b| **b != 0)
        .map(|b| *b as char)
        .collect();
    let s = s.trim();
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

fn cstr(field: &[u8]) -> String {
    String::from_utf8_lossy(&field[..field.iter().position(|b| *b == 0).unwrap_or(field.len())])
        .to_string()
}

#[derive(Default)]
struct Sample {
    image: Option<(String, u64, u64)>,
    cls: Option<String>,
}

/// Lists the samples of one shard into `out`.
pub fn list(tar: &Path, cfg: &SourceConfig, out: &mut Vec<ImageRef>, skipped: &mut Vec<Skipped>) {
    let name = shard_name(tar);
    let mut skip = |reason: String| {
        skipped.push(Skipped {
            id: name.clone(),
            reason,
        })
    };
    let mut f = match File::open(tar) {
        Ok(f) => f,
        Err(e) => return skip(format!("cannot open tar shard: {e}")),
    };
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut samples: BTreeMap<String, Sample> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut pos = 0u64;
    let mut long_name: Option<String> = None;
    let mut header = [0u8; BLOCK as usize];
    loop {
        if pos + BLOCK > size {
            if pos < size || pos == 0 {
                skip(format!(
                    "tar shard cut short at byte {pos} of {size}: members after it are lost"
                ));
            }
            break;
        }
        if f.seek(SeekFrom::Start(pos)).is_err() || f.read_exact(&mut header).is_err() {
            skip(format!("cannot read tar header at byte {pos}"));
            break;
        }
        if header.iter().all(|b| *b == 0) {
            break; // end of archive
        }
        let stored = octal(&header[148..156]);
        let sum: u64 = header
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    *b as u64
                }
            })
            .sum();
        if stored != Some(sum) {
            skip(format!("corrupt tar header at byte {pos} (checksum mismatch): the rest of the shard is skipped"));
            break;
        }
        let Some(len) = octal(&header[124..136]) else {
            skip(format!("corrupt tar header at byte {pos} (size)"));
            break;
        };
        let data = pos + BLOCK;
        let next = data + len.div_ceil(BLOCK) * BLOCK;
        let kind = header[156];
        let mut member = long_name.take().unwrap_or_else(|| {
            let prefix = cstr(&header[345..500]);
            let n = cstr(&header[0..100]);
            if prefix.is_empty() {
                n
            } else {
                format!("{prefix}/{n}")
            }
        });
        if kind == b'L' {
            // GNU long name: the data is the next member's name
            let mut buf = vec![0u8; len as usize];
            if f.seek(SeekFrom::Start(data)).is_ok() && f.read_exact(&mut buf).is_ok() {
                long_name = Some(cstr(&buf));
            }
            pos = next;
            continue;
        }
        if kind == b'0' || kind == 0 {
            if data + len > size {
                skip(format!("tar shard cut short inside member {member}: it and the members after it are lost"));
                break;
            }
            let file = member.rsplit('/').next().unwrap_or(&member).to_string();
            let dir = &member[..member.len() - file.len()];
            if let Some((stem, ext)) = file.split_once('.') {
                let key = format!("{dir}{stem}");
                let ext = ext.to_lowercase();
                let s = samples.entry(key.clone()).or_insert_with(|| {
                    order.push(key.clone());
                    Sample::default()
                });
                match ext.as_str() {
                    "jpg" | "jpeg" | "png" => {
                        s.image = Some((std::mem::take(&mut member), data, len))
                    }
                    "cls" => {
                        let mut buf = vec![0u8; len.min(64) as usize];
                        if f.seek(SeekFrom::Start(data)).is_ok() && f.read_exact(&mut buf).is_ok() {
                            s.cls = Some(String::from_utf8_lossy(&buf).trim().to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        pos = next;
    }
    for key in order {
        let Some(s) = samples.remove(&key) else {
            continue;
        };
        let Some((member, offset, len)) = s.image else {
            continue; // a sample without an image (metadata only)
        };
        let id = format!("{name}/{member}");
        let label = match (&s.cls, cfg.labels) {
            (Some(c), LabelSource::Source) => match c.parse::<i64>() {
                Ok(v) => Some(v),
                Err(_) => {
                    skipped.push(Skipped {
                        id,
                        reason: format!("label `{c}` in {key}.cls is not an integer"),
                    });
                    continue;
                }
            },
            _ => None,
        };
        out.push(ImageRef {
            seq: 0,
            id,
            loc: Locator::Tar {
                tar: tar.to_path_buf(),
                offset,
                len,
            },
            label,
        });
    }
}

/// Reads `len` bytes at `offset` of `tar`.
pub fn read_member(tar: &Path, offset: u64, len: u64) -> Result<Vec<u8>, String> {
    let mut f = File::open(tar).map_err(|e| format!("cannot open tar shard: {e}"))?;
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| format!("cannot seek in tar shard: {e}"))?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf)
        .map_err(|e| format!("tar member cut short: {e}"))?;
    Ok(buf)
}
