//! CUDA dispatch: candle custom ops over the kernels in `cuda/*.cu` (compiled to PTX by build.rs).
//!
//! Each `pub(crate) fn` here returns `Ok(None)` when the fused path does not apply (not a CUDA
//! tensor, unsupported dtype or shape), and the caller then runs the reference path.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublaslt::{Activation, CudaBlasLT, Matmul, MatmulConfig};
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, DeviceId, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result,
    Shape, Storage, Tensor,
};

include!(concat!(env!("OUT_DIR"), "/build_cap.rs"));

const ATTN_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
const EW_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx"));
const ATTN_MODULE: &str = "pawfect_attention";
const EW_MODULE: &str = "pawfect_elementwise";

/// Key-tile size and pipeline depth of the attention kernel; must match `cuda/attention.cu`.
const ATTN_BC: usize = if BUILD_COMPUTE_CAP >= 80 { 64 } else { 32 };
const ATTN_STAGES: usize = if BUILD_COMPUTE_CAP >= 80 { 2 } else { 1 };

/// Kernel-name suffix for `dtype`, or `None` where this build has no kernel for it.
fn suffix(dtype: DType, allow_f32: bool) -> Option<&'static str> {
    match dtype {
        DType::F16 => Some("f16"),
        DType::BF16 if BUILD_COMPUTE_CAP >= 80 => Some("bf16"),
        DType::F32 if allow_f32 => Some("f32"),
        _ => None,
    }
}

/// Elements per 16-byte vector.
fn vec_width(dtype: DType) -> usize {
    16 / dtype.size_in_bytes()
}

fn contig(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// `t` with a contiguous last dim and every other stride and the start offset a multiple of
/// `align` elements (copied when it is not).
fn rows_aligned(t: &Tensor, align: usize) -> Result<Tensor> {
    let l = t.layout();
    let st = l.stride();
    let ok = st.last() == Some(&1)
        && l.start_offset().is_multiple_of(align)
        && st[..st.len() - 1].iter().all(|s| s.is_multiple_of(align));
    if ok {
        Ok(t.clone())
    } else if t.is_contiguous() {
        t.copy()
    } else {
        t.contiguous()
    }
}

/// A new output buffer, NaN-filled when [`crate::set_poison_outputs`] is on.
fn alloc_out<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every element is written by the kernel that follows (checked by kernel-check with
    // poisoned buffers).
    let mut out = unsafe { dev.alloc::<T>(n)? };
    if crate::poison_outputs() && n > 0 {
        let stream = dev.cuda_stream();
        let bytes = out.num_bytes();
        let (ptr, _sync) = out.device_ptr_mut(&stream);
        // SAFETY: ptr is a live allocation of `bytes` bytes on this stream.
        unsafe {
            candle_core::cuda_backend::cudarc::driver::result::memset_d8_async(
                ptr,
                0xFF,
                bytes,
                stream.cu_stream(),
            )
        }
        .w()?;
    }
    Ok(out)
}

fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

fn cuda_storage(t: &Tensor) -> Result<(candle_core::StorageRef<'_>, &Layout)> {
    let (s, l) = t.storage_and_layout();
    if !matches!(&*s, Storage::Cuda(_)) {
        candle_core::bail!("pawfect-kernels: expected a CUDA tensor");
    }
    Ok((s, l))
}

fn as_cuda(s: &Storage) -> Result<&CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("pawfect-kernels: expected a CUDA tensor"),
    }
}

macro_rules! by_dtype {
    ($dt:expr, $f:ident ( $($a:expr),* $(,)? )) => {
        match $dt {
            DType::F16 => $f::<half::f16>($($a),*),
            DType::BF16 => $f::<half::bf16>($($a),*),
            DType::F32 => $f::<f32>($($a),*),
            dt => candle_core::bail!("pawfect-kernels: no kernel for {dt:?}"),
        }
    };
}

fn cpu_unsupported(name: &str) -> Result<(CpuStorage, Shape)> {
    candle_core::bail!(
        "{name} runs on CUDA only; on CPU the public function runs the reference path"
    )
}

// ----------------------------------------------------------------------------------------------
// attention

pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
    merged_heads: bool,
) -> Result<Option<Tensor>> {
    if !q.device().is_cuda() {
        return Ok(None);
    }
    let Some(suffix) = suffix(q.dtype(), false) else {
        return Ok(None);
    };
    let d = q.dim(3)?;
    if !matches!(d, 32 | 64 | 128) || v.dim(3)? != d {
        return Ok(None);
    }
    let (q, k, v) = (
        rows_aligned(q, 8)?,
        rows_aligned(k, 8)?,
        rows_aligned(v, 8)?,
    );
    let op = FlashAttn {
        scale_log2: (scale * std::f64::consts::LOG2_E) as f32,
        causal,
        merged_heads,
        suffix,
    };
    Ok(Some(q.apply_op3_no_bwd(&k, &v, &op)?))
}

/// Warps per attention block (16 query rows each); must match `cuda/attention.cu`.
const ATTN_WARPS: u32 = 4;

struct FlashAttn {
    scale_log2: f32,
    causal: bool,
    /// Write `[B, Nq, H·D]` (heads merged) instead of `[B, H, Nq, D]`.
    merged_heads: bool,
    suffix: &'static str,
}

impl CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "pawfect-flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }

    fn cuda_fwd(
        &self,
        sq: &CudaStorage,
        lq: &Layout,
        sk: &CudaStorage,
        lk: &Layout,
        sv: &CudaStorage,
        lv: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        by_dtype!(sq.dtype(), flash_launch(self, sq, lq, sk, lk, sv, lv))
    }
}

fn strides3(l: &Layout) -> Result<[i64; 3]> {
    let s = l.stride();
    if s.len() != 4 || s[3] != 1 {
        candle_core::bail!(
            "pawfect-kernels attention: expected [B, H, N, D] with a contiguous head dim"
        );
    }
    Ok([s[0] as i64, s[1] as i64, s[2] as i64])
}

fn flash_launch<T: CudaDType + DeviceRepr>(
    op: &FlashAttn,
    sq: &CudaStorage,
    lq: &Layout,
    sk: &CudaStorage,
    lk: &Layout,
    sv: &CudaStorage,
    lv: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = sq.device();
    let (b, h, nq, d) = lq.shape().dims4()?;
    let nk = lk.shape().dims4()?.2;
    let (qs, ks, vs) = (strides3(lq)?, strides3(lk)?, strides3(lv)?);
    let (q, k, v) = (view::<T>(sq, lq)?, view::<T>(sk, lk)?, view::<T>(sv, lv)?);
    let name = format!(
        "flash_fwd_{}_d{d}_w{ATTN_WARPS}_{}",
        op.suffix,
        if op.causal { "causal" } else { "full" }
    );
    let func = dev.get_or_load_custom_func(&name, ATTN_MODULE, ATTN_PTX)?;
    let smem = ATTN_STAGES * 2 * ATTN_BC * (d + 8) * 2;
    if smem > 48 * 1024 {
        func.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
    }
    let out = alloc_out::<T>(dev, b * h * nq * d)?;
    let br = 16 * ATTN_WARPS as usize;
    let cfg = LaunchConfig {
        grid_dim: (nq.div_ceil(br) as u32, h as u32, b as u32),
        block_dim: (ATTN_WARPS * 32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let (h_, nq_, nk_) = (h as i32, nq as i32, nk as i32);
    let mut builder = func.builder();
    builder
        .arg(&q)
        .arg(&k)
        .arg(&v)
        .arg(&out)
        .arg(&h_)
        .arg(&nq_)
        .arg(&nk_);
    let (os, shape) = if op.merged_heads {
        (
            [(nq * h * d) as i64, d as i64, (h * d) as i64],
            Shape::from((b, nq, h * d)),
        )
    } else {
        (
            [(h * nq * d) as i64, (nq * d) as i64, d as i64],
            Shape::from((b, h, nq, d)),
        )
    };
    for s in qs.iter().chain(ks.iter()).chain(vs.iter()).chain(os.iter()) {
        builder.arg(s);
    }
    builder.arg(&op.scale_log2);
    // SAFETY: argument list matches the kernel signature in cuda/attention.cu.
    unsafe { builder.launch(cfg) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
}

// ----------------------------------------------------------------------------------------------
// LayerNorm (+ modulation)

/// Vectors (or scalars) per thread in `ln_mod`; must match `cuda/elementwise.cu`.
const LN_NV: usize = 2;

pub(crate) fn layer_norm(
    x: &Tensor,
    m: Option<(&Tensor, &Tensor, bool)>,
    eps: f64,
) -> Result<Option<Tensor>> {
    if !x.device().is_cuda() || x.elem_count() == 0 {
        return Ok(None);
    }
    let Some(suffix) = suffix(x.dtype(), true) else {
        return Ok(None);
    };
    if let Some((sh, sc, _)) = m
        && (sh.dtype() != x.dtype() || sc.dtype() != x.dtype())
    {
        return Ok(None);
    }
    let c = x.dims()[x.rank() - 1];
    let vw = vec_width(x.dtype());
    let x = contig(x)?;
    let mods = match m {
        Some((sh, sc, per_batch)) => Some((contig(sh)?, contig(sc)?, per_batch)),
        None => None,
    };
    let aligned = |t: &Tensor| t.layout().start_offset().is_multiple_of(vw);
    let vec = c.is_multiple_of(vw)
        && aligned(&x)
        && mods
            .as_ref()
            .is_none_or(|(a, b, _)| aligned(a) && aligned(b));
    let per_thread = LN_NV * if vec { vw } else { 1 };
    let threads = c.div_ceil(per_thread).next_multiple_of(32);
    if threads > 1024 {
        return Ok(None);
    }
    let mut op = LnMod {
        eps: eps as f32,
        rows_per_mod: 1,
        mod_stride: 0,
        vec,
        threads: threads as u32,
        suffix,
    };
    match mods {
        None => Ok(Some(x.apply_op1_no_bwd(&op)?)),
        Some((sh, sc, per_batch)) => {
            if per_batch {
                op.rows_per_mod = x.dim(1)? as i32;
                op.mod_stride = c as i64;
            }
            Ok(Some(x.apply_op3_no_bwd(&sh, &sc, &op)?))
        }
    }
}

struct LnMod {
    eps: f32,
    rows_per_mod: i32,
    mod_stride: i64,
    vec: bool,
    threads: u32,
    suffix: &'static str,
}

impl CustomOp1 for LnMod {
    fn name(&self) -> &'static str {
        "pawfect-layer-norm"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(CustomOp1::name(self))
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        by_dtype!(s.dtype(), ln_launch(self, s, l, None))
    }
}

impl CustomOp3 for LnMod {
    fn name(&self) -> &'static str {
        "pawfect-layer-norm-modulate"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(CustomOp3::name(self))
    }
    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        l: &Layout,
        ssh: &CudaStorage,
        lsh: &Layout,
        ssc: &CudaStorage,
        lsc: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        by_dtype!(s.dtype(), ln_launch(self, s, l, Some((ssh, lsh, ssc, lsc))))
    }
}

type ModArgs<'a> = Option<(&'a CudaStorage, &'a Layout, &'a CudaStorage, &'a Layout)>;

fn ln_launch<T: CudaDType + DeviceRepr>(
    op: &LnMod,
    s: &CudaStorage,
    l: &Layout,
    m: ModArgs<'_>,
) -> Result<(CudaStorage, Shape)> {
    let dev = s.device();
    let shape = l.shape().clone();
    let c = shape.dims()[shape.rank() - 1];
    let rows = shape.elem_count() / c;
    let x = view::<T>(s, l)?;
    let name = format!("ln_mod_{}_{}", if op.vec { "v" } else { "s" }, op.suffix);
    let func = dev.get_or_load_custom_func(&name, EW_MODULE, EW_PTX)?;
    let out = alloc_out::<T>(dev, shape.elem_count())?;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (op.threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let (c_, null) = (c as i32, 0u64);
    let mut builder = func.builder();
    builder.arg(&x);
    let mods = match m {
        Some((ssh, lsh, ssc, lsc)) => Some((view::<T>(ssh, lsh)?, view::<T>(ssc, lsc)?)),
        None => None,
    };
    match &mods {
        Some((sh, sc)) => builder.arg(sh).arg(sc),
        None => builder.arg(&null).arg(&null),
    };
    builder
        .arg(&out)
        .arg(&c_)
        .arg(&op.rows_per_mod)
        .arg(&op.mod_stride)
        .arg(&op.eps);
    // SAFETY: argument list matches `ln_mod_*` in cuda/elementwise.cu.
    unsafe { builder.launch(cfg) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
}

// ----------------------------------------------------------------------------------------------
// gated residual

pub(crate) fn gated_residual(
    x: &Tensor,
    gate: &Tensor,
    y: &Tensor,
    per_batch: bool,
    clamp_f16: bool,
) -> Result<Option<Tensor>> {
    if !x.device().is_cuda() || x.elem_count() == 0 {
        return Ok(None);
    }
    let Some(suffix) = suffix(x.dtype(), true) else {
        return Ok(None);
    };
    let c = x.dims()[x.rank() - 1];
    let vw = vec_width(x.dtype());
    let (x, gate, y) = (contig(x)?, contig(gate)?, contig(y)?);
    let aligned = |t: &Tensor| t.layout().start_offset().is_multiple_of(vw);
    let vec = c.is_multiple_of(vw) && aligned(&x) && aligned(&gate) && aligned(&y);
    let (rows_per_gate, gate_stride) = if per_batch {
        (x.dim(1)? as i64, c as i64)
    } else {
        (1, 0)
    };
    let op = GatedRes {
        rows_per_gate,
        gate_stride,
        clamp: (clamp_f16 && x.dtype() == DType::F16) as i32,
        vec,
        suffix,
    };
    Ok(Some(x.apply_op3_no_bwd(&gate, &y, &op)?))
}

struct GatedRes {
    rows_per_gate: i64,
    gate_stride: i64,
    clamp: i32,
    vec: bool,
    suffix: &'static str,
}

impl CustomOp3 for GatedRes {
    fn name(&self) -> &'static str {
        "pawfect-gated-residual"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }
    fn cuda_fwd(
        &self,
        sx: &CudaStorage,
        lx: &Layout,
        sg: &CudaStorage,
        lg: &Layout,
        sy: &CudaStorage,
        ly: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        by_dtype!(sx.dtype(), gated_launch(self, sx, lx, sg, lg, sy, ly))
    }
}

/// Blocks for a one-element-per-thread launch of `n` items with 256 threads each.
fn flat_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn gated_launch<T: CudaDType + DeviceRepr>(
    op: &GatedRes,
    sx: &CudaStorage,
    lx: &Layout,
    sg: &CudaStorage,
    lg: &Layout,
    sy: &CudaStorage,
    ly: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = sx.device();
    let shape = lx.shape().clone();
    let n = shape.elem_count();
    let c = shape.dims()[shape.rank() - 1];
    let (x, g, y) = (view::<T>(sx, lx)?, view::<T>(sg, lg)?, view::<T>(sy, ly)?);
    let vw = if op.vec {
        16 / std::mem::size_of::<T>()
    } else {
        1
    };
    let name = format!("gated_res_{}_{}", if op.vec { "v" } else { "s" }, op.suffix);
    let func = dev.get_or_load_custom_func(&name, EW_MODULE, EW_PTX)?;
    let out = alloc_out::<T>(dev, n)?;
    let (n_, c_) = (n as i64, c as i32);
    let mut builder = func.builder();
    builder.arg(&x).arg(&g).arg(&y).arg(&out).arg(&n_).arg(&c_);
    builder
        .arg(&op.rows_per_gate)
        .arg(&op.gate_stride)
        .arg(&op.clamp);
    // SAFETY: argument list matches `gated_res_*` in cuda/elementwise.cu.
    unsafe { builder.launch(flat_cfg(n / vw)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
}

// ----------------------------------------------------------------------------------------------
// bias + GELU(tanh)

pub(crate) fn bias_gelu(x: &Tensor, bias: &Tensor) -> Result<Option<Tensor>> {
    if !x.device().is_cuda() || x.elem_count() == 0 || bias.dtype() != x.dtype() {
        return Ok(None);
    }
    let Some(suffix) = suffix(x.dtype(), true) else {
        return Ok(None);
    };
    let c = x.dims()[x.rank() - 1];
    let vw = vec_width(x.dtype());
    let (x, bias) = (contig(x)?, contig(bias)?);
    let aligned = |t: &Tensor| t.layout().start_offset().is_multiple_of(vw);
    let vec = c.is_multiple_of(vw) && aligned(&x) && aligned(&bias);
    Ok(Some(x.apply_op2_no_bwd(&bias, &BiasGelu { vec, suffix })?))
}

struct BiasGelu {
    vec: bool,
    suffix: &'static str,
}

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "pawfect-bias-gelu-tanh"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }
    fn cuda_fwd(
        &self,
        sx: &CudaStorage,
        lx: &Layout,
        sb: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        by_dtype!(sx.dtype(), gelu_launch(self, sx, lx, sb, lb))
    }
}

fn gelu_launch<T: CudaDType + DeviceRepr>(
    op: &BiasGelu,
    sx: &CudaStorage,
    lx: &Layout,
    sb: &CudaStorage,
    lb: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = sx.device();
    let shape = lx.shape().clone();
    let n = shape.elem_count();
    let c = shape.dims()[shape.rank() - 1];
    let (x, b) = (view::<T>(sx, lx)?, view::<T>(sb, lb)?);
    let vw = if op.vec {
        16 / std::mem::size_of::<T>()
    } else {
        1
    };
    let name = format!("bias_gelu_{}_{}", if op.vec { "v" } else { "s" }, op.suffix);
    let func = dev.get_or_load_custom_func(&name, EW_MODULE, EW_PTX)?;
    let out = alloc_out::<T>(dev, n)?;
    let (n_, c_) = (n as i64, c as i32);
    let mut builder = func.builder();
    builder.arg(&x).arg(&b).arg(&out).arg(&n_).arg(&c_);
    // SAFETY: argument list matches `bias_gelu_*` in cuda/elementwise.cu.
    unsafe { builder.launch(flat_cfg(n / vw)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
}

// ----------------------------------------------------------------------------------------------
// QK RMSNorm + RoPE

/// Largest head dim of `rms_rope` (4 pairs per lane), and heads per warp; must match
/// `cuda/elementwise.cu`.
const ROPE_MAX_D: usize = 256;
const ROPE_HEADS_PER_WARP: usize = 4;

pub(crate) fn rms_rope(
    x: &Tensor,
    weight: Option<&Tensor>,
    cos: &Tensor,
    sin: &Tensor,
    eps: f64,
) -> Result<Option<Tensor>> {
    if !x.device().is_cuda() || x.elem_count() == 0 {
        return Ok(None);
    }
    let Some(suffix) = suffix(x.dtype(), true) else {
        return Ok(None);
    };
    if x.dim(3)? > ROPE_MAX_D
        || cos.dtype() != DType::F32
        || sin.dtype() != DType::F32
        || weight.is_some_and(|w| w.dtype() != x.dtype())
    {
        return Ok(None);
    }
    let x = rows_aligned(x, 2)?;
    let op = RmsRope {
        // The kernel reads weight pairs as one 2-element load: keep its start even.
        weight: weight.map(|w| rows_aligned(w, 2)).transpose()?,
        cos: contig(cos)?,
        sin: contig(sin)?,
        eps: eps as f32,
        suffix,
    };
    Ok(Some(x.apply_op1_no_bwd(&op)?))
}

struct RmsRope {
    weight: Option<Tensor>,
    cos: Tensor,
    sin: Tensor,
    eps: f32,
    suffix: &'static str,
}

impl CustomOp1 for RmsRope {
    fn name(&self) -> &'static str {
        "pawfect-qk-rmsnorm-rope"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        by_dtype!(s.dtype(), rope_launch(self, s, l))
    }
}

fn rope_launch<T: CudaDType + DeviceRepr>(
    op: &RmsRope,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = s.device();
    let (b, h, n, d) = l.shape().dims4()?;
    let st = l.stride();
    if st[3] != 1 {
        candle_core::bail!("pawfect-kernels rope: the head dim must be contiguous");
    }
    let x = view::<T>(s, l)?;
    let (cs, cl) = cuda_storage(&op.cos)?;
    let (ss, sl) = cuda_storage(&op.sin)?;
    let cosv = view::<f32>(as_cuda(&cs)?, cl)?;
    let sinv = view::<f32>(as_cuda(&ss)?, sl)?;
    let w_guard = op.weight.as_ref().map(cuda_storage).transpose()?;
    let wv = match &w_guard {
        Some((ws, wl)) => Some(view::<T>(as_cuda(ws)?, wl)?),
        None => None,
    };
    let pairs_per_lane = (d / 2).div_ceil(32).next_power_of_two();
    let name = format!("rms_rope_p{pairs_per_lane}_{}", op.suffix);
    let func = dev.get_or_load_custom_func(&name, EW_MODULE, EW_PTX)?;
    let positions = b * n;
    let out = alloc_out::<T>(dev, positions * h * d)?;
    let (h_, n_, d_) = (h as i32, n as i32, d as i32);
    let (sb, sh, sn) = (st[0] as i64, st[1] as i64, st[2] as i64);
    let (positions_, norm, null) = (positions as i64, wv.is_some() as i32, 0u64);
    let mut builder = func.builder();
    builder.arg(&x);
    match &wv {
        Some(w) => builder.arg(w),
        None => builder.arg(&null),
    };
    builder
        .arg(&cosv)
        .arg(&sinv)
        .arg(&out)
        .arg(&h_)
        .arg(&n_)
        .arg(&d_);
    builder
        .arg(&sb)
        .arg(&sh)
        .arg(&sn)
        .arg(&positions_)
        .arg(&op.eps)
        .arg(&norm);
    let cfg = LaunchConfig {
        grid_dim: (
            (positions * h.div_ceil(ROPE_HEADS_PER_WARP)).div_ceil(4) as u32,
            1,
            1,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument list matches `rms_rope_*` in cuda/elementwise.cu.
    unsafe { builder.launch(cfg) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((b, h, n, d)),
    ))
}

// ----------------------------------------------------------------------------------------------
// Linear + bias (+ GELU) through a cuBLASLt epilogue

pub(crate) fn linear(x: &Tensor, w: &Tensor, bias: &Tensor, gelu: bool) -> Result<Option<Tensor>> {
    if !x.device().is_cuda() || x.elem_count() == 0 {
        return Ok(None);
    }
    if suffix(x.dtype(), false).is_none() {
        return Ok(None);
    }
    let dims = x.dims().to_vec();
    let k = dims[dims.len() - 1];
    let n = w.dim(0)?;
    let m = x.elem_count() / k;
    let x2 = contig(x)?.reshape((m, k))?;
    let (w, bias) = (contig(w)?, contig(bias)?);
    let out = x2.apply_op3_no_bwd(&w, &bias, &LtLinear { gelu })?;
    let mut out_dims = dims;
    let last = out_dims.len() - 1;
    out_dims[last] = n;
    Ok(Some(out.reshape(out_dims)?))
}

struct LtLinear {
    gelu: bool,
}

impl CustomOp3 for LtLinear {
    fn name(&self) -> &'static str {
        "pawfect-linear-bias-cublaslt"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }
    fn cuda_fwd(
        &self,
        sx: &CudaStorage,
        lx: &Layout,
        sw: &CudaStorage,
        lw: &Layout,
        sb: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match sx.dtype() {
            DType::F16 => lt_launch::<half::f16>(self, sx, lx, sw, lw, sb, lb),
            DType::BF16 => lt_launch::<half::bf16>(self, sx, lx, sw, lw, sb, lb),
            dt => candle_core::bail!("pawfect-kernels linear: no cuBLASLt path for {dt:?}"),
        }
    }
}

fn lt_err(
    e: candle_core::cuda_backend::cudarc::cublaslt::result::CublasError,
) -> candle_core::Error {
    candle_core::Error::Cuda(format!("cuBLASLt: {e:?}").into())
}

/// One cuBLASLt handle (with its workspace) per device, created on first use.
fn blas_lt(dev: &CudaDevice) -> Result<std::sync::Arc<CudaBlasLT>> {
    type Cache = std::sync::Mutex<Vec<(DeviceId, std::sync::Arc<CudaBlasLT>)>>;
    static CACHE: Cache = std::sync::Mutex::new(Vec::new());
    let mut cache = CACHE
        .lock()
        .map_err(|_| candle_core::Error::Msg("cuBLASLt handle cache poisoned".into()))?;
    if let Some((_, lt)) = cache.iter().find(|(id, _)| *id == dev.id()) {
        return Ok(lt.clone());
    }
    let lt = std::sync::Arc::new(CudaBlasLT::new(dev.cuda_stream()).map_err(lt_err)?);
    cache.push((dev.id(), lt.clone()));
    Ok(lt)
}

fn lt_launch<T: CudaDType + DeviceRepr>(
    op: &LtLinear,
    sx: &CudaStorage,
    lx: &Layout,
    sw: &CudaStorage,
    lw: &Layout,
    sb: &CudaStorage,
    lb: &Layout,
) -> Result<(CudaStorage, Shape)>
where
    CudaBlasLT: Matmul<T>,
{
    let dev = sx.device();
    let (m, k) = lx.shape().dims2()?;
    let (n, _) = lw.shape().dims2()?;
    let (x, w, b) = (view::<T>(sx, lx)?, view::<T>(sw, lw)?, view::<T>(sb, lb)?);
    let mut out = alloc_out::<T>(dev, m * n)?;
    let lt = blas_lt(dev)?;
    // Column-major view: outᵀ [n, m] = w [n, k] · xᵀ [k, m]; w is stored as a k×n column-major
    // matrix, hence transa. The epilogue bias has one entry per row of outᵀ, i.e. per feature.
    let cfg = MatmulConfig {
        transa: true,
        transb: false,
        transc: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        alpha: 1.0,
        lda: k as i64,
        ldb: k as i64,
        beta: 0.0,
        ldc: n as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    let act = op.gelu.then_some(Activation::Gelu);
    // SAFETY: the three views hold m·k, n·k and n elements and `out` m·n, as the config says.
    unsafe { lt.matmul(cfg, &w, &x, &mut out, Some(&b), act.as_ref()) }.map_err(lt_err)?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((m, n)),
    ))
}
