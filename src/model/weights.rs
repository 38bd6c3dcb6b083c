//! Checkpoint readers: safetensors, PyTorch zip `.pth`, and the legacy pre-1.6 pickle format
//! (five pickles, then the raw storages), which candle does not read. `module.` prefixes are
//! stripped and a state dict nested in a dict (`{"state_dict": ...}`) is found.
//!
//! In: a file. Out: tensor name -> f32 tensor on the CPU, and [`Params`], which hands tensors to a
//! model builder and reports every missing, unexpected or wrongly shaped tensor at once.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// The first pickle of a legacy file: protocol 2, LONG1 of 10 bytes holding the magic number.
const LEGACY_MAGIC: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e,
];

/// Reads every float tensor of a checkpoint, names without a `module.` prefix.
pub fn load(path: &Path) -> Result<HashMap<String, Tensor>> {
    let err = |msg: String| Error::Weights {
        file: path.to_path_buf(),
        msg,
    };
    let mut head = [0u8; 16];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| err(format!("cannot read: {e}")))?;
    let head = &head[..n];
    let tensors = if head.starts_with(b"PK\x03\x04") {
        load_zip(path).map_err(|e| err(format!("not a readable PyTorch zip checkpoint: {e}")))?
    } else if head.starts_with(&LEGACY_MAGIC) {
        load_legacy(path).map_err(err)?
    } else if head.len() >= 9 && head[8] == b'{' {
        candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| err(format!("not a readable safetensors file: {e}")))?
            .into_iter()
            .collect()
    } else {
        return Err(err(
            "not a checkpoint freqtag reads (safetensors, PyTorch zip .pth or legacy .pth/.th): check the file is complete".into(),
        ));
    };
    if tensors.is_empty() {
        return Err(err("holds no tensors".into()));
    }
    let mut out = HashMap::new();
    for (name, t) in tensors {
        let name = name.strip_prefix("module.").unwrap_or(&name).to_string();
        let t = if t.dtype().is_float() {
            t.to_dtype(DType::F32)
                .map_err(|e| err(format!("{name}: {e}")))?
        } else {
            t
        };
        out.insert(name, t);
    }
    Ok(out)
}

fn load_zip(path: &Path) -> candle_core::Result<Vec<(String, Tensor)>> {
    for key in [
        None,
        Some("state_dict"),
        Some("model"),
        Some("model_state_dict"),
    ] {
        let t = candle_core::pickle::read_all_with_key(path, key);
        match t {
            Ok(t) if !t.is_empty() => return Ok(t),
            Ok(_) => continue,
            Err(_) if key.is_some() => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(Vec::new())
}

/// A storage reference found in the pickle.
struct StorageRef {
    key: String,
    dtype: &'static str,
}

/// A tensor found in the pickle: storage, offset, size, stride.
struct TensorRef {
    storage: StorageRef,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

fn load_legacy(path: &Path) -> std::result::Result<Vec<(String, Tensor)>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut r = BufReader::new(file);
    let mut magic = [0u8; 15];
    r.read_exact(&mut magic)
        .map_err(|_| "cut short before its header".to_string())?;
    let mut next_pickle = |what: &str| -> std::result::Result<Object, String> {
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut r)
            .and_then(|_| stack.finalize())
            .map_err(|e| format!("legacy checkpoint: cannot read its {what} ({e}): the file may be cut short or not a PyTorch checkpoint"))
    };
    let _protocol = next_pickle("protocol version")?;
    let _sys_info = next_pickle("system info")?;
    let object = next_pickle("tensors")?;
    let keys = next_pickle("storage keys")?;
    let keys: Vec<String> = match keys {
        Object::List(k) => k
            .into_iter()
            .map(|o| o.unicode().map_err(|o| format!("bad storage key {o:?}")))
            .collect::<std::result::Result<_, _>>()?,
        other => return Err(format!("storage key list expected, got {other:?}")),
    };
    let mut found: Vec<(String, TensorRef)> = Vec::new();
    collect_tensors(object, "", &mut found);
    if found.is_empty() {
        return Err("legacy checkpoint holds no tensors".into());
    }
    let dtypes: HashMap<&str, &str> = found
        .iter()
        .map(|(_, t)| (t.storage.key.as_str(), t.storage.dtype))
        .collect();
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    for key in &keys {
        let mut len = [0u8; 8];
        r.read_exact(&mut len).map_err(|_| {
            format!("cut short before storage {key}: the file is incomplete, download it again")
        })?;
        let numel = u64::from_le_bytes(len) as usize;
        let elem = match dtypes.get(key.as_str()).copied() {
            Some("f64") | Some("i64") => 8,
            Some("f16") => 2,
            Some("u8") => 1,
            _ => 4,
        };
        let mut data = vec![0u8; numel * elem];
        r.read_exact(&mut data).map_err(|_| {
            format!("cut short inside storage {key}: the file is incomplete, download it again")
        })?;
        storages.insert(key.clone(), data);
    }
    let mut out = Vec::new();
    for (name, t) in found {
        if !matches!(t.storage.dtype, "f32" | "f64") {
            continue; // integer buffers such as num_batches_tracked are not used
        }
        let data = storages
            .get(&t.storage.key)
            .ok_or_else(|| format!("{name}: storage {} missing", t.storage.key))?;
        let values: Vec<f32> = if t.storage.dtype == "f64" {
            data.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect()
        } else {
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4])))
                .collect()
        };
        let numel: usize = t.size.iter().product();
        let mut view = Vec::with_capacity(numel);
        let mut idx = vec![0usize; t.size.len()];
        for _ in 0..numel {
            let off = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
            view.push(
                *values
                    .get(off)
                    .ok_or_else(|| format!("{name}: view outside its storage"))?,
            );
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < t.size[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        let tensor = Tensor::from_vec(view, t.size.clone(), &Device::Cpu)
            .map_err(|e| format!("{name}: {e}"))?;
        out.push((name, tensor));
    }
    Ok(out)
}

/// Walks the unpickled object and collects `name -> tensor` for every tensor in any dict,
/// preferring the names inside a `state_dict` entry (prefix dropped).
fn collect_tensors(obj: Object, prefix: &str, out: &mut Vec<(String, TensorRef)>) {
    if let Object::Dict(items) = obj {
        for (k, v) in items {
            let Ok(key) = k.unicode() else { continue };
            let name = if prefix.is_empty() || prefix == "state_dict" {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            match tensor_ref(&v) {
                Some(t) => out.push((name, t)),
                None => collect_tensors(v, &name, out),
            }
        }
    }
}

fn usizes(o: &Object) -> Option<Vec<usize>> {
    match o {
        Object::Tuple(v) => v
            .iter()
            .map(|x| match x {
                Object::Int(i) if *i >= 0 => Some(*i as usize),
                Object::Long(i) if *i >= 0 => Some(*i as usize),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

fn tensor_ref(o: &Object) -> Option<TensorRef> {
    let Object::Reduce { callable, args } = o else {
        return None;
    };
    let Object::Class { class_name, .. } = callable.as_ref() else {
        return None;
    };
    if class_name != "_rebuild_tensor_v2" && class_name != "_rebuild_tensor" {
        return None;
    }
    let Object::Tuple(args) = args.as_ref() else {
        return None;
    };
    let Object::PersistentLoad(pid) = args.first()? else {
        return None;
    };
    let Object::Tuple(pid) = pid.as_ref() else {
        return None;
    };
    // ('storage', StorageType, key, location, numel[, view_metadata])
    let dtype = match pid.get(1)? {
        Object::Class { class_name, .. } => match class_name.as_str() {
            "FloatStorage" => "f32",
            "DoubleStorage" => "f64",
            "HalfStorage" => "f16",
            "LongStorage" => "i64",
            "ByteStorage" => "u8",
            _ => "i32",
        },
        _ => return None,
    };
    let key = match pid.get(2)? {
        Object::Unicode(s) => s.clone(),
        _ => return None,
    };
    let offset = match args.get(1)? {
        Object::Int(i) => *i as usize,
        Object::Long(i) => *i as usize,
        _ => return None,
    };
    Some(TensorRef {
        storage: StorageRef { key, dtype },
        offset,
        size: usizes(args.get(2)?)?,
        stride: usizes(args.get(3)?)?,
    })
}

/// Hands checkpoint tensors to a model builder and reports every problem at once.
pub struct Params {
    file: PathBuf,
    tensors: HashMap<String, Tensor>,
    used: Vec<String>,
    problems: Vec<String>,
    device: Device,
    dtype: DType,
    device_layers: bool,
    winograd: Option<super::winograd::Tile>,
}

impl Params {
    /// Wraps the tensors read from `file`.
    pub fn new(file: &Path, tensors: HashMap<String, Tensor>) -> Self {
        Params {
            file: file.to_path_buf(),
            tensors,
            used: Vec::new(),
            problems: Vec::new(),
            device: Device::Cpu,
            dtype: DType::F32,
            device_layers: false,
            winograd: Some(super::winograd::Tile::F2),
        }
    }

    /// The CPU's 3x3 stride-1 convolutions by Winograd's `tile` (`model.winograd`), or by the
    /// direct kernel with `None`.
    pub fn winograd(mut self, tile: Option<super::winograd::Tile>) -> Self {
        self.winograd = tile;
        self
    }

    /// The Winograd tile of the CPU's 3x3 stride-1 convolutions, if any.
    pub fn winograd_tile(&self) -> Option<super::winograd::Tile> {
        self.winograd
    }

    /// Builds the GPU's layers (tensor ops only) even on the CPU, so that tests here run the
    /// code a GPU runs.
    pub fn device_layers_on_cpu(mut self) -> Self {
        self.device_layers = true;
        self
    }

    /// Whether the layers are the GPU's (tensor ops) rather than the CPU kernels.
    pub fn device_layers(&self) -> bool {
        self.device_layers || !self.device.is_cpu()
    }

    /// Builds the layers for `device`, computing in `dtype` (f16/bf16 on a GPU only); the
    /// tensors handed out by [`Params::get`] stay f32 on the CPU, the layers move them.
    pub fn on(mut self, device: &Device, dtype: DType) -> Self {
        self.device = device.clone();
        self.dtype = dtype;
        self
    }

    /// The device the layers run on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype the layers compute in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The tensor `name` with `shape`; a missing or wrongly shaped one is recorded and a zero
    /// tensor returned so the builder can go on and find every other problem.
    pub fn get(&mut self, name: &str, shape: &[usize]) -> Tensor {
        self.used.push(name.to_string());
        match self.tensors.get(name) {
            Some(t) if t.dims() == shape => t.clone(),
            Some(t) => {
                self.problems.push(format!(
                    "tensor {name} has shape {:?}, the model needs {:?}",
                    t.dims(),
                    shape
                ));
                Self::zeros(shape)
            }
            None => {
                self.problems
                    .push(format!("tensor {name} {shape:?} is missing"));
                Self::zeros(shape)
            }
        }
    }

    fn zeros(shape: &[usize]) -> Tensor {
        Tensor::zeros(shape, DType::F32, &Device::Cpu)
            .unwrap_or_else(|_| Tensor::new(&[0f32], &Device::Cpu).expect("a one-element tensor"))
    }

    /// Ends the build: an error listing every missing, unexpected or wrongly shaped tensor.
    pub fn finish(self, arch: &str) -> Result<()> {
        let mut problems = self.problems;
        let used: std::collections::HashSet<&String> = self.used.iter().collect();
        let unexpected: BTreeMap<&String, &Tensor> = self
            .tensors
            .iter()
            .filter(|(k, _)| !used.contains(k) && !k.ends_with("num_batches_tracked"))
            .collect();
        for (k, t) in unexpected.iter().take(20) {
            problems.push(format!("unexpected tensor {k} {:?}", t.dims()));
        }
        if unexpected.len() > 20 {
            problems.push(format!(
                "... and {} more unexpected tensors",
                unexpected.len() - 20
            ));
        }
        if problems.is_empty() {
            return Ok(());
        }
        let n = problems.len();
        problems.truncate(40);
        Err(Error::Weights {
            file: self.file,
            msg: format!(
                "does not fit {arch} ({n} problem(s)); is it the checkpoint of this architecture?\n  - {}",
                problems.join("\n  - ")
            ),
        })
    }
}
