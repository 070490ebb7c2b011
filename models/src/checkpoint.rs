//! Tensor stores (sharded safetensors, GGUF) and the linear layer shared by the dense and the
//! quantized paths.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Module, Tensor};
use pawfect_kernels as k;

use crate::accounting::{self, bytes_of};
use crate::error::{ModelError, Result};
use crate::int8::Int8Weight;

/// How GGUF-quantized weights are multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantMatmul {
    /// Pick per device: `DequantF16` on CUDA, `Dequant` on CPU.
    #[default]
    Auto,
    /// Dequantize each weight to f16 on every call, then a dense (cuBLAS) f16 matmul.
    DequantF16,
    /// Dequantize each weight to f32 on every call and multiply in the compute dtype
    /// (what diffusers' GGUF loader does; exact on CPU).
    Dequant,
    /// candle's quantized kernels (MMQ/MMVQ on CUDA with q8_1 activations; q8 dot products on CPU).
    Native,
}

impl std::str::FromStr for QuantMatmul {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "dequant-f16" | "f16" => Ok(Self::DequantF16),
            "dequant" => Ok(Self::Dequant),
            "native" | "mmq" => Ok(Self::Native),
            o => Err(format!(
                "unknown GGUF matmul mode {o} (auto, dequant-f16, dequant, native)"
            )),
        }
    }
}

impl QuantMatmul {
    fn resolve(self, device: &Device) -> Self {
        match self {
            Self::Auto if device.is_cuda() => Self::DequantF16,
            Self::Auto => Self::Dequant,
            m => m,
        }
    }
}

/// A tensor store: answers shapes and hands out tensors on a device.
pub trait WeightStore: Send + Sync {
    /// Where the tensors come from (for error messages).
    fn origin(&self) -> &Path;
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// A dense tensor in `dtype` (dequantized when stored quantized).
    fn dense(&self, name: &str, dtype: DType) -> Result<Tensor>;
    /// The stored quantized tensor, if the store keeps `name` in a GGML block format.
    fn quantized(&self, name: &str) -> Result<Option<Arc<QTensor>>>;
    fn names(&self) -> Vec<String>;
    fn device(&self) -> &Device;

    fn contains(&self, name: &str) -> bool {
        self.shape(name).is_some()
    }

    fn missing(&self, name: &str) -> ModelError {
        ModelError::Weights(format!("{}: no tensor {name}", self.origin().display()))
    }

    /// Loads `name` checking its shape.
    fn get(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        match self.shape(name) {
            None => Err(self.missing(name)),
            Some(s) if s != shape => Err(ModelError::Weights(format!(
                "{}: {name} has shape {s:?}, expected {shape:?}",
                self.origin().display()
            ))),
            Some(_) => self.dense(name, dtype),
        }
    }
}

/// One or several (sharded) safetensors files, memory-mapped.
pub struct SafetensorsStore {
    st: MmapedSafetensors,
    origin: PathBuf,
    device: Device,
}

impl SafetensorsStore {
    pub fn open(paths: &[PathBuf], device: &Device) -> Result<Self> {
        let origin = paths.first().cloned().unwrap_or_default();
        for p in paths {
            if !p.is_file() {
                return Err(ModelError::bad_file(p, "file not found"));
            }
        }
        // SAFETY: the files are mapped read-only; a model file changing underneath a running
        // worker is outside what the worker can guard against (as with any mmap loader).
        let st = unsafe { MmapedSafetensors::multi(paths) }
            .map_err(|e| ModelError::bad_file(&origin, e))?;
        Ok(Self {
            st,
            origin,
            device: device.clone(),
        })
    }
}

impl WeightStore for SafetensorsStore {
    fn origin(&self) -> &Path {
        &self.origin
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.st.get(name).ok().map(|v| v.shape().to_vec())
    }
    fn dense(&self, name: &str, dtype: DType) -> Result<Tensor> {
        let t = self
            .st
            .load(name, &self.device)
            .map_err(|_| self.missing(name))?;
        Ok(t.to_dtype(dtype)?)
    }
    fn quantized(&self, _name: &str) -> Result<Option<Arc<QTensor>>> {
        Ok(None)
    }
    fn names(&self) -> Vec<String> {
        self.st.tensors().into_iter().map(|(n, _)| n).collect()
    }
    fn device(&self) -> &Device {
        &self.device
    }
}

/// A GGUF file (city96 / llama.cpp layout). Tensors are read on demand.
pub struct GgufStore {
    path: PathBuf,
    content: gguf_file::Content,
    file: Mutex<BufReader<File>>,
    device: Device,
}

const GGML_TYPE_NAMES: &[(u32, &str)] = &[
    (0, "F32"),
    (1, "F16"),
    (2, "Q4_0"),
    (3, "Q4_1"),
    (6, "Q5_0"),
    (7, "Q5_1"),
    (8, "Q8_0"),
    (9, "Q8_1"),
    (10, "Q2_K"),
    (11, "Q3_K"),
    (12, "Q4_K"),
    (13, "Q5_K"),
    (14, "Q6_K"),
    (15, "Q8_K"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (30, "BF16"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
];
const SUPPORTED_GGML: &[u32] = &[0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30];

/// The GGML tensor types the GGUF loader accepts, as `(GGUF type id, ggml's name)` in id order
/// (F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K … Q6_K, BF16). Any other type is refused with
/// [`ModelError::UnsupportedGguf`]. `tests/gguf_dequant.rs` requires a dequantization fixture
/// for each of them.
pub fn supported_ggml_types() -> Vec<(u32, &'static str)> {
    SUPPORTED_GGML
        .iter()
        .map(|&id| {
            let name = GGML_TYPE_NAMES
                .iter()
                .find(|(t, _)| *t == id)
                .map_or("?", |(_, n)| *n);
            (id, name)
        })
        .collect()
}

fn ggml_type_name(t: u32) -> String {
    GGML_TYPE_NAMES
        .iter()
        .find(|(id, _)| *id == t)
        .map(|(_, n)| n.to_string())
        .unwrap_or_else(|| format!("type {t}"))
}

/// Reads the GGUF header far enough to list `(tensor name, ggml type)`; used to name the first
/// tensor of a type candle cannot read (candle's reader only says "unknown dtype").
fn scan_gguf_types<R: Read + Seek>(r: &mut R) -> std::io::Result<Vec<(String, u32)>> {
    fn u32_<R: Read>(r: &mut R) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64_<R: Read>(r: &mut R) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn string<R: Read>(r: &mut R) -> std::io::Result<String> {
        let n = u64_(r)? as usize;
        if n > 1 << 24 {
            return Err(std::io::Error::other("implausible string length"));
        }
        let mut b = vec![0u8; n];
        r.read_exact(&mut b)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }
    fn skip_value<R: Read + Seek>(r: &mut R, ty: u32) -> std::io::Result<()> {
        let fixed = |n: i64, r: &mut R| r.seek(std::io::SeekFrom::Current(n)).map(|_| ());
        match ty {
            0 | 1 | 7 => fixed(1, r),
            2 | 3 => fixed(2, r),
            4..=6 => fixed(4, r),
            10..=12 => fixed(8, r),
            8 => string(r).map(|_| ()),
            9 => {
                let et = u32_(r)?;
                let n = u64_(r)?;
                for _ in 0..n {
                    skip_value(r, et)?;
                }
                Ok(())
            }
            _ => Err(std::io::Error::other(format!("unknown metadata type {ty}"))),
        }
    }
    let magic = u32_(r)?;
    if magic != 0x4655_4747 {
        return Err(std::io::Error::other("not a GGUF file"));
    }
    let version = u32_(r)?;
    let (n_tensors, n_kv) = if version == 1 {
        (u32_(r)? as u64, u32_(r)? as u64)
    } else {
        (u64_(r)?, u64_(r)?)
    };
    for _ in 0..n_kv {
        string(r)?;
        let ty = u32_(r)?;
        skip_value(r, ty)?;
    }
    let mut out = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = string(r)?;
        let nd = u32_(r)?;
        for _ in 0..nd {
            u64_(r)?;
        }
        let ty = u32_(r)?;
        u64_(r)?;
        out.push((name, ty));
    }
    Ok(out)
}

/// What [`inspect_gguf`] found in a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufSummary {
    pub tensors: usize,
    /// Tensor types (candle's names: `Q5K`, `F32`, ...) and how many tensors have each, sorted.
    pub types: Vec<(String, usize)>,
    /// Bytes the header and tensor data need (the file may be longer: alignment padding).
    pub needed_bytes: u64,
}

/// Checks a GGUF file without loading it: the header parses (candle's reader), every tensor type
/// is one this build runs, and the file is long enough for every tensor's data (a truncated
/// download fails here, naming the first tensor that does not fit).
pub fn inspect_gguf(path: &Path) -> Result<GgufSummary> {
    let f = File::open(path).map_err(|e| ModelError::bad_file(path, e))?;
    let len = f
        .metadata()
        .map_err(|e| ModelError::bad_file(path, e))?
        .len();
    let mut reader = BufReader::new(f);
    let types = scan_gguf_types(&mut reader).map_err(|e| ModelError::bad_file(path, e))?;
    if let Some((name, t)) = types.iter().find(|(_, t)| !SUPPORTED_GGML.contains(t)) {
        return Err(ModelError::UnsupportedGguf {
            path: path.to_path_buf(),
            tensor: name.clone(),
            dtype: ggml_type_name(*t),
        });
    }
    reader.rewind()?;
    let content =
        gguf_file::Content::read(&mut reader).map_err(|e| ModelError::bad_file(path, e))?;
    let mut needed = content.tensor_data_offset;
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut infos: Vec<(&String, &gguf_file::TensorInfo)> = content.tensor_infos.iter().collect();
    infos.sort_by_key(|(_, i)| i.offset);
    for (name, info) in infos {
        let dt = info.ggml_dtype;
        let elems = info.shape.elem_count() as u64;
        let block = dt.block_size() as u64;
        if block == 0 || !elems.is_multiple_of(block) {
            return Err(ModelError::bad_file(
                path,
                format!("tensor {name}: {elems} elements do not fill {dt:?} blocks of {block}"),
            ));
        }
        let end = content
            .tensor_data_offset
            .saturating_add(info.offset)
            .saturating_add(elems / block * dt.type_size() as u64);
        if end > len {
            return Err(ModelError::bad_file(
                path,
                format!(
                    "truncated: tensor {name} ends at byte {end} but the file has {len} bytes \
                     (an interrupted download? fetch it again)"
                ),
            ));
        }
        needed = needed.max(end);
        *counts.entry(format!("{dt:?}")).or_default() += 1;
    }
    let mut types: Vec<(String, usize)> = counts.into_iter().collect();
    types.sort();
    Ok(GgufSummary {
        tensors: content.tensor_infos.len(),
        types,
        needed_bytes: needed,
    })
}

impl GgufStore {
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        let f = File::open(path).map_err(|e| ModelError::bad_file(path, e))?;
        let mut reader = BufReader::new(f);
        if let Ok(types) = scan_gguf_types(&mut reader)
            && let Some((name, t)) = types.iter().find(|(_, t)| !SUPPORTED_GGML.contains(t))
        {
            return Err(ModelError::UnsupportedGguf {
                path: path.to_path_buf(),
                tensor: name.clone(),
                dtype: ggml_type_name(*t),
            });
        }
        reader.rewind()?;
        let content =
            gguf_file::Content::read(&mut reader).map_err(|e| ModelError::bad_file(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            file: Mutex::new(reader),
            device: device.clone(),
        })
    }

    fn read(&self, name: &str) -> Result<QTensor> {
        let mut f = self
            .file
            .lock()
            .map_err(|_| ModelError::Weights("GGUF reader lock poisoned".into()))?;
        self.content
            .tensor(&mut *f, name, &self.device)
            .map_err(|e| ModelError::bad_file(&self.path, e))
    }

    pub fn metadata(&self) -> &HashMap<String, gguf_file::Value> {
        &self.content.metadata
    }
}

impl WeightStore for GgufStore {
    fn origin(&self) -> &Path {
        &self.path
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.content
            .tensor_infos
            .get(name)
            .map(|i| i.shape.dims().to_vec())
    }
    fn dense(&self, name: &str, dtype: DType) -> Result<Tensor> {
        if !self.contains(name) {
            return Err(self.missing(name));
        }
        Ok(self.read(name)?.dequantize(&self.device)?.to_dtype(dtype)?)
    }
    fn quantized(&self, name: &str) -> Result<Option<Arc<QTensor>>> {
        match self.content.tensor_infos.get(name) {
            None => Err(self.missing(name)),
            Some(i)
                if matches!(
                    i.ggml_dtype,
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
                ) =>
            {
                Ok(None)
            }
            Some(_) => Ok(Some(Arc::new(self.read(name)?))),
        }
    }
    fn names(&self) -> Vec<String> {
        self.content.tensor_infos.keys().cloned().collect()
    }
    fn device(&self) -> &Device {
        &self.device
    }
}

enum LinearWeight {
    Dense(Tensor),
    /// W8A8 ([`crate::int8`]): int8 weight per output channel, activations quantized per call.
    Int8(Int8Weight),
    Quant {
        q: Arc<QTensor>,
        mm: QMatMul,
        mode: QuantMatmul,
    },
}

/// `y = x·Wᵀ + b` with `W` dense (compute dtype) or GGML-quantized.
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    out_dim: usize,
    dtype: DType,
}

/// Options for building linears from a store.
#[derive(Debug, Clone, Copy)]
pub struct LinearOpts {
    pub dtype: DType,
    pub quant: QuantMatmul,
}

impl Linear {
    pub fn from_dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_dim, _) = weight.dims2()?;
        let dtype = weight.dtype();
        Ok(Self {
            weight: LinearWeight::Dense(weight),
            bias,
            out_dim,
            dtype,
        })
    }

    /// Loads `{prefix}.weight` `[out, in]` (and `{prefix}.bias` `[out]`).
    pub fn load(
        store: &dyn WeightStore,
        prefix: &str,
        out_dim: usize,
        in_dim: usize,
        bias: bool,
        o: LinearOpts,
    ) -> Result<Self> {
        let wname = format!("{prefix}.weight");
        match store.shape(&wname) {
            None => return Err(store.missing(&wname)),
            Some(s) if s != [out_dim, in_dim] => {
                return Err(ModelError::Weights(format!(
                    "{}: {wname} has shape {s:?}, expected [{out_dim}, {in_dim}]",
                    store.origin().display()
                )));
            }
            Some(_) => {}
        }
        let bias = if bias {
            Some(store.get(&format!("{prefix}.bias"), &[out_dim], o.dtype)?)
        } else {
            None
        };
        let weight = match store.quantized(&wname)? {
            Some(q) => {
                let mode = o.quant.resolve(store.device());
                let mm = QMatMul::from_arc(q.clone())?;
                LinearWeight::Quant { q, mm, mode }
            }
            None => LinearWeight::Dense(store.dense(&wname, o.dtype)?),
        };
        Ok(Self {
            weight,
            bias,
            out_dim,
            dtype: o.dtype,
        })
    }

    /// Several linears with the same input stacked along the output dim (e.g. q, k, v).
    pub fn load_cat(
        store: &dyn WeightStore,
        prefixes: &[String],
        outs: &[usize],
        in_dim: usize,
        bias: bool,
        o: LinearOpts,
    ) -> Result<Self> {
        let mut ws = Vec::with_capacity(prefixes.len());
        let mut bs = Vec::with_capacity(prefixes.len());
        for (p, &od) in prefixes.iter().zip(outs) {
            ws.push(store.get(&format!("{p}.weight"), &[od, in_dim], o.dtype)?);
            if bias {
                bs.push(store.get(&format!("{p}.bias"), &[od], o.dtype)?);
            }
        }
        let w = Tensor::cat(&ws, 0)?;
        let b = if bias {
            Some(Tensor::cat(&bs, 0)?)
        } else {
            None
        };
        Self::from_dense(w, b)
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Re-quantizes the weight (dense, or a GGUF weight dequantized to f32) to W8A8 int8
    /// ([`crate::int8`]). CPU only for now; the bias stays in the compute dtype.
    pub fn quantize_int8(&mut self) -> Result<()> {
        let w = match &self.weight {
            LinearWeight::Dense(w) => w.to_dtype(DType::F32)?,
            LinearWeight::Quant { q, .. } => q.dequantize(&q.device())?,
            LinearWeight::Int8(_) => return Ok(()),
        };
        self.weight = LinearWeight::Int8(Int8Weight::quantize(&w)?);
        Ok(())
    }

    /// Whether the weight is W8A8 int8.
    pub fn is_int8(&self) -> bool {
        matches!(self.weight, LinearWeight::Int8(_))
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Counts this linear on `x` ([`accounting`]): `2·rows·out·in`, as int8 ops for candle's
    /// quantized kernels, else as f16/f32 GEMM FLOP (dequantized GGUF weights included).
    fn count(&self, x: &Tensor) -> Result<()> {
        let in_dim = x
            .dims()
            .last()
            .copied()
            .ok_or_else(|| ModelError::InvalidInput("linear on a scalar".into()))?;
        let rows = x.elem_count() / in_dim.max(1);
        match &self.weight {
            LinearWeight::Quant {
                mode: QuantMatmul::Native,
                ..
            } => accounting::int8_gemm(rows, self.out_dim, in_dim),
            LinearWeight::Int8(_) => {
                accounting::int8_gemm(rows, self.out_dim, in_dim);
                // The dynamic activation quantization: the rows read, int8 written.
                accounting::memory_bound(bytes_of(x).saturating_add((rows * in_dim) as u64));
            }
            _ => accounting::gemm(rows, self.out_dim, in_dim),
        }
        Ok(())
    }

    /// `x·Wᵀ` without the bias; output in the compute dtype.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        self.count(x)?;
        self.matmul_uncounted(x)
    }

    fn matmul_uncounted(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&in_dim, lead)) = dims.split_last() else {
            return Err(ModelError::InvalidInput("linear on a scalar".into()));
        };
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        let y = match &self.weight {
            LinearWeight::Dense(w) => x2.to_dtype(w.dtype())?.matmul(&w.t()?)?,
            LinearWeight::Int8(w) => w.matmul(&x2)?,
            LinearWeight::Quant { q, mm, mode } => match mode {
                QuantMatmul::DequantF16 => {
                    let w = q.dequantize_f16(&q.device())?;
                    x2.to_dtype(DType::F16)?.matmul(&w.t()?)?
                }
                QuantMatmul::Native => {
                    let xin = if x2.device().is_cpu() {
                        x2.to_dtype(DType::F32)?
                    } else {
                        x2.clone()
                    };
                    mm.forward(&xin.contiguous()?)?
                }
                QuantMatmul::Dequant | QuantMatmul::Auto => {
                    let w = q.dequantize(&q.device())?.to_dtype(self.dtype)?;
                    x2.to_dtype(self.dtype)?.matmul(&w.t()?)?
                }
            },
        };
        let mut out_dims = lead.to_vec();
        out_dims.push(self.out_dim);
        Ok(y.to_dtype(self.dtype)?.reshape(out_dims)?)
    }

    /// `x·Wᵀ + b` computed in f32 whatever the stored dtype (weights upcast per call).
    pub fn forward_f32(&self, x: &Tensor) -> Result<Tensor> {
        let w = match &self.weight {
            LinearWeight::Dense(w) => w.to_dtype(DType::F32)?,
            LinearWeight::Quant { q, .. } => q.dequantize(&q.device())?,
            LinearWeight::Int8(w) => w.dequantize()?,
        };
        let dims = x.dims().to_vec();
        let Some((&in_dim, lead)) = dims.split_last() else {
            return Err(ModelError::InvalidInput("linear on a scalar".into()));
        };
        let rows: usize = lead.iter().product();
        accounting::gemm(rows, self.out_dim, in_dim);
        let y = x
            .to_dtype(DType::F32)?
            .reshape((rows, in_dim))?
            .matmul(&w.t()?)?;
        let mut out_dims = lead.to_vec();
        out_dims.push(self.out_dim);
        let y = y.reshape(out_dims)?;
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(&b.to_dtype(DType::F32)?)?),
            None => Ok(y),
        }
    }

    /// The weight as a dense tensor in the compute dtype when this linear can run as one fused
    /// cuBLASLt matmul with its bias in the epilogue: CUDA input, f16/bf16 compute dtype, a bias.
    /// GGUF weights are dequantized here (as `matmul` would), except in `Native` mode (MMQ).
    /// `None` keeps the plain path (always on CPU, so CPU results do not depend on this).
    fn fused_weight(&self, x: &Tensor) -> Result<Option<(Tensor, &Tensor)>> {
        let Some(b) = &self.bias else {
            return Ok(None);
        };
        if !x.device().is_cuda()
            || !matches!(self.dtype, DType::F16 | DType::BF16)
            || b.dtype() != self.dtype
        {
            return Ok(None);
        }
        let w = match &self.weight {
            LinearWeight::Dense(w) if w.dtype() == self.dtype => w.clone(),
            LinearWeight::Dense(_) | LinearWeight::Int8(_) => return Ok(None),
            LinearWeight::Quant { q, mode, .. } => match mode {
                QuantMatmul::DequantF16 if self.dtype == DType::F16 => {
                    q.dequantize_f16(&q.device())?
                }
                QuantMatmul::DequantF16 | QuantMatmul::Dequant | QuantMatmul::Auto => {
                    q.dequantize(&q.device())?.to_dtype(self.dtype)?
                }
                QuantMatmul::Native => return Ok(None),
            },
        };
        Ok(Some((w, b)))
    }

    /// `x·Wᵀ + b`. On CUDA in f16/bf16 one cuBLASLt matmul with the bias in its epilogue.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.count(x)?;
        if let Some((w, b)) = self.fused_weight(x)? {
            return Ok(k::linear_bias(&x.to_dtype(self.dtype)?, &w, b)?);
        }
        let y = self.matmul_uncounted(x)?;
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }

    /// `gelu_tanh(x·Wᵀ + b)` (FLUX's MLP input). On CUDA in f16/bf16 the bias and the GELU run in
    /// the cuBLASLt epilogue; otherwise a matmul and the (fused where possible) bias+GELU op.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.count(x)?;
        if let Some((w, b)) = self.fused_weight(x)? {
            return Ok(k::linear_bias_gelu_tanh(&x.to_dtype(self.dtype)?, &w, b)?);
        }
        let h = self.matmul_uncounted(x)?;
        match &self.bias {
            Some(b) => Ok(k::bias_gelu_tanh(&h, b)?),
            None => Ok(h.gelu()?),
        }
    }

    /// The first `n_plain` outputs as `x·Wᵀ + b`, the rest through GELU(tanh): FLUX's single-block
    /// `linear1` (q, k, v | MLP input). On CUDA in f16/bf16 two cuBLASLt matmuls over row views of
    /// the weight, each with its epilogue; otherwise one matmul, split afterwards.
    pub fn forward_split_gelu(&self, x: &Tensor, n_plain: usize) -> Result<(Tensor, Tensor)> {
        self.count(x)?;
        let n_gelu = self.out_dim.checked_sub(n_plain).ok_or_else(|| {
            ModelError::InvalidInput(format!(
                "split at {n_plain} of a linear with {} outputs",
                self.out_dim
            ))
        })?;
        if let Some((w, b)) = self.fused_weight(x)? {
            let x = x.to_dtype(self.dtype)?;
            let plain = k::linear_bias(&x, &w.narrow(0, 0, n_plain)?, &b.narrow(0, 0, n_plain)?)?;
            let gelu = k::linear_bias_gelu_tanh(
                &x,
                &w.narrow(0, n_plain, n_gelu)?,
                &b.narrow(0, n_plain, n_gelu)?,
            )?;
            return Ok((plain, gelu));
        }
        let y = self.matmul_uncounted(x)?;
        let last = y.rank() - 1;
        Ok(match &self.bias {
            Some(b) => (
                y.narrow(last, 0, n_plain)?
                    .broadcast_add(&b.narrow(0, 0, n_plain)?)?,
                k::bias_gelu_tanh(
                    &y.narrow(last, n_plain, n_gelu)?,
                    &b.narrow(0, n_plain, n_gelu)?,
                )?,
            ),
            None => (
                y.narrow(last, 0, n_plain)?,
                y.narrow(last, n_plain, n_gelu)?.gelu()?,
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_scan_names_unsupported_tensor() -> Result<()> {
        // Hand-written GGUF v3 header: one metadata string, two tensors (F16 and IQ4_XS = 23).
        let mut b: Vec<u8> = vec![];
        b.extend(0x4655_4747u32.to_le_bytes());
        b.extend(3u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        let s = |b: &mut Vec<u8>, x: &str| {
            b.extend((x.len() as u64).to_le_bytes());
            b.extend(x.as_bytes());
        };
        s(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        s(&mut b, "flux");
        for (name, ty) in [
            ("img_in.weight", 1u32),
            ("double_blocks.0.img_attn.qkv.weight", 23),
        ] {
            s(&mut b, name);
            b.extend(2u32.to_le_bytes());
            b.extend(256u64.to_le_bytes());
            b.extend(4u64.to_le_bytes());
            b.extend(ty.to_le_bytes());
            b.extend(0u64.to_le_bytes());
        }
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("x.gguf");
        std::fs::write(&p, &b)?;
        match GgufStore::open(&p, &Device::Cpu) {
            Err(ModelError::UnsupportedGguf { tensor, dtype, .. }) => {
                assert_eq!(tensor, "double_blocks.0.img_attn.qkv.weight");
                assert_eq!(dtype, "IQ4_XS");
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("IQ4_XS accepted"),
        }
        Ok(())
    }

    #[test]
    fn quantized_linear_modes_agree() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.1, (64, 256), &dev)?;
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0)?);
        let x = Tensor::randn(0f32, 1.0, (2, 3, 256), &dev)?;
        let wd = q.dequantize(&dev)?;
        let want = x.broadcast_matmul(&wd.t()?)?;
        for mode in [
            QuantMatmul::Dequant,
            QuantMatmul::Native,
            QuantMatmul::DequantF16,
        ] {
            let lin = Linear {
                weight: LinearWeight::Quant {
                    q: q.clone(),
                    mm: QMatMul::from_arc(q.clone())?,
                    mode,
                },
                bias: None,
                out_dim: 64,
                dtype: DType::F32,
            };
            let got = lin.matmul(&x)?;
            let err = ((got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?)
                / want.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 2e-2, "{mode:?}: {err}");
        }
        Ok(())
    }
}
