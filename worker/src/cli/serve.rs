//! `pawfect-worker serve`: run jobs from the queue (see `crate::serve` for the loop).
//!
//! ```text
//! pawfect-worker serve --models DIR --pool NAME --worker-name NAME --http-addr 0.0.0.0:8080
//!     [--allow-root DIR]... [--allow-prefix s3://BUCKET/PREFIX/]... [--no-overwrite]
//!     [--device cpu|cuda] [--dtype f16|bf16|f32] [--drain-timeout 120s]
//! env: PAWFECT_REDIS_URL (rediss:// for TLS), PAWFECT_REDIS_USERNAME, PAWFECT_REDIS_PASSWORD,
//!      PAWFECT_REDIS_CA_FILE (PEM of a private CA), PAWFECT_QUEUE_PREFIX (default pawfect),
//!      PAWFECT_MODEL_VARIANT (q4_0|q4_k_m|q5_k_m|q8_0|bf16), POD_NAME (worker name),
//!      RUST_LOG (default info)
//! ```
//!
//! SIGTERM or SIGINT: stop claiming, finish the current job within `--drain-timeout` or hand it
//! back to the queue, exit 0. A second signal exits at once (the queue gives the job to another
//! worker after the lease).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use pawfect_models::weights::ModelVariant;
use pawfect_queue::QueueConfig;
use tokio::sync::watch;

use super::models::{CaptionArgs, FluxArgs, load_models};
use crate::pipeline::{CropConfig, InputLimits, MaskConfig, MaskSizePolicy, PipelineConfig};
use crate::serve::{self, Loaded, ServeConfig};
use crate::storage::{Cidr, HttpPolicy, ObjectPrefix, StorageConfig};

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (span fields such as the job uid in front of each message).
    #[default]
    Text,
    /// One JSON object per line, with the current span's fields (the job uid).
    Json,
}

/// Installs the global `tracing` subscriber: `RUST_LOG` filter (default `info`), to stderr.
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // Err only when a subscriber is already installed (e.g. twice in one process): keep it.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// Parses `90`, `90s`, `1500ms`, `2m`, `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 90s, 1500ms, 2m)"))?;
    let secs = match unit.trim() {
        "" | "s" => v,
        "ms" => v / 1000.0,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        other => return Err(format!("unknown duration unit {other:?} (ms, s, m, h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A variant as the CRD spells it (`q5_k_m`, any case), in the models library's terms.
pub(crate) fn parse_variant(s: &str) -> Result<ModelVariant, String> {
    let api: pawfect_api::ModelVariant =
        serde_json::from_value(serde_json::Value::String(s.to_ascii_lowercase()))
            .map_err(|_| format!("{s:?}: expected q4_0, q4_k_m, q5_k_m, q8_0 or bf16"))?;
    Ok(crate::pipeline::adapters::model_variant(api))
}

/// Limits and geometry of the pipeline (shared with `inpaint`).
#[derive(Args, Clone, Debug)]
pub struct PipelineArgs {
    /// Most pixels of a photo or mask (decompression-bomb guard).
    #[arg(long, default_value_t = 40_000_000)]
    pub max_pixels: u64,
    /// Most bytes read for one input.
    #[arg(long, default_value_t = 64 << 20)]
    pub max_input_bytes: u64,
    /// A mask whose size differs from the photo's: resize it (same aspect ratio ±2%) or reject it.
    #[arg(long, value_enum, default_value_t = MaskSizePolicy::Resize)]
    pub mask_size_policy: MaskSizePolicy,
    /// Mask dilation radius in pixels (default: long side / 128, in [4, 48]).
    #[arg(long)]
    pub dilate: Option<u8>,
    /// Most crops per photo (a thin mask spread over the frame is split into several).
    #[arg(long, default_value_t = 4)]
    pub max_crops: usize,
    /// Shortest long side of a crop's model input (smaller regions grow for context first).
    #[arg(long, default_value_t = 512)]
    pub crop_min_side: u32,
    /// Longest side of a crop's model input (larger regions are scaled down or split).
    #[arg(long, default_value_t = 1024)]
    pub crop_max_side: u32,
}

impl PipelineArgs {
    pub fn config(&self) -> PipelineConfig {
        // Multiples of 16 (the model's granularity), min ≤ max.
        let side = |v: u32| (v / 16 * 16).clamp(16, 4096);
        let (min_side, max_side) = (side(self.crop_min_side), side(self.crop_max_side));
        PipelineConfig {
            limits: InputLimits {
                max_pixels: self.max_pixels,
                max_bytes: self.max_input_bytes,
                mask_policy: self.mask_size_policy,
                ..InputLimits::default()
            },
            mask: MaskConfig {
                dilate_px: self.dilate,
                ..MaskConfig::default()
            },
            crop: CropConfig {
                max_crops: self.max_crops.max(1),
                min_side,
                max_side: max_side.max(min_side),
                ..CropConfig::default()
            },
            full_frame: false,
            raw_output: false,
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub flux: FluxArgs,
    /// FLUX transformer weights: picks the GGUF file in --models (`bf16`: the diffusers or BFL
    /// weights). --transformer-gguf / --transformer-file win over it.
    #[arg(long, env = "PAWFECT_MODEL_VARIANT", default_value = "q5_k_m", value_parser = parse_variant)]
    pub model_variant: ModelVariant,
    #[command(flatten)]
    pub caption: CaptionArgs,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Queue pool to take jobs from.
    #[arg(long, env = "PAWFECT_POOL", default_value = "default")]
    pub pool: String,
    /// This worker's name, unique in the pool (the pod name).
    #[arg(long, env = "POD_NAME")]
    pub worker_name: String,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    #[arg(
        long,
        env = "PAWFECT_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/"
    )]
    pub redis_url: String,
    /// Redis ACL user (the pool's own user; default: the URL's, else `default`).
    #[arg(long, env = "PAWFECT_REDIS_USERNAME")]
    pub redis_username: Option<String>,
    /// Redis password (kept out of the URL and the logs).
    #[arg(long, env = "PAWFECT_REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,
    /// PEM file of the CA that signed the Redis server's certificate (`rediss://` URLs; default:
    /// the public web roots).
    #[arg(long, env = "PAWFECT_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    #[arg(long, env = "PAWFECT_QUEUE_PREFIX", default_value = "pawfect")]
    pub queue_prefix: String,
    /// A job whose worker stopped heartbeating this long is taken over by another worker.
    #[arg(long, env = "PAWFECT_LEASE", default_value = "60s", value_parser = parse_duration)]
    pub lease: Duration,
    /// On SIGTERM, how long the current job may still run before it is handed back.
    /// Keep it below the pod's terminationGracePeriodSeconds.
    #[arg(long, env = "PAWFECT_DRAIN_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Directories `file://` inputs and outputs may be in (repeatable; none: file:// refused).
    #[arg(long = "allow-root", value_name = "DIR")]
    pub allow_roots: Vec<PathBuf>,
    /// Object-store locations inputs and outputs may be in (repeatable): `s3://bucket/prefix/`,
    /// `gs://bucket`, `az://container/prefix/`. None: s3, gs and az URIs are refused.
    #[arg(long = "allow-prefix", value_name = "URI")]
    pub allow_prefixes: Vec<ObjectPrefix>,
    /// Never replace an existing output: such a job fails (`OutputExists`).
    #[arg(long, env = "PAWFECT_NO_OVERWRITE")]
    pub no_overwrite: bool,
    /// Whole-request limit of http(s) reads.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub http_timeout: Duration,
    /// Allow plain `http://` inputs (default: https only).
    #[arg(long, env = "PAWFECT_HTTP_ALLOW_PLAIN")]
    pub http_allow_plain: bool,
    /// Address ranges http(s) inputs may reach even where they are refused by default
    /// (loopback, private, link-local) or by --http-deny-cidrs; comma-separated CIDRs.
    #[arg(
        long,
        env = "PAWFECT_HTTP_ALLOW_CIDRS",
        value_delimiter = ',',
        value_name = "CIDRS"
    )]
    pub http_allow_cidrs: Vec<Cidr>,
    /// Address ranges http(s) inputs may not reach besides the default ones (the cluster's
    /// pod and service CIDRs); comma-separated.
    #[arg(
        long,
        env = "PAWFECT_HTTP_DENY_CIDRS",
        value_delimiter = ',',
        value_name = "CIDRS"
    )]
    pub http_deny_cidrs: Vec<Cidr>,
    #[arg(long, env = "PAWFECT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The URL with the username and password of the flags (each only where the URL has none).
fn redis_url(url: &str, username: Option<&str>, password: Option<&str>) -> anyhow::Result<String> {
    let username = username.filter(|u| !u.is_empty());
    let password = password.filter(|p| !p.is_empty());
    if username.is_none() && password.is_none() {
        return Ok(url.to_string());
    }
    let mut u = url::Url::parse(url).context("PAWFECT_REDIS_URL is not a URL")?;
    if u.host_str().is_none() {
        anyhow::bail!("PAWFECT_REDIS_URL has no host to put a username or password into");
    }
    if let Some(user) = username.filter(|_| u.username().is_empty()) {
        u.set_username(user)
            .map_err(|()| anyhow::anyhow!("can't put the username into PAWFECT_REDIS_URL"))?;
    }
    if let Some(password) = password.filter(|_| u.password().is_none()) {
        u.set_password(Some(password))
            .map_err(|()| anyhow::anyhow!("can't put the password into PAWFECT_REDIS_URL"))?;
    }
    Ok(u.to_string())
}

pub fn main(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    // The signal handlers come first: from here on a SIGTERM (while logging is set up, the
    // models load or the port is bound) asks for a clean exit instead of killing the process.
    let shutdown = {
        let _in_runtime = runtime.enter();
        install_signal_handlers().context("installing signal handlers")?
    };
    init_tracing(args.log_format);
    let result = runtime.block_on(run(args, shutdown));
    // A shutdown during model loading leaves the loader running on its blocking thread: exit
    // without waiting for it.
    runtime.shutdown_timeout(Duration::from_millis(100));
    result
}

async fn run(args: ServeArgs, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let queue = QueueConfig {
        url: redis_url(
            &args.redis_url,
            args.redis_username.as_deref(),
            args.redis_password.as_deref(),
        )?,
        ca_file: args.redis_ca_file.clone(),
        prefix: args.queue_prefix.clone(),
        lease: args.lease,
        ..QueueConfig::default()
    };
    #[cfg(not(feature = "test-faults"))]
    for var in [serve::TEST_FAULTS_ENV, serve::TEST_FAST_MODEL_ENV] {
        if std::env::var_os(var).is_some() {
            anyhow::bail!(
                "{var} is set, but this binary was built without the test-faults feature (fault injection and the fast model are for tests only)"
            );
        }
    }
    // A workspace build unifies features: `cargo build --release --workspace` turns
    // test-faults on through the end-to-end tests' dependency. An optimized build refuses the
    // variable all the same, so no release binary can inject faults by accident.
    #[cfg(feature = "test-faults")]
    if !cfg!(debug_assertions)
        && (std::env::var_os(serve::TEST_FAULTS_ENV).is_some()
            || std::env::var_os(serve::fast_model::ENV).is_some())
    {
        anyhow::bail!(
            "{} or {} is set, but fault injection and the fast model run only in debug (test) builds",
            serve::TEST_FAULTS_ENV,
            serve::fast_model::ENV
        );
    }
    #[cfg(feature = "test-faults")]
    let faults = match std::env::var(serve::faults::ENV) {
        Ok(spec) => serve::faults::parse(&spec).map_err(anyhow::Error::msg)?,
        Err(_) => Vec::new(),
    };
    let config = ServeConfig {
        pool: args.pool.clone(),
        worker_name: args.worker_name.clone(),
        claim_wait: Duration::from_secs(2).min(args.lease / 2),
        queue,
        storage: StorageConfig {
            allow_roots: args.allow_roots.clone(),
            allow_prefixes: args.allow_prefixes.clone(),
            no_overwrite: args.no_overwrite,
            http_timeout: args.http_timeout,
            http_policy: HttpPolicy {
                allow_plain: args.http_allow_plain,
                allow: args.http_allow_cidrs.clone(),
                deny: args.http_deny_cidrs.clone(),
            },
            ..StorageConfig::default()
        },
        pipeline: args.pipeline.config(),
        drain_timeout: args.drain_timeout,
        model_variant: args.model_variant.as_str().to_string(),
        device: args.flux.device.clone().unwrap_or_else(|| "auto".into()),
        #[cfg(feature = "test-faults")]
        faults: faults.clone(),
    };
    let listener = serve::bind(args.http_addr)
        .await
        .with_context(|| format!("binding {}", args.http_addr))?;
    let (flux, caption, variant) = (args.flux.clone(), args.caption.clone(), args.model_variant);
    let load = move || -> Result<Loaded, String> {
        #[cfg(feature = "test-faults")]
        serve::faults::hold_load(&faults);
        #[cfg(feature = "test-faults")]
        if std::env::var_os(serve::fast_model::ENV).is_some() {
            tracing::warn!(
                "{} is set: no model, masks filled with one colour",
                serve::fast_model::ENV
            );
            return Ok(Loaded {
                models: crate::pipeline::Models {
                    inpainter: std::sync::Arc::new(serve::fast_model::FastInpainter),
                    captioner: None,
                    rules: std::sync::Arc::new(crate::pipeline::adapters::SurfaceRules),
                },
                gpu_memory: None,
            });
        }
        let loaded = load_models(&flux, &caption, Some(variant)).map_err(|e| format!("{e:#}"))?;
        Ok(Loaded {
            gpu_memory: crate::pipeline::adapters::gpu_memory(&loaded.device),
            models: loaded.models,
        })
    };
    serve::run(config, listener, load, shutdown)
        .await
        .map_err(anyhow::Error::from)
}

/// Registers SIGTERM and SIGINT (at once, in the current runtime) and returns the shutdown
/// flag they raise. The first signal asks for a drain; a second one exits at once.
fn install_signal_handlers() -> std::io::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
        let _ = tx.send(true);
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting now");
        std::process::exit(1);
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_go_into_the_url() {
        assert_eq!(
            redis_url("redis://redis:6379/0", None, Some("s3cret")).unwrap(),
            "redis://:s3cret@redis:6379/0"
        );
        assert_eq!(
            redis_url("redis://redis:6379/", None, None).unwrap(),
            "redis://redis:6379/"
        );
        assert_eq!(
            redis_url("redis://:old@redis:6379/", None, Some("new")).unwrap(),
            "redis://:old@redis:6379/"
        );
        assert_eq!(
            redis_url("rediss://redis:6380/", Some("media.t4"), Some("p@ss/w")).unwrap(),
            "rediss://media.t4:p%40ss%2Fw@redis:6380/"
        );
        assert_eq!(
            redis_url("redis://other@redis:6379/", Some("media.t4"), None).unwrap(),
            "redis://other@redis:6379/"
        );
        assert!(redis_url("redis+unix:///run/redis.sock", Some("u"), None).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("810s"), Ok(Duration::from_secs(810)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0.5s"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }

    fn parse(extra: &[&str]) -> Result<ServeArgs, clap::Error> {
        use clap::Parser;
        let mut argv = vec![
            "pawfect-worker",
            "serve",
            "--models",
            "/m",
            "--worker-name",
            "w",
        ];
        argv.extend_from_slice(extra);
        let cli = crate::cli::Cli::try_parse_from(argv)?;
        match cli.command {
            crate::cli::Command::Serve(args) => Ok(*args),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn http_policy_flags() {
        let args = parse(&[]).unwrap();
        assert!(!args.http_allow_plain, "https only by default");
        assert!(args.http_allow_cidrs.is_empty() && args.http_deny_cidrs.is_empty());

        let args = parse(&[
            "--http-allow-plain",
            "--http-allow-cidrs",
            "127.0.0.1/32,10.96.0.0/12",
            "--http-deny-cidrs",
            "203.0.113.0/24",
        ])
        .unwrap();
        assert!(args.http_allow_plain);
        let shown: Vec<String> = args
            .http_allow_cidrs
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(shown, ["127.0.0.1/32", "10.96.0.0/12"]);
        assert_eq!(args.http_deny_cidrs[0].to_string(), "203.0.113.0/24");

        let e = parse(&["--http-allow-cidrs", "10.0.0.0/40"]).unwrap_err();
        assert!(e.to_string().contains("prefix length"), "{e}");
    }

    #[test]
    fn variants_parse() {
        assert_eq!(parse_variant("q4_k_m"), Ok(ModelVariant::Q4KM));
        assert_eq!(parse_variant("BF16"), Ok(ModelVariant::Bf16));
        assert!(parse_variant("q3").is_err());
    }
}
